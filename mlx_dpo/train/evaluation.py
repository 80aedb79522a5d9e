"""Evaluation and logging for the training loop: the eval pass over held-out pairs, when it
is due (``eval_strategy``), and the logged record of a logging step (TRL / transformers names)."""

from __future__ import annotations

import math
import time
from typing import Callable, Dict, List, Optional

import mlx.core as mx

from ..data.batching import eval_batches
from ..config.fields import DPOConfig
from ..data import TokenizedPair
from ..util.metal import peak_memory_gb, release_cache
from .state import TrainState


def evaluate(model, eval_step: Callable, pairs: List[TokenizedPair], cfg: DPOConfig, collate: Callable,
             to_device: Callable, loss_state: dict, log: Callable[[str], None]) -> Dict[str, float]:
    """Mean loss and metrics (``eval_*``, weighted by pairs) over ``pairs`` (``max_eval_batches``
    batches of them) in inference mode; the model's train/eval mode is left as it was, MLX's buffer cache freed.
    ``collate(pairs, indices)`` pads a batch, ``to_device(batch, "eval")`` makes its arrays."""
    was_training = model.training
    model.eval()
    bs = cfg.eval_batch_size or cfg.batch_size
    totals: Dict[str, float] = {}
    weights: Dict[str, float] = {}
    count, tic = 0, time.perf_counter()
    for indices in eval_batches(pairs, bs, cfg.max_eval_batches):
        batch = collate(pairs, indices)
        loss, metrics = eval_step(to_device(batch, "eval"), loss_state)
        mx.eval(loss, metrics)
        n = batch.num_pairs
        for k, v in {"loss": loss, **metrics}.items():
            if k == "loss" or not math.isnan(v.item()):  # NaN: no value in this batch (KTO's one-label batches)
                totals[k] = totals.get(k, 0.0) + float(v.item()) * n
                weights[k] = weights.get(k, 0.0) + n
        count += n
    model.train(was_training)
    release_cache()  # the eval batches' buffers: shapes the training step does not reuse
    log(f"evaluation: {count} pairs in {time.perf_counter() - tic:.1f} s")
    return {f"eval_{k}": v / weights[k] for k, v in totals.items()}


def eval_every(cfg: DPOConfig, steps_per_epoch: int) -> int:
    """Steps between evaluations by ``eval_strategy``: ``eval_steps`` (``steps``), an epoch
    (``epoch``), or 0 (``no``)."""
    if cfg.eval_mode == "no":
        return 0
    return steps_per_epoch if cfg.eval_mode == "epoch" else (cfg.eval_steps or cfg.logging_steps)


def eval_due(cfg: DPOConfig, state: TrainState, steps_per_epoch: int, has_eval: bool) -> bool:
    """Every :func:`eval_every` steps and at the last step; never with ``no`` or without eval pairs."""
    every = eval_every(cfg, steps_per_epoch)
    if not every or not has_eval:
        return False
    return state.step % every == 0 or state.step == state.max_steps


def log_record(cfg: DPOConfig, state: TrainState, learning_rate: float, grad_norm: float, compiled_shapes: int,
               compile_seconds: float) -> Optional[dict]:
    """At a logging step (every ``logging_steps`` and the last): the window's means as a record,
    except ``learning_rate`` and ``grad_norm`` (pre-clip), the logging step's own, as
    transformers' Trainer; ``None`` at other steps."""
    if not (state.step % cfg.logging_steps == 0 or state.step == state.max_steps):
        return None
    record = {"step": state.step, "epoch": round(state.epoch, 4), **state.window.flush(),
              "peak_memory_gb": peak_memory_gb(), "learning_rate": learning_rate, "grad_norm": grad_norm,
              "compiled_shapes": compiled_shapes, "compile_seconds": round(compile_seconds, 3)}
    if cfg.skip_nonfinite_steps:
        record["skipped_steps"] = state.skipped_steps
    return record
