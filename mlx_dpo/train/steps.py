"""The compiled functions of a training step, built over one shared model.

``grad_step(batch, loss_state)``: reference log-probs (precomputed in the batch, or the
same model with adapters off / on the frozen reference copy, under ``stop_gradient``) +
policy forward/backward + loss, returning ``(loss, metrics, new_loss_state, grads,
||grads||^2)``. ``apply_update(grads)``: global-norm clipping + the optimizer update
(decoupled weight decay on :func:`decay_parameter_names` only; LoRA+ scales the B matrices'
updates), returning the pre-clip norm. ``eval_step(batch, loss_state)``: loss and metrics, no
gradients. With a data-parallel ``group`` (:mod:`mlx_dpo.util.distributed`) ``grad_step`` sees this rank's
slice of the global batch and returns the global loss, metrics and averaged gradients (the
same on every rank); ``eval_step`` stays local (every rank evaluates every pair).
All three are ``mx.compile``d with the model, optimizer and RNG state as
implicit inputs/outputs, so a new batch shape re-traces and nothing else does.
"""

from __future__ import annotations

import re
from functools import partial
from typing import Callable, Dict, List, NamedTuple, Optional

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from ..util import distributed
from ..loss import losses
from ..loss.reduce import reduce_logps
from ..config.fields import DPOConfig
from ..forward.logprobs import completion_logps
from ..model.adapters import adapter_mode

# Where the reference log-probs come from: no reference, precomputed (``ref_<reduction>``
# in the batch), or the model itself in an adapter mode.
REFERENCE_SOURCES = (None, "precomputed", "base", "reference")


class Steps(NamedTuple):
    grad_step: Callable
    apply_update: Callable
    eval_step: Callable


def reference_logps(model: nn.Module, batch: Dict[str, mx.array], cfg: DPOConfig, reductions: List[str],
                    source: Optional[str]) -> Optional[Dict[str, mx.array]]:
    """Reduced reference log-probs ``{reduction: (2B,)}`` of ``batch`` from ``source``."""
    if source is None:
        return None
    if source == "precomputed":
        return {r: batch[f"ref_{r}"] for r in reductions}
    with adapter_mode(model, source):
        out = completion_logps(model, batch)
    token_logps = mx.stop_gradient(out["token_logps"])
    return {r: reduce_logps(token_logps, out["mask"], r, cfg) for r in reductions}


# transformers' Trainer.get_decay_parameter_names: no decay for names matching these (lowercase)
NO_DECAY_PATTERNS = (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)")


def decay_parameter_names(model: nn.Module) -> set:
    """Trainable parameters that ``weight_decay`` applies to, as transformers'
    ``get_decay_parameter_names``: all but those of LayerNorm/RMSNorm modules and those whose
    lowercase name matches :data:`NO_DECAY_PATTERNS` (biases and norm weights)."""
    norms = [k + "." for k, m in model.named_modules() if k and isinstance(m, (nn.LayerNorm, nn.RMSNorm))]
    return {k for k, _ in tree_flatten(model.trainable_parameters())
            if not any(re.search(p, k.lower()) for p in NO_DECAY_PATTERNS) and not k.startswith(tuple(norms))}


def _decay(model: nn.Module, before: list, rate: mx.array) -> None:
    """Decoupled weight decay after the Adam step: ``p <- p - rate * p_before`` for the
    ``(name, p_before)`` in ``before`` -- AdamW's ``p (1 - lr wd) - lr adam`` with rate = lr wd."""
    now = dict(tree_flatten(model.trainable_parameters()))
    model.update(tree_unflatten([(k, now[k] - rate.astype(p.dtype) * p) for k, p in before]))


def loraplus_names(model: nn.Module) -> set:
    """The LoRA B matrices (``lora_b``), which LoRA+ trains at ``loraplus_lr_ratio`` x the learning rate."""
    return {k for k, _ in tree_flatten(model.trainable_parameters()) if k.rsplit(".", 1)[-1] == "lora_b"}


def _scale_updates(model: nn.Module, before: list, ratio: float) -> None:
    """LoRA+: ``p <- p_before + ratio (p - p_before)`` for the ``(name, p_before)`` in ``before``: the
    update (weight decay included) at ``ratio`` x the learning rate. Every optimizer here moves a
    parameter by lr x (something its state does not scale with lr), so this is its own update at the
    higher rate, and the state is the same (PEFT's separate parameter group)."""
    now = dict(tree_flatten(model.trainable_parameters()))
    model.update(tree_unflatten([(k, p + ratio * (now[k] - p)) for k, p in before]))


def _keep_where(ok: mx.array, tree, old) -> None:
    """In place: each leaf of ``tree`` (dicts and lists) becomes ``where(ok, leaf, old leaf)``
    (a skipped update leaves the optimizer state, its step count included, as it was)."""
    for k in (tree.keys() if isinstance(tree, dict) else range(len(tree))):
        if isinstance(tree[k], (dict, list)):
            _keep_where(ok, tree[k], old[k])
        elif isinstance(tree[k], mx.array):
            tree[k] = mx.where(ok, tree[k], old[k])


def _grad_sq(grads) -> mx.array:
    return sum(mx.sum(g.astype(mx.float32) ** 2) for _, g in tree_flatten(grads))


def _all_mean(loss: mx.array, metrics: Dict[str, mx.array], group):
    """The loss and metrics averaged over the ranks, in one all-reduce."""
    names = sorted(metrics)
    values = distributed.all_mean(mx.stack([loss, *(metrics[k] for k in names)]).astype(mx.float32), group)
    return values[0], {k: values[i + 1] for i, k in enumerate(names)}


def build_steps(model: nn.Module, optimizer: optim.Optimizer, cfg: DPOConfig, reductions: List[str],
                source: Optional[str], on_trace: Callable[[], None] = lambda: None, group=None) -> Steps:
    """Compile the step functions (see the module docstring). ``on_trace`` runs each time
    ``grad_step`` is traced (a new batch shape); ``group``: the data-parallel group or None."""
    assert source in REFERENCE_SOURCES, source
    state = [model.state, optimizer.state, mx.random.state]
    decayed = decay_parameter_names(model) if cfg.weight_decay else set()
    lora_b = loraplus_names(model) if cfg.loraplus_lr_ratio else set()

    def loss_fn(model, batch, ref, loss_state, group=None):
        policy = completion_logps(model, batch, with_wpo=cfg.use_weighting)
        loss, metrics, new_state = losses.batch_loss(policy, ref, cfg, loss_state, group, batch.get("labels"))
        return loss, (metrics, new_state)

    loss_and_grad = nn.value_and_grad(model, loss_fn)

    @partial(mx.compile, inputs=state, outputs=state)
    def grad_step(batch, loss_state):
        on_trace()  # runs only while tracing
        ref = reference_logps(model, batch, cfg, reductions, source)
        (loss, (metrics, new_state)), grads = loss_and_grad(model, batch, ref, loss_state, group)
        if group is not None and group.size() > 1:
            grads = nn.average_gradients(grads, group=group)
            loss, metrics = _all_mean(loss, metrics, group)
        return loss, metrics, new_state, grads, _grad_sq(grads)

    @partial(mx.compile, inputs=state, outputs=state)
    def apply_update(grads, ok=mx.array(True)):
        old_params, old_opt = model.trainable_parameters(), tree_map(lambda x: x, optimizer.state)
        norm = _update(grads)
        model.update(tree_map(lambda new, old: mx.where(ok, new, old), model.trainable_parameters(), old_params))
        _keep_where(ok, optimizer.state, old_opt)
        return norm

    def _update(grads):
        if cfg.max_grad_norm and cfg.max_grad_norm > 0:
            grads, norm = optim.clip_grad_norm(grads, cfg.max_grad_norm)
        else:
            norm = mx.sqrt(_grad_sq(grads))
        params = tree_flatten(model.trainable_parameters())
        before = [(k, p) for k, p in params if k in decayed]
        optimizer.update(model, grads)  # weight_decay 0: the decay is ours, by parameter group
        if before:
            _decay(model, before, optimizer.learning_rate * cfg.weight_decay)
        if lora_b:
            _scale_updates(model, [(k, p) for k, p in params if k in lora_b], cfg.loraplus_lr_ratio)
        return norm

    @partial(mx.compile, inputs=state)
    def eval_step(batch, loss_state):
        ref = reference_logps(model, batch, cfg, reductions, source)
        loss, (metrics, _) = loss_fn(model, batch, ref, loss_state)
        return loss, metrics

    return Steps(grad_step, apply_update, eval_step)
