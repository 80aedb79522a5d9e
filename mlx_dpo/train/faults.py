"""What a training fault says: non-finite values and out-of-memory, with the likely causes
and the way to go on (the last good checkpoint, ``--resume``)."""

from __future__ import annotations

import math

from .checkpoint import TrainingError
from ..config.fields import DPOConfig

MAX_CONSECUTIVE_SKIPS = 10


class NonFiniteError(TrainingError):
    """Loss or gradient became NaN/inf."""


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
