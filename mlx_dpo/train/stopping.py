"""How a training run stops early, and what it says: a non-finite step (stop, or skip and count
it), SIGINT/SIGTERM (agreed by every data-parallel rank), a lost peer and out of memory, each
naming the last good checkpoint to resume from."""

from __future__ import annotations

import math
import os
import signal
import threading
from pathlib import Path
from typing import Callable, Optional

import mlx.core as mx

from . import checkpoint
from ..util import distributed
from ..config.fields import DPOConfig
from .state import TrainState
from ..errors import DistributedError, NonFiniteError, TrainingError, TrainingInterrupted

MAX_CONSECUTIVE_SKIPS = 10


def nonfinite_message(step: int, values: dict, grad_norm_sq: float, cfg: DPOConfig) -> str:
    """Which values of step ``step`` are not finite, and the usual causes."""
    bad = [k for k, v in values.items() if not math.isfinite(v)]
    bad += [] if math.isfinite(grad_norm_sq) else ["gradient norm"]
    return (f"step {step}: non-finite {', '.join(bad)} (loss={values['loss']}, grad_norm^2={grad_norm_sq}). "
            f"Likely causes: learning_rate too high ({cfg.learning_rate}), beta too large ({cfg.beta}), or float16 "
            f"overflow (compute_dtype: {cfg.compute_dtype}; use float32 or bfloat16).")


def is_out_of_memory(e: Exception) -> bool:
    text = str(e).lower()
    return any(w in text for w in ("out of memory", "insufficient memory", "unable to allocate", "malloc",
                                   "attempting to allocate"))


def out_of_memory_error(step: int, e: Exception, last_checkpoint: str) -> TrainingError:
    return TrainingError(
        f"step {step}: out of memory ({e}). Try a smaller max_length, gradient_checkpointing: true, quantize: "
        "{bits: 4}, or a new run with a smaller batch_size (and more gradient_accumulation_steps). Last good "
        f"checkpoint: {last_checkpoint}; gradient_checkpointing and compute_dtype may change on --resume.")


def last_checkpoint(output_dir: Path) -> str:
    last = checkpoint.latest_checkpoint(output_dir)
    return f"{last} (resume with --resume)" if last else "none yet"


def skip_nonfinite(state: TrainState, values: dict, grad_norm_sq: float, cfg: DPOConfig, output_dir: Path,
                   log: Callable[[str], None]) -> None:
    """Stop on a non-finite step (:class:`NonFiniteError`), or (``skip_nonfinite_steps``) count
    it in ``state`` and go on; ``MAX_CONSECUTIVE_SKIPS`` in a row stop too."""
    msg = nonfinite_message(state.step + 1, values, grad_norm_sq, cfg)
    if not cfg.skip_nonfinite_steps:
        raise NonFiniteError(msg + f" Last good checkpoint: {last_checkpoint(output_dir)}. "
                             "Set skip_nonfinite_steps: true to skip such steps.")
    state.skipped_steps += 1
    state.consecutive_skips += 1
    if state.consecutive_skips >= MAX_CONSECUTIVE_SKIPS:
        raise NonFiniteError(msg + f" {state.consecutive_skips} steps in a row were non-finite: stopping. "
                             f"Last good checkpoint: {last_checkpoint(output_dir)}.")
    log(msg + f" Skipped ({state.skipped_steps} so far); step {state.step + 1} is retried on the next batches.")


def share_tokens_and_stop(tokens: int, stop: StopSignals, group) -> tuple:
    """Data parallel: every rank's tokens (for tokens/s) and stop signal, summed after the
    step (whose collectives are where a dead peer blocks): ``(global tokens, stopped)``; when
    some rank was signalled, ``stop.signum`` is set on every rank (its own, or the peer's
    SIGINT/SIGTERM), so all ranks stop after the same step."""
    signum = stop.signum or 0
    tokens, total, stopped = distributed.all_sum(mx.array([tokens, signum, int(signum > 0)]), group).tolist()
    if stopped:
        peer = signal.SIGINT if total == signal.SIGINT * stopped else signal.SIGTERM
        stop.signum = signum or peer
    return tokens, bool(stopped)


def interrupted(signum: int, step: int, path, output_dir: Path) -> TrainingInterrupted:
    """After SIGINT/SIGTERM and the checkpoint at ``path``: the error that says how to resume."""
    return TrainingInterrupted(
        signum, f"{signal.Signals(signum).name}: stopped after step {step}; checkpoint saved to {path}. "
                f"Resume with: mlx-dpo train --config {output_dir / 'config.yaml'} --output-dir {output_dir} --resume")


def fault_error(e: RuntimeError, step: int, rank: int, ranks: int, output_dir: Path) -> Optional[Exception]:
    """What to raise instead of ``e`` from training at ``step``: :class:`DistributedError` for a
    lost peer, the out-of-memory advice; ``None`` to raise ``e`` itself."""
    lost = distributed.peer_lost_message(e, rank, ranks) if ranks > 1 else None
    if lost is not None and not isinstance(e, TrainingError):
        return DistributedError(f"{lost}. Stopped at step {step}; last checkpoint: {last_checkpoint(output_dir)}")
    if isinstance(e, TrainingError) or not is_out_of_memory(e):
        return None
    return out_of_memory_error(step + 1, e, last_checkpoint(output_dir))


class StopSignals:
    """While active, SIGINT/SIGTERM set ``signum`` (the loop finishes its step, saves and
    stops); a second signal raises :class:`TrainingInterrupted` at once."""

    def __init__(self):
        self.signum: Optional[int] = None
        self._old = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.signum is not None:
            raise TrainingInterrupted(signum, f"{name} again: stopped at once; saved checkpoints are intact")
        self.signum = signum
        # os.write, not print: a handler may run in the middle of another print
        os.write(2, f"\n{name}: finishing this step, then saving a checkpoint (again to stop at once)\n".encode())
