"""Whole runs as a user meets them: one epoch, whole-process wall time, mlx-dpo beside mlx-lm-lora.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 \
        python benchmarks/epoch.py --work /tmp/epoch                 # uf64, uf512, n64
    python benchmarks/epoch.py --work /tmp/epoch --workloads uf64 --variants "defaults,cpu_fast_math"

The shared reference harness (``../shared/bench/realistic_epoch.py``) generalised to several workloads,
with its parts (``mk_tiny.py``: ~34M random Llama; ``run_mlxlora.sh``: mlx-lm-lora 5.10.2's own CLI
with a timing shim). Each run is a fresh process timed from outside (``/usr/bin/time``: wall time and
peak RSS), with empty mlx-dpo caches; mlx-dpo runs ``mlx-dpo train`` with its defaults plus
``precompute_ref_log_probs: true`` (and a variant's keys), and prints its own wall-time split.
Workloads (batch 4, LoRA r8/alpha16 on q,k,v,o, max_length 1024, lr 1e-5, one epoch):

- ``uf64`` / ``uf512``: 64 / 512 pairs with UltraFeedback-like long-tailed lengths (the harness's);
- ``n64``: 128 pairs with prompt and completions ~N(64, 8) tokens.

Run it once before timing on a fresh machine: MLX JIT-compiles its CPU kernels on first use
(cached under /tmp/mlx), which is not what a second run pays.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

SHARED = Path(__file__).resolve().parents[2] / "shared" / "bench"
WORKLOADS = {  # name: (pairs, length model)
    "uf64": (64, "ultrafeedback"),
    "uf512": (512, "ultrafeedback"),
    "n64": (128, "normal"),
}
VARIANTS = {  # mlx-dpo: the defaults (+ precompute, as the harness) and alternatives to weigh against them
    "defaults": {},
    "cpu_fast_math": {"cpu_fast_math": True},
    "unshared": {"prefix_sharing": False},
    "padding_free": {"padding_free": True},
}
BATCH = 4
TARGETS = [f"self_attn.{p}_proj" for p in "qkvo"]


def make_data(work: Path, model: Path, name: str) -> Path:
    """The workload's train.jsonl (+ a 4-pair valid.jsonl for the peer's CLI), text from the model's
    tokenizer so that the lengths hold in tokens (as the shared harness does)."""
    pairs, kind = WORKLOADS[name]
    data = work / f"data-{name}"
    if (data / "train.jsonl").exists():
        return data
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    rng = np.random.default_rng(0)
    vocab = list(range(300, min(8000, tok.vocab_size)))

    def text(n):
        return tok.decode(rng.choice(vocab, size=int(n)).tolist()).replace("\n", " ")

    def length(median):
        if kind == "normal":
            return max(8, rng.normal(median, 8))
        return float(np.clip(rng.lognormal(np.log(median), 0.9 if median == 90 else 0.6), 8, 512))

    prompt, completion = (64, 64) if kind == "normal" else (90, 220)
    data.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", pairs), ("valid", 4)):
        with open(data / f"{split}.jsonl", "w") as f:
            for _ in range(n):
                f.write(json.dumps({"prompt": text(length(prompt)), "chosen": " " + text(length(completion)),
                                    "rejected": " " + text(length(completion))}) + "\n")
    return data


def timed(cmd: list, env: dict, log: Path) -> tuple:
    """Wall seconds, peak RSS MB and output of ``cmd`` run under /usr/bin/time."""
    tic = time.perf_counter()
    p = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - tic
    log.write_text(p.stdout + p.stderr)
    if p.returncode:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{(p.stdout + p.stderr)[-1500:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr).group(1)) / 1024
    return seconds, rss, p.stdout


def run_peer(work: Path, model: Path, data: Path, pairs: int) -> tuple:
    venv = work / "venv-mlxlora"
    if not (venv / "bin" / "mlx_lm_lora.train").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "mlx[cpu]==0.32.4", "mlx-lm==0.32.2",
                        "mlx-lm-lora==5.10.2"], check=True)
    out = work / f"peer-{data.name}"
    env = dict(os.environ, VENV=str(venv), OUT=str(out), STEPS=str(pairs // BATCH - 1), WARMUP="0",
               MAXLEN="1024", VAL_BATCHES="1")
    return timed(["bash", str(SHARED / "run_mlxlora.sh"), str(model), str(data)], env, work / f"peer-{data.name}.log")


def run_ours(work: Path, model: Path, data: Path, pairs: int, name: str, options: dict, env: dict = None) -> tuple:
    """``mlx-dpo train`` with the defaults plus ``options``, under ``env`` (default: this process's)."""
    slug = f"{data.name}-{re.sub(r'[^a-z0-9]+', '_', name)}"
    out, cache = work / f"ours-{slug}", work / f"cache-{slug}"
    for d in (out, cache):
        shutil.rmtree(d, ignore_errors=True)
    cfg = dict(model=str(model), data=str(data / "train.jsonl"), output_dir=str(out), batch_size=BATCH,
               learning_rate=1e-5, lora_rank=8, lora_alpha=16, lora_dropout=0.0, beta=0.1,
               lr_scheduler_type="constant", warmup_steps=0, max_length=1024, precompute_ref_log_probs=True,
               eval_steps=100000, save_steps=100000, seed=0, progress_bar=False, cache_dir=str(cache),
               lora_target_modules=TARGETS, max_steps=pairs // BATCH)
    cfg.update(options)
    path = work / f"ours-{slug}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    seconds, rss, stdout = timed(["mlx-dpo", "train", "--config", str(path)], env or dict(os.environ),
                                 work / f"ours-{slug}.log")
    split = next((line for line in stdout.splitlines() if line.startswith("time: ")), "")
    return seconds, rss, split


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/mlx-dpo-epoch")
    ap.add_argument("--workloads", default="uf64,uf512,n64")
    ap.add_argument("--variants", default="defaults", help=f"comma-separated, of: {', '.join(VARIANTS)}")
    ap.add_argument("--no-peer", action="store_true", help="mlx-dpo only")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model = work / "small"
    if not (model / "config.json").exists():
        subprocess.run([sys.executable, str(SHARED / "mk_tiny.py"), str(model)], env=dict(os.environ, H="512", L="8"),
                       check=True, capture_output=True)
    rows = []
    for wl in args.workloads.split(","):
        data = make_data(work, model, wl)
        pairs = WORKLOADS[wl][0]
        peer = None if args.no_peer else run_peer(work, model, data, pairs)
        if peer:
            print(f"{wl}: mlx-lm-lora {peer[0]:.0f} s, {peer[1]:.0f} MB", flush=True)
        for name in args.variants.split(","):
            seconds, rss, split = run_ours(work, model, data, pairs, name, VARIANTS[name])
            ratio = f"{peer[0] / seconds:.2f}x" if peer else ""
            print(f"{wl}: mlx-dpo ({name}) {seconds:.0f} s, {rss:.0f} MB {ratio}\n    {split}", flush=True)
            rows.append((wl, name, peer, seconds, rss))
    print("\n| workload | run | wall s | x mlx-lm-lora | peak RSS MB | x peer RSS |")
    print("|---|---|---:|---:|---:|---:|")
    for i, (wl, name, peer, seconds, rss) in enumerate(rows):
        if peer and (i == 0 or rows[i - 1][0] != wl):
            print(f"| {wl} | mlx-lm-lora 5.10.2 | {peer[0]:.0f} | 1.00 | {peer[1]:.0f} | 1.00 |")
        print(f"| {wl} | mlx-dpo ({name}) | {seconds:.0f} | {peer[0] / seconds if peer else float('nan'):.2f} | "
              f"{rss:.0f} | {rss / peer[1] if peer else float('nan'):.2f} |")


if __name__ == "__main__":
    main()
