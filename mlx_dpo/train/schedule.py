"""Learning-rate schedules with the semantics of transformers' ``get_scheduler``, and the
optimizer (transformers' ``optim`` names, MLX's implementations).

``lr(s)`` is the rate used by optimizer update number ``s`` (0-based), as MLX's
optimizers call the schedule with the step count before incrementing it:

- warmup: ``lr * s / warmup`` for ``s < warmup``;
- ``linear``: ``lr * (T - s) / (T - warmup)``; ``cosine``: ``lr * max(0, (1 + cos(2 pi c p)) / 2)``
  with ``p = (s - warmup) / (T - warmup)`` and ``c = num_cycles`` (0.5); ``cosine_with_min_lr``:
  that factor ``f`` as ``f (1 - r) + r``, ``r = min_lr_rate`` (or ``min_lr / lr``);
  ``constant`` / ``constant_with_warmup``: ``lr``.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import mlx.core as mx
import mlx.optimizers as optim

from ..config.checks import OPTIMIZERS
from ..config.fields import DPOConfig


def build_schedule(kind: str, learning_rate: float, total_steps: int, warmup_steps: int = 0,
                   kwargs: Optional[dict] = None) -> Callable:
    """The schedule ``lr(s)``; ``kwargs``: ``lr_scheduler_kwargs`` (checked by the config)."""
    kwargs = kwargs or {}
    if kind == "constant":
        warmup_steps = 0
    decay_steps = max(1, total_steps - warmup_steps)
    cycles = float(kwargs.get("num_cycles", 0.5))
    floor = float(kwargs["min_lr"]) / learning_rate if "min_lr" in kwargs else float(kwargs.get("min_lr_rate", 0.0))

    def schedule(step):
        s = mx.array(step, dtype=mx.float32)
        progress = mx.clip((s - warmup_steps) / decay_steps, 0.0, 1.0)
        if kind == "linear":
            factor = 1.0 - progress
        elif kind.startswith("cosine"):
            factor = mx.maximum(0.5 * (1.0 + mx.cos(math.pi * 2.0 * cycles * progress)), 0.0)
            factor = factor * (1.0 - floor) + floor
        else:
            factor = mx.ones_like(progress)
        if warmup_steps > 0:
            factor = mx.where(s < warmup_steps, s / warmup_steps, factor)
        return learning_rate * factor

    return schedule


def build_optimizer(cfg: DPOConfig, schedule: Callable) -> optim.Optimizer:
    """The MLX optimizer of ``cfg.optim`` at ``schedule``, with weight decay 0 (the trainer decays
    decoupled, by transformers' parameter groups) and ``optim_args`` on top of the defaults:
    adafactor as transformers' (no relative step or parameter scaling), lion with the Adam betas."""
    defaults = {
        "adamw": dict(betas=[cfg.adam_beta1, cfg.adam_beta2], eps=cfg.adam_epsilon, bias_correction=True),
        "adafactor": dict(relative_step=False, scale_parameter=False, warmup_init=False),
        "lion": dict(betas=[cfg.adam_beta1, cfg.adam_beta2]),
    }.get(cfg.optim, {})
    cls = getattr(optim, OPTIMIZERS[cfg.optim])
    return cls(learning_rate=schedule, weight_decay=0.0, **{**defaults, **(cfg.optim_args or {})})
