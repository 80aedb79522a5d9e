"""The DPO training loop: a compiled step over one shared model.

One step = reference forward (adapters switched off, or the frozen reference
adapter, under ``mx.stop_gradient``; skipped when reference log-probs are
precomputed or the loss is reference-free) + policy forward/backward + loss, all in
one ``mx.compile``d function; the optimizer update (clipping + AdamW with bias
correction) is a second compiled function, applied every
``gradient_accumulation_steps`` micro-batches and only when loss and gradients are
finite.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Dict, List, Optional

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map

from . import checkpoint, losses
from .batching import Batch, BatchSampler, collate, eval_batches
from .config import ConfigError, DPOConfig, resolve_config
from .data import TokenizedPair, load_datasets
from .logprobs import completion_logps
from .plan import Throughput, warn_if_too_big
from .prefix import use_prefix_sharing
from .model import (adapter_config, adapter_layers, adapter_mode, add_adapters, add_reference_copy,
                    count_parameters, load_adapter_weights, load_model, read_adapter_config,
                    setup_full_finetune)
from .schedule import build_schedule


MAX_CONSECUTIVE_SKIPS = 10


class NonFiniteError(checkpoint.TrainingError):
    """Loss or gradient became NaN/inf."""


@dataclass
class TrainResult:
    output_dir: Path
    step: int
    metrics: Dict[str, float] = field(default_factory=dict)
    eval_metrics: Dict[str, float] = field(default_factory=dict)
    history: List[dict] = field(default_factory=list)


def peak_memory_gb() -> float:
    return mx.get_peak_memory() / 1e9


class DPOTrainer:
    """TRL-style trainer. ``DPOTrainer(cfg).train()``; the model, tokenizer and
    tokenized pairs may be passed in (notebooks), otherwise they are loaded from ``cfg``."""

    def __init__(self, cfg: DPOConfig, model: Optional[nn.Module] = None, tokenizer=None,
                 train_pairs: Optional[List[TokenizedPair]] = None,
                 eval_pairs: Optional[List[TokenizedPair]] = None, log: Callable = print):
        self.cfg = cfg
        self.log = log
        losses.validate_loss_config(cfg)
        self.output_dir = Path(cfg.output_dir).expanduser().resolve()
        self._check_output_dir()
        self.resume_path = self._check_resume()
        mx.random.seed(cfg.seed)
        if model is None:
            model, tokenizer, self.model_path = load_model(cfg)
        else:
            self.model_path = Path(cfg.model)
        self.model, self.tokenizer = model, tokenizer
        if train_pairs is None:
            train_pairs, eval_pairs = load_datasets(cfg, tokenizer, log=log)
        self.train_pairs, self.eval_pairs = train_pairs, eval_pairs or []
        self.pad_id = tokenizer.pad_token_id if getattr(tokenizer, "pad_token_id", None) is not None else 0
        self.prefix_sharing = use_prefix_sharing(cfg.prefix_sharing, model)

        self.use_reference = losses.needs_reference(cfg)
        self.precompute = cfg.precompute_ref_log_probs or (cfg.train_type == "full" and self.use_reference)
        self._setup_trainable()
        self.reductions = losses.reductions(cfg)
        self.loss_state = losses.init_loss_state(cfg)

        if len(self.train_pairs) < cfg.batch_size:
            raise ConfigError(f"batch_size {cfg.batch_size} is larger than the {len(self.train_pairs)} training pairs")
        self.sampler = BatchSampler(self.train_pairs, cfg.batch_size, cfg.seed)
        self.total_steps = self._total_steps()
        warmup = cfg.warmup_steps or math.ceil(cfg.warmup_ratio * self.total_steps)
        if warmup and cfg.lr_scheduler_type == "constant":
            self.log("warning: lr_scheduler_type 'constant' has no warmup (as in transformers); "
                     "use 'constant_with_warmup' for warmup_steps/warmup_ratio to apply")
        self.schedule = build_schedule(cfg.lr_scheduler_type, cfg.learning_rate, self.total_steps, warmup)
        self.optimizer = optim.AdamW(
            learning_rate=self.schedule, betas=[cfg.adam_beta1, cfg.adam_beta2], eps=cfg.adam_epsilon,
            weight_decay=cfg.weight_decay, bias_correction=True,
        )
        self.optimizer.init(self.model.trainable_parameters())
        self.ref_cache: Dict[str, Dict[str, np.ndarray]] = {}
        self.step = 0
        self.skipped_steps = 0
        self.log_state: dict = {}  # the logging window, carried across a resume
        self.trace_count = 0
        self._build_steps()
        self.data_fingerprint = checkpoint.data_fingerprint(self.train_pairs)
        if self.resume_path is not None:
            checkpoint.restore(self, checkpoint.load_checkpoint(self.resume_path))
            self.log(f"resumed from {self.resume_path} (step {self.step})")

    # ------------------------------------------------------------------ setup
    def _check_output_dir(self) -> None:
        out = self.output_dir
        if out.exists() and not out.is_dir():
            raise ConfigError(f"output_dir: {out} exists and is not a directory")
        for key in ("model", "data", "ref_adapter_path"):
            value = getattr(self.cfg, key)
            if value and Path(value).expanduser().exists() and Path(value).expanduser().resolve() == out:
                raise ConfigError(f"output_dir: {out} is the {key} directory; choose another output_dir")
        existing = next(p for p in (out, *out.parents) if p.exists())
        if not os.access(existing, os.W_OK):
            raise ConfigError(f"output_dir: {existing} is not writable")
        if self.cfg.overwrite_output_dir or self.cfg.resume_from_checkpoint:
            return
        if (out / "adapters.safetensors").exists():
            raise ConfigError(f"output_dir: {out} already holds a finished run; pass --overwrite "
                              "(overwrite_output_dir: true) or choose another output_dir")
        last = checkpoint.latest_checkpoint(out)
        if last is not None:
            raise ConfigError(f"output_dir: {out} holds checkpoints of an unfinished run (latest: {last.name}); "
                              "pass --resume to continue it, --overwrite to start over, or choose another output_dir")

    def _check_resume(self) -> Optional[Path]:
        """The checkpoint to resume from, after checking its config against ours (before
        anything is loaded or written)."""
        if not self.cfg.resume_from_checkpoint:
            return None
        path = checkpoint.resolve_resume(self.cfg.resume_from_checkpoint, self.output_dir)
        errors, notes = checkpoint.config_differences(checkpoint.read_config(path), self.cfg)
        if errors:
            raise ConfigError(f"cannot resume from {path}: the config changes what the run depends on: "
                              + "; ".join(errors) + f". Use the checkpoint's values (see {path / 'config.yaml'}) "
                              "or start a new run (another output_dir, or --overwrite)")
        for note in notes:
            self.log(f"resume: changed {note}")
        return path

    def _setup_trainable(self) -> None:
        cfg, model = self.cfg, self.model
        if cfg.train_type == "full":
            self.num_layers = setup_full_finetune(model, cfg)
        else:
            self.num_layers = add_adapters(model, cfg)
            if cfg.reference == "adapter":
                self._check_ref_adapter()
                load_adapter_weights(model, Path(cfg.ref_adapter_path))  # policy starts as a copy
            if (cfg.reference == "adapter" and self.use_reference) or cfg.sync_ref_model:
                add_reference_copy(model)
        if cfg.gradient_checkpointing:
            for block in model.layers:
                _checkpoint_block(block)
        total, trainable = count_parameters(model)
        self.num_parameters = total
        self.log(f"parameters: {total / 1e6:.2f}M total, {trainable / 1e6:.3f}M trainable "
                 f"({100 * trainable / max(total, 1):.3f}%)")

    def _check_ref_adapter(self) -> None:
        ref = read_adapter_config(Path(self.cfg.ref_adapter_path))
        params = ref.get("lora_parameters", {})
        ours = {"rank": self.cfg.lora_rank, "keys": list(self.cfg.target_modules), "num_layers": self.num_layers,
                "fine_tune_type": self.cfg.adapter}
        theirs = {"rank": params.get("rank"), "keys": params.get("keys") or list(self.cfg.target_modules),
                  "num_layers": ref.get("num_layers") if ref.get("num_layers", -1) >= 0 else self.num_layers,
                  "fine_tune_type": ref.get("fine_tune_type", "lora")}
        diff = [f"{k}: reference adapter has {theirs[k]}, config has {ours[k]}"
                for k in ours if theirs[k] != ours[k] and not (k == "keys" and set(theirs[k]) == set(ours[k]))]
        if diff:
            raise ConfigError(f"ref_adapter_path {self.cfg.ref_adapter_path} does not match the adapter config: "
                              + "; ".join(diff))
        if abs(params.get("scale", self.cfg.lora_scale) - self.cfg.lora_scale) > 1e-6:
            raise ConfigError(f"ref_adapter_path: its LoRA scale {params.get('scale')} differs from "
                              f"lora_alpha / lora_rank = {self.cfg.lora_scale}")

    def _total_steps(self) -> int:
        if self.cfg.max_steps > 0:
            return self.cfg.max_steps
        per_epoch = max(1, len(self.sampler) // self.cfg.gradient_accumulation_steps)
        return max(1, math.ceil(self.cfg.num_train_epochs * per_epoch))

    @property
    def reference_mode(self) -> str:
        has_copy = any("ref_lora_a" in layer for layer in adapter_layers(self.model))
        return "reference" if has_copy else "base"

    # ------------------------------------------------------------------ the step
    def reference_logps(self, batch: Dict[str, mx.array]) -> Optional[Dict[str, mx.array]]:
        """Reduced reference log-probs: from the batch when precomputed, else the same
        model with adapters off (or on the frozen reference copy)."""
        if not self.use_reference:
            return None
        if self.precompute:
            return {r: batch[f"ref_{r}"] for r in self.reductions}
        with adapter_mode(self.model, self.reference_mode):
            out = completion_logps(self.model, batch)
        token_logps = mx.stop_gradient(out["token_logps"])
        return {r: losses.reduce_logps(token_logps, out["mask"], r, self.cfg) for r in self.reductions}

    def _loss(self, model, batch, ref, loss_state):
        policy = completion_logps(model, batch, with_wpo=self.cfg.use_weighting)
        loss, metrics, new_state = losses.batch_loss(policy, ref, self.cfg, loss_state)
        return loss, (metrics, new_state)

    def _build_steps(self) -> None:
        model, optimizer = self.model, self.optimizer
        state = [model.state, optimizer.state, mx.random.state]
        loss_and_grad = nn.value_and_grad(model, self._loss)

        @partial(mx.compile, inputs=state, outputs=state)
        def grad_step(batch, loss_state):
            self.trace_count += 1  # runs only while tracing
            ref = self.reference_logps(batch)
            (loss, (metrics, new_state)), grads = loss_and_grad(model, batch, ref, loss_state)
            grad_sq = sum(mx.sum(g.astype(mx.float32) ** 2) for _, g in tree_flatten(grads))
            return loss, metrics, new_state, grads, grad_sq

        max_norm = self.cfg.max_grad_norm

        @partial(mx.compile, inputs=state, outputs=state)
        def apply_update(grads):
            if max_norm and max_norm > 0:
                grads, norm = optim.clip_grad_norm(grads, max_norm)
            else:
                norm = mx.sqrt(sum(mx.sum(g.astype(mx.float32) ** 2) for _, g in tree_flatten(grads)))
            optimizer.update(model, grads)
            return norm

        @partial(mx.compile, inputs=state)
        def eval_step(batch, loss_state):
            ref = self.reference_logps(batch)
            policy = completion_logps(model, batch, with_wpo=self.cfg.use_weighting)
            loss, metrics, _ = losses.batch_loss(policy, ref, self.cfg, loss_state)
            return loss, metrics

        self.grad_step, self.apply_update, self.eval_step = grad_step, apply_update, eval_step

    def collate(self, pairs: List[TokenizedPair], indices: List[int]) -> Batch:
        """Pad ``pairs[indices]`` into a batch (shared-prefix layout when enabled)."""
        return collate([pairs[i] for i in indices], indices, self.pad_id, prefix=self.prefix_sharing)

    def to_device(self, batch: Batch, split: str = "train") -> Dict[str, mx.array]:
        arrays = {k: mx.array(v) for k, v in batch.arrays().items()}
        if self.precompute and self.use_reference:
            cache = self.ref_cache[split]
            for r in self.reductions:
                values = cache[r][batch.indices]  # (B, 2): chosen, rejected
                arrays[f"ref_{r}"] = mx.array(np.concatenate([values[:, 0], values[:, 1]]).astype(np.float32))
        return arrays

    # ------------------------------------------------------------------ precompute
    def precompute_reference(self) -> None:
        """Reference log-probs of every train/eval pair, once, in inference mode;
        cached on disk keyed by model, reference adapter, data and settings."""
        from .reference import precompute_reference_logps

        for split, pairs in (("train", self.train_pairs), ("eval", self.eval_pairs)):
            if pairs:
                self.ref_cache[split] = precompute_reference_logps(self, pairs, split)

    # ------------------------------------------------------------------ evaluation
    def evaluate(self) -> Dict[str, float]:
        if not self.eval_pairs:
            return {}
        self.model.eval()
        bs = self.cfg.eval_batch_size or self.cfg.batch_size
        totals: Dict[str, float] = {}
        count = 0
        for indices in eval_batches(self.eval_pairs, bs, self.cfg.max_eval_batches):
            batch = self.collate(self.eval_pairs, indices)
            loss, metrics = self.eval_step(self.to_device(batch, "eval"), self.loss_state)
            mx.eval(loss, metrics)
            n = batch.num_pairs
            for k, v in {"loss": loss, **metrics}.items():
                totals[k] = totals.get(k, 0.0) + float(v.item()) * n
            count += n
        self.model.train()
        return {f"eval_{k}": v / count for k, v in totals.items()}

    # ------------------------------------------------------------------ training
    def train(self) -> TrainResult:
        """Train to ``total_steps``, checkpointing every ``save_steps`` and at the end.
        SIGINT/SIGTERM: finish the step, checkpoint, raise ``TrainingInterrupted``."""
        history = self._prepare_output_dir()
        checkpoint.run_config(self.cfg).save(self.output_dir / "config.yaml")
        try:
            if self.precompute and self.use_reference:
                self.precompute_reference()
            self.model.train()
            with checkpoint.StopSignals() as stop:
                return self._train_loop(history, stop)
        except RuntimeError as e:
            if isinstance(e, checkpoint.TrainingError) or not _is_out_of_memory(e):
                raise
            raise checkpoint.TrainingError(
                f"step {self.step + 1}: out of memory ({e}). Try a smaller max_length, gradient_checkpointing: "
                "true, quantize: {bits: 4}, or a new run with a smaller batch_size (and more "
                f"gradient_accumulation_steps). Last good checkpoint: {self._last_checkpoint()}; "
                "gradient_checkpointing and compute_dtype may change on --resume.") from None

    def _prepare_output_dir(self) -> List[dict]:
        """Create the output dir, remove a killed run's temporaries; with --overwrite clear the
        old run (only now, after config, model and data loaded fine); on resume keep the metric
        records up to the checkpoint's step (returned) and drop newer checkpoints."""
        out = self.output_dir
        out.mkdir(parents=True, exist_ok=True)
        for p in checkpoint.clean_stale(out):
            self.log(f"removed stale temporary {p}")
        metrics_file = out / "metrics.jsonl"
        if self.resume_path is None:
            if self.cfg.overwrite_output_dir:
                checkpoint.clear_run(out)
            metrics_file.write_text("")
            return []
        for newer in checkpoint.list_checkpoints(out):
            if checkpoint.step_of(newer) > self.step:
                self.log(f"removing {newer} (newer than the resumed step {self.step})")
                checkpoint.remove_checkpoint(newer)
        return checkpoint.truncate_metrics(metrics_file, self.step)

    def _train_loop(self, history: List[dict], stop: checkpoint.StopSignals) -> TrainResult:
        cfg = self.cfg
        metrics_file = self.output_dir / "metrics.jsonl"
        logs = self.log_state  # restored on resume
        window: Dict[str, float] = dict(logs.get("window", {}))
        window_steps, window_tokens, window_time = logs.get("steps", 0), logs.get("tokens", 0), logs.get("time", 0.0)
        last_eval: Dict[str, float] = dict(logs.get("last_eval", {}))
        eval_every = cfg.logging_steps if cfg.eval_steps is None else cfg.eval_steps
        accum = cfg.gradient_accumulation_steps
        batches = iter(self.sampler)
        self.log(f"training: {self.total_steps} steps, {len(self.train_pairs)} pairs, batch {cfg.batch_size} x "
                 f"{accum} accumulation, loss {cfg.loss_type}, reference "
                 f"{'none' if not self.use_reference else 'precomputed' if self.precompute else self.reference_mode}")
        bar = _progress(self.total_steps, cfg.progress_bar, self.log)
        warn_if_too_big(self, self.log)
        throughput = Throughput()
        while self.step < self.total_steps:
            if stop.signum is not None:
                bar.close()
                self._stop(stop.signum)
            tic = time.perf_counter()
            grads_sum, step_metrics, tokens = None, {}, 0
            for _ in range(accum):
                indices = next(batches)
                batch = self.collate(self.train_pairs, indices)
                loss, metrics, new_state, grads, grad_sq = self.grad_step(self.to_device(batch), self.loss_state)
                mx.eval(loss, metrics, new_state, grads, grad_sq)
                values = {"loss": float(loss.item()), **{k: float(v.item()) for k, v in metrics.items()}}
                grad_norm_sq = float(grad_sq.item())
                if not math.isfinite(values["loss"]) or not math.isfinite(grad_norm_sq):
                    self._nonfinite(values, grad_norm_sq)
                    grads_sum = None
                    break
                self.loss_state = new_state
                grads_sum = grads if grads_sum is None else tree_map(mx.add, grads_sum, grads)
                for k, v in values.items():
                    step_metrics[k] = step_metrics.get(k, 0.0) + v / accum
                tokens += batch.num_tokens
            if grads_sum is None:  # skipped: the step is retried on the next batches
                continue
            self.consecutive_skips = 0
            if accum > 1:
                grads_sum = tree_map(lambda g: g / accum, grads_sum)
            lr = float(self.schedule(self.optimizer.step).item())
            norm = self.apply_update(grads_sum)
            mx.eval(norm, self.model.trainable_parameters(), self.optimizer.state)
            self.step += 1
            if cfg.sync_ref_model and self.step % cfg.ref_model_sync_steps == 0:
                sync_reference(self.model, cfg.ref_model_mixup_alpha)
            window_time += time.perf_counter() - tic
            window_tokens += tokens
            throughput.add(tokens, time.perf_counter() - tic)
            window_steps += 1
            step_metrics["grad_norm"] = float(norm.item())
            step_metrics["learning_rate"] = lr
            for k, v in step_metrics.items():
                window[k] = window.get(k, 0.0) + v
            bar.update(1)
            bar.set_postfix(loss=f"{step_metrics['loss']:.4f}", acc=f"{step_metrics.get('rewards/accuracies', 0):.2f}")
            record = None
            if self.step % cfg.logging_steps == 0 or self.step == self.total_steps:
                record = {"step": self.step, "epoch": round(self._epoch(), 4),
                          **{k: v / window_steps for k, v in window.items()},
                          "tokens_per_second": window_tokens / max(window_time, 1e-9),
                          "peak_memory_gb": peak_memory_gb()}
                record["learning_rate"] = lr
                if cfg.skip_nonfinite_steps:
                    record["skipped_steps"] = self.skipped_steps
                window, window_steps, window_tokens, window_time = {}, 0, 0, 0.0
            if eval_every and self.eval_pairs and (self.step % eval_every == 0 or self.step == self.total_steps):
                last_eval = self.evaluate()
                record = {**(record or {"step": self.step, "epoch": round(self._epoch(), 4)}), **last_eval}
            if record is not None:
                history.append(record)
                with open(metrics_file, "a") as f:
                    f.write(json.dumps(record) + "\n")
                bar.write(_format_record(record))
            self.log_state = {"window": window, "steps": window_steps, "tokens": window_tokens,
                              "time": window_time, "last_eval": last_eval}
            if cfg.save_steps and self.step % cfg.save_steps == 0 and self.step < self.total_steps:
                self.save_checkpoint()
        bar.close()
        self.save_checkpoint()
        self.save()
        final = history[-1] if history else {}
        self.log(f"done: {self.step} steps, peak memory {peak_memory_gb():.3f} GB, adapters in {self.output_dir}")
        self.log(throughput.report(self.model, self.use_reference and not self.precompute))
        self.throughput = throughput
        return TrainResult(self.output_dir, self.step, {k: v for k, v in final.items() if not k.startswith("eval_")},
                           last_eval, history)

    def _epoch(self) -> float:
        return self.sampler.state.epoch + self.sampler.state.index / max(1, len(self.sampler))

    def _nonfinite(self, values: dict, grad_norm_sq: float) -> None:
        bad = [k for k, v in values.items() if not math.isfinite(v)]
        bad += [] if math.isfinite(grad_norm_sq) else ["gradient norm"]
        msg = (f"step {self.step + 1}: non-finite {', '.join(bad)} (loss={values['loss']}, "
               f"grad_norm^2={grad_norm_sq}). Likely causes: learning_rate too high ({self.cfg.learning_rate}), "
               f"beta too large ({self.cfg.beta}), or float16 overflow (compute_dtype: {self.cfg.compute_dtype}; "
               "use float32 or bfloat16).")
        if not self.cfg.skip_nonfinite_steps:
            raise NonFiniteError(msg + f" Last good checkpoint: {self._last_checkpoint()}. "
                                 "Set skip_nonfinite_steps: true to skip such steps.")
        self.skipped_steps += 1
        self.consecutive_skips = getattr(self, "consecutive_skips", 0) + 1
        if self.consecutive_skips >= MAX_CONSECUTIVE_SKIPS:
            raise NonFiniteError(msg + f" {self.consecutive_skips} steps in a row were non-finite: stopping. "
                                 f"Last good checkpoint: {self._last_checkpoint()}.")
        self.log(msg + f" Skipped ({self.skipped_steps} so far); step {self.step + 1} is retried on the next batches.")

    def _last_checkpoint(self) -> str:
        last = checkpoint.latest_checkpoint(self.output_dir)
        return f"{last} (resume with --resume)" if last else "none yet"

    def _stop(self, signum: int) -> None:
        """After SIGINT/SIGTERM: checkpoint, say how to resume, raise TrainingInterrupted."""
        path = self.save_checkpoint()
        out = self.output_dir
        raise checkpoint.TrainingInterrupted(
            signum, f"{signal.Signals(signum).name}: stopped after step {self.step}; checkpoint saved to {path}. "
                    f"Resume with: mlx-dpo train --config {out / 'config.yaml'} --output-dir {out} --resume")

    def save_checkpoint(self) -> Path:
        """``checkpoints/step-N``: everything needed to resume exactly (see :mod:`.checkpoint`)."""
        path = checkpoint.save_checkpoint(self, self.log_state)
        self.log(f"checkpoint: {path}")
        return path

    def _adapter_config(self) -> dict:
        base = self.cfg.model if self.cfg.model.startswith("toy:") else str(self.model_path)
        return adapter_config(self.cfg, self.num_layers, base)

    def save(self, directory: Optional[Path] = None) -> Path:
        """Adapters in mlx-lm's format + resolved config."""
        from .io import atomic_write_text

        directory = Path(directory or self.output_dir)
        directory.mkdir(parents=True, exist_ok=True)
        weights = dict(tree_flatten(self.model.trainable_parameters()))
        tmp = directory / ".adapters.safetensors.tmp.safetensors"
        try:
            mx.save_safetensors(str(tmp), weights, metadata={"format": "mlx"})
            tmp.replace(directory / "adapters.safetensors")
            atomic_write_text(directory / "adapter_config.json", json.dumps(self._adapter_config(), indent=2))
            checkpoint.run_config(self.cfg).save(directory / "config.yaml")
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise checkpoint.CheckpointError(f"could not save adapters to {directory}: {e}. The last checkpoint is "
                                             f"{self._last_checkpoint()}") from e
        return directory


def _is_out_of_memory(e: Exception) -> bool:
    text = str(e).lower()
    return any(w in text for w in ("out of memory", "insufficient memory", "unable to allocate", "malloc",
                                   "attempting to allocate"))


def sync_reference(model: nn.Module, alpha: float) -> None:
    """TR-DPO (Gorbatovski et al. 2024, arXiv:2404.09656) soft update of the reference
    adapter: ``ref <- alpha * policy + (1 - alpha) * ref``."""
    for layer in adapter_layers(model):
        layer.ref_lora_a = alpha * layer.lora_a + (1 - alpha) * layer.ref_lora_a
        layer.ref_lora_b = alpha * layer.lora_b + (1 - alpha) * layer.ref_lora_b
        if "ref_m" in layer:
            layer.ref_m = alpha * layer.m + (1 - alpha) * layer.ref_m
        mx.eval(layer.ref_lora_a, layer.ref_lora_b)


def _checkpoint_block(block: nn.Module) -> None:
    """Recompute a transformer block's activations in the backward pass (mlx-lm's
    ``grad_checkpoint``, per instance)."""
    fn = type(block).__call__

    def checkpointed(self, *args, **kwargs):
        def inner(params, *a, **k):
            self.update(params)
            return fn(self, *a, **k)

        return mx.checkpoint(inner)(self.trainable_parameters(), *args, **kwargs)

    block.__class__ = type(type(block).__name__ + "Checkpointed", (type(block),),
                           {"__call__": checkpointed, "plain_call": fn})


class _NoBar:
    def __init__(self, log: Callable = print):
        self.write = log

    def update(self, n):
        pass

    def set_postfix(self, **kw):
        pass

    def close(self):
        pass


def _progress(total: int, enabled: bool, log: Callable = print):
    if not enabled:
        return _NoBar(log)
    from tqdm import tqdm

    return tqdm(total=total, desc="dpo", dynamic_ncols=True)


def _format_record(record: dict) -> str:
    keys = ["step", "loss", "rewards/accuracies", "rewards/margins", "eval_loss", "eval_rewards/accuracies",
            "learning_rate", "tokens_per_second", "peak_memory_gb"]
    parts = []
    for k in keys:
        if k in record:
            v = record[k]
            parts.append(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}")
    return " ".join(parts)


def train(config=None, **overrides) -> TrainResult:
    """Python API: ``train("configs/toy.yaml", beta=0.2)`` or ``train(DPOConfig(...))``."""
    cfg = config if isinstance(config, DPOConfig) else resolve_config(config, **overrides)
    if isinstance(config, DPOConfig) and overrides:
        cfg = DPOConfig.from_dict({**config.to_dict(), **overrides})
    return DPOTrainer(cfg).train()
