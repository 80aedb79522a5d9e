"""Preference losses at batch level: the registry's metadata, config checks and the
loss the compiled training step calls. The per-pair formulas are in :mod:`.pair_losses`.

* :func:`preference_loss` (:mod:`.pair_losses`, re-exported) -- a pure function on per-sequence
  log-probs with the semantics of TRL 1.16's ``DPOTrainer`` losses, returning
  ``(losses, chosen_rewards, rejected_rewards)``.
* :func:`batch_loss` -- what the compiled training step calls: reduces token log-probs
  (sum / mean / LD-DPO, :mod:`mlx_dpo.loss.reduce`), mixes several losses (MPO), adds NLL terms (RPO, CPO, ORPO),
  WPO weights, and returns the scalar loss, TRL-named metrics and the new loss state.
"""

from __future__ import annotations

import difflib
import functools
import importlib
from typing import Callable, Optional

import mlx.core as mx

from ..util import distributed
from ..errors import ConfigError
from . import kto
from .pair_losses import LOSSES, bco_pair, dpop, preference_loss, sigmoid, update_bco_state
from .reduce import chosen_nll, reduce_logps, wpo_weights


# ---------------------------------------------------------------------------------------------
# Custom losses and loss metadata.
# ---------------------------------------------------------------------------------------------


def resolve_loss(name_or_callable) -> Callable:
    """A callable with :func:`preference_loss`'s signature for a built-in name, a
    ``"pkg.module:function"`` string (imported now) or a callable (returned as is).

    Custom losses are called as ``fn(c, r, rc, rr, beta=..., label_smoothing=...,
    reference_free=..., f_divergence_type=..., f_alpha_divergence_coef=..., discopop_tau=...,
    simpo_gamma=..., lengths=...)`` (``lengths``: chosen / rejected token counts) and must return ``(losses, chosen_rewards, rejected_rewards)``.
    Optional attributes: ``fn.reduction`` ("sum" | "mean" | "ld", default "sum") and
    ``fn.reference_free`` (default False).
    """
    if callable(name_or_callable):
        return name_or_callable
    name = str(name_or_callable)
    if name in LOSSES:
        return functools.partial(preference_loss, loss_type=name)
    if ":" in name:
        module, _, attr = name.partition(":")
        try:
            fn = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"loss_type '{name}': cannot import {attr} from {module} ({e})") from None
        if not callable(fn):
            raise ConfigError(f"loss_type '{name}' is not callable")
        return fn
    close = difflib.get_close_matches(name, sorted(LOSSES), n=1, cutoff=0.0)
    raise ConfigError(
        f"unknown loss_type '{name}'; did you mean '{close[0]}'? "
        f"(known: {', '.join(sorted(LOSSES))}; or 'pkg.module:function' for a custom loss)"
    )


def _info(name_or_callable):
    """(reduction, reference_free, options, nll) of a built-in or custom loss."""
    if isinstance(name_or_callable, str) and name_or_callable in kto.UNPAIRED_LOSSES:
        return "sum", False, (), None  # summed log-probs with a reference (loss/kto.py)
    fn = LOSSES.get(name_or_callable) if isinstance(name_or_callable, str) else None
    if fn is None:
        fn = resolve_loss(name_or_callable)
        return getattr(fn, "reduction", "sum"), getattr(fn, "reference_free", False), None, None
    return fn.reduction, fn.reference_free, fn.options, fn.nll


def _reduction(name, cfg) -> str:
    red = _info(name)[0]
    return "ld" if red == "sum" and getattr(cfg, "ld_alpha", None) is not None else red


def _loss_weights(cfg) -> list:
    return list(cfg.loss_weights) if cfg.loss_weights is not None else [1.0] * len(cfg.loss_types)


def metric_reduction(cfg) -> str:
    """The reduction the logged ``rewards/*`` and ``logps/*`` use, as TRL 1.16: summed (or
    LD-reduced) log-probs whenever a reference is used -- also for ipo/sigmoid_norm, whose loss
    averages per token; for reference-free configs the first loss's own reduction (CPO's
    convention: simpo/orpo average, cpo sums)."""
    if needs_reference(cfg):
        return "ld" if getattr(cfg, "ld_alpha", None) is not None else "sum"
    return _reduction(cfg.loss_types[0], cfg)


def reductions(cfg) -> list:
    """Per-sequence reductions the configured loss(es) and the metrics need, in order: sum,
    mean or ld (LD-DPO replaces "sum" when ``ld_alpha`` is set), then
    :func:`metric_reduction` if no loss uses it. The reference dict passed to
    :func:`batch_loss` must hold these keys."""
    out = []
    for name in cfg.loss_types:
        red = _reduction(name, cfg)
        if red not in out:
            out.append(red)
    if metric_reduction(cfg) not in out:
        out.append(metric_reduction(cfg))
    return out


def needs_reference(cfg) -> bool:
    """False when ``reference_free`` is set or every configured loss is reference-free."""
    return not cfg.reference_free and not all(_info(name)[1] for name in cfg.loss_types)


def init_loss_state(cfg) -> dict:
    """State carried between steps (bco_pair's running reward mean); {} if none is needed."""
    if any(isinstance(n, str) and LOSSES.get(n) is bco_pair for n in cfg.loss_types):
        return {"bco_running_mean": mx.array(0.0), "bco_count": mx.array(0.0)}
    return {}


def trl_notes(cfg) -> list:
    """One line per setting this config uses where mlx-dpo deliberately differs from TRL 1.16
    (it follows the paper there; docs/losses.md, "Differences from TRL")."""
    notes = []
    smoothed = [n for n in cfg.loss_types if isinstance(n, str) and LOSSES.get(n) is sigmoid]
    if cfg.label_smoothing > 0 and smoothed:
        notes.append(f"label_smoothing={cfg.label_smoothing} with {smoothed[0]}: conservative DPO (cDPO, "
                     "Mitchell 2023); TRL >= 0.29 ignores label_smoothing for sigmoid")
    return notes


F_DIVERGENCE_LOSSES = tuple(sorted(n for n, fn in LOSSES.items() if "f_divergence_type" in fn.options))


def validate_loss_config(cfg) -> None:
    """Raise :class:`ConfigError` for loss settings that cannot work together."""
    names = cfg.loss_types
    if not names:
        raise ConfigError("loss_type is empty")
    if len(set(map(str, names))) != len(names):
        raise ConfigError(f"loss_type {names} repeats a name; give each loss once and weight it with loss_weights")
    if cfg.loss_weights is not None and len(cfg.loss_weights) != len(names):
        raise ConfigError(f"loss_weights has {len(cfg.loss_weights)} entries but loss_type has {len(names)}")
    if cfg.beta <= 0:
        raise ConfigError(f"beta must be > 0, got {cfg.beta}")
    if kto.is_unpaired(cfg):
        why = kto.check_unpaired_config(cfg)
        if why:
            raise ConfigError(why)
        return
    ld_alpha = getattr(cfg, "ld_alpha", None)
    if ld_alpha is not None and not 0.0 <= ld_alpha <= 1.0:
        raise ConfigError(f"ld_alpha must be in [0, 1], got {ld_alpha}")
    if (cfg.precompute_ref_log_probs or cfg.reference == "adapter") and not needs_reference(cfg):
        why = "reference_free is set" if cfg.reference_free else f"loss_type {cfg.loss_type} is reference-free"
        if cfg.precompute_ref_log_probs:
            raise ConfigError(f"precompute_ref_log_probs has no effect: {why}, so there is no reference to "
                              "precompute; remove it")
        raise ConfigError(f"reference: adapter has no effect: {why}, so no reference is computed; remove "
                          "reference and ref_adapter_path (or choose a loss with a reference)")
    for name in names:
        resolve_loss(name)  # unknown names and custom imports fail here
        red, _, options, nll = _info(name)
        if red not in ("sum", "mean", "ld"):
            raise ConfigError(f"custom loss {name}: reduction must be sum, mean or ld, got {red!r}")
        if options is None:  # custom: it decides what it uses
            continue
        if cfg.label_smoothing > 0 and "label_smoothing" not in options:
            raise ConfigError(
                f"label_smoothing={cfg.label_smoothing} has no effect with loss_type '{name}'; it applies to "
                "sigmoid (cDPO), robust, exo_pair, aot, aot_unpaired, simpo, cpo"
            )
        if name == "robust" and cfg.label_smoothing >= 0.5:
            raise ConfigError("robust needs label_smoothing < 0.5 (it divides by 1 - 2*label_smoothing)")
        if cfg.f_divergence_type != "reverse_kl" and "f_divergence_type" not in options:
            raise ConfigError(
                f"f_divergence_type={cfg.f_divergence_type} applies to loss_type {', '.join(F_DIVERGENCE_LOSSES)}, "
                f"not '{name}' (as TRL); use f_divergence_type: reverse_kl with it"
            )
        if cfg.use_weighting and name in ("aot", "aot_unpaired", "aot_pair"):
            raise ConfigError(f"use_weighting (WPO) cannot be used with '{name}': it sorts the batch, so its "
                              "losses no longer belong to one pair")
        if ld_alpha is not None and red == "mean":
            raise ConfigError(f"ld_alpha (LD-DPO) reweights summed log-probs; '{name}' uses average log-probs")
        if nll is not None and cfg.rpo_alpha is not None:
            raise ConfigError(f"rpo_alpha adds an NLL term; '{name}' already has one")


# ---------------------------------------------------------------------------------------------
# Batch level: used inside the compiled training step.
# ---------------------------------------------------------------------------------------------


def batch_loss(policy: dict, ref: Optional[dict], cfg, state: dict, group=None, labels=None):
    """Scalar loss, metrics and new state for one batch of B pairs (this rank's slice of the
    global batch when ``group`` is a data-parallel group, see :mod:`mlx_dpo.util.distributed`).

    ``policy``: token_logps, mask (2B, T); logits_sum (2B,); wpo_adjust (2B, T) if use_weighting.
    ``ref``: {reduction: (2B,) reference log-probs} or None when reference-free.

        loss = mean_i( w_i * (sum_k lw_k loss_k,i + rpo_alpha * NLL) ) + sum_k lw_k nll_k * NLL

    with lw = loss_weights, w = WPO weights (1 without use_weighting), nll_k = cpo_alpha (cpo),
    1 (orpo), 0 otherwise; NLL = mean cross-entropy over all chosen completion tokens.
    Rewards are computed once, ``beta * (logps - ref)`` under :func:`metric_reduction` (TRL 1.16),
    whatever the losses (custom ones included) return as rewards.

    With a ``group`` of N ranks each loss sees the gathered global batch (its rows of the
    per-pair losses are kept) and the NLL divides by the global chosen token count (times N),
    so the mean over the ranks of this loss is the single-process loss of the global batch.

    Unpaired losses (kto, apo_zero_unpaired) take the batch's ``labels`` (:mod:`.kto`).
    """
    if kto.is_unpaired(cfg):
        return (*kto.unpaired_batch_loss(policy, ref, labels, cfg, group), dict(state))
    tl, mask = policy["token_logps"], policy["mask"]
    nll = _global_nll(tl, mask, group)
    reference_free = cfg.reference_free or ref is None
    if ref is None and needs_reference(cfg):
        raise ValueError("batch_loss: the configured loss needs reference log-probs (ref is None)")

    reduced, new_state = {}, dict(state)
    n = mx.maximum(mask.sum(-1), 1.0)
    lengths = (n[: n.shape[0] // 2], n[n.shape[0] // 2:])
    pair_loss, extra_loss = 0.0, 0.0
    has_nll = cfg.rpo_alpha is not None
    for name, weight in zip(cfg.loss_types, _loss_weights(cfg)):
        _, ref_free, _, nll_kind = _info(name)
        logps = _pair_logps(tl, mask, _reduction(name, cfg), None if ref_free or reference_free else ref, cfg, reduced)
        losses, _, _, new_state = _one_loss(name, *logps, cfg, reference_free, new_state, lengths, group)
        pair_loss = pair_loss + weight * losses
        if nll_kind is not None:
            has_nll = True
            extra_loss = extra_loss + weight * (cfg.cpo_alpha if nll_kind == "cpo_alpha" else 1.0) * nll

    if cfg.rpo_alpha is not None:
        pair_loss = pair_loss + cfg.rpo_alpha * nll
    if cfg.use_weighting:
        pair_loss = pair_loss * wpo_weights(tl, policy["wpo_adjust"], mask)
    loss = pair_loss.mean() + extra_loss
    red = metric_reduction(cfg)
    c, r, rc, rr = _pair_logps(tl, mask, red, None if reference_free else ref, cfg, reduced)
    metrics = _metrics(cfg.beta * (c - rc), cfg.beta * (r - rr), reduced[red], policy["logits_sum"], mask,
                       nll if has_nll else None, group)
    return loss, metrics, new_state


def _pair_logps(tl, mask, red: str, ref: Optional[dict], cfg, reduced: dict) -> tuple:
    """``(c, r, rc, rr)``, each ``(B,)``, under reduction ``red``; ``rc, rr`` are 0 when
    ``ref`` is None. ``reduced`` caches the policy's reductions across the losses."""
    if red not in reduced:
        reduced[red] = reduce_logps(tl, mask, red, cfg)
    B = tl.shape[0] // 2
    c, r = reduced[red][:B], reduced[red][B:]
    if ref is None:
        return c, r, mx.zeros_like(c), mx.zeros_like(r)
    if red not in ref:
        raise KeyError(f"batch_loss: ref has no '{red}' log-probs; build ref for every name in reductions(cfg)")
    return c, r, ref[red][:B], ref[red][B:]


def _global_nll(tl, mask, group=None):
    """:func:`chosen_nll` with the global chosen token count: ``-N sum lp[:B] / sum_ranks n_chosen``
    (its mean over the N ranks is the NLL of the global batch); the local NLL without ``group``."""
    if group is None or group.size() == 1:
        return chosen_nll(tl, mask)
    B = tl.shape[0] // 2
    count = distributed.all_sum(mx.stop_gradient(mask[:B].sum()), group)
    return -group.size() * tl[:B].sum() / mx.maximum(count, 1.0)


def _one_loss(name, c, r, rc, rr, cfg, reference_free: bool, state: dict, lengths=None, group=None) -> tuple:
    """One loss of the mixture: ``(losses, chosen_rewards, rejected_rewards, state)``;
    bco_pair first moves its running reward mean (the state). ``lengths``: (B,) token counts
    of the chosen / rejected completions (f-divergences on average log-probs need them).
    With a data-parallel ``group`` the loss runs on the gathered global batch and this rank's
    rows are returned (batch-coupled losses see every pair, as one process would)."""
    if group is not None and group.size() > 1:
        c, r, rc, rr = (distributed.gather(x, group) for x in (c, r, rc, rr))
        lengths = tuple(distributed.gather(mx.stop_gradient(n), group) for n in lengths)
        losses, cw, rw, state = _one_loss(name, c, r, rc, rr, cfg, reference_free, state, lengths)
        return (*(distributed.local(x, group) for x in (losses, cw, rw)), state)
    extra = {"simpo_gamma": cfg.simpo_gamma, "lengths": lengths}
    if isinstance(name, str) and LOSSES.get(name) is dpop:
        extra["dpop_lambda"] = cfg.dpop_lambda
    if isinstance(name, str) and LOSSES.get(name) is bco_pair:
        state = update_bco_state(state, cfg.beta * (c - rc), cfg.beta * (r - rr))
        extra["bco_mean"] = state["bco_running_mean"]
    losses, cw, rw = preference_loss(
        c, r, rc, rr, loss_type=name if isinstance(name, str) and name in LOSSES else resolve_loss(name),
        beta=cfg.beta, label_smoothing=cfg.label_smoothing, reference_free=reference_free,
        f_divergence_type=cfg.f_divergence_type, f_alpha_divergence_coef=cfg.f_alpha_divergence_coef,
        discopop_tau=cfg.discopop_tau, **extra,
    )
    return losses, cw, rw, state


def _metrics(chosen_rewards, rejected_rewards, logps, logits_sum, mask, nll=None, group=None) -> dict:
    """TRL's metric names; ``logps`` (2B,) are the :func:`metric_reduction` log-probs, ``logits/*``
    the mean logit per completion token (over the global batch with a ``group``: the mean over
    the ranks of every metric is then the global one); ``nll_loss`` when a loss has an NLL term."""
    sg = mx.stop_gradient
    chosen_rewards, rejected_rewards, logits_sum = sg(chosen_rewards), sg(rejected_rewards), sg(logits_sum)
    B = logps.shape[0] // 2
    metrics = {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).astype(mx.float32).mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": sg(logps[:B]).mean(),
        "logps/rejected": sg(logps[B:]).mean(),
        "logits/chosen": _token_mean(logits_sum[:B].sum(), mask[:B].sum(), group),
        "logits/rejected": _token_mean(logits_sum[B:].sum(), mask[B:].sum(), group),
    }
    if nll is not None:
        metrics["nll_loss"] = sg(nll)
    return metrics


def _token_mean(total, count, group=None):
    """``total / count`` with both summed over the ranks of ``group``."""
    totals = distributed.all_sum(mx.stack([total, count]), group)
    return totals[0] / mx.maximum(totals[1], 1.0)
