"""Transformer blocks over query chunks: block-causal attention for every batch layout.

A causal attention layer over ``L`` positions scores an ``L x L`` matrix of which half is
masked out (MLX's attention computes it all on the CPU backend, and its backward keeps it).
Run the queries in ``n`` chunks instead, chunk ``j`` attending only to the keys up to its
own end, with the earlier chunks' keys and values kept as in a KV cache's chunked prefill:
``L^2 (n + 1) / (2n)`` scores. Each query sees exactly the keys its mask lets it see, so the
result is the one-pass result. Measured here (34M Llama, 4 x 1024 tokens, forward and
backward, float32; ``benchmarks/chunked_attention.py``): 11.7 s -> 6.5 s with 8 chunks, peak
2.99 -> 2.33 GB.

Blocks are mlx-lm's ``layer(h, mask, cache)``: ``cache.offset`` is read for RoPE before
``cache.update_and_fetch(keys, values)`` returns every key and value to attend to.
"""

from __future__ import annotations

import math
from functools import partial
from typing import List, Optional, Tuple, Union

import mlx.core as mx
import mlx.nn as nn

from ..model.architectures import has_feature, model_type

CHUNK_TOKENS = 128  # measured best on the CPU backend for 640-1024 positions (64: slower, 256: ~5% slower)
MAX_CHUNKS = 8


def chunk_bounds(length: int) -> List[int]:
    """``[0, ..., length]``: ``ceil(length / CHUNK_TOKENS)`` (at most ``MAX_CHUNKS``) near-equal chunks."""
    n = min(MAX_CHUNKS, max(1, math.ceil(length / CHUNK_TOKENS)))
    return [round(length * i / n) for i in range(n + 1)]


class Positions:
    """A RoPE ``offset`` that gives each token its own position: ``pos`` (B, S) int32
    (applied by ``packed.PositionRoPE``)."""

    def __init__(self, pos: mx.array):
        self.pos = pos


class ChunkCache:
    """One layer's keys/values so far: optional leading ones (a shared prompt's), then
    those of each chunk in turn; ``offset`` is set by :func:`_run_chunks` per chunk."""

    def __init__(self, lead: Optional[Tuple[mx.array, mx.array]] = None, cpu_math: bool = False):
        self.kv, self.offset = lead, 0
        self.cpu_math = cpu_math  # attention through cpu_math.py (``enable_cpu_math``)

    def update_and_fetch(self, keys, values):
        if self.kv is not None:
            keys = mx.concatenate([self.kv[0], keys], axis=2)
            values = mx.concatenate([self.kv[1], values], axis=2)
        self.kv = (keys, values)
        return keys, values


Offset = Union[int, mx.array]  # the first RoPE position, or per-token positions (B, L)


def _run_chunks(call, h, mask, offset: Offset, lead, cpu_math: bool = False):
    """``call(h_chunk, mask_chunk, cache)`` over the chunks of ``h`` (N, L, H). ``mask``:
    ``"causal"`` or boolean (N, 1, L, K0 + L) with ``K0`` leading keys. Returns the output
    (N, L, H) and every key/value (leading ones included)."""
    k0 = 0 if lead is None else lead[0].shape[2]
    bounds = chunk_bounds(h.shape[1])
    cache, outs = ChunkCache(lead, cpu_math), []
    for a, b in zip(bounds, bounds[1:]):
        cache.offset = Positions(offset[:, a:b]) if isinstance(offset, mx.array) else offset + a
        chunk_mask = mask if isinstance(mask, str) else mask[..., a:b, : k0 + b]
        outs.append(call(h[:, a:b], chunk_mask, cache))
    return (outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=1)), cache.kv


def run_block(layer: nn.Module, h: mx.array, mask, offset: Offset = 0,
              lead: Optional[Tuple[mx.array, mx.array]] = None):
    """One block over query chunks: ``(output, (keys, values))``. A block wrapped by
    ``gradient_checkpointing`` is checkpointed whole, as a pure function of arrays (the
    keys/values must be outputs of the checkpoint, not leaked tracers)."""
    plain = getattr(type(layer), "plain_call", None)
    cpu_math = getattr(layer, "cpu_math", False)
    if plain is None:
        return _run_chunks(layer, h, mask, offset, lead, cpu_math)
    arrays = [x for x in (mask, offset) if isinstance(x, mx.array)] + list(lead or ())

    def inner(params, h, *arrays):
        layer.update(params)
        rest = list(arrays)
        m = rest.pop(0) if isinstance(mask, mx.array) else mask
        o = rest.pop(0) if isinstance(offset, mx.array) else offset
        out, kv = _run_chunks(partial(plain, layer), h, m, o, tuple(rest) or None, cpu_math)
        return (out, *kv)

    out, *kv = mx.checkpoint(inner)(layer.trainable_parameters(), h, *arrays)
    return out, tuple(kv)


def standard_blocks(model: nn.Module) -> bool:
    """An architecture whose blocks are the standard ones (``model/architectures.py``'s
    ``prefix_sharing`` feature) under ``model.model.{embed_tokens,layers,norm}``:
    ``model.model(x)`` is :func:`embed` -> blocks (causal, or windowed per :func:`layer_windows`)
    -> norm. Layers with another kind of sliding window (``use_sliding``) are not."""
    inner = getattr(model, "model", None)
    return (has_feature(model_type(model), "prefix_sharing") and inner is not None
            and all(hasattr(inner, k) for k in ("embed_tokens", "layers", "norm"))
            and not any(getattr(layer, "use_sliding", False) for layer in inner.layers))


def embed(model: nn.Module, tokens: mx.array) -> mx.array:
    """``model.model``'s input embeddings, scaled as the architecture scales them (Gemma's
    ``sqrt(hidden_size)``, ``model/architectures.py``'s ``embed_scale``)."""
    h = model.model.embed_tokens(tokens)
    scale = has_feature(model_type(model), "embed_scale")
    if not scale:
        return h
    factor = model.args.hidden_size ** 0.5
    if scale == "bf16":  # Gemma 3 rounds the factor to bfloat16 first
        return h * mx.array(factor, mx.bfloat16).astype(h.dtype)
    return h * factor


def layer_windows(model: nn.Module) -> List[Optional[int]]:
    """Each block's sliding window (``None``: global attention). Gemma 3's sliding layers
    (``self_attn.is_sliding``) let a query see the model's last ``window_size`` positions,
    itself included: key ``k`` iff ``q - window < k <= q`` (mlx-lm's and transformers' rule)."""
    inner = model.model
    window = getattr(inner, "window_size", None)
    return [window if window and getattr(layer.self_attn, "is_sliding", False) else None
            for layer in inner.layers]


def within(distance: mx.array, window: Optional[int]) -> mx.array:
    """``distance < window`` (query position minus key position; every key if no window)."""
    return distance < (window if window is not None else 1 << 30)


def _grouped(model: nn.Module, masks):
    """Masks as the attention applies them: Gemma 2 (``array_mask``) scores grouped query heads
    (B, kv_heads, repeats, L, K), so a (B, 1, L, K) mask gets an axis there."""
    if not has_feature(model_type(model), "array_mask") or getattr(model.model.layers[0].self_attn, "repeats", 1) == 1:
        return masks
    if isinstance(masks, tuple):
        return tuple(_grouped(model, m) for m in masks)
    return masks[:, :, None] if isinstance(masks, mx.array) and masks.ndim == 4 else masks


def per_layer(model: nn.Module, make, longest: int) -> list:
    """``make(window)`` (a mask or a tuple of masks) once per distinct window of the blocks (a
    window of ``longest`` positions or more masks nothing: it is built as global), listed per block."""
    windows = [w if w is not None and w < longest else None for w in layer_windows(model)]
    built = {w: _grouped(model, make(w)) for w in dict.fromkeys(windows)}
    return [built[w] for w in windows]


def causal_hidden(model: nn.Module, tokens: mx.array) -> mx.array:
    """``model.model(tokens)`` for an architecture with standard blocks, block-causally."""
    inner = model.model
    length = tokens.shape[1]
    array_mask = has_feature(model_type(model), "array_mask")

    def mask(window):
        if window is None and not array_mask:
            return "causal"
        q, k = mx.arange(length)[:, None], mx.arange(length)[None]
        return (k <= q) & within(q - k, window)

    h = embed(model, tokens)
    for layer, m in zip(inner.layers, per_layer(model, mask, length)):
        h, _ = run_block(layer, h, m)
    return inner.norm(h)
