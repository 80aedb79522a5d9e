"""The training loop: steps, accumulation, metrics, logging and evaluation between checkpoints.

:class:`TrainingLoop` is the half of :class:`~mlx_dpo.train.trainer.DPOTrainer` that runs once
everything is built (model, data, shapes, compiled steps, callbacks): one iteration is one
optimizer step over ``gradient_accumulation_steps`` micro-batches with one host sync, then the
step's metrics to the callbacks, a log record, an evaluation and a checkpoint when they are due.
A non-finite step stops the run or (``skip_nonfinite_steps``) is skipped; SIGINT/SIGTERM finish
the step, checkpoint and stop (every data-parallel rank after the same step).
"""

from __future__ import annotations

import math
import time
from typing import Optional

import mlx.core as mx
from mlx.utils import tree_map

from . import checkpoint, evaluation, stopping
from ..loss import kto
from ..model.adapters import sync_reference
from ..monitor.callbacks import COMPLETIONS_FILE
from ..monitor.perf import Throughput, reference_blas_warning, warn_if_too_big
from ..util import distributed, metal
from .rundir import mark_complete
from .state import TrainResult


class TrainingLoop:
    """The loop over a built trainer's state (``self.state``, ``self.cfg``, the compiled
    ``grad_step``/``apply_update``, ``self.clock``, ``self.callbacks``...)."""

    def _train_loop(self, stop: stopping.StopSignals) -> TrainResult:
        cfg, state = self.cfg, self.state
        batches = iter(self.sampler)
        self.stop_signals, self.stop_agreed = stop, False  # data parallel: every rank stops after the same step
        self.stopped_early = False  # early_stopping_patience ran out (:func:`.evaluation.track_best`)
        self.reference_sampled = self.resume_path is not None and any(  # generate_during_eval's, once a run
            '"model": "reference"' in line for line in self._completions_lines())
        items = "rows" if kto.is_unpaired(cfg) else "pairs"  # unpaired: each a completion and its label
        self.log(f"training: {state.max_steps} steps, {len(self.train_pairs)} {items}, "
                 f"{distributed.global_batch_message(cfg.batch_size, cfg.gradient_accumulation_steps, self.ranks)}"
                 f", loss {cfg.loss_type}, reference {self.reference_source or 'none'}")
        warn_if_too_big(self.model, self.train_pairs, cfg.batch_size, self.prefix_sharing,
                        cfg.gradient_checkpointing, self.log, self.optimizer)
        for warning in (reference_blas_warning(), metal.memory_limit_warning()):
            if warning:
                self.log(warning)
        self.throughput = Throughput()
        self.callbacks.on_train_begin(state)
        if cfg.eval_on_start and state.step == 0 and self.eval_pairs:
            self._log_and_evaluate(start=True)
        self.clock.started_training()
        while state.step < state.max_steps and not self.stopped_early:
            if stop.signum is not None and (self.ranks == 1 or self.stop_agreed):
                self._stop(stop.signum)
            tic, traces = time.perf_counter(), self.trace_count
            with self._guard(f"step {state.step + 1}"):
                grads, ok, values, tokens = self._accumulate(batches)
                norm = self.apply_update(grads, ok)
                learning_rate = self.optimizer.learning_rate  # the rate this update used (set by the update)
                mx.eval(norm, ok, learning_rate, values, self._pending_loss_state,
                        self.model.trainable_parameters(), self.optimizer.state)  # the step's one host sync
                tokens = self._share_tokens_and_stop(tokens)
            metrics = self._step_metrics(values, norm, learning_rate)
            if metrics is None:  # skipped on the device: the step is retried on the next batches
                continue
            state.step += 1
            if cfg.sync_ref_model and state.step % cfg.ref_model_sync_steps == 0:
                sync_reference(self.model, cfg.ref_model_mixup_alpha)
            seconds = time.perf_counter() - tic
            self.throughput.add(tokens, seconds)
            self.clock.step(seconds, tokens, traced=self.trace_count > traces)
            state.window.add(metrics, tokens, seconds, self.metric_counts)
            self.callbacks.on_step_end(state, metrics)
            self._log_and_evaluate(metrics["learning_rate"], metrics["grad_norm"])
            if cfg.save_steps and state.step % cfg.save_steps == 0 and state.step < state.max_steps:
                self.save_checkpoint()
        return self._finish()

    def _finish(self) -> TrainResult:
        """The last checkpoint, the adapters (the best evaluation's with ``load_best_model_at_end``),
        the done lines; the run's result."""
        cfg, state = self.cfg, self.state
        self.save_checkpoint()
        if cfg.load_best_model_at_end:
            self._load_best()
        self.save()
        self.callbacks.on_train_end(state)
        if self.main:
            mark_complete(self.output_dir, state.step, self.ranks)
        self.log(f"done: {state.step} steps, peak memory {metal.peak_memory_gb():.3f} GB, "
                 f"adapters in {self.output_dir}")
        self.log(f"{self.clock.line()}; {self.trace_count} training-step shapes compiled (max_batch_shapes "
                 f"{cfg.max_batch_shapes})")
        self.log(self.throughput.report(self.model, self.use_reference and not self.precompute))
        final = state.log_history[-1] if state.log_history else {}
        return TrainResult(self.output_dir, state.step,
                           {k: v for k, v in final.items() if not k.startswith("eval_") and k != "warnings"},
                           dict(state.window.last_eval), state.log_history)

    def _time_split(self) -> dict:
        """The run's wall time so far (transformers' ``train_runtime``) and its split by phase
        (``time/<phase>``, :mod:`mlx_dpo.util.clock`), in seconds: the last step's record carries them."""
        split = self.clock.split()
        return {"train_runtime": split.pop("total"), **{f"time/{k}": v for k, v in split.items()}}

    def _accumulate(self, batches):
        """Gradients (averaged) of ``gradient_accumulation_steps`` micro-batches, a device-side
        flag "loss and gradients finite", the per-micro-batch values (lazy) and the tokens.
        Nothing waits for the device here (a step that traced a new shape is timed by the run clock)."""
        accum, state = self.cfg.gradient_accumulation_steps, self.state
        grads_sum, ok, values, tokens = None, mx.array(True), [], 0
        loss_state = state.loss_state
        for _ in range(accum):
            batch = self.collate(self.train_pairs, next(batches))
            loss, out, loss_state, grads, grad_sq = self.grad_step(self.to_device(batch), loss_state)
            ok = ok & mx.isfinite(loss) & mx.isfinite(grad_sq)
            grads_sum = grads if grads_sum is None else tree_map(mx.add, grads_sum, grads)
            values.append(({"loss": loss, **out}, grad_sq))
            if accum > 1:
                mx.async_eval(grads_sum, ok)  # bounded memory; the host goes on to the next micro-batch
            tokens += batch.num_tokens
        self._pending_loss_state = loss_state
        if accum > 1:
            grads_sum = tree_map(lambda g: g / accum, grads_sum)
        return grads_sum, ok, values, tokens

    def _share_tokens_and_stop(self, tokens: int) -> int:
        """Data parallel: the global tokens; all ranks stop after the same step (:mod:`.stopping`)."""
        if self.ranks == 1:
            return tokens
        tokens, stopped = stopping.share_tokens_and_stop(tokens, self.stop_signals, self.group)
        self.stop_agreed = self.stop_agreed or stopped
        return tokens

    def _step_metrics(self, values: list, norm: mx.array, learning_rate: mx.array) -> Optional[dict]:
        """The step's metrics as floats (micro-batch means), or ``None`` after a non-finite step
        (the update was not applied; see :meth:`_nonfinite`)."""
        floats = [({k: float(v.item()) for k, v in out.items()}, float(sq.item())) for out, sq in values]
        bad = next(((out, sq) for out, sq in floats
                    if not math.isfinite(out["loss"]) or not math.isfinite(sq)), None)
        if bad is not None:
            self._nonfinite(*bad)
            return None
        self.state.loss_state = self._pending_loss_state
        self.state.consecutive_skips = 0
        # a NaN metric has no value in that micro-batch (KTO's rewards/rejected with only desirable rows): left out
        found = {k: [out[k] for out, _ in floats if not math.isnan(out[k])] for k in floats[0][0]}
        self.metric_counts = {k: len(v) for k, v in found.items() if v}
        metrics = {k: sum(v) / len(v) for k, v in found.items() if v}
        metrics.update(learning_rate=float(learning_rate.item()), grad_norm=float(norm.item()))
        return metrics

    def _log_and_evaluate(self, learning_rate: float = 0.0, grad_norm: float = 0.0, start: bool = False) -> None:
        """At a logging step: the record of :func:`.evaluation.log_record`; at an eval step (or
        ``start``: before step 1, ``eval_on_start``): evaluate and add the ``eval_*`` metrics.
        The record goes to ``log_history`` and the callbacks."""
        cfg, state = self.cfg, self.state
        record = None if start else evaluation.log_record(cfg, state, learning_rate, grad_norm, self.trace_count,
                                                           self.clock.compile_seconds())
        evaluated = start or evaluation.eval_due(cfg, state, self.steps_per_epoch, bool(self.eval_pairs))
        if evaluated:
            with self.clock.phase("eval"):
                state.window.last_eval = self.evaluate()
            self.stopped_early = evaluation.track_best(cfg, state, state.window.last_eval)
            self.callbacks.on_evaluate(state, state.window.last_eval)
            record = {**(record or {"step": state.step, "epoch": round(state.epoch, 4)}), **state.window.last_eval,
                      "best_metric": state.best.metric, "best_step": state.best.step}
        if record is not None and (state.step == state.max_steps or self.stopped_early) and not start:
            record.update(self._time_split())  # the final save is in the done line's split only
        if record is not None:
            state.log_history.append(record)
            self.callbacks.on_log(state, record)
        if evaluated and cfg.generate_during_eval and self.main:
            with self.clock.phase("eval"):
                self.callbacks.on_completions(state, self._sample_completions())
        if evaluated and cfg.load_best_model_at_end and state.best.step == state.step:
            self.save_checkpoint()  # the best so far stays on disk (save_total_limit keeps it)
        if self.stopped_early:
            self.log(f"early stopping: {cfg.best_metric_key} has not improved on its best by more than "
                     f"{cfg.early_stopping_threshold} for {state.best.evals_without_improvement} evaluations "
                     f"(early_stopping_patience {cfg.early_stopping_patience}; best {state.best.metric:.6g} at step "
                     f"{state.best.step}): stopping after step {state.step} of {state.max_steps}")

    def _sample_completions(self) -> list:
        """``generate_during_eval``: the policy's completions of the fixed eval prompts, and the
        reference's the first time (adapters off, or the reference adapter; none for full training)."""
        cfg = self.cfg
        modes = {"policy": "policy"}
        if not self.reference_sampled and cfg.train_type == "adapter":
            modes = {"reference": "reference" if cfg.reference == "adapter" else "base", **modes}
        self.reference_sampled = True
        prompts = evaluation.eval_prompts(self.eval_pairs, cfg.generate_eval_prompts)
        return evaluation.completions(self.model, self.tokenizer, prompts, cfg.generate_max_new_tokens, modes,
                                      self.state.step, self.log)

    def _completions_lines(self) -> list:
        path = self.output_dir / COMPLETIONS_FILE
        return path.read_text().splitlines() if path.is_file() else []

    def _load_best(self) -> None:
        """``load_best_model_at_end``: the best evaluation's adapters (from its checkpoint) into the model."""
        best, step = self.state.best, self.state.step
        if best.step is None or best.step == step or not self.main:
            return
        path = checkpoint.checkpoints_dir(self.output_dir) / f"step-{best.step}"
        checkpoint.load_adapters(self.model, path)
        self.log(f"load_best_model_at_end: the adapters written are step {best.step}'s ({self.cfg.best_metric_key} "
                 f"{best.metric:.6g}, the best evaluation; {path}); the last step's are in its checkpoint, step-{step}")

    def _nonfinite(self, values: dict, grad_norm_sq: float) -> None:
        """Stop on a non-finite step, or (``skip_nonfinite_steps``) count it and go on."""
        stopping.skip_nonfinite(self.state, values, grad_norm_sq, self.cfg, self.output_dir, self.log)

    def _stop(self, signum: int) -> None:
        """After SIGINT/SIGTERM: checkpoint, say how to resume, raise TrainingInterrupted."""
        path = self.save_checkpoint() or f"{self.output_dir} by rank 0"
        raise stopping.interrupted(signum, self.step, path, self.output_dir)
