"""The explicit training state: everything that changes while training, besides the
model's weights and the optimizer's state.

``TrainState`` is what :mod:`.checkpoint` saves and restores (with the model, the
optimizer and the global MLX/numpy RNG keys), what callbacks read, and what the
trainer's loop passes along; nothing else carries progress between steps.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

from ..data.batching import SamplerState


@dataclass
class LogWindow:
    """Sums of the metrics of the steps since the last logged record (a logged record
    holds their means, TRL's logging), carried across a resume."""

    sums: Dict[str, float] = field(default_factory=dict)
    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0
    last_eval: Dict[str, float] = field(default_factory=dict)
    counts: Dict[str, int] = field(default_factory=dict)  # values summed per metric (default: steps)

    def add(self, metrics: Dict[str, float], tokens: int, seconds: float,
            counts: Optional[Dict[str, int]] = None) -> None:
        """``counts``: of how many micro-batch values each metric is the mean (1 if absent);
        the window's mean is over those values, as TRL averages what it appended."""
        counts = counts or {}
        for k, v in metrics.items():
            n = counts.get(k, 1)
            self.sums[k] = self.sums.get(k, 0.0) + v * n
            self.counts[k] = self.counts.get(k, 0) + n
        self.steps += 1
        self.tokens += tokens
        self.seconds += seconds

    def flush(self) -> dict:
        """Means over the window and its tokens/s; the window starts again empty."""
        out = {k: v / max(self.counts.get(k, self.steps), 1) for k, v in self.sums.items()}
        out["tokens_per_second"] = self.tokens / max(self.seconds, 1e-9)
        self.sums, self.counts, self.steps, self.tokens, self.seconds = {}, {}, 0, 0, 0.0
        return out

    def to_dict(self) -> dict:
        """The checkpoint's ``log`` entry (format 1 names)."""
        return {"window": dict(self.sums), "steps": self.steps, "tokens": self.tokens, "time": self.seconds,
                "last_eval": dict(self.last_eval), "counts": dict(self.counts)}

    @classmethod
    def from_dict(cls, d: dict) -> "LogWindow":
        return cls(dict(d.get("window", {})), int(d.get("steps", 0)), int(d.get("tokens", 0)),
                   float(d.get("time", 0.0)), dict(d.get("last_eval", {})), dict(d.get("counts", {})))


@dataclass
class BestSoFar:
    """The best evaluation so far by ``metric_for_best_model`` (transformers' ``best_metric`` and
    ``best_global_step``) and the evaluations since one improved on it by more than
    ``early_stopping_threshold`` (transformers' ``early_stopping_patience_counter``)."""

    metric: Optional[float] = None
    step: Optional[int] = None
    evals_without_improvement: int = 0


@dataclass
class TrainState:
    """Progress of a run (transformers' ``TrainerState`` in spirit).

    - ``step``: optimizer steps done; ``max_steps``: the run's total;
    - ``sampler``: position in the batch order (epoch, batches consumed, seed);
    - ``skipped_steps`` / ``consecutive_skips``: non-finite steps skipped (in total / in a row);
    - ``loss_state``: the loss's running state (e.g. BCO's reward mean), MLX arrays;
    - ``window``: the logging window; ``log_history``: every record logged so far;
    - ``best``: the best evaluation so far and the early-stopping count (:class:`BestSoFar`);
    - ``num_batches`` / ``data_fingerprint``: the training data this state walks over
      (a resume refuses other data); ``world_size``: the data-parallel ranks of the run.
    """

    max_steps: int
    num_batches: int
    data_fingerprint: str
    sampler: SamplerState = field(default_factory=SamplerState)
    loss_state: dict = field(default_factory=dict)
    step: int = 0
    skipped_steps: int = 0
    consecutive_skips: int = 0
    window: LogWindow = field(default_factory=LogWindow)
    log_history: List[dict] = field(default_factory=list)
    world_size: int = 1
    best: BestSoFar = field(default_factory=BestSoFar)

    @property
    def epoch(self) -> float:
        """Fractional epoch: batches consumed / batches per epoch."""
        return self.sampler.epoch + self.sampler.index / max(1, self.num_batches)

    def to_json(self) -> dict:
        """The JSON part of a checkpoint (``trainer_state.json`` without format keys)."""
        return {"step": self.step, "skipped_steps": self.skipped_steps, "consecutive_skips": self.consecutive_skips,
                "sampler": asdict(self.sampler), "num_batches": self.num_batches,
                "data_fingerprint": self.data_fingerprint, "log": self.window.to_dict(),
                "world_size": self.world_size, "best": asdict(self.best)}

    def load_json(self, d: dict) -> None:
        """Restore the counters, sampler position and logging window saved by :meth:`to_json`."""
        self.step = int(d["step"])
        self.skipped_steps = int(d["skipped_steps"])
        self.consecutive_skips = int(d.get("consecutive_skips", 0))
        self.sampler = SamplerState(**d["sampler"])
        self.window = LogWindow.from_dict(d.get("log", {}))
        self.best = BestSoFar(**d.get("best", {}))


@dataclass
class TrainResult:
    """What :meth:`DPOTrainer.train` returns: the run directory, the last step, the last
    record's training metrics and evaluation metrics, and every record logged."""

    output_dir: Path
    step: int
    metrics: Dict[str, float] = field(default_factory=dict)
    eval_metrics: Dict[str, float] = field(default_factory=dict)
    history: List[dict] = field(default_factory=list)
