"""KTO on a real model: SmolLM2-135M-Instruct with thumbs-up / thumbs-down labels from a judge.

    python examples/kto_smollm2.py [--work runs/smollm2-kto] [--max-chars 200]

The samples are the model's own answers that ``mlx-dpo sample --judge shorter`` wrote, with the
judge's score (minus the answer's characters), to ``examples/data/smollm2-shorter/`` (its README has
the commands: 48 training and 16 held-out questions, the shortest and the longest of 4 samples
each). Each sample becomes one unpaired row labelled by a judge threshold: 👍 when the judge scores
it at least ``-max_chars`` (an answer of at most ``max_chars`` characters), 👎 otherwise. Then one
epoch of ``kto`` with ``configs/smollm2-135m.yaml``'s recipe (QLoRA on the 4-bit GGUF, LoRA r8 on the
last 8 blocks, lr 1e-3, completions cut at 40 tokens), batch 8 rows, ``desirable_weight`` in TRL's
recommended range for the label counts, as a ``mlx-dpo train`` process.

Printed: the held-out rows' mean reward ``beta log(pi / pi_ref)`` of the desirable minus the
undesirable ones, before training (step 0's evaluation: the policy is the reference) and after,
from the run's evaluations (``eval_rewards/*``) and from ``mlx-dpo audit`` over every held-out row.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "examples" / "data" / "smollm2-shorter"


def label_samples(split: str, max_chars: int) -> list:
    """Every sample of ``split`` as an unpaired row labelled by the judge's threshold."""
    rows = []
    for line in (SAMPLES / f"{split}.jsonl").read_text().splitlines():
        pair = json.loads(line)
        for side in ("chosen", "rejected"):
            rows.append({"prompt": pair["prompt"], "completion": pair[side],
                         "label": bool(pair[f"score_{side}"] >= -max_chars)})
    return rows


def desirable_weight(rows: list) -> float:
    """The middle of TRL's recommended range for ``desirable_weight`` (undesirable_weight 1)."""
    n_des = sum(r["label"] for r in rows)
    ratio = (len(rows) - n_des) / n_des
    return round(ratio * (1 + 1.33) / 2, 2)


def train(work: Path, train_file: Path, heldout_file: Path, weight: float) -> Path:
    run = work / "run"
    cli = [shutil.which("mlx-dpo")] if shutil.which("mlx-dpo") else [sys.executable, "-m", "mlx_dpo"]
    cmd = [*cli, "train", "--config", str(ROOT / "configs" / "smollm2-135m.yaml"), "--loss-type", "kto",
           "--data", str(train_file), "--eval-data", str(heldout_file), "--output-dir", str(run), "--overwrite",
           "--batch-size", "8", "--desirable-weight", str(weight), "--eval-steps", "12",
           "--no-generate-during-eval"]
    print("$", " ".join(cmd), flush=True)
    tic = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT)
    print(f"training process: {time.perf_counter() - tic:.0f} s")
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "smollm2-kto")
    ap.add_argument("--max-chars", type=int, default=200, help="longest answer that gets a thumbs-up")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    files = {}
    for split in ("train", "heldout"):
        rows = label_samples(split, args.max_chars)
        files[split] = args.work / f"{split}.jsonl"
        files[split].write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"{split}: {len(rows)} rows, {sum(r['label'] for r in rows)} desirable (<= {args.max_chars} chars)")
    weight = desirable_weight([json.loads(x) for x in files["train"].read_text().splitlines()])
    run = train(args.work, files["train"], files["heldout"], weight)

    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval_loss" in r]
    print("| held-out (32 rows) | " + " | ".join(f"step {r['step']}" for r in evals) + " |")
    print("|---|" + "---:|" * len(evals))
    for key in ("eval_rewards/chosen", "eval_rewards/rejected", "eval_rewards/margins", "eval_loss", "eval_kl"):
        print(f"| `{key}` | " + " | ".join(f"{r.get(key, float('nan')):.4f}" for r in evals) + " |")

    from mlx_dpo.analysis.audit import audit

    result = audit(run, data=str(files["heldout"]), top=10 ** 6, output=args.work / "audit.jsonl")
    rewards = {True: [], False: []}
    for entry in result["worst"]:
        rewards[entry["label"]].append(entry["reward"])
    gap = np.mean(rewards[True]) - np.mean(rewards[False])
    print(f"audit, after: held-out mean reward desirable {np.mean(rewards[True]):.4f} - undesirable "
          f"{np.mean(rewards[False]):.4f} = {gap:.4f} (before: 0, the policy is the reference); "
          f"{result['negative']} of {result['pairs']} rows rated against their label")


if __name__ == "__main__":
    main()
