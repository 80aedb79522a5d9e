"""Callbacks: whatever watches training (metrics file, console, progress bar, yours).

A callback is any object with some of these methods (missing ones are skipped), as
in transformers' ``TrainerCallback`` / mlx-lm's ``TrainingCallback``::

    on_train_begin(state)            before the first step (after a resume: the resumed state)
    on_step_end(state, metrics)      after every optimizer step (this step's metrics)
    on_log(state, record)            a logged record (window means; also eval results)
    on_evaluate(state, metrics)      after an evaluation (``eval_*`` metrics)
    on_save(state, path)             after a checkpoint was written
    on_completions(state, rows)      after ``generate_during_eval`` (rows: step, model, prompt, completion, tokens)
    on_train_end(state)              after the final save

``state`` is the :class:`~mlx_dpo.train.state.TrainState`; ``state.log_history`` already
holds ``record`` when ``on_log`` runs. Pass your own with
``DPOTrainer(cfg, callbacks=[...])``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Iterable, List, Optional

from ..util.io import open_no_follow

EVENTS = ("on_train_begin", "on_step_end", "on_log", "on_evaluate", "on_save", "on_completions", "on_train_end")
COMPLETIONS_FILE = "completions.jsonl"  # in output_dir, beside metrics.jsonl
CONSOLE_KEYS = ("step", "loss", "rewards/accuracies", "rewards/margins", "eval_loss", "eval_rewards/accuracies",
                "learning_rate", "tokens_per_second", "peak_memory_gb")


class TrainerCallback:
    """Base class with every event as a no-op; subclass and override what you need."""

    def on_train_begin(self, state) -> None: ...
    def on_step_end(self, state, metrics: dict) -> None: ...
    def on_log(self, state, record: dict) -> None: ...
    def on_evaluate(self, state, metrics: dict) -> None: ...
    def on_save(self, state, path: Path) -> None: ...
    def on_completions(self, state, rows: list) -> None: ...
    def on_train_end(self, state) -> None: ...


class CallbackList:
    """Calls an event on every callback that defines it, in order."""

    def __init__(self, callbacks: Iterable = ()):
        self.callbacks: List = list(callbacks)

    def __getattr__(self, event: str) -> Callable:
        if event not in EVENTS:
            raise AttributeError(event)

        def call(*args) -> None:
            for cb in self.callbacks:
                method = getattr(cb, event, None)
                if method is not None:
                    method(*args)

        return call

    def close(self) -> None:
        """Release what a callback holds open (its ``close()``, if it has one); safe to repeat."""
        for cb in self.callbacks:
            getattr(cb, "close", lambda: None)()


def append_jsonl(path: Path, records: Iterable[dict]) -> None:
    with os.fdopen(open_no_follow(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT), "a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records))


class JSONLWriter(TrainerCallback):
    """Appends every logged record to ``metrics.jsonl``, and the completions of
    ``generate_during_eval`` to ``completions.jsonl`` beside it (one JSON object a line)."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def on_log(self, state, record: dict) -> None:
        append_jsonl(self.path, [record])

    def on_completions(self, state, rows: list) -> None:
        append_jsonl(self.path.with_name(COMPLETIONS_FILE), rows)


def format_record(record: dict) -> str:
    parts = []
    for k in CONSOLE_KEYS:
        if k in record:
            v = record[k]
            parts.append(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}")
    return " ".join(parts)


class ConsoleLogger(TrainerCallback):
    """Every logged record as one ``key=value`` line through ``log``."""

    def __init__(self, log: Callable[[str], None]):
        self.log = log

    def on_log(self, state, record: dict) -> None:
        self.log(format_record(record))


class ProgressBar(TrainerCallback):
    """A tqdm bar over the optimizer steps with the latest loss and accuracy."""

    def __init__(self):
        self.bar = None

    def on_train_begin(self, state) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=state.max_steps, initial=state.step, desc="train", dynamic_ncols=True)

    def on_step_end(self, state, metrics: dict) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", acc=f"{metrics.get('rewards/accuracies', 0):.2f}")

    def on_train_end(self, state) -> None:
        self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def console(message: str) -> None:
    """The default ``log``: a line on stdout that does not break a tqdm bar."""
    from tqdm import tqdm

    tqdm.write(str(message))


def default_callbacks(metrics_file: Path, log: Callable, progress_bar: bool, extra: Optional[Iterable] = (),
                      health: Optional[TrainerCallback] = None) -> list:
    """The health monitor (if given: first, so the ``warnings`` it adds to a record are
    written), the metrics file, the console lines, the bar (if on), then the user's callbacks."""
    return [*([health] if health is not None else []), JSONLWriter(metrics_file), ConsoleLogger(log),
            *([ProgressBar()] if progress_bar else []), *(extra or ())]
