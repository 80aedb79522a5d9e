"""Data parallel: 1 process vs 2 local ring ranks at the same global batch, and the bytes
all-reduced per step (also for a Qwen2.5-0.5B-shaped LoRA run, from the shapes alone).

    python benchmarks/data_parallel.py                 # both
    python benchmarks/data_parallel.py --bytes-only    # no training

Both runs walk the same global batches (the 2-rank run's adapters equal the 1-process run's,
tests/test_distributed.py), so their tokens/s compare directly. On one machine the two ranks
share its cores: this measures the overhead of the collectives, not a speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # helpers.py

from helpers import write_local_hostfile  # noqa: E402
from mlx_dpo.util.distributed import LINKS_GB_S, allreduce_bytes, ring_seconds  # noqa: E402

# Qwen2.5-0.5B: 24 layers, hidden 896, 14 query heads / 2 kv heads of 64, MLP 4864
QWEN05 = dict(layers=24, hidden=896, kv=2 * 64, mlp=4864)


def lora_shapes(layers, hidden, kv, mlp, rank, targets):
    """(shape, itemsize) of every LoRA A (in x r) and B (r x out) matrix."""
    dims = {"q_proj": (hidden, hidden), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (hidden, hidden),
            "gate_proj": (hidden, mlp), "up_proj": (hidden, mlp), "down_proj": (mlp, hidden)}
    out = []
    for _ in range(layers):
        for t in targets:
            i, o = dims[t]
            out += [((i, rank), 4), ((rank, o), 4)]
    return out


def bytes_table():
    attn = ["q_proj", "k_proj", "v_proj", "o_proj"]
    rows = [("q,k,v,o", attn), ("all-linear", attn + ["gate_proj", "up_proj", "down_proj"])]
    print("Qwen2.5-0.5B shape, LoRA r16, float32 gradients (bfloat16: half), accumulation 1:")
    for name, targets in rows:
        nbytes = allreduce_bytes(lora_shapes(rank=16, targets=targets, **QWEN05))
        links = ", ".join(f"{link} {1e3 * ring_seconds(nbytes, 2, bw):.1f} ms"
                          for link, bw in LINKS_GB_S.items())
        print(f"  {name:10s} {nbytes / 1e6:7.2f} MB per step; ring all-reduce over 2 ranks: {links}")


def run(config: dict, ranks: int, work: Path, timeout: float) -> dict:
    """Train ``config`` on ``ranks`` processes; median tokens/s of the steps after 3, and wall time."""
    out = work / f"run{ranks}"
    cfg = {**config, "output_dir": str(out), "batch_size": config["batch_size"] // ranks}
    path = work / f"config{ranks}.yaml"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    hostfile = write_local_hostfile(work / "hosts.json", ranks)
    cmd = [sys.executable, "-m", "mlx_dpo", "train", "--config", str(path)]
    tic = time.perf_counter()
    procs = [subprocess.Popen(cmd, env={**env, **({"MLX_RANK": str(r), "MLX_HOSTFILE": str(hostfile)}
                                                 if ranks > 1 else {})},
                              stdout=subprocess.DEVNULL, start_new_session=True) for r in range(ranks)]
    try:
        codes = [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, 9)
    if codes != [0] * ranks:
        raise SystemExit(f"{ranks} rank(s) failed: exit codes {codes}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"ranks": ranks, "tokens_per_second": statistics.median(r["tokens_per_second"] for r in records[3:]),
            "wall_seconds": time.perf_counter() - tic, "steps": len(records)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bytes-only", action="store_true")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8, help="global batch (pairs per step)")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--timeout", type=float, default=600)
    args = ap.parse_args()
    bytes_table()
    if args.bytes_only:
        return
    from mlx_dpo.model.toy import build_toy_dataset, build_toy_model

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = build_toy_model(work / "model", hidden_size=args.hidden, num_layers=args.layers,
                                intermediate_size=3 * args.hidden)
        data = build_toy_dataset(work / "data", n_train=args.batch * (args.steps + 1), n_valid=2)
        config = dict(model=str(model), data=str(data), max_steps=args.steps, batch_size=args.batch,
                      logging_steps=1, save_steps=0, eval_strategy="no", progress_bar=False, seed=0,
                      lora_rank=8, cache_dir=str(work / "cache"))
        os.environ["MLX_DPO_CACHE"] = str(work / "cache")
        one, two = run(config, 1, work, args.timeout), run(config, 2, work, args.timeout)
    print(f"toy Llama hidden {args.hidden}, {args.layers} layers, LoRA r8, global batch {args.batch}, "
          f"{args.steps} steps, {os.cpu_count()} cores:")
    for r in (one, two):
        print(f"  {r['ranks']} process(es): {r['tokens_per_second']:.0f} tokens/s (median, steps 4+), "
              f"{r['wall_seconds']:.1f} s wall incl. start-up")
    print(f"  2 ranks / 1 process: {two['tokens_per_second'] / one['tokens_per_second']:.2f}x tokens/s "
          "(both ranks share this machine's cores: overhead, not speed-up)")


if __name__ == "__main__":
    main()
