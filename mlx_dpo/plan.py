"""Plan a run before training: FLOPs, memory and speed on this machine.

- ``gemm_peak_gflops()``: a short float32 GEMM probe (the MFU denominator).
- ``flops_per_token(model, forward_equivalents)``: ``fe x 2 x params``, params without
  the input embedding table (a lookup, no FLOPs). A DPO step with a live reference
  costs 3 forward-equivalents per token (reference forward, policy forward, policy
  backward through frozen weights ~ 1 forward); with precomputed reference log-probs, 2.
- ``static_memory_estimate(...)``: weights + adapter/optimizer state + activations,
  a cheap formula used by ``train`` to warn before it starts.
- ``plan(cfg)``: a few timed steps at the configured batch size and one smaller, a
  linear fit of measured peak memory in the batch size, and the largest batch that
  fits ``memory_budget_gb``.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Dict, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

# Fallback when no probe is run: a float32 GEMM peak measured on a 2-core x86 CPU
# with OpenBLAS (the reference machine of benchmarks/README.md).
DEFAULT_PEAK_GFLOPS = 140.0


def gemm_peak_gflops(n: int = 1024, repeats: int = 8) -> float:
    """Best-of-``repeats`` float32 ``n x n`` matmul throughput on the default device."""
    a, b = mx.random.normal((n, n)), mx.random.normal((n, n))
    mx.eval(a @ b)
    best = float("inf")
    for _ in range(repeats):
        tic = time.perf_counter()
        mx.eval(a @ b)
        best = min(best, time.perf_counter() - tic)
    return 2 * n ** 3 / best / 1e9


def compute_parameters(model: nn.Module) -> int:
    """Parameters that take part in matmuls (as if de-quantized): all but the input
    embedding table; a tied head counts the table once."""
    from .model import count_parameters

    total, _ = count_parameters(model)
    embed = model.model.embed_tokens
    n_embed = embed.weight.size * (32 // embed.bits if isinstance(embed, nn.QuantizedEmbedding) else 1)
    tied = getattr(model.args, "tie_word_embeddings", False) or not hasattr(model, "lm_head")
    return total if tied else total - n_embed


def forward_equivalents(live_reference: bool) -> int:
    return 3 if live_reference else 2


def flops_per_token(model: nn.Module, live_reference: bool) -> float:
    return forward_equivalents(live_reference) * 2.0 * compute_parameters(model)


def mfu(tokens_per_second: float, flops_token: float, peak_gflops: float) -> float:
    return tokens_per_second * flops_token / (peak_gflops * 1e9)


def system_memory_bytes() -> int:
    """Memory MLX may use: Metal's recommended working set, else physical RAM."""
    info = mx.device_info()
    for key in ("max_recommended_working_set_size", "memory_size"):
        if info.get(key):
            return int(info[key])
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def static_memory_estimate(model: nn.Module, batch_size: int, seq_len: int, prompt_len: int = 0,
                           gradient_checkpointing: bool = False) -> Dict[str, float]:
    """Rough peak bytes of one step: weights, trainable state (param, grad, Adam m, v),
    activations kept for the backward pass (~16 hidden + 3 MLP + attention-score values
    per token per layer, float32; one hidden per token per layer with checkpointing)
    and a chunk of logits. ``prompt_len`` > 0: shared prefix (prompt counted once)."""
    args = model.args
    hidden, inter = args.hidden_size, getattr(args, "intermediate_size", 4 * args.hidden_size)
    heads, layers = args.num_attention_heads, len(model.layers)
    weights = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    trainable = 4 * sum(v.nbytes for _, v in tree_flatten(model.trainable_parameters()))
    tokens = 2 * batch_size * seq_len - (batch_size * prompt_len if prompt_len else 0)
    per_token = hidden if gradient_checkpointing else 16 * hidden + 3 * inter + 2 * heads * seq_len
    activations = 4 * tokens * layers * per_token
    from .logprobs import MAX_LOGIT_ELEMENTS

    logits = 3 * 4 * min(MAX_LOGIT_ELEMENTS, 2 * batch_size * seq_len * args.vocab_size)
    total = weights + trainable + activations + logits
    return {"weights": weights, "trainable_state": trainable, "activations": activations, "logits": logits,
            "total": total}


def _timed_steps(trainer, batch_size: int, steps: int, warmup: int = 2) -> Dict[str, float]:
    """Peak memory and tokens/s of ``steps`` grad+update steps on the longest pairs."""
    pairs = sorted(range(len(trainer.train_pairs)), key=lambda i: trainer.train_pairs[i].length)
    indices = pairs[-batch_size:]
    batch = trainer.collate(trainer.train_pairs, indices)
    arrays = trainer.to_device(batch)
    trainer.model.train()  # as in training (lora_dropout on); mlx-lm loads models in eval mode
    mx.reset_peak_memory()
    seconds = 0.0
    for i in range(warmup + steps):
        tic = time.perf_counter()
        loss, _, _, grads, _ = trainer.grad_step(arrays, trainer.loss_state)
        norm = trainer.apply_update(grads)
        mx.eval(loss, norm, trainer.model.trainable_parameters(), trainer.optimizer.state)
        if i >= warmup:
            seconds += time.perf_counter() - tic
    return {"batch_size": batch_size, "peak_bytes": mx.get_peak_memory(),
            "tokens_per_second": steps * batch.num_tokens / seconds}


def plan(cfg, memory_budget_gb: Optional[float] = None, steps: int = 3, log=print) -> Dict[str, object]:
    """Measure the configured run on this machine (see module docstring)."""
    from .trainer import DPOTrainer

    cfg = dataclasses.replace(cfg, output_dir=os.path.join(cfg.output_dir, ".plan"), overwrite_output_dir=True)
    trainer = DPOTrainer(cfg, log=lambda *a: None)
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
    fpt = flops_per_token(trainer.model, trainer.use_reference and not trainer.precompute)
    peak = gemm_peak_gflops()
    result = {
        "parameters": trainer.num_parameters,
        "flops_per_token": fpt,
        "gemm_peak_gflops": peak,
        "batch_size": bs,
        "longest_pair_tokens": longest,
        "prefix_sharing": trainer.prefix_sharing,
        "tokens_per_second": main["tokens_per_second"],
        "mfu": mfu(main["tokens_per_second"], fpt, peak),
        "peak_memory_gb": main["peak_bytes"] / 1e9,
        "memory_per_pair_gb": slope / 1e9,
        "memory_budget_gb": budget / 1e9,
        "max_batch_size": max_batch,
        "fits": main["peak_bytes"] <= budget,
    }
    log(f"plan: {result['parameters'] / 1e6:.1f}M params, batch {bs} (longest pair {longest} tokens), "
        f"prefix sharing {'on' if trainer.prefix_sharing else 'off'}")
    log(f"  speed:  {result['tokens_per_second']:.0f} tokens/s, MFU {100 * result['mfu']:.1f}% "
        f"(float32 GEMM peak {peak:.0f} GFLOP/s, {fpt / 1e6:.0f} MFLOP/token)")
    log(f"  memory: peak {result['peak_memory_gb']:.3f} GB, +{result['memory_per_pair_gb'] * 1e3:.1f} MB per pair; "
        f"budget {result['memory_budget_gb']:.2f} GB -> largest batch_size {max_batch}"
        f"{'' if result['fits'] else '  (the configured batch does NOT fit)'}")
    return result


class Throughput:
    """Tokens/s over a run's steps after the first ``warmup`` (which include ``mx.compile``
    tracing), and the model FLOPs utilisation it implies."""

    def __init__(self, warmup: int = 3):
        self.warmup, self.steps, self.tokens, self.seconds = warmup, 0, 0, 0.0

    def add(self, tokens: int, seconds: float) -> None:
        self.steps += 1
        if self.steps > self.warmup:
            self.tokens += tokens
            self.seconds += seconds

    @property
    def tokens_per_second(self) -> Optional[float]:
        return self.tokens / self.seconds if self.seconds > 0 else None

    def report(self, model: nn.Module, live_reference: bool, peak_gflops: Optional[float] = None) -> str:
        tps = self.tokens_per_second
        if tps is None:
            return f"throughput: too few steps to measure (first {self.warmup} are warm-up)"
        peak = peak_gflops or gemm_peak_gflops()
        fpt = flops_per_token(model, live_reference)
        self.mfu = mfu(tps, fpt, peak)
        return (f"throughput: {tps:.0f} tokens/s (steps after the first {self.warmup}), MFU {100 * self.mfu:.1f}% "
                f"({forward_equivalents(live_reference)} x 2 x {compute_parameters(model) / 1e6:.1f}M params per token, "
                f"float32 GEMM peak {peak:.0f} GFLOP/s)")


def warn_if_too_big(trainer, log=print) -> Optional[Dict[str, float]]:
    """Static estimate for the longest batch; warns when it exceeds this machine's memory."""
    pairs = trainer.train_pairs
    if not pairs:
        return None
    longest = max(pairs, key=lambda p: p.length)
    seq = len(longest.prompt) + max(len(longest.chosen), len(longest.rejected))
    est = static_memory_estimate(trainer.model, trainer.cfg.batch_size, seq,
                                 len(longest.prompt) if trainer.prefix_sharing else 0,
                                 trainer.cfg.gradient_checkpointing)
    available = system_memory_bytes()
    if est["total"] > 0.8 * available:
        log(f"warning: estimated peak memory {est['total'] / 1e9:.2f} GB (weights {est['weights'] / 1e9:.2f}, "
            f"activations {est['activations'] / 1e9:.2f}) exceeds 80% of the {available / 1e9:.1f} GB available; "
            f"lower batch_size, max_length, or enable gradient_checkpointing (`mlx-dpo plan` measures it)")
    return est
