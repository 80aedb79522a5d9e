"""Throughput / memory benchmark: mlx-dpo beside mlx-lm-lora and TRL+PEFT.

    python benchmarks/bench.py --size medium --peers
    python benchmarks/bench.py --lengths ultrafeedback --size small --pairs 64 --peers

Builds random-weight Llama models in HF format (``toy.build_toy_model``, the toy BPE
tokenizer's vocabulary padded to 8192; or ``--model DIR``, an MLX/HF model directory),
random token-id preference pairs (``--lengths normal``: prompt and completions ~N(len,
8 tokens) long; ``ultrafeedback``: lognormal, long-tailed lengths up to ``--max-length``,
``ULTRAFEEDBACK_LENGTHS`` (tests/helpers.py); all ending in EOS), and trains LoRA r8/alpha16 on
q,k,v,o for ``warmup + steps`` steps at ``batch`` pairs per step, float32. Every run
is its own subprocess: peak RSS is that child's ``ru_maxrss`` (``os.wait4``), ``process s`` its
whole-process wall time (start-up, loading, compiling, every step: what a user waits; with
``--lengths ultrafeedback`` one epoch). ``benchmarks/epoch.py`` runs the users' own command,
``mlx-dpo train`` with the defaults, the same way.
tokens/s counts the real tokens of both sequences of a pair (prompt included twice)
over the steps after the warm-up. With ``--peers``, mlx-lm-lora 5.10.2 and TRL 1.16 +
PEFT run with the same settings in their own venvs (created on first use).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
SIZES = {  # name: build_toy_model arguments
    "small": dict(hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=384),
    "medium": dict(hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=4, intermediate_size=1536),
}
VARIANTS = {  # mlx-dpo settings
    "mlx-dpo (plain)": dict(prefix_sharing="false", precompute_ref_log_probs=False),
    "mlx-dpo (prefix)": dict(prefix_sharing="true", precompute_ref_log_probs=False),
    "mlx-dpo (precompute)": dict(prefix_sharing="false", precompute_ref_log_probs=True),
    "mlx-dpo (prefix+precompute)": dict(prefix_sharing="true", precompute_ref_log_probs=True),
    "mlx-dpo (padding_free)": dict(padding_free=True, precompute_ref_log_probs=False),
    "mlx-dpo (padding_free+precompute)": dict(padding_free=True, precompute_ref_log_probs=True),
    "mlx-dpo (padding_free+precompute+ckpt)": dict(padding_free=True, precompute_ref_log_probs=True,
                                                   gradient_checkpointing=True),
    "mlx-dpo (prefix+precompute+ckpt)": dict(prefix_sharing="true", precompute_ref_log_probs=True,
                                             gradient_checkpointing=True),
    # MLX's own exp/sigmoid kernels instead of mlx_dpo/forward/cpu_math.py (the default on the CPU backend)
    "mlx-dpo (plain; MLX kernels)": dict(prefix_sharing="false", precompute_ref_log_probs=False,
                                         cpu_fast_math=False),
    "mlx-dpo (padding_free+precompute; MLX kernels)": dict(padding_free=True, precompute_ref_log_probs=True,
                                                           cpu_fast_math=False),
    # MLX's CPU buffer cache at 8 GiB instead of its 32 MiB default (not a config option: the worker sets it)
    "mlx-dpo (plain; 8 GiB cache)": dict(prefix_sharing="false", precompute_ref_log_probs=False, cache_limit_gb=8),
    "mlx-dpo (padding_free+precompute; 8 GiB cache)": dict(padding_free=True, precompute_ref_log_probs=True,
                                                           cache_limit_gb=8),
}
PEERS = {
    "mlx-lm-lora": ("mlxlora", ["mlx-lm-lora==5.10.2", "mlx[cpu]"], "mlx_lm_lora_driver.py", {}),
    # the same with torch installed, as most users of transformers have it (mlx-lm's tokenizer
    # import loads transformers' AutoTokenizer, which imports torch when it is installed)
    "mlx-lm-lora (with torch)": ("mlxlora-torch", ["mlx-lm-lora==5.10.2", "mlx[cpu]", "torch==2.13.0"],
                                 "mlx_lm_lora_driver.py", {}),
    "trl+peft": ("trl", ["trl==1.16", "peft", "torch==2.13.0"], "trl_driver.py", {}),
    "trl+peft (precompute)": ("trl", ["trl==1.16", "peft", "torch==2.13.0"], "trl_driver.py", {"precompute": True}),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3"


def pair_lengths(args, n: int, rng) -> list:
    """(prompt, chosen, rejected) token lengths, EOS and BOS included."""
    if args.lengths == "ultrafeedback":
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        from helpers import lognormal_lengths  # tests/helpers.py

        return [(max(p, 2), c, r) for p, c, r in lognormal_lengths(n, seed=0, max_length=args.max_length - 1)]
    draw = lambda mean: max(2, int(rng.normal(mean, 8)))  # noqa: E731
    return [(draw(args.prompt_len), draw(args.completion_len), draw(args.completion_len)) for _ in range(n)]


def build_inputs(work: Path, size: str, args) -> dict:
    from mlx_dpo.model.toy import build_toy_model

    if args.model:  # a real model (e.g. converted from a GGUF): its vocabulary, its weights
        model, vocab = Path(args.model), json.loads((Path(args.model) / "config.json").read_text())["vocab_size"]
    else:
        model, vocab = work / f"model-{size}", 8192
        if not (model / "model.safetensors").exists():
            build_toy_model(model, arch="llama", vocab_size=vocab, **SIZES[size])
    rng = np.random.default_rng(0)
    n = args.pairs or (args.steps + args.warmup) * args.batch
    eos = 2
    ids = lambda k: [int(x) for x in rng.integers(4, vocab, k)]  # noqa: E731
    pairs = [{"prompt": [1] + ids(p - 1), "chosen": ids(c - 1) + [eos], "rejected": ids(r - 1) + [eos]}
             for p, c, r in pair_lengths(args, n, rng)]
    data = work / f"pairs-{args.lengths}-{args.prompt_len}-{args.completion_len}-{n}-{vocab}.json"
    data.write_text(json.dumps(pairs))
    tokens = [2 * len(p["prompt"]) + len(p["chosen"]) + len(p["rejected"]) for p in pairs]
    whole = args.lengths == "ultrafeedback"  # one epoch, timed end to end
    return {"model": str(model), "data": str(data), "tokens_per_pair": float(np.mean(tokens)),
            "total_tokens": int(sum(tokens[: n // args.batch * args.batch])), "whole_epoch": whole,
            "steps": n // args.batch if whole else args.steps, "warmup": 0 if whole else args.warmup,
            "batch_size": args.batch, "lora_rank": 8, "lora_alpha": 16, "targets": TARGETS}


def worker(spec_path: str) -> None:
    """One mlx-dpo run (in its own process), importing mlx-lm as ``mlx-dpo train`` does."""
    try:
        from mlx_dpo.entry import import_mlx_lm_without_torch
    except ImportError:  # a checkout from before mlx_dpo/entry.py
        pass
    else:
        import_mlx_lm_without_torch()
    import mlx.core as mx

    from mlx_dpo.config.fields import DPOConfig
    from mlx_dpo.data import TokenizedPair
    from mlx_dpo.model.loader import load_model
    from mlx_dpo.monitor.perf import gemm_peak_gflops
    from mlx_dpo.train.trainer import DPOTrainer

    spec = json.loads(Path(spec_path).read_text())
    options = dict(spec["options"])
    cache_limit_gb = options.pop("cache_limit_gb", None)  # a benchmark knob, not a DPOConfig key
    if cache_limit_gb:
        mx.set_cache_limit(int(cache_limit_gb * 2 ** 30))
    pairs = [TokenizedPair(p["prompt"], p["chosen"], p["rejected"]) for p in json.loads(Path(spec["data"]).read_text())]
    cfg = DPOConfig(model=spec["model"], lora_rank=8, lora_alpha=16, lora_target_modules=[f"self_attn.{t}" for t in TARGETS],
                    batch_size=spec["batch_size"], max_steps=spec["steps"] + spec["warmup"], learning_rate=1e-5,
                    logging_steps=10 ** 6, eval_steps=0, save_steps=0, progress_bar=False, output_dir=spec["out"],
                    overwrite_output_dir=True, beta=0.1, **options)
    model, tok, _ = load_model(cfg)
    trainer = DPOTrainer(cfg, model, tok, pairs, [], log=lambda *a: None)

    padding = [0, 0]  # input positions, real tokens of the batches trained on
    collate = trainer.collate

    def counting_collate(p, indices):
        batch = collate(p, indices)
        if p is trainer.train_pairs:  # (a checkout from before Batch.slots counts nothing)
            padding[0], padding[1] = padding[0] + getattr(batch, "slots", 0), padding[1] + getattr(batch, "filled", 0)
        return batch

    trainer.collate = counting_collate
    tic = time.perf_counter()
    if trainer.precompute and trainer.use_reference:
        trainer.precompute_reference()
        trainer.precompute_reference = lambda: None
    precompute_s = time.perf_counter() - tic
    trainer.train()
    wall = time.perf_counter() - tic
    t = trainer.throughput
    tps = spec["total_tokens"] / wall if spec["whole_epoch"] else t.tokens_per_second
    peak = gemm_peak_gflops()
    print("BENCH_RESULT " + json.dumps({
        "tokens_per_second": tps, "gemm_peak_gflops": peak, "precompute_seconds": precompute_s,
        "compiled_shapes": getattr(trainer, "trace_count", None), "compile_seconds": getattr(trainer, "compile_seconds", None),
        "padding_fraction": 1 - padding[1] / max(padding[0], 1) if padding[0] else None,
        "flops_per_token": __import__("mlx_dpo.monitor.perf", fromlist=["x"]).flops_per_token(
            trainer.model, trainer.use_reference and not trainer.precompute),
        "mlx_peak_gb": mx.get_peak_memory() / 1e9}), flush=True)


def ensure_venv(name: str, packages: list) -> Path:
    venv = Path(os.environ.get("PEER_VENVS", "/tmp/peer-venvs")) / name
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *packages], check=True)
    return python


def run_child(cmd: list, env: dict) -> dict:
    """Run ``cmd``; return its BENCH_RESULT plus its own peak RSS (MB) and whole-process wall time (s)."""
    tic = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    lines = [ln for ln in out.splitlines() if ln.startswith("BENCH_RESULT ")]
    if proc.returncode != 0 or not lines:
        return {"error": out[-2000:]}
    result = json.loads(lines[-1][len("BENCH_RESULT "):])
    result["peak_rss_mb"] = usage.ru_maxrss / 1024  # KiB on Linux
    result["process_seconds"] = time.perf_counter() - tic  # start-up, loading, compiling and every step
    return result


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=[*SIZES, "both"], default="medium")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lengths", choices=["normal", "ultrafeedback"], default="normal",
                    help="normal: N(--prompt-len / --completion-len, 8); ultrafeedback: lognormal, one epoch")
    ap.add_argument("--pairs", type=int, default=0, help="pairs in the data (default (steps + warmup) x batch)")
    ap.add_argument("--max-length", type=int, default=1024, help="ultrafeedback: longest prompt + completion")
    ap.add_argument("--model", default=None, help="a model directory instead of the random toy Llama")
    ap.add_argument("--src", default=str(ROOT.parent), help="the mlx_dpo checkout the mlx-dpo runs import")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--completion-len", type=int, default=64)
    ap.add_argument("--variants", default=",".join(list(VARIANTS)[:3]), help="comma-separated mlx-dpo variants")
    ap.add_argument("--peers", action="store_true", help="also run mlx-lm-lora and TRL+PEFT")
    ap.add_argument("--peer-list", default=",".join(k for k in PEERS if "with torch" not in k))
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "mlx-dpo-bench"))
    ap.add_argument("--json", default=None, help="write the results here too")
    ap.add_argument("--mlx-python", default=None,
                    help="python for the mlx-dpo runs (default: with --peers, the mlx-lm-lora venv's, so both MLX "
                         "trainers share one environment -- no torch imported by transformers; else this python)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args.worker)

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=args.src)
    if os.path.exists(OPENBLAS):
        env["LD_PRELOAD"] = OPENBLAS
    results = []
    for size in (list(SIZES) if args.size == "both" else [args.size]):
        base = build_inputs(work, size, args)
        python = args.mlx_python or (str(ensure_venv(*PEERS["mlx-lm-lora"][:2])) if args.peers else sys.executable)
        runs = [(name, [python, str(ROOT / "bench.py"), "--worker"], {"options": VARIANTS[name]})
                for name in args.variants.split(",") if name]
        if args.peers:
            for name in args.peer_list.split(","):
                venv, packages, driver, extra = PEERS[name]
                runs.append((name, [str(ensure_venv(venv, packages)), str(ROOT / "peers" / driver)], extra))
        for name, cmd, extra in runs:
            spec = dict(base, out=str(work / f"run-{size}-{len(results)}"), **extra)
            spec_path = work / f"spec-{size}-{len(results)}.json"
            spec_path.write_text(json.dumps(spec))
            print(f"[{size}] {name} ...", flush=True)
            r = run_child(cmd + [str(spec_path)], env)
            r.update(size=size, name=name)
            results.append(r)
            if "error" in r:
                print(r["error"], file=sys.stderr)
    print_table(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


def print_table(results: list) -> None:
    peak = next((r["gemm_peak_gflops"] for r in results if "gemm_peak_gflops" in r), None)
    print("\n| size | run | process s | tokens/s | x mlx-lm-lora | x TRL | peak RSS MB | MFU | shapes | compile s | "
          "padding |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        same = [x for x in results if x["size"] == r["size"] and "tokens_per_second" in x]
        ref = {x["name"]: x["tokens_per_second"] for x in same}
        if "tokens_per_second" not in r:
            print(f"| {r['size']} | {r['name']} | failed | | | | | | | | |")
            continue
        if r["tokens_per_second"] is None:  # too few steps after the warm-up to time
            print(f"| {r['size']} | {r['name']} | {r['process_seconds']:.0f} | too few steps | | | | | | | |")
            continue
        tps = r["tokens_per_second"]
        base = next((ref[k] for k in ("mlx-lm-lora", "mlx-lm-lora (with torch)") if k in ref), None)
        lora = f"{tps / base:.2f}" if base else ""
        trl = f"{tps / ref['trl+peft']:.2f}" if "trl+peft" in ref else ""
        fpt = r.get("flops_per_token") or next((x.get("flops_per_token") for x in same if "flops_per_token" in x), None)
        live = "precompute" not in r["name"]
        if fpt and "flops_per_token" not in r:  # peers: same model, 3 or 2 forward-equivalents
            base_fe = 3 if "precompute" not in next(x["name"] for x in same if "flops_per_token" in x) else 2
            fpt = fpt / base_fe * (3 if live else 2)
        mfu = f"{100 * tps * fpt / (peak * 1e9):.0f}%" if fpt and peak else ""
        extra = [str(r["compiled_shapes"]) if r.get("compiled_shapes") is not None else "",
                 f"{r['compile_seconds']:.1f}" if r.get("compile_seconds") is not None else "",
                 f"{100 * r['padding_fraction']:.1f}%" if r.get("padding_fraction") is not None else ""]
        print(f"| {r['size']} | {r['name']} | {r['process_seconds']:.0f} | {tps:.0f} | {lora} | {trl} | {r['peak_rss_mb']:.0f} | {mfu} | "
              + " | ".join(extra) + " |")
    if peak:
        print(f"\nfloat32 GEMM peak (probe, 1024^3): {peak:.0f} GFLOP/s")


if __name__ == "__main__":
    main()
