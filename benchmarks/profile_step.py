"""Where a DPO step's time goes on this machine, per op, for the benchmark's models.

    python benchmarks/profile_step.py --size medium

Times each op of one transformer block at the step's shapes in isolation (forward;
attention as the trainer runs it, in query chunks (``mlx_dpo/blocks.py``), and one-pass for comparison;
the backward of an op through frozen weights costs about the same again), the LM
head on the completion positions, and one whole compiled forward of ``model.model``;
then prints the share of each op and the GEMM rate it achieves.
"""

import argparse
import time

import mlx.core as mx
import mlx.nn as nn


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
    args = ap.parse_args()
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from bench import SIZES

    from mlx_dpo.perf import gemm_peak_gflops

    s = SIZES[args.size]
    h, inter, heads, kv = s["hidden_size"], s["intermediate_size"], s["num_heads"], s["num_kv_heads"]
    d, vocab, layers = h // heads, 8192, s["num_layers"]
    n, L = args.rows, args.length
    x = mx.random.normal((n * L, h))
    w = {"q": (heads * d, h), "k": (kv * d, h), "v": (kv * d, h), "o": (h, heads * d),
         "gate": (inter, h), "up": (inter, h)}
    ops = {}
    for name, shape in w.items():
        W = mx.random.normal(shape) * 0.02
        ops[f"matmul {name}"] = (timed(lambda a, b: a @ b.T, x, W), 2 * n * L * shape[0] * shape[1])
    Wd = mx.random.normal((h, inter)) * 0.02
    xi = mx.random.normal((n * L, inter))
    ops["matmul down"] = (timed(lambda a, b: a @ b.T, xi, Wd), 2 * n * L * h * inter)
    q = mx.random.normal((n, heads, L, d))
    k = mx.random.normal((n, kv, L, d))
    ops["attention (sdpa, causal)"] = (timed(lambda q, k: mx.fast.scaled_dot_product_attention(
        q, k, k, scale=d ** -0.5, mask="causal"), q, k), 4 * n * heads * L * L * d / 2)
    from mlx_dpo.blocks import chunk_bounds

    bounds = chunk_bounds(L)

    def block_causal(q, k):  # what mlx_dpo/blocks.py runs: query chunks, keys up to each chunk's end
        return mx.concatenate([mx.fast.scaled_dot_product_attention(
            q[:, :, a:b], k[:, :, :b], k[:, :, :b], scale=d ** -0.5, mask="causal")
            for a, b in zip(bounds, bounds[1:])], axis=2)

    attention = f"attention, block-causal ({len(bounds) - 1} chunks, as trained)"
    ops[attention] = (timed(block_causal, q, k), 4 * n * heads * L * L * d / 2)
    rope = nn.RoPE(d)
    ops["rope q+k"] = (timed(lambda q, k: (rope(q), rope(k)), q, k), 0)
    norm = nn.RMSNorm(h)
    ops["rmsnorm x2"] = (2 * timed(norm, x), 0)
    g = mx.random.normal((n * L, inter))
    ops["silu(gate)*up"] = (timed(lambda a, b: nn.silu(a) * b, g, xi), 0)
    one_pass = ops.pop("attention (sdpa, causal)")  # shown, not summed: the trainer runs the block-causal one
    per_layer = sum(t for t, _ in ops.values())
    head_x = mx.random.normal((n * args.completion, h))
    Wh = mx.random.normal((vocab, h)) * 0.02
    head = (timed(lambda a, b: mx.logsumexp(a @ b.T, axis=-1), head_x, Wh), 2 * n * args.completion * vocab * h)

    peak = gemm_peak_gflops()
    total = layers * per_layer + head[0]
    print(f"{args.size}: {n} rows x {L} tokens, {layers} layers; float32 GEMM peak {peak:.0f} GFLOP/s")
    print("| op (forward, one pass over the batch) | ms | share | GFLOP/s |")
    print("|---|---:|---:|---:|")
    for name, (t, flops) in [*ops.items(), ("attention, one pass (sdpa, causal; not summed)", one_pass)]:
        rate = f"{flops / t / 1e9:.0f}" if flops else ""
        print(f"| {name} (x{layers} layers) | {1e3 * layers * t:.1f} | {100 * layers * t / total:.0f}% | {rate} |")
    print(f"| lm head + logsumexp ({args.completion} positions/row) | {1e3 * head[0]:.1f} | "
          f"{100 * head[0] / total:.0f}% | {head[1] / head[0] / 1e9:.0f} |")
    gemm_flops = layers * sum(f for _, f in ops.values() if f) + head[1]
    print(f"sum of ops: {1e3 * total:.1f} ms per forward; at GEMM peak the FLOPs would take "
          f"{1e3 * gemm_flops / (peak * 1e9):.1f} ms")


if __name__ == "__main__":
    main()
