"""What each GGUF tensor type costs a training step on the CPU backend.

On the CPU a quantized weight is de-quantized per matmul (``mlx_dpo/model/quant.py``); a GGUF's
types become MLX affine groups of 4 (Q4_0, Q4_1, Q4_K), 5 (Q5_*, Q5_K) or 8 bits (Q8_0, Q3_K, and
Q6_K/Q2_K re-quantized), with float16 scales (the 32-weight types) or float32 (the K types). This
times the forward + backward of one linear layer of SmolLM2-1.7B's MLP shape (2048 -> 8192) on 512
tokens per type, against the same layer held dense in float32, in one run (ratios only). A CPU
run's default compute dtype (float32) casts every scale to float32 at load, so the float32 rows are
what training on the CPU pays; the float16 rows are the stored form (Metal keeps it):

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 python benchmarks/kquant_cpu.py
"""

import time

import mlx.core as mx
import mlx.nn as nn

from mlx_dpo.model.quant import base_linear

SHAPE, TOKENS, REPEATS = (8192, 2048), 512, 10
# (name, bits, scale dtype): what mlx_dpo.model.ggml makes of each type
TYPES = [("Q4_0 / Q4_1", 4, mx.float16), ("Q4_K", 4, mx.float32), ("Q5_0 / Q5_1", 5, mx.float16),
         ("Q5_K", 5, mx.float32), ("Q8_0", 8, mx.float16), ("Q3_K / Q6_K / Q2_K", 8, mx.float32)]


def seconds(layer, x) -> float:
    def loss(x):
        return base_linear(layer, x).square().sum()

    step = mx.grad(loss)
    mx.eval(step(x))  # warm-up: kernels and the graph
    tic = time.perf_counter()
    for _ in range(REPEATS):
        mx.eval(step(x))
    return (time.perf_counter() - tic) / REPEATS


def main():
    mx.random.seed(0)
    w = mx.random.normal(SHAPE) * 0.02
    x = mx.random.normal((TOKENS, SHAPE[1]))
    dense = nn.Linear(SHAPE[1], SHAPE[0], bias=False)
    dense.weight = w
    base = seconds(dense, x)
    print(f"dense float32: {base * 1e3:.1f} ms per forward + backward ({TOKENS} tokens, {SHAPE[1]} -> {SHAPE[0]})")
    for name, bits, scale_dtype in TYPES:
        layer = nn.QuantizedLinear(SHAPE[1], SHAPE[0], bias=False, group_size=32, bits=bits)
        layer.weight, scales, biases = mx.quantize(w, group_size=32, bits=bits)
        layer.scales, layer.biases = scales.astype(scale_dtype), biases.astype(scale_dtype)
        s = seconds(layer, x)
        print(f"{name:<20} {bits} bits, {str(scale_dtype).split('.')[-1]} scales: {s * 1e3:6.1f} ms, "
              f"{s / base:.2f}x dense")


if __name__ == "__main__":
    main()
