"""The DPO trainer: builds a run (model, data, shapes, compiled steps, callbacks) and runs it.

One step = reference forward (adapters switched off, or the frozen reference
adapter, under ``mx.stop_gradient``; skipped when reference log-probs are
precomputed or the loss is reference-free) + policy forward/backward + loss, all in
one ``mx.compile``d function; the optimizer update (clipping + ``optim``, AdamW
with bias correction by default) is a second compiled function, applied every
``gradient_accumulation_steps`` micro-batches and only when loss and gradients are
finite.

Progress lives in an explicit :class:`~mlx_dpo.train.state.TrainState` (``trainer.state``)
that :mod:`.checkpoint` saves and restores; what watches training (the metrics file,
console lines, the progress bar, yours) are :mod:`mlx_dpo.monitor.callbacks`. The loop itself
is :mod:`.loop`.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import checkpoint, evaluation, stopping
from ..util import distributed, metal
from ..loss import kto, losses
from ..model.adapters import adapter_config, reference_mode
from ..data.batching import Batch, BatchSampler, collate
from ..monitor.callbacks import CallbackList, console, default_callbacks
from ..util.clock import RunClock
from ..config.fields import DPOConfig, resolve_config
from ..errors import CheckpointError, ConfigError
from ..forward.cpu_math import enable_cpu_math
from ..data import TokenizedPair, load_datasets, unpaired
from ..data.cache import data_fingerprint
from ..data.formats import check_data_format
from ..monitor.health import HealthMonitor
from ..model.loader import count_parameters, model_for_training, setup_trainable
from ..forward.packed import enable_position_rope
from ..forward.prefix import batch_layout
from ..model.quant import on_cpu
from .preflight import warn_unused_settings
from .precompute import precompute_reference_logps
from .rundir import METRICS_FILE, RunLock, check_output_dir, check_resume, prepare_output_dir
from .schedule import build_optimizer, build_schedule
from ..data.shapes import ShapePlan, run_passes
from .loop import TrainingLoop
from .state import TrainResult, TrainState
from .steps import build_steps
from ..monitor.trackers import tracker_callbacks


def _silent(*args, **kwargs) -> None:
    """The log of the ranks other than 0."""


class DPOTrainer(TrainingLoop):
    """TRL-style trainer. ``DPOTrainer(cfg).train()``; the model, tokenizer and tokenized
    pairs may be passed in (notebooks), otherwise they are loaded from ``cfg``.

    ``log`` receives every message and metric line (default: stdout, tqdm-safe);
    ``callbacks`` are added after the built-in ones (see :mod:`mlx_dpo.monitor.callbacks`)."""

    def __init__(self, cfg: DPOConfig, model: Optional[nn.Module] = None, tokenizer=None,
                 train_pairs: Optional[List[TokenizedPair]] = None,
                 eval_pairs: Optional[List[TokenizedPair]] = None, log: Optional[Callable] = None,
                 callbacks: Optional[Iterable] = None):
        self.cfg = cfg
        self.clock = RunClock()  # the wall-time split of the run (start-up counts from here, or the process start)
        self.group = distributed.world(cfg.ddp_timeout)
        self.rank, self.ranks = self.group.rank(), self.group.size()
        self.main = self.rank == 0  # data parallel: rank 0 prints and writes
        self.log = (log or console) if self.main else _silent
        losses.validate_loss_config(cfg)
        check_data_format(cfg)
        self.output_dir = check_output_dir(cfg)
        self.lock = RunLock(self.output_dir)
        if self.main:
            self.lock.check()  # another run in this output_dir: refuse before loading anything
        trackers = tracker_callbacks(cfg, self.output_dir) if self.main else []  # a missing package fails here
        self.resume_path = check_resume(cfg, self.output_dir, self.log, self.ranks)
        mx.random.seed(cfg.seed)
        model, tokenizer, self.model_path = model_for_training(cfg, model, tokenizer, train_pairs, self.log)
        self.model, self.tokenizer = model, tokenizer
        if train_pairs is None:
            with self.clock.phase("data"):
                train_pairs, eval_pairs = load_datasets(cfg, tokenizer, log=self.log)
        self.train_pairs, self.eval_pairs = self._rows_for_loss(train_pairs, eval_pairs or [])
        self.pad_id = tokenizer.pad_token_id if getattr(tokenizer, "pad_token_id", None) is not None else 0
        self.layout = batch_layout(cfg.prefix_sharing, cfg.padding_free, model)
        self.prefix_sharing = self.layout != "unshared"  # each prompt runs once
        self.use_reference = losses.needs_reference(cfg)
        self.precompute = cfg.precompute_ref_log_probs or (cfg.train_type == "full" and self.use_reference)
        self._prepare_model()
        self.reductions = losses.reductions(cfg)
        self._build_sampler()
        self._build_optimizer()
        self.state = TrainState(max_steps=self.total_steps, num_batches=len(self.sampler),
                                data_fingerprint=data_fingerprint(self.train_pairs),
                                sampler=self.sampler.state, loss_state=losses.init_loss_state(cfg),
                                world_size=self.ranks)
        health = HealthMonitor.from_config(cfg, self.log) if cfg.health_warnings and self.main else None
        extra = [*trackers, *(callbacks or ())]
        self.callbacks = CallbackList(default_callbacks(self.output_dir / METRICS_FILE, self.log, cfg.progress_bar,
                                                        extra, health) if self.main else ())
        self.ref_cache: Dict[str, Dict[str, np.ndarray]] = {}
        self.reference_forwards = 0
        self.watchdog = None  # data parallel: set while train() runs
        self.trace_count = 0
        self._build_steps()
        if self.resume_path is not None:
            self._resume()
        if self.ranks > 1:  # every rank has checked output_dir and the checkpoint before rank 0 writes
            self._start_watchdog()
            with self._guard("start-up"):
                mx.eval(distributed.all_sum(mx.array(1), self.group))

    # ------------------------------------------------------------------ setup
    def _prepare_model(self) -> None:
        """What trains (adapters or blocks), the layout's and the backend's kernels; logs the counts."""
        cfg, model = self.cfg, self.model
        self.num_layers = setup_trainable(model, cfg, self.use_reference)
        if self.layout == "packed":
            enable_position_rope(model)
        if cfg.cpu_fast_math and on_cpu() and enable_cpu_math(model):
            self.log("CPU backend: attention softmax and the gated MLP through mlx_dpo/forward/cpu_math.py "
                     "(cpu_fast_math: false for MLX's kernels)")
        self.num_parameters, trainable = count_parameters(model)
        self.log(f"parameters: {self.num_parameters / 1e6:.2f}M total, {trainable / 1e6:.3f}M trainable "
                 f"({100 * trainable / max(self.num_parameters, 1):.3f}%)")

    def _rows_for_loss(self, train: List[TokenizedPair], evals: List[TokenizedPair]) -> tuple:
        """Pairs for a paired loss (unpaired rows refused); unpaired rows with their KL completions
        for kto / apo_zero_unpaired, paired data unpaired (:mod:`mlx_dpo.data.unpaired`)."""
        if not kto.is_unpaired(self.cfg):
            unpaired.check_paired(train, self.cfg)
            unpaired.check_paired(evals, self.cfg)
            return train, evals
        return tuple(unpaired.prepare_rows(pairs, self.cfg, kto.uses_kl(self.cfg), self.log, split)
                     for pairs, split in ((train, "train"), (evals, "eval")))

    def _resume(self) -> None:
        """Advance the freshly built state, model and optimizer to the checkpoint's."""
        self.state = checkpoint.restore(checkpoint.load_checkpoint(self.resume_path), self.state, self.model,
                                        self.optimizer)
        self.sampler.state = self.state.sampler
        if self.step > self.total_steps:
            raise ConfigError(f"max_steps is {self.total_steps} but the checkpoint {self.resume_path} is at "
                              f"step {self.step}; set max_steps >= {self.step} to continue it")
        self.log(f"resumed from {self.resume_path} (step {self.step})")

    def _build_sampler(self) -> None:
        """The run's batch shapes and this rank's batch sampler."""
        cfg = self.cfg
        if len(self.train_pairs) < cfg.batch_size * self.ranks:
            raise ConfigError(f"batch_size {cfg.batch_size} x {self.ranks} ranks is larger than the "
                              f"{len(self.train_pairs)} training pairs")
        pairs_per_step = cfg.batch_size * cfg.gradient_accumulation_steps * self.ranks
        passes = run_passes(cfg.max_steps, cfg.num_train_epochs, pairs_per_step, len(self.train_pairs))
        self.shapes = ShapePlan(self.train_pairs, self.layout, cfg.max_batch_shapes,
                                batch_size=cfg.batch_size * self.ranks, passes=passes)
        self.sampler = BatchSampler(self.train_pairs, cfg.batch_size, cfg.seed, shapes=self.shapes,
                                    rank=self.rank, ranks=self.ranks, sequential=kto.is_unpaired(cfg))
        if kto.is_unpaired(cfg):
            leftover = unpaired.leftover_warning(len(self.train_pairs), cfg.batch_size, self.ranks)
            if leftover:
                self.log(leftover)

    def _build_optimizer(self) -> None:
        cfg = self.cfg
        self.steps_per_epoch = max(1, len(self.sampler) // cfg.gradient_accumulation_steps)
        if cfg.max_steps > 0:
            self.total_steps = cfg.max_steps
        else:
            self.total_steps = max(1, math.ceil(cfg.num_train_epochs * self.steps_per_epoch))
        warmup = cfg.warmup_steps or math.ceil(cfg.warmup_ratio * self.total_steps)
        warn_unused_settings(cfg, bool(self.eval_pairs), self.total_steps, warmup, self.log)
        self.schedule = build_schedule(cfg.lr_scheduler_type, cfg.learning_rate, self.total_steps, warmup,
                                       cfg.lr_scheduler_kwargs)
        self.optimizer = build_optimizer(cfg, self.schedule)  # weight decay: apply_update's, by parameter group
        self.optimizer.init(self.model.trainable_parameters())

    @property
    def step(self) -> int:
        return self.state.step

    @property
    def loss_state(self) -> dict:
        return self.state.loss_state

    @property
    def reference_mode(self) -> str:
        return reference_mode(self.model)

    # ------------------------------------------------------------------ the step
    @property
    def reference_source(self) -> Optional[str]:
        """Where the step's reference log-probs come from (see :mod:`.steps`)."""
        if not self.use_reference:
            return None
        return "precomputed" if self.precompute else self.reference_mode

    def _build_steps(self) -> None:
        def traced():
            self.trace_count += 1

        self.grad_step, self.apply_update, self.eval_step = build_steps(
            self.model, self.optimizer, self.cfg, self.reductions, self.reference_source, on_trace=traced,
            group=self.group if self.ranks > 1 else None)

    def collate(self, pairs: List[TokenizedPair], indices: List[int]) -> Batch:
        """Pad ``pairs[indices]`` into a batch of one of the run's shapes, in the run's layout."""
        chosen = [pairs[i] for i in indices]
        return collate(chosen, indices, self.pad_id, layout=self.layout, shape=self.shapes.cell(chosen))

    def to_device(self, batch: Batch, split: str = "train") -> Dict[str, mx.array]:
        arrays = {k: mx.array(v) for k, v in batch.arrays().items()}
        if self.precompute and self.use_reference:
            cache = self.ref_cache[split]
            for r in self.reductions:
                values = cache[r][batch.indices]  # (B, 2): chosen, rejected (KL; none: only chosen)
                values = np.concatenate([values[:, 0], values[:, 1]]) if batch.two_rows else values[:, 0]
                arrays[f"ref_{r}"] = mx.array(values.astype(np.float32))
        return arrays

    # ------------------------------------------------------------------ precompute
    def precompute_reference(self) -> None:
        """Reference log-probs of every train/eval pair, once, in inference mode;
        cached on disk keyed by model, reference adapter, data and settings."""
        for split, pairs in (("train", self.train_pairs), ("eval", self.eval_pairs)):
            if pairs:
                self.ref_cache[split], batches = precompute_reference_logps(
                    self.model, pairs, self.cfg, self.collate, reductions=self.reductions,
                    model_path=self.model_path, split=split, log=self.log, initial=self.step == 0,
                    group=self.group if self.ranks > 1 else None)
                self.reference_forwards += batches
        metal.release_cache()

    # ------------------------------------------------------------------ evaluation
    def evaluate(self) -> Dict[str, float]:
        """Mean loss and metrics over the eval pairs (``max_eval_batches`` of them), in inference
        mode (:func:`.evaluation.evaluate`); the model's train/eval mode is left as it was."""
        if not self.eval_pairs:
            return {}
        if self.reference_source == "precomputed" and "eval" not in self.ref_cache:
            self.precompute_reference()  # evaluate() before train()
        return evaluation.evaluate(self.model, self.eval_step, self.eval_pairs, self.cfg, self.collate,
                                   self.to_device, self.loss_state, self.log)

    # ------------------------------------------------------------------ training
    def train(self) -> TrainResult:
        """Train to ``state.max_steps``, checkpointing every ``save_steps`` and at the end.
        SIGINT/SIGTERM: finish the step, checkpoint, raise ``TrainingInterrupted``.
        The output directory is locked while it runs (a second run there is refused)."""
        if self.main:
            self.lock.acquire()
        try:
            return self._train()
        finally:
            self.lock.release()

    def _train(self) -> TrainResult:
        if self.main:
            self.state.log_history = prepare_output_dir(self.output_dir, self.step, self.resume_path is not None,
                                                        self.cfg.overwrite_output_dir, self.log)
            checkpoint.recorded_config(self.cfg).save(self.output_dir / "config.yaml")
        was_training = self.model.training
        if self.ranks > 1:
            self._start_watchdog()
        try:
            if self.precompute and self.use_reference:
                with self._guard("the reference precompute"), self.clock.phase("precompute"):
                    self.precompute_reference()
            self.model.train()
            with stopping.StopSignals() as stop, metal.wired_limit(self.model, self.log):
                return self._train_loop(stop)
        except RuntimeError as e:
            error = stopping.fault_error(e, self.step, self.rank, self.ranks, self.output_dir)
            if error is None:
                raise
            raise error from None
        finally:
            self.model.train(was_training)  # as loaded (mlx-lm: eval), so dropout is off for generation
            if self.watchdog is not None:
                self.watchdog.close()
                self.watchdog = None
            self.callbacks.close()  # a bar or tracker left open by an exception

    def _start_watchdog(self) -> None:
        if self.watchdog is None:
            self.watchdog = distributed.Watchdog(self.cfg.ddp_timeout, self.rank, self.ranks, self._last_checkpoint)

    def _guard(self, what: str):
        """The watchdog around a section with collectives (a no-op in one process)."""
        return self.watchdog.guard(what) if self.watchdog is not None else contextlib.nullcontext()

    def _last_checkpoint(self) -> str:
        return stopping.last_checkpoint(self.output_dir)

    # ------------------------------------------------------------------ saving
    def save_checkpoint(self) -> Path:
        """``checkpoints/step-N``: everything needed to resume exactly (see :mod:`.checkpoint`);
        written by rank 0 only (``None`` on the others)."""
        if not self.main:
            return None
        with self.clock.phase("save"):
            path = checkpoint.save_checkpoint(self.output_dir, self.state, self.model, self.optimizer, self.cfg,
                                              self.adapter_config())
        self.log(f"checkpoint: {path}")
        self.callbacks.on_save(self.state, path)
        return path

    def adapter_config(self) -> dict:
        """mlx-lm's ``adapter_config.json`` for this run (``model: null`` when the base is unknown)."""
        if self.model_path is None:
            base = None
        else:
            base = self.cfg.model if self.cfg.model.startswith("toy:") else str(self.model_path)
        return adapter_config(self.cfg, self.num_layers, base)

    def save(self, directory: Optional[Path] = None) -> Path:
        """Adapters in mlx-lm's format + resolved config."""
        directory = Path(directory or self.output_dir)
        if not self.main:
            return directory
        try:
            with self.clock.phase("save"):
                checkpoint.save_adapters(directory, self.model, self.cfg, self.adapter_config())
        except OSError as e:
            raise CheckpointError(f"could not save adapters to {directory}: {e}. The last checkpoint is "
                                             f"{self._last_checkpoint()}") from e
        return directory


def train(config=None, **overrides) -> TrainResult:
    """Python API: ``train("configs/toy.yaml", beta=0.2)`` or ``train(DPOConfig(...))``."""
    cfg = config if isinstance(config, DPOConfig) else resolve_config(config, **overrides)
    if isinstance(config, DPOConfig) and overrides:
        cfg = DPOConfig.from_dict({**config.to_dict(), **overrides})
    return DPOTrainer(cfg).train()
