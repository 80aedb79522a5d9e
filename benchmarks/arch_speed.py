"""Whole runs on the architectures GGUF brought in (Gemma 3, Gemma 2, Phi-3): the fast paths against
the general path they took before, the same command on two checkouts.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 \\
        python benchmarks/arch_speed.py --work /tmp/arch-speed --before c433d8d

``--before REV`` runs ``mlx-dpo train`` from a git worktree of ``REV`` (``PYTHONPATH``) beside this
checkout, each a fresh process with the defaults (+ ``precompute_ref_log_probs``, as ``epoch.py``)
on the ``uf64`` workload (64 pairs of UltraFeedback-like long-tailed lengths, up to 1024 tokens).
The models: ~30M random weights of each architecture at ``mk_tiny.py``'s shape (512 wide, 8 layers,
8 heads, 4 key/value heads), its byte-level BPE vocabulary; Gemma 3 with its real pattern (5 of 6
layers slide) and a 512-token window, Gemma 2 with its soft-caps (50 attention, 30 logits).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parent))
from epoch import SHARED, make_data, run_ours  # noqa: E402

SHAPE = dict(hidden_size=512, num_hidden_layers=8, intermediate_size=1536, num_attention_heads=8,
             num_key_value_heads=4, rms_norm_eps=1e-6, max_position_embeddings=4096, rope_theta=10000.0)
ARCHS = {
    "gemma3_text": dict(architectures=["Gemma3ForCausalLM"], head_dim=64, query_pre_attn_scalar=64,
                        sliding_window=512, sliding_window_pattern=6, rope_local_base_freq=10000.0),
    "gemma2": dict(architectures=["Gemma2ForCausalLM"], head_dim=64, query_pre_attn_scalar=64,
                   attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
    "phi3": dict(architectures=["Phi3ForCausalLM"]),
}
TARGETS = {"phi3": ["self_attn.qkv_proj", "self_attn.o_proj"]}  # its fused projections


def build(work: Path, arch: str) -> Path:
    """A model directory of ``arch``: ``mk_tiny.py``'s tokenizer files, mlx-lm's class at :data:`SHAPE`."""
    import importlib

    llama = work / "llama"
    if not (llama / "config.json").exists():
        subprocess.run([sys.executable, str(SHARED / "mk_tiny.py"), str(llama)], env=dict(os.environ, H="512", L="8"),
                       check=True, capture_output=True)
    out = work / arch
    if (out / "config.json").exists():
        return out
    out.mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(llama / name, out / name)
    base = json.loads((llama / "config.json").read_text())
    cfg = dict(SHAPE, **ARCHS[arch], model_type=arch, vocab_size=base["vocab_size"], torch_dtype="float32",
               eos_token_id=base["eos_token_id"], pad_token_id=base["pad_token_id"], tie_word_embeddings=arch != "phi3")
    module = importlib.import_module(f"mlx_lm.models.{arch}")
    mx.random.seed(0)
    model = module.Model(module.ModelArgs.from_dict(cfg))
    weights = {k: v for k, v in tree_flatten(model.parameters()) if k != "lm_head.weight" or arch == "phi3"}
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/arch-speed")
    ap.add_argument("--before", default="c433d8d", help="the revision to compare with (a git worktree of it)")
    ap.add_argument("--archs", default=",".join(ARCHS))
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    before = work / f"checkout-{args.before}"
    if not before.exists():
        subprocess.run(["git", "worktree", "add", "--detach", str(before), args.before], check=True,
                       cwd=Path(__file__).resolve().parents[1], capture_output=True)
    print("| architecture | before s | MB | now s | MB | before / now |\n|---|---:|---:|---:|---:|---:|")
    for arch in args.archs.split(","):
        model = build(work, arch)
        data = make_data(work, model, "uf64")
        options = {"lora_target_modules": TARGETS[arch]} if arch in TARGETS else {}
        env_before = dict(os.environ, PYTHONPATH=str(before))
        old = run_ours(work, model, data, 64, f"{arch}-before", options, env_before)
        new = run_ours(work, model, data, 64, f"{arch}-now", options)
        print(f"| {arch} | {old[0]:.0f} | {old[1]:.0f} | {new[0]:.0f} | {new[1]:.0f} | {old[0] / new[0]:.2f}x |",
              flush=True)
        print(f"|   | {old[2]} | | {new[2]} | | |", flush=True)


if __name__ == "__main__":
    main()
