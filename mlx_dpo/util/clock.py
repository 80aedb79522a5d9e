"""Where a run's wall time goes, by phase: the split the done line and ``metrics.jsonl`` report.

- ``startup``: from the ``mlx-dpo`` process's start (imports, model loading, trainer set-up),
  or from the trainer's construction when called from Python, to the first training step,
  data loading and the other phases below excepted;
- ``data``: reading, formatting and tokenizing the data (or loading it from the cache);
- ``precompute``: the reference log-prob pass (``precompute_ref_log_probs``);
- ``compile``: what the training steps that traced a new batch shape took beyond what their
  tokens cost at the run's steady speed (tracing, MLX's graph compilation, kernel JIT);
- ``train``: every other second of the training steps;
- ``eval``: evaluation passes;
- ``save``: checkpoints, adapters and the run's files;
- ``other``: the rest (logging, callbacks, trackers).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Dict, Optional

PHASES = ("startup", "data", "precompute", "compile", "train", "eval", "save", "other")
_process_start: Optional[float] = None


def mark_process_start() -> None:
    """Called first thing by the ``mlx-dpo`` program: the next run's clock starts here."""
    global _process_start
    _process_start = time.perf_counter()


def _take_process_start() -> Optional[float]:
    global _process_start
    start, _process_start = _process_start, None
    return start


class RunClock:
    """Seconds per phase of one run. ``phase(name)`` times a block; the trainer calls
    :meth:`step` with the training steps' own times to split ``compile`` from ``train``."""

    def __init__(self):
        self.start = _take_process_start() or time.perf_counter()
        self.seconds: Dict[str, float] = dict.fromkeys(PHASES, 0.0)
        self.traced = [0.0, 0]  # seconds and tokens of the steps that traced a new shape
        self.steady = [0.0, 0]  # ... and of the others

    @contextmanager
    def phase(self, name: str):
        assert name in PHASES, name
        tic = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - tic

    def started_training(self) -> None:
        """The first training step begins: what is not in a timed phase so far is start-up."""
        if self.seconds["startup"] == 0.0:
            self.seconds["startup"] = time.perf_counter() - self.start - sum(self.seconds.values())

    def step(self, seconds: float, tokens: int, traced: bool) -> None:
        """One optimizer step's wall time and tokens; ``traced``: it compiled a new shape."""
        acc = self.traced if traced else self.steady
        acc[0] += seconds
        acc[1] += tokens

    def compile_seconds(self) -> float:
        """The ``compile`` phase so far: the traced steps' seconds beyond their tokens at the steady
        steps' speed (all of their seconds while no step has run at a known shape yet)."""
        steady_rate = self.steady[1] / self.steady[0] if self.steady[0] > 0 else None
        return max(0.0, self.traced[0] - (self.traced[1] / steady_rate if steady_rate else 0.0))

    def split(self) -> Dict[str, float]:
        """Seconds per phase so far (:data:`PHASES`), rounded to 0.1 s, and ``total``."""
        out = dict(self.seconds)
        out["compile"] = self.compile_seconds()
        out["train"] = self.traced[0] + self.steady[0] - out["compile"]
        out["total"] = time.perf_counter() - self.start
        out["other"] = max(0.0, out["total"] - sum(out[k] for k in PHASES if k != "other"))
        return {k: round(v, 1) for k, v in out.items()}

    def line(self) -> str:
        """``time: 312 s = startup 9, data 2, ...`` (phases of at least 0.1 s)."""
        split = self.split()
        parts = ", ".join(f"{k} {split[k]:.1f}" for k in PHASES if split[k] >= 0.1)
        return f"time: {split['total']:.1f} s = {parts} s"
