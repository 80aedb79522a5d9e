"""``mlx-dpo plan``: measure a run before training: memory and speed on this machine.

``plan(cfg)``: a few timed steps at the configured batch size and one smaller, a
linear fit of measured peak memory in the batch size, and the largest batch that
fits ``memory_budget_gb``; the run's padded batch shapes (each compiles the step once)
and the padding of an epoch; a suggestion of ``gradient_checkpointing`` when the
activations dominate the estimated memory. The figures themselves come from :mod:`mlx_dpo.monitor.perf`.

Data parallel (``ranks`` > 1, default: the ranks this process was launched with): the
memory figures are per rank (each holds the model and ``batch_size`` pairs); the step adds a
ring all-reduce of the gradients (:func:`mlx_dpo.util.distributed.allreduce_bytes`), estimated for the
links of :data:`mlx_dpo.util.distributed.LINKS_GB_S`.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Dict, Optional, Tuple

import mlx.core as mx
from mlx.utils import tree_flatten

from ..util import distributed
from ..data.batching import eval_batches
from ..train.evaluation import eval_every
from ..monitor.perf import (flops_per_token, gemm_peak_gflops, mfu, optimizer_state_bytes, static_memory_estimate,
                            system_memory_bytes)

ACTIVATIONS_DOMINATE = 0.5  # share of the estimated peak above which gradient_checkpointing is suggested


def _timed_steps(trainer, batch_size: int, steps: int, warmup: int = 2) -> Dict[str, float]:
    """Peak memory and tokens/s of ``steps`` grad+update steps on the longest pairs."""
    pairs = sorted(range(len(trainer.train_pairs)), key=lambda i: trainer.train_pairs[i].length)
    indices = pairs[-batch_size:]
    batch = trainer.collate(trainer.train_pairs, indices)
    arrays = trainer.to_device(batch)
    trainer.model.train()  # as in training (lora_dropout on); mlx-lm loads models in eval mode
    mx.reset_peak_memory()
    seconds, first = 0.0, 0.0
    for i in range(warmup + steps):
        tic = time.perf_counter()
        loss, _, _, grads, _ = trainer.grad_step(arrays, trainer.loss_state)
        norm = trainer.apply_update(grads)
        mx.eval(loss, norm, trainer.model.trainable_parameters(), trainer.optimizer.state)
        if i >= warmup:
            seconds += time.perf_counter() - tic
        elif i == 0:
            first = time.perf_counter() - tic
    return {"batch_size": batch_size, "peak_bytes": mx.get_peak_memory(), "slots": batch.slots,
            "tokens_per_second": steps * batch.num_tokens / seconds, "seconds_per_step": seconds / steps,
            "compile_seconds": max(0.0, first - seconds / steps)}  # the first step's extra time: its trace


def epoch_slots(trainer) -> Tuple[int, int, set]:
    """Input positions (real + padding) and real tokens of the first epoch's training batches,
    and the cells they pad to."""
    slots = filled = 0
    cells = set()
    for indices in trainer.sampler.epoch_batches(0):
        pairs = [trainer.train_pairs[i] for i in indices]
        batch = trainer.collate(trainer.train_pairs, indices)
        slots, filled = slots + batch.slots, filled + batch.filled
        cells.add(trainer.shapes.cell(pairs))
    return slots, filled, cells


# A forward pass (the reference precompute, evaluation) costs about this share of a LoRA training step
# at the same shape (measured 0.52-0.62 on this CPU for a 34M Llama, benchmarks/README.md).
FORWARD_SHARE = 0.55


def predicted_split(trainer, built: Dict[str, float], timed: Dict[str, float], slots: int,
                    cells: int) -> Dict[str, float]:
    """The run's wall-time split (:mod:`mlx_dpo.util.clock` phases): start-up and data as measured in ``built``
    (the trainer's clock once built); the rest predicted from the ``timed`` steps: step time
    scaled by input positions (``slots`` of an epoch), one compile per training shape, forward passes
    at :data:`FORWARD_SHARE` of a step."""
    cfg = trainer.cfg
    per_slot = timed["seconds_per_step"] / timed["slots"]
    passes = trainer.total_steps * cfg.gradient_accumulation_steps / max(len(trainer.sampler), 1)
    eval_slots = sum(trainer.collate(trainer.eval_pairs, g).slots
                     for g in eval_batches(trainer.eval_pairs, cfg.eval_batch_size or cfg.batch_size,
                                           cfg.max_eval_batches)) if trainer.eval_pairs else 0
    every = eval_every(cfg, trainer.steps_per_epoch)  # and at the last step, as eval_due
    evals = -(-trainer.total_steps // every) if every and eval_slots else 0
    live = trainer.use_reference and not trainer.precompute
    precompute = trainer.precompute and trainer.use_reference
    split = {
        "startup": built["total"] - built["data"],  # measured: this process's start-up and data loading
        "data": built["data"],
        "precompute": FORWARD_SHARE * per_slot * (slots + eval_slots) if precompute else 0.0,
        "compile": cells * timed["compile_seconds"],
        "train": passes * slots * per_slot,
        "eval": evals * eval_slots * per_slot * FORWARD_SHARE * (2 if live else 1),
    }
    split["total"] = sum(split.values())
    return {k: round(v, 1) for k, v in split.items()}


LAYOUT_NAMES = {"unshared": "unshared (prefix sharing off)", "prefix": "shared prefix",
                "packed": "packed (padding_free)"}


def checkpointing_advice(trainer) -> Optional[str]:
    """Suggest ``gradient_checkpointing`` when activations are most of the estimated peak
    (:func:`~mlx_dpo.monitor.perf.static_memory_estimate` for the longest batch)."""
    cfg = trainer.cfg
    if cfg.gradient_checkpointing:
        return None
    longest = max(trainer.train_pairs, key=lambda p: p.length)
    seq = len(longest.prompt) + max(len(longest.chosen), len(longest.rejected))
    prompt = len(longest.prompt) if trainer.prefix_sharing else 0
    est = static_memory_estimate(trainer.model, cfg.batch_size, seq, prompt, optimizer=trainer.optimizer)
    if est["activations"] <= ACTIVATIONS_DOMINATE * est["total"]:
        return None
    ckpt = static_memory_estimate(trainer.model, cfg.batch_size, seq, prompt, gradient_checkpointing=True,
                                  optimizer=trainer.optimizer)
    return (f"  suggestion: gradient_checkpointing: true -- activations are ~{est['activations'] / 1e9:.2f} of "
            f"~{est['total'] / 1e9:.2f} GB estimated for the longest batch; with it ~{ckpt['total'] / 1e9:.2f} GB "
            f"(~30% slower steps)")


def plan(cfg, memory_budget_gb: Optional[float] = None, steps: int = 3, log=print,
         ranks: Optional[int] = None) -> Dict[str, object]:
    """Measure the configured run on this machine (see module docstring)."""
    from ..train.trainer import DPOTrainer

    cfg = dataclasses.replace(cfg, output_dir=os.path.join(cfg.output_dir, ".plan"), overwrite_output_dir=True)
    trainer = DPOTrainer(cfg, log=lambda *a: None)
    built = trainer.clock.split()  # start-up and data, before the timed steps
    if trainer.precompute and trainer.use_reference:  # plan the step with dummy reference values
        import numpy as np

        n = len(trainer.train_pairs)
        trainer.ref_cache["train"] = {r: np.zeros((n, 2), np.float32) for r in trainer.reductions}
    budget = (memory_budget_gb * 1e9) if memory_budget_gb else system_memory_bytes() * 0.8
    bs = cfg.batch_size
    small = max(1, bs // 2) if bs > 1 else 2
    runs = sorted([_timed_steps(trainer, b, steps) for b in {bs, small}], key=lambda r: r["batch_size"])
    main = next(r for r in runs if r["batch_size"] == bs)
    (b1, m1), (b2, m2) = [(r["batch_size"], r["peak_bytes"]) for r in runs]
    slope = max((m2 - m1) / (b2 - b1), 1.0)
    fixed = m1 - slope * b1
    max_batch = max(0, int((budget - fixed) // slope))
    longest = max(p.length for p in trainer.train_pairs)
    slots, filled, cells = epoch_slots(trainer)
    fpt = flops_per_token(trainer.model, trainer.use_reference and not trainer.precompute)
    peak = gemm_peak_gflops()
    result = {
        "parameters": trainer.num_parameters,
        "flops_per_token": fpt,
        "gemm_peak_gflops": peak,
        "batch_size": bs,
        "longest_pair_tokens": longest,
        "prefix_sharing": trainer.prefix_sharing,
        "batch_layout": trainer.layout,
        "tokens_per_second": main["tokens_per_second"],
        "mfu": mfu(main["tokens_per_second"], fpt, peak),
        "peak_memory_gb": main["peak_bytes"] / 1e9,
        "memory_per_pair_gb": slope / 1e9,
        "optimizer_state_gb": optimizer_state_bytes(trainer.optimizer) / 1e9,
        "memory_budget_gb": budget / 1e9,
        "max_batch_size": max_batch,
        "fits": main["peak_bytes"] <= budget,
        **_data_parallel(trainer, cfg, ranks or distributed.size(), main["seconds_per_step"]),
        "compiled_shapes": len(cells),
        "compile_seconds_per_shape": main["compile_seconds"],
        "padding_fraction": 1.0 - filled / max(slots, 1),
        "time_split": predicted_split(trainer, built, main, slots, len(cells)),
        "suggestion": checkpointing_advice(trainer),
    }
    _log_plan(result, trainer, log)
    return result


def _log_plan(result: Dict[str, object], trainer, log) -> None:
    """The plan's lines (:func:`plan`'s result for ``trainer``'s config)."""
    cfg = trainer.cfg
    log(f"plan: {result['parameters'] / 1e6:.1f}M params, batch {result['batch_size']} (longest pair "
        f"{result['longest_pair_tokens']} tokens), batch layout {LAYOUT_NAMES[trainer.layout]}")
    log(f"  speed:  {result['tokens_per_second']:.0f} tokens/s, MFU {100 * result['mfu']:.1f}% "
        f"(float32 GEMM peak {result['gemm_peak_gflops']:.0f} GFLOP/s, "
        f"{result['flops_per_token'] / 1e6:.0f} MFLOP/token)")
    log(f"  memory: peak {result['peak_memory_gb']:.3f} GB, +{result['memory_per_pair_gb'] * 1e3:.1f} MB per pair; "
        f"optimizer state ({cfg.optim}) {result['optimizer_state_gb'] * 1e3:.2f} MB; "
        f"budget {result['memory_budget_gb']:.2f} GB -> largest batch_size {result['max_batch_size']}"
        f"{'' if result['fits'] else '  (the configured batch does NOT fit)'}")
    n, mb = result["ranks"], result["allreduce_bytes_per_step"] / 1e6
    batch = distributed.global_batch_message(result["batch_size"], cfg.gradient_accumulation_steps, n)
    log(f"  ranks:  {n}, {batch}; memory above is per rank; all-reduce {mb:.2f} MB per step" + ("; step " + ", ".join(
            f"{s:.3f} s on {link}" for link, s in result["seconds_per_step"].items()) if n > 1 else ""))
    log(f"  shapes: {result['compiled_shapes']} padded batch shapes (max_batch_shapes {cfg.max_batch_shapes}), "
        f"~{result['compile_seconds_per_shape']:.1f} s to compile each; {100 * result['padding_fraction']:.1f}% of "
        f"an epoch's input positions are padding")
    split = result["time_split"]
    log(f"  time:   ~{split['total']:.0f} s predicted for {trainer.total_steps} steps = " + ", ".join(
        f"{k} {v:.1f}" for k, v in split.items() if k != "total") + " s")
    if result["suggestion"]:
        log(result["suggestion"])


def _data_parallel(trainer, cfg, ranks: int, local_seconds: float) -> Dict[str, object]:
    """The global batch, the bytes all-reduced per optimizer step and the expected step time
    (the measured local step + the ring all-reduce) per link."""
    nbytes = distributed.allreduce_bytes(tree_flatten(trainer.model.trainable_parameters()),
                                         cfg.gradient_accumulation_steps)
    local = cfg.gradient_accumulation_steps * local_seconds
    return {"ranks": ranks, "global_batch_size": cfg.batch_size * cfg.gradient_accumulation_steps * ranks,
            "allreduce_bytes_per_step": nbytes,
            "seconds_per_step": {link: local + distributed.ring_seconds(nbytes, ranks, bw)
                                 for link, bw in distributed.LINKS_GB_S.items()}}
