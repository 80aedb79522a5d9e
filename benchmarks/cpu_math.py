"""Polynomial exp/sigmoid on MLX's CPU backend (``mlx_dpo/forward/cpu_math.py``) against MLX's kernels.

    python benchmarks/cpu_math.py --model /tmp/mlx-dpo-bench/model-medium --rows 8 --length 640

First each op alone, compiled (as the training step is), at the shapes of one block of the
~34M Llama at ``rows x length`` tokens; then one compiled forward + backward of the whole model
(block-causal, LoRA r8 on q,k,v,o, float32, loss = summed log-probs of the last 70% of each row)
with MLX's kernels and with ``enable_cpu_math``, each twice, interleaved: best of 6 after warm-ups, and the largest
differences of the loss and of the gradients (relative to the largest gradient).
"""

import argparse

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten
from profile_step import fwd_bwd, timed  # timed: compiles, warms up, best of ``repeats``


def op_table(rows, length, hidden, inter, heads, kv_heads):
    from mlx_lm.models.activations import swiglu

    from mlx_dpo.forward import cpu_math

    d, chunk = hidden // heads, 128
    key = iter(mx.random.split(mx.random.key(0), 8))
    gate, up = (mx.random.normal((rows * length, inter), key=next(key)) for _ in range(2))
    q = mx.random.normal((rows, heads, chunk, d), key=next(key))
    k, v = (mx.random.normal((rows, kv_heads, length, d), key=next(key)) for _ in range(2))
    scores = mx.random.normal((rows, heads, chunk, length), key=next(key)) * 3
    cases = [
        ("exp (x <= 0)", lambda x: mx.exp(x), cpu_math.exp_nonpositive, [-mx.abs(scores)]),
        ("softmax, one chunk's scores", lambda x: mx.softmax(x, axis=-1), cpu_math.softmax, [scores]),
        ("swiglu, one block", swiglu, cpu_math.swiglu, [gate, up]),
        ("attention, last 128-query chunk",
         lambda q, k, v: mx.fast.scaled_dot_product_attention(q, k, v, scale=d ** -0.5, mask="causal"),
         lambda q, k, v: cpu_math.attention(q, k, v, d ** -0.5, "causal"), [q, k, v]),
    ]
    print("| op | shape | MLX fwd ms | ours fwd ms | MLX fwd+bwd ms | ours fwd+bwd ms | x fwd+bwd |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name, theirs, ours, args in cases:
        t = [timed(f, *args, repeats=3) for f in (theirs, ours)]
        tb = [timed(fwd_bwd(f), *args, repeats=3) for f in (theirs, ours)]
        print(f"| {name} | {'x'.join(map(str, args[0].shape))} | {t[0] * 1e3:.1f} | {t[1] * 1e3:.1f} | "
              f"{tb[0] * 1e3:.1f} | {tb[1] * 1e3:.1f} | {tb[0] / tb[1]:.2f} |", flush=True)


def model_step(model_dir, rows, length):
    from mlx_lm import load

    from mlx_dpo.forward import blocks, cpu_math, logprobs
    from mlx_dpo.model.adapters import add_adapters
    from mlx_dpo.config.fields import DPOConfig

    model, _ = load(model_dir)
    model.set_dtype(mx.float32)
    add_adapters(model, DPOConfig(model=model_dir, lora_rank=8, lora_alpha=16,
                                  lora_target_modules=[f"self_attn.{t}_proj" for t in "qkvo"]))
    for layer in [m for _, m in model.named_modules() if hasattr(m, "lora_b")]:
        layer.lora_b = mx.random.normal(layer.lora_b.shape, key=mx.random.key(1)) * 0.01
    tokens = mx.array(np.random.default_rng(0).integers(4, model.args.vocab_size, (rows, length)), dtype=mx.int32)
    scored = int(length * 0.7)
    params = model.trainable_parameters()

    def loss(p):
        model.update(p)
        h = blocks.causal_hidden(model, tokens)[:, -scored - 1:-1]
        logits = logprobs.project(model, h).astype(mx.float32)
        return (mx.take_along_axis(logits, tokens[:, -scored:, None], -1)[..., 0]
                - mx.logsumexp(logits, axis=-1)).sum()

    def set_kernels(ours):
        if ours:
            cpu_math.enable_cpu_math(model)
        else:  # undo it (benchmark only): MLX's attention and the MLP's own class
            for layer in model.model.layers:
                layer.cpu_math = False
                if getattr(type(layer.mlp), "cpu_math", False):
                    layer.mlp.__class__ = type(layer.mlp).__base__

    results = {}
    for ours in (False, True, False, True):  # twice each, interleaved: the machine drifts
        set_kernels(ours)
        step = mx.compile(mx.value_and_grad(loss))  # a new trace: the blocks changed
        t = timed(step, params, repeats=3)
        results[ours] = (min(t, results.get(ours, (t,))[0]), step(params))
    model.update(params)
    (t0, (v0, g0)), (t1, (v1, g1)) = results[False], results[True]
    ga, gb = dict(tree_flatten(g0)), dict(tree_flatten(g1))
    scale = max(float(mx.abs(x).max()) for x in ga.values())
    grad_diff = max(float(mx.abs(ga[k] - gb[k]).max()) for k in ga) / scale
    print(f"\nwhole model, {rows} x {length} tokens, forward + backward: MLX kernels {t0:.2f} s, "
          f"cpu_math {t1:.2f} s (x{t0 / t1:.2f}); loss {v0.item():.6g} vs {v1.item():.6g} "
          f"(rel {abs(v0.item() - v1.item()) / abs(v0.item()):.1e}), gradients rel {grad_diff:.1e}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="an MLX/HF model directory (e.g. bench.py's model-medium)")
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--length", type=int, default=640)
    ap.add_argument("--cache-limit-gb", type=float, default=None, help="mx.set_cache_limit (MLX's CPU default: 32 MiB)")
    args = ap.parse_args()
    if args.cache_limit_gb is not None:
        mx.set_cache_limit(int(args.cache_limit_gb * 2**30))
    import json
    from pathlib import Path

    c = json.loads((Path(args.model) / "config.json").read_text())
    op_table(args.rows, args.length, c["hidden_size"], c["intermediate_size"], c["num_attention_heads"],
             c.get("num_key_value_heads", c["num_attention_heads"]))
    model_step(args.model, args.rows, args.length)


if __name__ == "__main__":
    main()
