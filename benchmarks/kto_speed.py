"""KTO against paired DPO on the same tokens (issue 30): whole-process wall time, tokens/s, peak memory.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 \
        python benchmarks/kto_speed.py --work /tmp/kto_speed [--pairs 64] [--max-length 512]

One file of pairs with UltraFeedback-like long-tailed token lengths (``tests/helpers.py``'s
``lognormal_lengths``; text of the toy vocabulary, so the lengths hold in the toy tokenizer's tokens)
is trained for one epoch, each run a fresh ``mlx-dpo train`` process timed from outside (wall time,
peak RSS from ``wait4``) with its own empty caches, on a random toy Llama (``mlx_dpo.model.toy``),
LoRA r8 on q/k/v/o, lr 1e-5, reference = adapters off, no evaluation or checkpoints:

- ``dpo``: ``sigmoid`` on the pairs, batch 4 pairs (8 sequences a step);
- ``kto``: the same pairs given to ``kto``, which unpairs them as TRL's ``unpair_preference_dataset``
  (one desirable and one undesirable row per pair), batch 8 rows: the same data per step, plus
  each row's KL sequence (its prompt with the previous row's completion), 16 sequences a step;
- ``apo_zero_unpaired``: the same rows, batch 8, no KL sequences (8 sequences a step).

So the three train the same data tokens in the same number of steps. "data tok/s" is those tokens
over the whole process's wall time (start-up, tokenization, compilation included); "step tok/s"
is the trainer's own ``tokens_per_second`` (the tokens it forwards, KL sequences included) over the
steps; "peak MLX" is the trainer's ``peak_memory_gb``, "peak RSS" the process's; "positions" the
input positions (real and padding) the epoch's batches hold as the trainer pads them, "padding" their
padding fraction (computed in this process before the run).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # helpers.py

MODEL = dict(hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=768)
RUNS = {  # name: (loss_type, batch_size)
    "dpo": ("sigmoid", 4),
    "kto": ("kto", 8),
    "apo_zero_unpaired": ("apo_zero_unpaired", 8),
}


def word_text(tokenizer, n: int, rng) -> str:
    """About ``n`` tokens of toy-vocabulary words (each ' word' encodes to its own tokens)."""
    from mlx_dpo.model.toy import WORDS

    cost = {w: len(tokenizer.encode(" " + w, add_special_tokens=False)) for w in WORDS}
    words, total = [], 0
    while total < n:
        w = WORDS[int(rng.integers(len(WORDS)))]
        words.append(w)
        total += cost[w]
    return " " + " ".join(words)


def make_inputs(work: Path, pairs: int, max_length: int) -> tuple:
    """The toy model and the pairs file (built once), and the pairs' tokenized lengths."""
    from helpers import lognormal_lengths
    from mlx_lm.utils import load_tokenizer

    from mlx_dpo.config.fields import DPOConfig
    from mlx_dpo.data import tokenize_pairs
    from mlx_dpo.model.toy import build_toy_model

    model = work / "model"
    if not (model / "model.safetensors").exists():
        build_toy_model(model, arch="llama", **MODEL)
    tokenizer = load_tokenizer(model)
    rng = np.random.default_rng(0)
    records = [{"prompt": word_text(tokenizer, p, rng), "chosen": word_text(tokenizer, max(1, c - 1), rng),
                "rejected": word_text(tokenizer, max(1, r - 1), rng)}
               for p, c, r in lognormal_lengths(pairs, seed=0, max_length=max_length - 2)]
    data = work / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    tokenized, _ = tokenize_pairs(records, tokenizer, DPOConfig(max_length=max_length))
    return model, data, tokenized


def run_config(work: Path, name: str, model: Path, data: Path, max_length: int) -> dict:
    loss_type, batch = RUNS[name]
    out = work / f"run-{name}"
    return {"model": str(model), "data": str(data), "output_dir": str(out), "cache_dir": str(out / "cache"),
            "loss_type": loss_type, "batch_size": batch, "num_train_epochs": 1, "max_steps": -1,
            "learning_rate": 1e-5, "lora_rank": 8, "lora_alpha": 16, "max_length": max_length,
            "lora_target_modules": [f"self_attn.{p}_proj" for p in "qkvo"], "eval_split": 0.0, "eval_steps": 0,
            "save_steps": 0, "logging_steps": 1, "progress_bar": False, "seed": 0}


def padded_positions(cfg: dict) -> tuple:
    """``(input positions, padding fraction)`` of the run's epoch: its batches as its trainer pads them."""
    from mlx_dpo.config.fields import DPOConfig
    from mlx_dpo.train.trainer import DPOTrainer

    trainer = DPOTrainer(DPOConfig(**{**cfg, "output_dir": cfg["output_dir"] + "-pad"}), log=lambda *a: None)
    batches = [trainer.collate(trainer.train_pairs, b) for b in trainer.sampler.epoch_batches(0)]
    slots = sum(b.slots for b in batches)
    shutil.rmtree(cfg["output_dir"] + "-pad", ignore_errors=True)
    return slots, 1 - sum(b.filled for b in batches) / slots


def run(name: str, cfg: dict) -> dict:
    """One ``mlx-dpo train`` process: its wall time, peak RSS and logged metrics."""
    out = Path(cfg["output_dir"])
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    (out.parent / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
    cli = [shutil.which("mlx-dpo")] if shutil.which("mlx-dpo") else [sys.executable, "-m", "mlx_dpo"]
    with open(out.parent / f"{name}.log", "w") as log:
        tic = time.perf_counter()
        proc = subprocess.Popen([*cli, "train", "--config", str(out.parent / f"{name}.yaml")], stdout=log,
                                stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - tic
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{name}: mlx-dpo train failed (exit {os.waitstatus_to_exitcode(status)}); see "
                         f"{out.parent / f'{name}.log'}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "tokens_per_second" in r]
    return {"wall": wall, "rss_mb": usage.ru_maxrss / 1024, "steps": max(r["step"] for r in records),
            "step_tps": float(np.median([r["tokens_per_second"] for r in steps])),
            "peak_gb": max(r.get("peak_memory_gb", 0.0) for r in records)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/kto_speed"))
    ap.add_argument("--pairs", type=int, default=64)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--runs", default=",".join(RUNS), help="comma-separated, of " + ", ".join(RUNS))
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    model, data, pairs = make_inputs(args.work, args.pairs, args.max_length)
    trained = pairs[: len(pairs) // 4 * 4]  # every run drops the same leftover: 4 pairs = 8 rows a step
    tokens = sum(2 * len(p.prompt) + len(p.chosen) + len(p.rejected) for p in trained)
    lengths = np.array([[len(p.prompt), len(p.chosen), len(p.rejected)] for p in pairs])
    print(f"toy Llama {MODEL}, {len(pairs)} pairs ({2 * len(pairs)} unpaired rows), token lengths "
          f"prompt/chosen/rejected median {np.median(lengths, 0).tolist()}, max {lengths.max(0).tolist()}; "
          f"{tokens} data tokens trained per epoch")
    print("| run | steps | wall s | data tok/s | step tok/s (median) | peak MLX GB | peak RSS MB | positions | padding |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.runs.split(","):
        cfg = run_config(args.work, name, model, data, args.max_length)
        slots, padding = padded_positions(cfg)
        r = run(name, cfg)
        print(f"| {name} (batch {RUNS[name][1]}) | {r['steps']} | {r['wall']:.1f} | {tokens / r['wall']:.0f} | "
              f"{r['step_tps']:.0f} | {r['peak_gb']:.3f} | {r['rss_mb']:.0f} | {slots} | {padding:.2f} |", flush=True)


if __name__ == "__main__":
    main()
