"""Per-sequence reductions of ``(2B, T)`` completion token log-probs (rows [0:B] chosen,
[B:2B] rejected; 0 where ``mask`` is 0): the sequence log-probs the losses compare, the
chosen NLL and the WPO pair weights."""

from __future__ import annotations

import mlx.core as mx


def reduce_logps(token_logps, mask, name, cfg):
    """Reduce ``(2B, T)`` token log-probs (0 where mask == 0; rows [0:B] chosen, [B:2B]
    rejected) to ``(2B,)``:

        sum:   sum_t lp_t
        mean:  sum_t lp_t / n                                   (n = completion tokens)
        ld:    sum_{k <= l_p} lp + ld_alpha * sum_{k > l_p} lp  (LD-DPO, arXiv:2409.06411)

    where k counts completion tokens from 1 and l_p = min(n_chosen, n_rejected) of the pair.
    """
    if name == "sum":
        return token_logps.sum(-1)
    if name == "mean":
        return token_logps.sum(-1) / mx.maximum(mask.sum(-1), 1.0)
    if name == "ld":
        n = mask.sum(-1)
        half = n.shape[0] // 2
        shared = mx.minimum(n[:half], n[half:])
        shared = mx.concatenate([shared, shared])[:, None]
        front = (mx.cumsum(mask, axis=1) <= shared) * mask
        return (token_logps * front).sum(-1) + cfg.ld_alpha * (token_logps * (mask - front)).sum(-1)
    raise ValueError(f"unknown reduction {name!r}")


def chosen_nll(token_logps, mask):
    """Mean cross-entropy over all chosen completion tokens: ``-sum lp[:B] / n_chosen``."""
    B = token_logps.shape[0] // 2
    return -token_logps[:B].sum() / mx.maximum(mask[:B].sum(), 1.0)


def wpo_weights(token_logps, wpo_adjust, mask):
    """WPO (Zhou et al. 2024, arXiv:2406.11827) pair weights, no gradient, ``(B,)``:

        w = min(exp(mean_t (lp - adjust)_chosen + mean_t (lp - adjust)_rejected), 1)
    """
    per_seq = ((token_logps - wpo_adjust) * mask).sum(-1) / mx.maximum(mask.sum(-1), 1.0)
    B = per_seq.shape[0] // 2
    return mx.stop_gradient(mx.minimum(mx.exp(per_seq[:B] + per_seq[B:]), 1.0))


__all__ = ["reduce_logps", "chosen_nll", "wpo_weights"]
