"""Where a DPO step's time goes on this machine, per op, for the benchmark's models.

    python benchmarks/profile_step.py --size medium
    python benchmarks/profile_step.py --size medium --backward --kernels cpu_math

Times each op of one transformer block at the step's shapes in isolation, compiled: forward,
or with ``--backward`` forward + backward (the vjp of the activations only: the base weights are
frozen under LoRA, so a linear's backward is one GEMM, ``dx = dy W``). Attention runs as the
trainer runs it, in query chunks (``mlx_dpo/forward/blocks.py``), one-pass shown for comparison;
``--kernels cpu_math`` times attention and SwiGLU as ``cpu_fast_math`` runs them on the CPU
backend (``mlx_dpo/forward/cpu_math.py``). Then the LM head on the completion positions, and the share of
each op and the GEMM rate it achieves.
"""

import argparse
import time

import mlx.core as mx
import mlx.nn as nn


def fwd_bwd(fn):
    """``fn`` and the vjp of all its inputs (cotangent ones)."""
    return lambda *a: mx.vjp(fn, list(a), [mx.ones_like(fn(*a))])


def timed(fn, *args, repeats=5):
    fn = mx.compile(fn)
    mx.eval(fn(*args))
    best = float("inf")
    for _ in range(repeats):
        tic = time.perf_counter()
        mx.eval(fn(*args))
        best = min(best, time.perf_counter() - tic)
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="medium", choices=["small", "medium"])
    ap.add_argument("--rows", type=int, default=8, help="sequences (2 x pairs)")
    ap.add_argument("--length", type=int, default=160, help="padded sequence length")
    ap.add_argument("--completion", type=int, default=80, help="scored positions per row")
    ap.add_argument("--backward", action="store_true", help="forward + backward (activations' vjp)")
    ap.add_argument("--kernels", default="mlx", choices=["mlx", "cpu_math"], help="attention/SwiGLU kernels")
    args = ap.parse_args()
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from bench import SIZES

    from mlx_dpo.monitor.perf import gemm_peak_gflops

    s = SIZES[args.size]
    h, inter, heads, kv = s["hidden_size"], s["intermediate_size"], s["num_heads"], s["num_kv_heads"]
    d, vocab, layers = h // heads, 8192, s["num_layers"]
    n, L = args.rows, args.length
    passes = 2 if args.backward else 1  # FLOPs: a frozen linear's backward is one more GEMM

    def time_op(fn, *inputs, frozen=()):
        """Best time of ``fn(*inputs, *frozen)``, with ``--backward`` plus the vjp of ``inputs``."""
        mx.eval(inputs, frozen)  # a lazy frozen weight would be re-drawn inside every timed call
        if not args.backward:
            return timed(fn, *inputs, *frozen)
        return timed(fwd_bwd(lambda *x: fn(*x, *frozen)), *inputs)

    x = mx.random.normal((n * L, h))
    w = {"q": (heads * d, h), "k": (kv * d, h), "v": (kv * d, h), "o": (h, heads * d),
         "gate": (inter, h), "up": (inter, h)}
    ops = {}
    for name, shape in w.items():
        W = mx.random.normal(shape) * 0.02
        ops[f"matmul {name}"] = (time_op(lambda a, b: a @ b.T, x, frozen=(W,)), passes * 2 * n * L * shape[0] * shape[1])
    Wd = mx.random.normal((h, inter)) * 0.02
    xi = mx.random.normal((n * L, inter))
    ops["matmul down"] = (time_op(lambda a, b: a @ b.T, xi, frozen=(Wd,)), passes * 2 * n * L * h * inter)
    A, B = mx.random.normal((8, h)) * 0.02, mx.random.normal((heads * d, 8)) * 0.02
    ops["LoRA r8 x 4 (q, k, v, o)"] = (4 * time_op(lambda a, wa, wb: (a @ wa.T) @ wb.T, x, A, B), 0)
    q = mx.random.normal((n, heads, L, d))
    k = mx.random.normal((n, kv, L, d))
    from mlx_dpo.forward import cpu_math
    from mlx_dpo.forward.blocks import chunk_bounds

    def sdpa(q, k, v, mask):
        if args.kernels == "cpu_math":
            return cpu_math.attention(q, k, v, d ** -0.5, mask)
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=d ** -0.5, mask=mask)

    attn_flops = (1 + passes) * 2 * n * heads * L * L * d / 2  # QK^T and PV over the causal half; bwd 2x
    ops["attention (one pass, causal)"] = (time_op(lambda q, k: sdpa(q, k, k, "causal"), q, k), attn_flops)
    bounds = chunk_bounds(L)

    def block_causal(q, k):  # what mlx_dpo/forward/blocks.py runs: query chunks, keys up to each chunk's end
        return mx.concatenate([sdpa(q[:, :, a:b], k[:, :, :b], k[:, :, :b], "causal")
                               for a, b in zip(bounds, bounds[1:])], axis=2)

    attention = f"attention, block-causal ({len(bounds) - 1} chunks, as trained)"
    ops[attention] = (time_op(block_causal, q, k), attn_flops)
    rope = nn.RoPE(d)
    ops["rope q+k"] = (time_op(lambda q, k: rope(q).sum(axis=1) + rope(k).sum(axis=1), q, k), 0)
    norm = nn.RMSNorm(h)
    ops["rmsnorm x2"] = (2 * time_op(norm, x), 0)
    g = mx.random.normal((n * L, inter))
    act = cpu_math.swiglu if args.kernels == "cpu_math" else (lambda a, b: nn.silu(a) * b)
    ops["silu(gate)*up"] = (time_op(act, g, xi), 0)
    one_pass = ops.pop("attention (one pass, causal)")  # shown, not summed: the trainer runs the block-causal one
    per_layer = sum(t for t, _ in ops.values())
    head_x = mx.random.normal((n * args.completion, h))
    Wh = mx.random.normal((vocab, h)) * 0.02
    head = (time_op(lambda a, b: mx.logsumexp(a @ b.T, axis=-1), head_x, frozen=(Wh,)),
            passes * 2 * n * args.completion * vocab * h)

    peak = gemm_peak_gflops()
    total = layers * per_layer + head[0]
    what = "forward + backward" if args.backward else "forward"
    print(f"{args.size}: {n} rows x {L} tokens, {layers} layers, {what}, {args.kernels} kernels; "
          f"float32 GEMM peak {peak:.0f} GFLOP/s")
    print(f"| op ({what}, one pass over the batch) | ms | share | GFLOP/s |")
    print("|---|---:|---:|---:|")
    for name, (t, flops) in [*ops.items(), ("attention, one pass (causal; not summed)", one_pass)]:
        rate = f"{flops / t / 1e9:.0f}" if flops else ""
        print(f"| {name} (x{layers} layers) | {1e3 * layers * t:.1f} | {100 * layers * t / total:.0f}% | {rate} |")
    print(f"| lm head + logsumexp ({args.completion} positions/row) | {1e3 * head[0]:.1f} | "
          f"{100 * head[0] / total:.0f}% | {head[1] / head[0] / 1e9:.0f} |")
    gemm_flops = layers * sum(f for name, (_, f) in ops.items() if name.startswith("matmul")) + head[1]
    print(f"sum of ops: {1e3 * total:.1f} ms; the linears' and the head's FLOPs at GEMM peak would take "
          f"{1e3 * gemm_flops / (peak * 1e9):.1f} ms")


if __name__ == "__main__":
    main()
