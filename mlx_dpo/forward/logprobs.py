"""Per-token log-probabilities of completion tokens, computed without materialising
``batch x length x vocab`` logits.

For sequence ``x`` the token at position ``t`` is scored by the logits at ``t - 1``:
``log p(x_t | x_<t) = z_{t-1}[x_t] - logsumexp(z_{t-1})``. Only the hidden states
that score completion tokens are projected onto the vocabulary, in chunks, with
``logsumexp`` in float32 (and ``mx.checkpoint`` so the backward pass recomputes a
chunk's logits instead of keeping them).
"""

from __future__ import annotations

from functools import partial
from typing import Dict

import mlx.core as mx
import mlx.nn as nn

from ..model.architectures import has_feature, model_type
from .blocks import causal_hidden, standard_blocks
from ..model.quant import base_linear, dequantized_weight, on_cpu

# Keep a chunk's float32 logits under this many elements (256 MB).
MAX_LOGIT_ELEMENTS = 1 << 26


def has_plain_head(model: nn.Module) -> bool:
    """``Model.__call__`` is exactly ``head(model.model(x))`` (``model/architectures.py``)."""
    return has_feature(model_type(model), "plain_head") and hasattr(model, "model")


def project(model: nn.Module, h: mx.array) -> mx.array:
    """Hidden states -> logits through the LM head (tied or not), soft-capped where the model
    caps its logits (Gemma 2's ``final_logit_softcapping``)."""
    if getattr(model.args, "tie_word_embeddings", False) or not hasattr(model, "lm_head"):
        embed = model.model.embed_tokens
        if isinstance(embed, nn.QuantizedEmbedding) and on_cpu():
            logits = h @ dequantized_weight(embed).astype(h.dtype).T
        else:
            logits = embed.as_linear(h)
    else:
        logits = base_linear(model.lm_head, h)
    cap = getattr(model.args, "final_logit_softcapping", None)
    return mx.tanh(logits / cap) * cap if cap else logits


def _score(logits: mx.array, targets: mx.array, with_wpo: bool):
    logits = logits.astype(mx.float32)
    lse = mx.logsumexp(logits, axis=-1)
    token = mx.take_along_axis(logits, targets[..., None], axis=-1)[..., 0] - lse
    out = [token, logits.mean(axis=-1)]
    if with_wpo:  # log sum_v p_v^2, the WPO weight adjustment (arXiv:2406.11827, eq. 2)
        out.append(mx.logsumexp(2.0 * logits, axis=-1) - 2.0 * lse)
    return out


def completion_logps(model: nn.Module, batch: Dict[str, mx.array], with_wpo: bool = False,
                     chunked: bool = True) -> Dict[str, mx.array]:
    """Per-token log-probs of the completion tokens of a ``(2B, L)`` batch (or of the
    shared-prefix layout, see ``prefix.py``, or the packed one, ``packed.py``).

    Returns ``token_logps`` (2B, T) (0 where ``mask`` is 0), ``mask``, ``logits_sum``
    (2B,) = sum over completion tokens of the mean-over-vocab logit, and with
    ``with_wpo`` the per-token ``wpo_adjust`` = ``log sum_v p_v^2``.
    """
    targets, mask = batch["targets"], batch["mask"]
    if "prompt" in batch or "branch" in batch:  # shared-prefix or packed layout: each prompt runs once
        from .packed import packed_hidden
        from .prefix import shared_prefix_hidden

        h = (packed_hidden if "branch" in batch else shared_prefix_hidden)(model, batch)

        def score(h_chunk, t_chunk):
            return _score(project(model, h_chunk), t_chunk, with_wpo)
    elif has_plain_head(model):
        tokens, positions = batch["tokens"], batch["positions"]
        h = causal_hidden(model, tokens) if standard_blocks(model) else model.model(tokens)
        h = mx.take_along_axis(h, positions[..., None], axis=1)  # (2B, T, H): only scoring positions

        def score(h_chunk, t_chunk):
            return _score(project(model, h_chunk), t_chunk, with_wpo)
    else:  # any other architecture: full logits, then pick the scoring positions
        tokens, positions = batch["tokens"], batch["positions"]
        logits = model(tokens)
        h = mx.take_along_axis(logits, positions[..., None], axis=1)

        def score(l_chunk, t_chunk):
            return _score(l_chunk, t_chunk, with_wpo)

    n, t = targets.shape
    vocab = model.args.vocab_size if hasattr(model, "args") and hasattr(model.args, "vocab_size") else 1 << 16
    step = max(1, min(t, MAX_LOGIT_ELEMENTS // max(1, n * vocab))) if chunked else t
    parts = []
    for i in range(0, t, step):
        fn = partial(score, t_chunk=targets[:, i: i + step])  # targets are constants, not inputs
        parts.append((mx.checkpoint(fn) if step < t else fn)(h[:, i: i + step]))
    outs = [mx.concatenate(p, axis=1) if len(p) > 1 else p[0] for p in zip(*parts)]
    result = {
        "token_logps": outs[0] * mask,
        "mask": mask,
        "logits_sum": (outs[1] * mask).sum(axis=-1),
    }
    if with_wpo:
        result["wpo_adjust"] = outs[2] * mask
    return result
