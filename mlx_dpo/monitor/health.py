"""Training-health warnings: the usual ways a DPO run goes wrong, said while it runs.

:class:`HealthMonitor` is a callback that looks at every logged record (window means,
eval results) and warns, one line through ``log`` each, when

- ``chosen_below_reference``: ``rewards/chosen`` < 0 for ``patience`` logging steps in a
  row: the policy's chosen log-prob fell below the reference's (both completions go
  down, the "likelihood displacement" failure);
- ``overfitting``: train accuracy >= 0.99 while eval accuracy < train - 0.2;
- ``loss_at_ln2``: ``|loss - ln 2| < 1e-3`` after warmup for ``patience`` logging steps:
  policy == reference, no learning signal;
- ``margins_exploding``: ``|rewards/margins|`` > ``margin_limit`` (20 reward units: the
  sigmoid loss is ~2e-9 there, every pair is saturated and what still grows is drift);
- ``grad_norm_spike``: ``grad_norm`` > 10x the median of the last 20 logged values.

Each kind is said at most once per ``every`` logging steps; a resumed run replays its
history first, so it warns as the run straight through would. The warnings are also added
to the record under ``warnings`` (``{kind: message}``); :func:`~mlx_dpo.monitor.callbacks.default_callbacks`
puts this monitor before the metrics file writer, so they land in ``metrics.jsonl``.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Callable, Dict, Optional

import numpy as np

from .callbacks import TrainerCallback

LN2 = math.log(2.0)


class HealthMonitor(TrainerCallback):
    """Warns about unhealthy training from the logged records (see the module docstring)."""

    def __init__(self, log: Callable[[str], None], warmup_steps: int = 0, warmup_ratio: float = 0.0,
                 patience: int = 3, every: int = 10, margin_limit: float = 20.0, spike_factor: float = 10.0,
                 window: int = 20):
        self.log = log
        self.warmup_steps, self.warmup_ratio = warmup_steps, warmup_ratio
        self.patience, self.every = patience, every
        self.margin_limit, self.spike_factor = margin_limit, spike_factor
        self.grad_norms: deque = deque(maxlen=window)
        self.streaks: Dict[str, int] = {"chosen_below_reference": 0, "loss_at_ln2": 0}
        self.accuracy: Dict[str, float] = {}
        self.last_warned: Dict[str, int] = {}
        self.logged = 0  # logged records seen

    @classmethod
    def from_config(cls, cfg, log: Callable[[str], None]) -> "HealthMonitor":
        return cls(log, warmup_steps=cfg.warmup_steps, warmup_ratio=cfg.warmup_ratio)

    def on_train_begin(self, state) -> None:
        """Fix the warmup; after a resume, replay the logged records (silently), so the
        streaks, medians and rate limits are those of a run straight through."""
        self.warmup_steps = self.warmup_steps or math.ceil(self.warmup_ratio * state.max_steps)
        for record in state.log_history:
            self.logged += 1
            self.check(record)
            for kind in record.get("warnings") or {}:
                self.last_warned[kind] = self.logged

    def on_log(self, state, record: dict) -> None:
        self.logged += 1
        found = self.check(record)
        said = {k: m for k, m in found.items()
                if k not in self.last_warned or self.logged - self.last_warned[k] >= self.every}
        for kind, message in said.items():
            self.last_warned[kind] = self.logged
            self.log(f"warning: step {record.get('step')}: {message} [{kind}]")
        if said:
            record["warnings"] = said

    def check(self, record: dict) -> Dict[str, str]:
        """Every warning this record (with the ones before it) gives, before rate limiting."""
        checks = (self._chosen_below_reference, self._overfitting, self._loss_at_ln2, self._margins, self._grad_spike)
        found = {}
        for check in checks:
            kind_message = check(record)
            if kind_message:
                found[kind_message[0]] = kind_message[1]
        return found

    def _streak(self, kind: str, condition: Optional[bool]) -> bool:
        """Count ``condition`` in a row (``None``: the key is absent, no change); True at ``patience``."""
        if condition is None:
            return False
        self.streaks[kind] = self.streaks[kind] + 1 if condition else 0
        return self.streaks[kind] >= self.patience

    def _chosen_below_reference(self, record: dict):
        chosen = record.get("rewards/chosen")
        if self._streak("chosen_below_reference", None if chosen is None else chosen < 0):
            return ("chosen_below_reference",
                    f"rewards/chosen < 0 for {self.streaks['chosen_below_reference']} logging steps "
                    f"({chosen:.3g}): the chosen log-prob is below the reference's (both completions go down). "
                    "Try rpo_alpha: 1.0 (an NLL term on chosen) or a lower learning_rate")
        return None

    def _overfitting(self, record: dict):
        for key, name in (("rewards/accuracies", "train"), ("eval_rewards/accuracies", "eval")):
            if key in record and record.get("step", 0) > 0:  # not the untrained baseline (eval_on_start)
                self.accuracy[name] = record[key]
        train, evals = self.accuracy.get("train"), self.accuracy.get("eval")
        if train is None or evals is None or train < 0.99 or evals >= train - 0.2:
            return None
        return ("overfitting", f"train accuracy {train:.2f} but eval accuracy {evals:.2f}: overfitting. Try fewer "
                               "steps, a lower learning_rate, a higher beta or more data")

    def _loss_at_ln2(self, record: dict):
        loss = record.get("loss")
        condition = None if loss is None else abs(loss - LN2) < 1e-3 and record.get("step", 0) > self.warmup_steps
        if self._streak("loss_at_ln2", condition):
            return ("loss_at_ln2",
                    f"loss has stayed at ln 2 = 0.6931 for {self.streaks['loss_at_ln2']} logging steps after "
                    "warmup: the policy equals the reference, no learning signal. Check learning_rate is not ~0, "
                    "that adapters are trained (num_layers, lora_target_modules) and that chosen != rejected "
                    "after truncation (max_length, max_prompt_length)")
        return None

    def _margins(self, record: dict):
        margin = record.get("rewards/margins")
        if margin is None or abs(margin) <= self.margin_limit:
            return None
        return ("margins_exploding", f"|rewards/margins| = {abs(margin):.3g} > {self.margin_limit:g}: every pair is "
                                     "saturated and the policy drifts from the reference. Try a lower "
                                     "learning_rate, a higher beta, or stop earlier")

    def _grad_spike(self, record: dict):
        norm = record.get("grad_norm")
        if norm is None:
            return None
        median = float(np.median(self.grad_norms)) if len(self.grad_norms) >= 5 else None
        self.grad_norms.append(norm)
        if median is None or median <= 0 or norm <= self.spike_factor * median:
            return None
        return ("grad_norm_spike", f"grad_norm {norm:.3g} is {norm / median:.0f}x its recent median {median:.3g}: "
                                   "an unstable step. Try a lower learning_rate or max_grad_norm, or look for odd "
                                   "pairs in this window")
