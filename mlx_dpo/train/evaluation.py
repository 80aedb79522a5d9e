"""Evaluation and logging for the training loop: the eval pass over held-out pairs, when it
is due (``eval_strategy``), the best evaluation so far and early stopping (transformers'
``metric_for_best_model`` / ``EarlyStoppingCallback``), and the logged record of a logging
step (TRL / transformers names)."""

from __future__ import annotations

import math
import time
from typing import Callable, Dict, List, Optional

import mlx.core as mx

from ..data.batching import eval_batches
from ..config.fields import DPOConfig
from ..errors import ConfigError
from ..loss import kto
from ..data import TokenizedPair
from ..forward.decode import detokenize, generate_samples
from ..model.adapters import adapter_mode
from ..util.metal import peak_memory_gb, release_cache
from .state import TrainState


def evaluate(model, eval_step: Callable, pairs: List[TokenizedPair], cfg: DPOConfig, collate: Callable,
             to_device: Callable, loss_state: dict, log: Callable[[str], None]) -> Dict[str, float]:
    """Mean loss and metrics (``eval_*``, weighted by pairs) over ``pairs`` (``max_eval_batches``
    batches of them) in inference mode; the model's train/eval mode is left as it was, MLX's buffer cache freed.
    ``collate(pairs, indices)`` pads a batch, ``to_device(batch, "eval")`` makes its arrays."""
    was_training = model.training
    model.eval()
    bs = cfg.eval_batch_size or cfg.batch_size
    totals: Dict[str, float] = {}
    weights: Dict[str, float] = {}
    count, tic, rows = 0, time.perf_counter(), kto.is_unpaired(cfg)  # unpaired rows: TRL's sequential batches
    for indices in eval_batches(pairs, bs, cfg.max_eval_batches, sequential=rows):
        batch = collate(pairs, indices)
        loss, metrics = eval_step(to_device(batch, "eval"), loss_state)
        mx.eval(loss, metrics)
        n = batch.num_pairs
        for k, v in {"loss": loss, **metrics}.items():
            if k == "loss" or not math.isnan(v.item()):  # NaN: no value in this batch (KTO's one-label batches)
                totals[k] = totals.get(k, 0.0) + float(v.item()) * n
                weights[k] = weights.get(k, 0.0) + n
        count += n
    model.train(was_training)
    release_cache()  # the eval batches' buffers: shapes the training step does not reuse
    log(f"evaluation: {count} {'rows' if rows else 'pairs'} in {time.perf_counter() - tic:.1f} s")
    return {f"eval_{k}": v / weights[k] for k, v in totals.items()}


def eval_prompts(pairs: List[TokenizedPair], n: int) -> List[List[int]]:
    """The token ids of the first ``n`` distinct prompts of ``pairs`` (``generate_during_eval``'s)."""
    seen: Dict[tuple, None] = {}
    for pair in pairs:
        seen.setdefault(tuple(pair.prompt), None)
        if len(seen) == n:
            break
    return [list(p) for p in seen]


def completions(model, tokenizer, prompts: List[List[int]], max_tokens: int, modes: Dict[str, str], step: int,
                log: Callable[[str], None]) -> List[dict]:
    """Greedy completions of ``prompts`` by ``model`` in each adapter mode of ``modes`` (``{"policy":
    "policy", "reference": "base"}``), in inference mode, the train/eval mode left as it was: rows of
    ``step``, ``model`` (the key), ``prompt``, ``completion`` and ``tokens``; the cost is logged."""
    from mlx_lm.sample_utils import make_sampler

    was_training, tic, rows = model.training, time.perf_counter(), []
    model.eval()
    texts = [tokenizer.decode(p, skip_special_tokens=True) for p in prompts]
    for name, mode in modes.items():
        with adapter_mode(model, mode):
            tokens, _, _ = generate_samples(model, tokenizer, prompts, 1, make_sampler(0.0), max_tokens, len(prompts))
        rows += [{"step": step, "model": name, "prompt": text, "completion": detokenize(tokenizer, out[0]),
                  "tokens": len(out[0])} for text, out in zip(texts, tokens)]
    model.train(was_training)
    release_cache()
    log(f"completions: {len(prompts)} prompts x {' and '.join(modes)}, {sum(r['tokens'] for r in rows)} tokens in "
        f"{time.perf_counter() - tic:.1f} s")
    return rows


def eval_every(cfg: DPOConfig, steps_per_epoch: int) -> int:
    """Steps between evaluations by ``eval_strategy``: ``eval_steps`` (``steps``), an epoch
    (``epoch``), or 0 (``no``)."""
    if cfg.eval_mode == "no":
        return 0
    return steps_per_epoch if cfg.eval_mode == "epoch" else (cfg.eval_steps or cfg.logging_steps)


def eval_due(cfg: DPOConfig, state: TrainState, steps_per_epoch: int, has_eval: bool) -> bool:
    """Every :func:`eval_every` steps and at the last step; never with ``no`` or without eval pairs."""
    every = eval_every(cfg, steps_per_epoch)
    if not every or not has_eval:
        return False
    return state.step % every == 0 or state.step == state.max_steps


def track_best(cfg: DPOConfig, state: TrainState, metrics: Dict[str, float]) -> bool:
    """Update ``state.best`` with an evaluation's ``metrics`` at ``state.step``; True when
    ``early_stopping_patience`` evaluations in a row have not improved on the best so far by
    more than ``early_stopping_threshold``. As transformers: the best moves on any strict
    improvement, the count resets only on one larger than the threshold."""
    key, best = cfg.best_metric_key, state.best
    if key not in metrics:
        raise ConfigError(f"metric_for_best_model: this run's evaluation has no {key}; it has "
                          f"{', '.join(sorted(metrics))}")
    value, sign = metrics[key], 1.0 if cfg.best_is_greater else -1.0
    better = best.metric is None or sign * (value - best.metric) > 0
    if better and (best.metric is None or abs(value - best.metric) > cfg.early_stopping_threshold):
        best.evals_without_improvement = 0
    else:
        best.evals_without_improvement += 1
    if better:
        best.metric, best.step = value, state.step
    patience = cfg.early_stopping_patience
    return patience is not None and best.evals_without_improvement >= patience


def log_record(cfg: DPOConfig, state: TrainState, learning_rate: float, grad_norm: float, compiled_shapes: int,
               compile_seconds: float) -> Optional[dict]:
    """At a logging step (every ``logging_steps`` and the last): the window's means as a record,
    except ``learning_rate`` and ``grad_norm`` (pre-clip), the logging step's own, as
    transformers' Trainer; ``None`` at other steps."""
    if not (state.step % cfg.logging_steps == 0 or state.step == state.max_steps):
        return None
    record = {"step": state.step, "epoch": round(state.epoch, 4), **state.window.flush(),
              "peak_memory_gb": peak_memory_gb(), "learning_rate": learning_rate, "grad_norm": grad_norm,
              "compiled_shapes": compiled_shapes, "compile_seconds": round(compile_seconds, 3)}
    if cfg.skip_nonfinite_steps:
        record["skipped_steps"] = state.skipped_steps
    return record
