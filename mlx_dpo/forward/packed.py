"""Padding-free forward (``padding_free: true``): each pair packed into one row.

Row ``i`` of a batch of ``B`` pairs (built by ``batching.collate_packed``) is
``[prompt | chosen[:-1] | rejected[:-1] | padding]``, with per-token

- ``rope_pos`` (B, S): each token's position in its own sequence (the prompt from 0,
  chosen and rejected both from ``len(prompt)``), applied per token by :class:`PositionRoPE`;
- ``branch``   (B, S): 0 prompt, 1 chosen, 2 rejected, 3 padding.

Token ``q`` attends key ``k`` iff ``pos_k <= pos_q`` and (``k`` is a prompt token or in
``q``'s own branch): a block-diagonal causal mask per sequence, so the chosen and rejected
completions see the prompt and themselves only, exactly as in two separate sequences. The
prompt runs once (as with ``prefix_sharing``) and nothing is padded but the row's tail.

TRL's ``padding_free`` flattens the whole batch into one row for FlashAttention's varlen
kernels; MLX's attention is dense over a row, so one pair per row keeps the attention
work at ``sum_i S_i^2`` rather than ``(sum_i S_i)^2``.
"""

from __future__ import annotations

from typing import Dict, Optional

import mlx.core as mx
import mlx.nn as nn

from ..data.batching import PROMPT
from .blocks import Positions, embed, per_layer, run_block, within


class PositionRoPE(nn.Module):
    """Wraps an attention layer's RoPE: an ``int``/array offset passes through unchanged;
    a :class:`Positions` offset rotates token ``(b, s)`` by ``pos[b, s]`` (the row is
    turned into ``B * S`` one-token rows, each with its own offset)."""

    def __init__(self, rope: nn.Module):
        super().__init__()
        self.rope = rope

    def __call__(self, x: mx.array, offset=0) -> mx.array:
        if not isinstance(offset, Positions):
            return self.rope(x, offset=offset)
        b, h, s, d = x.shape
        y = x.transpose(0, 2, 1, 3).reshape(b * s, h, 1, d)
        y = self.rope(y, offset=offset.pos.reshape(-1))
        return y.reshape(b, s, h, d).transpose(0, 2, 1, 3)


def enable_position_rope(model: nn.Module) -> None:
    """Wrap every attention layer's ``rope`` in :class:`PositionRoPE` (idempotent; call it
    before the step functions are compiled: it changes the module tree)."""
    for layer in model.model.layers:
        attn = layer.self_attn
        if not isinstance(attn.rope, PositionRoPE):
            attn.rope = PositionRoPE(attn.rope)


def packed_mask(rope_pos: mx.array, branch: mx.array, window: Optional[int] = None) -> mx.array:
    """(B, 1, S, S) boolean (True = attend): ``pos_k <= pos_q`` and ``k`` in the prompt or
    in ``q``'s branch (and, with a sliding ``window``, ``pos_q - pos_k < window``). A padding
    query sees the padding keys (so no row is empty)."""
    pq, pk = rope_pos[:, :, None], rope_pos[:, None, :]
    bq, bk = branch[:, :, None], branch[:, None, :]
    return ((pk <= pq) & ((bk == PROMPT) | (bk == bq)) & within(pq - pk, window))[:, None]


def packed_hidden(model: nn.Module, batch: Dict[str, mx.array]) -> mx.array:
    """Final-norm hidden states that score the completion tokens: (2B, T, H); ``positions``
    holds flat indices into the ``B * S`` row positions (chosen rows, then rejected)."""
    inner = model.model
    if not isinstance(inner.layers[0].self_attn.rope, PositionRoPE):
        raise RuntimeError("padding_free batches need packed.enable_position_rope(model) first")
    tokens, pos = batch["tokens"], batch["rope_pos"]
    masks = per_layer(model, lambda w: packed_mask(pos, batch["branch"], w), tokens.shape[1])
    h = embed(model, tokens)
    for layer, mask in zip(inner.layers, masks):
        h, _ = run_block(layer, h, mask, pos)
    h = inner.norm(h)
    return h.reshape(-1, h.shape[-1])[batch["positions"]]
