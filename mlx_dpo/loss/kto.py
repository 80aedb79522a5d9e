"""Unpaired losses on thumbs-up / thumbs-down rows, as TRL 1.16's ``KTOTrainer``.

A batch holds ``B`` rows: token log-probs ``(2B, T)`` whose first ``B`` rows are the
completions and last ``B`` the KL completions (``data/unpaired.py``; ``apo_zero_unpaired`` has
none: ``(B, T)``), and ``labels`` ``(B,)`` (1 desirable, 0 undesirable). With
``r = log pi(y|x) - log pi_ref(y|x)`` (summed log-probs):

* the KL reference point ``z = max(0, mean_ranks(mean_batch(log pi(y'|x) - log pi_ref(y'|x))))``
  over the mismatched pairs, under ``stop_gradient`` (TRL: ``.mean().detach()``,
  ``gather_for_metrics(kl).mean().clamp(min=0)``);
* ``kto``: desirable ``w_d (1 - sigmoid(beta (r - z)))``, undesirable ``w_u (1 - sigmoid(beta (z - r)))``;
* ``apo_zero_unpaired``: desirable ``w_d (1 - sigmoid(beta r))``, undesirable ``w_u sigmoid(beta r)`` (no KL);
* the loss is the mean over the rows (each rank's; their mean is the global batch's).

Metrics use TRL's names and values: ``rewards/chosen`` = sum of the desirable rows' rewards
``beta r`` over the ranks / their count (``logps/*``, ``logits/*`` likewise), ``rewards/margins``,
``kl``. A value with no row to average (a batch with one label) is NaN: the loop leaves it out
of its means, as TRL appends nothing.
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx

from ..util import distributed
from .reduce import reduce_logps

UNPAIRED_LOSSES = ("kto", "apo_zero_unpaired")


def is_unpaired(cfg) -> bool:
    """Whether the config's loss trains on unpaired rows."""
    return any(isinstance(name, str) and name in UNPAIRED_LOSSES for name in cfg.loss_types)


def uses_kl(cfg) -> bool:
    """``kto`` estimates the KL reference point; ``apo_zero_unpaired`` does not (TRL's ``calculate_KL``)."""
    return "kto" in cfg.loss_types


def kl_reference_point(kl_logps: mx.array, ref_kl_logps: mx.array, group=None) -> mx.array:
    """``max(0, mean over ranks of the batch mean of kl_logps - ref_kl_logps)``, no gradient."""
    kl = mx.stop_gradient((kl_logps - ref_kl_logps).mean())
    return mx.maximum(distributed.all_mean(kl, group), 0.0)


def unpaired_losses(logratios: mx.array, labels: mx.array, kl, loss_type: str, beta: float,
                    desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> mx.array:
    """Per-row weighted losses (module docstring); ``kl`` is ignored by apo_zero_unpaired."""
    if loss_type == "kto":
        desirable = 1 - mx.sigmoid(beta * (logratios - kl))
        undesirable = 1 - mx.sigmoid(beta * (kl - logratios))
    elif loss_type == "apo_zero_unpaired":
        desirable = 1 - mx.sigmoid(beta * logratios)
        undesirable = mx.sigmoid(beta * logratios)
    else:
        raise ValueError(f"unknown unpaired loss {loss_type!r} (known: {', '.join(UNPAIRED_LOSSES)})")
    return mx.where(labels > 0, desirable_weight * desirable, undesirable_weight * undesirable)


def unpaired_batch_loss(policy: dict, ref: dict, labels: mx.array, cfg, group=None):
    """``(loss, metrics)`` of one batch of unpaired rows (this rank's slice with a ``group``)."""
    if labels is None:
        raise ValueError("unpaired_batch_loss: the batch has no labels (unpaired rows)")
    tl, mask = policy["token_logps"], policy["mask"]
    logps = reduce_logps(tl, mask, "sum", cfg)
    B = labels.shape[0]
    if logps.shape[0] != (2 * B if uses_kl(cfg) else B):
        what = "each row and its KL completion" if uses_kl(cfg) else "the rows only"
        raise ValueError(f"unpaired_batch_loss: {logps.shape[0]} sequences for {B} rows; "
                         f"loss_type {cfg.loss_type} forwards {what}")
    logratios = logps[:B] - ref["sum"][:B]
    kl = kl_reference_point(logps[B:], ref["sum"][B:], group) if uses_kl(cfg) else mx.array(0.0)
    loss = unpaired_losses(logratios, labels, kl, cfg.loss_types[0], cfg.beta, cfg.desirable_weight,
                           cfg.undesirable_weight).mean()
    rewards = mx.stop_gradient(cfg.beta * logratios)
    return loss, unpaired_metrics(rewards, mx.stop_gradient(logps[:B]), labels, policy["logits_sum"][:B],
                                  mask[:B].sum(-1), kl, group)


def unpaired_metrics(rewards, logps, labels, logits_sum, tokens, kl, group=None) -> dict:
    """TRL 1.16's KTO metrics (module docstring): sums and counts over the ranks, then ratios."""
    d, u = labels, 1 - labels
    parts = [(rewards * d).sum(), (rewards * u).sum(), (logps * d).sum(), (logps * u).sum(), d.sum(), u.sum(),
             (mx.stop_gradient(logits_sum) * d).sum(), (tokens * d).sum(), (mx.stop_gradient(logits_sum) * u).sum(),
             (tokens * u).sum()]
    s = distributed.all_sum(mx.stack(parts).astype(mx.float32), group)

    def ratio(total, count):
        return mx.where(count > 0, total / mx.maximum(count, 1.0), mx.array(float("nan")))

    metrics = {"rewards/chosen": ratio(s[0], s[4]), "rewards/rejected": ratio(s[1], s[5]),
               "logps/chosen": ratio(s[2], s[4]), "logps/rejected": ratio(s[3], s[5]),
               "logits/chosen": ratio(s[6], s[7]), "logits/rejected": ratio(s[8], s[9]), "kl": kl}
    metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return metrics


def check_unpaired_config(cfg, batch_size: Optional[int] = None) -> Optional[str]:
    """Why this unpaired config cannot work (None if it can): one unpaired loss alone, with a
    reference, a batch of more than one row for kto's KL estimate (TRL's checks)."""
    if len(cfg.loss_types) > 1:
        return (f"loss_type {cfg.loss_type}: {', '.join(UNPAIRED_LOSSES)} train on unpaired rows and cannot be "
                "mixed with other losses; give one of them alone")
    if cfg.reference_free:
        return f"reference_free cannot be used with loss_type {cfg.loss_type}: its reward needs the reference"
    if uses_kl(cfg) and (batch_size or cfg.batch_size) <= 1:
        return ("loss_type kto needs batch_size > 1: its KL reference point pairs each prompt with another row's "
                "completion in the batch (with one row it equals the row's own reward)")
    if cfg.desirable_weight <= 0 or cfg.undesirable_weight <= 0:
        return "desirable_weight and undesirable_weight must be > 0"
    unused = [k for k in ("label_smoothing", "rpo_alpha", "use_weighting", "ld_alpha", "loss_weights")
              if getattr(cfg, k, None) not in (None, 0, 0.0, False)]
    if unused:
        return f"{unused[0]} has no effect with loss_type {cfg.loss_type} (TRL's KTOTrainer has no such option); remove it"
    return None
