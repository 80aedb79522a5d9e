"""Peak memory of completion log-probs + backward: full logits vs mlx-dpo's
completion-only, chunked projection (``logprobs.completion_logps``).

    python benchmarks/logits_memory.py --vocab 151936 --tokens 1024

A random-weight Llama (hidden 256, 2 layers, untied head) with a 150k vocabulary;
one chosen + one rejected sequence of ``tokens`` tokens each, half prompt, half
completion; LoRA on q/v so there is a backward pass. "full" = ``model(tokens)``
logits for every position, ``log_softmax``, gather (what a plain trainer does).
"""

import argparse
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--hidden", type=int, default=256)
    args = ap.parse_args()

    from mlx_dpo.data.batching import collate
    from mlx_dpo.config.fields import DPOConfig
    from mlx_dpo.data import TokenizedPair
    from mlx_dpo.forward.logprobs import completion_logps
    from mlx_dpo.model.adapters import add_adapters
    from mlx_dpo.model.loader import load_model
    from mlx_dpo.model.toy import build_toy_model

    d = build_toy_model(Path(tempfile.mkdtemp()) / "m", arch="llama", hidden_size=args.hidden, num_layers=2,
                        num_heads=4, num_kv_heads=2, intermediate_size=2 * args.hidden, vocab_size=args.vocab)
    cfg = DPOConfig(model=str(d))
    model, _, _ = load_model(cfg)
    add_adapters(model, cfg)
    rng = np.random.default_rng(0)
    half = args.tokens // 2
    ids = lambda k: [int(x) for x in rng.integers(4, args.vocab, k)]  # noqa: E731
    pair = TokenizedPair(ids(half), ids(half), ids(half))
    batch = {k: mx.array(v) for k, v in collate([pair], [0]).arrays().items()}

    def full(m):
        logits = m(batch["tokens"]).astype(mx.float32)
        logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        pos = batch["positions"]
        picked = mx.take_along_axis(logp, pos[..., None], axis=1)
        token = mx.take_along_axis(picked, batch["targets"][..., None], axis=-1)[..., 0]
        return (token * batch["mask"]).sum()

    def ours(m):
        return completion_logps(m, batch)["token_logps"].sum()

    results = {}
    for name, fn in (("full logits", full), ("completion-only, chunked", ours)):
        mx.clear_cache()
        mx.reset_peak_memory()
        tic = time.perf_counter()
        value, grads = nn.value_and_grad(model, fn)(model)
        mx.eval(value, grads)
        results[name] = (value.item(), mx.get_peak_memory() / 2 ** 20, time.perf_counter() - tic)
    weights = sum(v.nbytes for _, v in __import__("mlx.utils").utils.tree_flatten(model.parameters())) / 2 ** 20
    print(f"vocab {args.vocab}, 2 x {args.tokens} tokens (completion {half}), weights {weights:.0f} MiB")
    print("| computation | peak MiB | time s | summed log-prob |")
    print("|---|---:|---:|---:|")
    for name, (v, mib, sec) in results.items():
        print(f"| {name} | {mib:.0f} | {sec:.2f} | {v:.3f} |")
    (v1, m1, _), (v2, m2, _) = results.values()
    print(f"saved: {m1 - m2:.0f} MiB ({m1 / m2:.1f}x less peak), |diff| {abs(v1 - v2):.2e}")


if __name__ == "__main__":
    main()
