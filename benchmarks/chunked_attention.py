"""Block-causal attention (``mlx_dpo/forward/blocks.py``): one forward + backward over ``rows x length``
tokens with the queries in 1 (one pass, as mlx-lm runs a model), 2, 4, 8 or 16 chunks.

    python benchmarks/chunked_attention.py --model /tmp/mlx-dpo-bench/model-medium --length 1024 --rows 4

LoRA r8 on q,k,v,o, float32; the loss is the mean square of the last half's hidden states
(the gradient reaches every block). Prints the best of 3 timed calls after one warm-up, MLX's
peak memory, and the largest difference of the loss and the gradients from the one-pass run.
"""

import argparse
import time

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="an MLX/HF model directory (e.g. bench.py's model-medium)")
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--chunks", default="1,2,4,8,16")
    args = ap.parse_args()
    from mlx_lm import load

    from mlx_dpo.forward import blocks
    from mlx_dpo.model.adapters import add_adapters
    from mlx_dpo.config.fields import DPOConfig

    model, _ = load(args.model)
    model.set_dtype(mx.float32)
    add_adapters(model, DPOConfig(model=args.model, lora_rank=8, lora_alpha=16,
                                  lora_target_modules=[f"self_attn.{t}_proj" for t in "qkvo"]))
    tokens = mx.array(np.random.default_rng(0).integers(4, model.args.vocab_size, (args.rows, args.length)),
                      dtype=mx.int32)

    def loss(m):
        return (blocks.causal_hidden(m, tokens)[:, args.length // 2:] ** 2).mean()

    grad = nn.value_and_grad(model, loss)
    print(f"| chunks | tokens per chunk | fwd+bwd s | x one pass | peak GB | max |diff| loss / grads |")
    print("|---:|---:|---:|---:|---:|---|")
    first = None
    for n in [int(x) for x in args.chunks.split(",")]:
        blocks.MAX_CHUNKS, blocks.CHUNK_TOKENS = n, -(-args.length // n)
        out = grad(model)
        mx.eval(out)
        mx.reset_peak_memory()
        best = float("inf")
        for _ in range(3):
            tic = time.perf_counter()
            out = grad(model)
            mx.eval(out)
            best = min(best, time.perf_counter() - tic)
        if first is None:
            first, diff = (best, out), "-"
        else:
            ga, gb = dict(tree_flatten(first[1][1])), dict(tree_flatten(out[1]))
            diff = (f"{abs(first[1][0].item() - out[0].item()):.1e} / "
                    f"{max(float(mx.abs(ga[k] - gb[k]).max()) for k in ga):.1e}")
        print(f"| {n} | {blocks.CHUNK_TOKENS} | {best:.2f} | {first[0] / best:.2f} | "
              f"{mx.get_peak_memory() / 1e9:.2f} | {diff} |", flush=True)


if __name__ == "__main__":
    main()
