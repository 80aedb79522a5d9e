"""A Q4_K_M-like GGUF file of each supported architecture through the CLI, as a user runs it:
train, generate, export as GGUF (``--dtype q4_k_m``), and train on the exported file (read back).

Run by ``.ci/run`` in a fresh venv of ``pip install -e .`` alone (no torch, no test extras):
``python tests/gguf_cli_e2e.py WORK_DIR``. Prints one line per architecture with the seconds each
step took; exits non-zero at the first failure. The files are tiny random models (tests/gguf_files.py).
"""

import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from gguf_files import Q, write_tiny_gguf  # noqa: E402

from mlx_dpo.model.toy import build_toy_dataset  # noqa: E402

# llama.cpp's Q4_K_M: Q4_K, with Q6_K for the head and some attn_v/ffn_down, Q5_K for Phi's fused qkv
Q4_K_M = {"embd": Q.Q4_K, "attn": Q.Q4_K, "attn_v": Q.Q6_K, "ffn": Q.Q4_K, "ffn_down": Q.Q6_K, "output": Q.Q6_K}
ARCHS = {
    "llama": dict(pre="smollm"),
    "qwen2": dict(pre="qwen2", tied=True),
    "qwen3": dict(pre="qwen2", heads=4, kv_heads=2, head_dim=128, tied=True),
    "gemma3": dict(pre="default", heads=2, kv_heads=1, head_dim=256, layers=6, tied=True, sliding_window=4,
                   embd_std=0.05, sentencepiece=True),
    "gemma2": dict(pre="default", heads=2, kv_heads=1, head_dim=256, tied=True, embd_std=0.05, sentencepiece=True),
    "phi3": dict(pre="qwen2", heads=4, kv_heads=4, types={**Q4_K_M, "attn_qkv": Q.Q5_K}),
}


def cli(*args) -> float:
    tic = time.perf_counter()
    result = subprocess.run(["mlx-dpo", *map(str, args)], capture_output=True, text=True, timeout=900)
    if result.returncode:
        sys.exit(f"mlx-dpo {' '.join(map(str, args))} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    return time.perf_counter() - tic


def run(arch: str, work: Path, data: Path) -> str:
    spec = dict(ARCHS[arch])
    types, pre = spec.pop("types", Q4_K_M), spec.pop("pre")
    source = write_tiny_gguf(work / f"{arch}.gguf", arch, types, pre, hidden=256, inter=512, std=0.06, **spec)
    common = ["--data", data, "--batch-size", 2, "--max-length", 64, "--no-progress-bar",
              "--cache-dir", work / "cache", "--eval-steps", 0, "--no-eval-on-start"]
    seconds = [cli("train", "--model", source, "--output-dir", work / f"{arch}-run", "--max-steps", 2, *common)]
    seconds.append(cli("generate", work / f"{arch}-run", "--prompt", "red fox", "--max-tokens", 4))
    seconds.append(cli("export", "--adapter-path", work / f"{arch}-run", "--output", work / f"{arch}-gguf",
                       "--format", "gguf", "--dtype", "q4_k_m"))
    seconds.append(cli("train", "--model", work / f"{arch}-gguf" / "model.gguf", "--output-dir",
                       work / f"{arch}-again", "--max-steps", 1, *common))
    return f"{arch}: train {seconds[0]:.1f} s, generate {seconds[1]:.1f} s, export q4_k_m {seconds[2]:.1f} s, " \
           f"read back and train {seconds[3]:.1f} s"


def main(work: Path) -> None:
    work.mkdir(parents=True, exist_ok=True)
    data = build_toy_dataset(work / "data", n_train=16, n_valid=4)
    for arch in ARCHS:
        print(run(arch, work, Path(data)), flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
