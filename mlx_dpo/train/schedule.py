"""Learning-rate schedules with the semantics of transformers' ``get_scheduler``.

``lr(s)`` is the rate used by optimizer update number ``s`` (0-based), as MLX's
optimizers call the schedule with the step count before incrementing it:

- warmup: ``lr * s / warmup`` for ``s < warmup``;
- ``linear``: ``lr * (T - s) / (T - warmup)``; ``cosine``: ``lr * (1 + cos(pi p)) / 2`` with
  ``p = (s - warmup) / (T - warmup)``; ``constant`` / ``constant_with_warmup``: ``lr``.
"""

from __future__ import annotations

import math
from typing import Callable

import mlx.core as mx


def build_schedule(kind: str, learning_rate: float, total_steps: int, warmup_steps: int = 0) -> Callable:
    if kind == "constant":
        warmup_steps = 0
    decay_steps = max(1, total_steps - warmup_steps)

    def schedule(step):
        s = mx.array(step, dtype=mx.float32)
        progress = mx.clip((s - warmup_steps) / decay_steps, 0.0, 1.0)
        if kind == "linear":
            factor = 1.0 - progress
        elif kind == "cosine":
            factor = 0.5 * (1.0 + mx.cos(math.pi * progress))
        else:
            factor = mx.ones_like(progress)
        if warmup_steps > 0:
            factor = mx.where(s < warmup_steps, s / warmup_steps, factor)
        return learning_rate * factor

    return schedule
