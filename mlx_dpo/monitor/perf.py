"""Performance figures: FLOPs, MFU, memory estimates and throughput.

- ``gemm_peak_gflops()``: a short float32 GEMM probe (the MFU denominator).
- ``flops_per_token(model, live_reference)``: ``fe x 2 x params``, params without
  the input embedding table (a lookup, no FLOPs). A DPO step with a live reference
  costs 3 forward-equivalents per token (reference forward, policy forward, policy
  backward through frozen weights ~ 1 forward); with precomputed reference log-probs, 2.
- ``static_memory_estimate(...)``: weights + adapter/optimizer state + activations,
  a cheap formula used by ``train`` to warn before it starts.
- ``Throughput``: tokens/s of a run after its warm-up steps.
- ``reference_blas_warning()``: on Linux, MLX's CPU wheel ships the netlib reference
  BLAS (~3 GFLOP/s); a preloaded OpenBLAS (or MKL/BLIS) is ~40x faster. Detected from
  the libraries mapped into this process (``/proc/self/maps``).
"""

from __future__ import annotations

import functools
import os
import platform
import sys
import time
from typing import Dict, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..forward.blocks import chunk_bounds, standard_blocks
from ..util.metal import system_memory_bytes, weights_bytes

# Fallback when no probe is run: a float32 GEMM peak measured on a 2-core x86 CPU
# with OpenBLAS (the reference machine of benchmarks/README.md).
DEFAULT_PEAK_GFLOPS = 140.0


@functools.lru_cache(maxsize=None)
def gemm_peak_gflops(n: int = 1024, repeats: int = 8) -> float:
    """Best-of-``repeats`` float32 ``n x n`` matmul throughput on the default device
    (measured once per process: ~1-5 s on a 2-core CPU)."""
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
    from ..model.loader import count_parameters

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


def optimizer_state_bytes(optimizer) -> int:
    """Bytes of an initialized MLX optimizer's per-parameter state (AdamW's m and v, Lion's m,
    Adafactor's row and column factors...; scalars such as the step left out)."""
    return sum(v.nbytes for _, v in tree_flatten(optimizer.state) if isinstance(v, mx.array) and v.ndim > 0)


def static_memory_estimate(model: nn.Module, batch_size: int, seq_len: int, prompt_len: int = 0,
                           gradient_checkpointing: bool = False, optimizer=None) -> Dict[str, float]:
    """Rough peak bytes of one step: weights, trainable state (param, grad, and the state of
    ``optimizer``: :func:`optimizer_state_bytes`, or Adam's m and v when it is None),
    activations kept for the backward pass (~16 hidden + 3 MLP + attention-score values
    per token per layer, float32, the scores over the keys a block-causal chunk sees; one hidden
    per token per layer with checkpointing)
    and a chunk of logits. ``prompt_len`` > 0: shared prefix (prompt counted once)."""
    args = model.args
    hidden, inter = args.hidden_size, getattr(args, "intermediate_size", 4 * args.hidden_size)
    heads, layers = args.num_attention_heads, len(model.layers)
    weights = weights_bytes(model)
    params = sum(v.nbytes for _, v in tree_flatten(model.trainable_parameters()))
    state = 2 * params if optimizer is None else optimizer_state_bytes(optimizer)
    trainable = 2 * params + state
    tokens = 2 * batch_size * seq_len - (batch_size * prompt_len if prompt_len else 0)
    n = len(chunk_bounds(seq_len)) - 1 if standard_blocks(model) else 1
    keys = seq_len * (n + 1) / (2 * n)  # block-causal chunks see (n+1)/(2n) of the keys on average
    per_token = hidden if gradient_checkpointing else 16 * hidden + 3 * inter + 2 * heads * keys
    activations = 4 * tokens * layers * per_token
    from ..forward.logprobs import MAX_LOGIT_ELEMENTS

    logits = 3 * 4 * min(MAX_LOGIT_ELEMENTS, 2 * batch_size * seq_len * args.vocab_size)
    total = weights + trainable + activations + logits
    return {"weights": weights, "trainable_state": trainable, "optimizer_state": state, "activations": activations,
            "logits": logits, "total": total}


FAST_BLAS = ("openblas", "libmkl", "blis")
NOT_MLX = ("numpy.libs", "scipy_openblas", "scipy.libs", "torch/lib")  # other packages' private copies
OPENBLAS_PATH = "/usr/lib/{arch}-linux-gnu/openblas-pthread/libblas.so.3"


def reference_blas_warning(maps: Optional[str] = None, system: Optional[str] = None,
                           device: Optional[str] = None) -> Optional[str]:
    """A one-line warning with the fix when MLX computes on a reference BLAS, else None.

    On Linux's CPU backend: a ``libblas`` among the libraries mapped into this process
    (``maps``, default ``/proc/self/maps``; MLX's wheel bundles the netlib one) and no fast
    BLAS (numpy's and torch's private OpenBLAS copies do not count: MLX cannot use them).
    A file, not a timing: a GEMM probe on a loaded 2-core machine measured OpenBLAS at
    256^3 only 4x above the reference BLAS. ``system``/``device``: default this machine's."""
    if not (system or sys.platform).startswith("linux") or "cpu" not in (device or str(mx.default_device())):
        return None
    if maps is None:
        try:
            with open("/proc/self/maps") as f:
                maps = f.read()
        except OSError:
            return None
    paths = {line.split()[-1].lower() for line in maps.splitlines() if "/" in line}
    paths = {p for p in paths if not any(x in p for x in NOT_MLX)}
    if not any("libblas" in p for p in paths) or any(n in p for p in paths for n in FAST_BLAS):
        return None
    path = OPENBLAS_PATH.format(arch=platform.machine())
    step = "" if os.path.exists(path) else "apt-get install libopenblas0-pthread, then "
    return (f"warning: MLX runs on the reference BLAS here (~3 GFLOP/s, ~40x slower matmuls); {step}start with "
            f"LD_PRELOAD={path} (e.g. export LD_PRELOAD={path})")


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


def warn_if_too_big(model: nn.Module, pairs: list, batch_size: int, prefix_sharing: bool,
                    gradient_checkpointing: bool, log=print, optimizer=None) -> Optional[Dict[str, float]]:
    """Static estimate for the longest batch; warns when it exceeds this machine's memory."""
    if not pairs:
        return None
    longest = max(pairs, key=lambda p: p.length)
    seq = len(longest.prompt) + max(len(longest.chosen), len(longest.rejected))
    est = static_memory_estimate(model, batch_size, seq, len(longest.prompt) if prefix_sharing else 0,
                                 gradient_checkpointing, optimizer)
    available = system_memory_bytes()
    if est["total"] > 0.8 * available:
        log(f"warning: estimated peak memory {est['total'] / 1e9:.2f} GB (weights {est['weights'] / 1e9:.2f}, "
            f"activations {est['activations'] / 1e9:.2f}) exceeds 80% of the {available / 1e9:.1f} GB available; "
            f"lower batch_size, max_length, or enable gradient_checkpointing (`mlx-dpo plan` measures it)")
    return est
