"""Shared-prefix forward: each pair's prompt runs once, chosen and rejected attend to it.

Layout (built by ``batching.collate(..., prefix=True)``):

- ``prompt``      (B, P): prompts LEFT-padded, so every prompt ends at column ``P - 1``
- ``prompt_lens`` (B,): real prompt lengths (pad keys are hidden by the mask)
- ``completion``  (2B, T - 1): completions minus their last token, right-padded;
  rows ``[0:B]`` chosen, ``[B:2B]`` rejected of the same pairs

Pass 1 runs the prompts through every block, recording each attention layer's keys
and values. Pass 2 runs the 2B completions at RoPE offset ``P`` against
``[prompt keys | own keys]``; both passes run their queries in chunks (``blocks.py``).
RoPE scores depend on relative positions only, so the left-padding shift changes nothing; gradients reach the prompt through its keys and
values exactly as in the unshared computation. The hidden state of the last prompt
column scores the first completion token; completion column ``j`` scores token ``j + 1``.
"""

from __future__ import annotations

from typing import Dict, Optional, Union

import mlx.core as mx
import mlx.nn as nn

from ..model.architectures import with_feature
from .blocks import embed, per_layer, run_block, standard_blocks, within
from ..model.quant import on_cpu


def supports_prefix_sharing(model: nn.Module) -> bool:
    """An architecture with standard blocks (``blocks.standard_blocks``)."""
    return standard_blocks(model)


def use_prefix_sharing(setting: str, model: nn.Module) -> bool:
    """Resolve ``prefix_sharing: auto|true|false`` for ``model``."""
    ok = supports_prefix_sharing(model)
    if setting == "true" and not ok:
        from ..errors import ConfigError

        supported = ", ".join(sorted(with_feature("prefix_sharing")))
        raise ConfigError(f"prefix_sharing: true is not supported for model_type "
                          f"{getattr(model, 'model_type', '?')!r} (supported: {supported})")
    return ok and setting != "false"


def batch_layout(prefix_sharing: Union[str, bool], padding_free: Union[str, bool], model: nn.Module) -> str:
    """The run's batch layout (``batching.LAYOUTS``): ``packed`` with ``padding_free``
    (``packed.py``; ``auto``: on MLX's CPU backend, for architectures with standard blocks, unless
    ``prefix_sharing`` is false), else ``prefix`` when prefix sharing is on, else ``unshared``."""
    prefix_sharing, padding_free = str(prefix_sharing).lower(), str(padding_free).lower()  # DPOConfig's spelling
    if padding_free == "auto":
        padding_free = str(on_cpu() and prefix_sharing != "false" and supports_prefix_sharing(model)).lower()
    if padding_free == "false":
        return "prefix" if use_prefix_sharing(prefix_sharing, model) else "unshared"
    from ..config.checks import check_layout
    from ..errors import ConfigError

    if not supports_prefix_sharing(model):
        supported = ", ".join(sorted(with_feature("prefix_sharing")))
        raise ConfigError(f"padding_free: true is not supported for model_type "
                          f"{getattr(model, 'model_type', '?')!r} (supported: {supported})")
    check_layout(prefix_sharing, padding_free)
    return "packed"


def prefix_masks(prompt_lens: mx.array, p: int, c: int, reps: int = 2, window: Optional[int] = None):
    """Boolean masks (True = attend; mlx-lm's own convention, exact in every dtype, where an
    additive -1e9 is -inf in float16): prompts (B, 1, P, P) causal with left-pad keys hidden
    (a pad query still sees itself, so no row is empty); completions (reps*B, 1, C, P + C):
    the real prompt keys + causal over the completion. Left padding shifts a whole row, so a
    column difference is a position difference: a sliding ``window`` keeps keys less than
    ``window`` columns back."""
    start = (p - prompt_lens)[:, None, None, None]  # first real prompt column
    qi = mx.arange(p)[:, None]
    kj = mx.arange(p)[None, :]
    prompt_mask = (kj <= qi) & ((kj >= start) | (kj == qi)) & within(qi - kj, window)
    prompt_keys = mx.broadcast_to(kj[None, None] >= start, (prompt_lens.shape[0], 1, c, p))  # (B, 1, C, P)
    prompt_keys = mx.concatenate([prompt_keys] * reps)
    causal = mx.broadcast_to(mx.arange(c)[None, :] <= mx.arange(c)[:, None], (prompt_keys.shape[0], 1, c, c))
    completion_mask = mx.concatenate([prompt_keys, causal], axis=-1)
    if window is not None:  # query column p + i, key column k
        completion_mask = completion_mask & within(p + mx.arange(c)[:, None] - mx.arange(p + c)[None], window)
    return prompt_mask, completion_mask


def shared_prefix_hidden(model: nn.Module, batch: Dict[str, mx.array]) -> mx.array:
    """Final-norm hidden states that score the completion tokens: (2B, T, H),
    row ``r``, column ``j`` scores ``targets[r, j]``."""
    inner = model.model
    prompt, completion, lens = batch["prompt"], batch["completion"], batch["prompt_lens"]
    p, c = prompt.shape[1], completion.shape[1]
    reps = completion.shape[0] // prompt.shape[0]
    masks = per_layer(model, lambda w: prefix_masks(lens, p, c, reps, w), p + c)

    h = embed(model, prompt)
    kvs = []
    for layer, (prompt_mask, _) in zip(inner.layers, masks):
        h, kv = run_block(layer, h, prompt_mask, 0)
        kvs.append(kv)
    last = inner.norm(h[:, -1:])  # scores each pair's first completion token

    h = embed(model, completion)
    for layer, (keys, values), (_, completion_mask) in zip(inner.layers, kvs, masks):  # the prompt's, once per row
        lead = mx.concatenate([keys] * reps), mx.concatenate([values] * reps)
        h, _ = run_block(layer, h, completion_mask, p, lead)
    h = inner.norm(h)
    return mx.concatenate([mx.concatenate([last] * reps), h], axis=1)
