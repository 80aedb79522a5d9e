"""GGUF against llama.cpp itself: its quantizer, its reading of each file, its perplexity.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 \\
        python benchmarks/llama_cpp_check.py --bin LLAMA_CPP/build/bin --work /tmp/llama-cpp-check --archs

``--bin`` holds llama.cpp's ``llama-quantize``, ``llama-perplexity``, ``llama-simple`` and
``llama-tokenize``, built from the sources the ``llama-cpp-python`` sdist on PyPI vendors (``pip
download --no-deps --no-binary :all: llama-cpp-python``, then in ``vendor/llama.cpp``: ``cmake -B
build -DLLAMA_CURL=OFF && cmake --build build --target llama-quantize llama-perplexity llama-simple
llama-tokenize``; ~20 min on 2 cores). On SmolLM2-135M-Instruct (``demo:smollm2``, real weights)
after a 2-step run:

1. ``mlx-dpo export --format gguf --dtype float32``, then ``llama-quantize`` of that file to each
   mix, beside ``mlx-dpo export --dtype`` of the same mix: each tensor's type and bytes compared
   (the same float32 weights go into both quantizers);
2. every file read by llama.cpp and by mlx-dpo on the same tokens (``llama-perplexity`` over
   :data:`CHUNKS` chunks of :data:`CONTEXT` tokens of English text, the second half of each chunk
   scored, its log-probs saved with ``--kl-divergence-base``): each reader's perplexity, the KL
   divergence of mlx-dpo's next-token distributions from llama.cpp's, and how often their top token
   agrees; and each quantized file against the float32 export, as llama.cpp users measure a quant
   (mean KL divergence, same top token);
3. greedy decoding of the float32 export by both, and ``mlx-dpo train`` on llama.cpp's Q4_K_M;
4. tokenization: mlx-dpo's tokenizer, rebuilt from the file, against ``llama-tokenize`` on a
   multilingual text (each architecture's file too with ``--archs``: Gemma's SentencePiece ones).

``--archs``: the same reading comparison on the float32 and Q4_K_M exports of a random model of each
architecture trained on its Q4_K_M-like file (``tests/gguf_cli_e2e.py``'s: Gemma 3's 4-token sliding
windows, Gemma 2's soft-caps, Phi-3's fused projections, as llama.cpp runs them). Random models have
absurd perplexities on English; the divergence is the measure there.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MIXES = {"q4_k_m": "Q4_K_M", "q5_k_m": "Q5_K_M", "q6_k": "Q6_K", "q8_0": "Q8_0"}
PROMPT = "The three primary colors are"
CONTEXT, CHUNKS = 256, 8


def sh(*args, timeout=1800) -> str:
    p = subprocess.run([str(a) for a in args], capture_output=True, text=True, errors="replace", timeout=timeout)
    if p.returncode:
        raise SystemExit(f"failed: {' '.join(map(str, args))}\n{(p.stdout + p.stderr)[-2000:]}")
    return p.stdout + p.stderr


def english(work: Path) -> Path:
    """Python's own documentation prose (``pydoc_data``, offline), enough for :data:`CHUNKS` chunks."""
    import pydoc_data.topics as topics

    path = work / "text.txt"
    path.write_text("\n\n".join(topics.topics[k] for k in sorted(topics.topics))[:60000])
    return path


class Stored(np.ndarray):
    """llama.cpp's saved log-probs: those below max - 16 nats are clamped there (``kept`` False)."""

    def __new__(cls, logp, kept):
        out = np.asarray(logp).view(cls)
        out.kept = kept
        return out


def llama_cpp_logprobs(binary: Path, gguf: Path, text: Path) -> tuple:
    """llama.cpp's perplexity of ``gguf`` on ``text`` and its saved log-probs: ``(ppl, tokens
    [chunks, n_ctx], log-probs [chunks, n_ctx - 1 - first, vocab])``, as llama.cpp stores them
    (:class:`Stored`)."""
    base = gguf.with_suffix(".kld")
    out = sh(binary / "llama-perplexity", "-m", gguf, "-f", text, "-c", CONTEXT, "--chunks", CHUNKS, "-t", 2,
             "--kl-divergence-base", base)
    ppl = float(re.search(r"Final estimate: PPL = ([\d.]+)", out).group(1))
    raw = base.read_bytes()
    assert raw[:8] == b"_logits_", base
    n_ctx, n_vocab, n_chunk = np.frombuffer(raw[8:20], np.int32)
    at = 20 + 4 * n_chunk * n_ctx
    tokens = np.frombuffer(raw[20:at], np.int32).reshape(n_chunk, n_ctx)
    nv, scored = 2 * ((n_vocab + 1) // 2) + 4, n_ctx - 1 - n_ctx // 2
    rows = np.frombuffer(raw[at:], np.uint16).reshape(n_chunk, scored, nv)
    head = rows[..., :4].copy().view(np.float32)  # (scale, min log-prob) per position
    levels = rows[..., 4:4 + n_vocab]
    logp = head[..., 1:2] + head[..., 0:1] * levels.astype(np.float32)
    return ppl, tokens, Stored(logp, levels > 0)


def mlx_dpo_logprobs(gguf: Path, tokens: np.ndarray) -> np.ndarray:
    """mlx-dpo's loader on ``gguf``: log-probs at llama-perplexity's scored positions of its chunks
    (the first token of a chunk is BOS when the file asks for one, as llama.cpp does)."""
    import mlx.core as mx
    from gguf import GGUFReader

    from mlx_dpo import DPOConfig
    from mlx_dpo.model.loader import load_model

    fields = GGUFReader(str(gguf)).fields
    chunks = tokens.copy()
    if "tokenizer.ggml.add_bos_token" in fields and fields["tokenizer.ggml.add_bos_token"].contents():
        chunks[:, 0] = fields["tokenizer.ggml.bos_token_id"].contents()
    model, _, _ = load_model(DPOConfig(model=str(gguf)))
    first = chunks.shape[1] // 2
    out = []
    for chunk in chunks:
        logits = model(mx.array(chunk[None]))[0, first:-1].astype(mx.float32)
        out.append(np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True)))
    return np.stack(out)


def divergence(p_log: np.ndarray, q_log: np.ndarray) -> tuple:
    """Mean KL(p || q) over positions and the share of positions with the same top token. Tokens
    llama.cpp stored below its floor (max - 16 nats, p < 1e-7 each) are left out and both
    distributions renormalised over the rest."""
    keep = p_log.kept if isinstance(p_log, Stored) else np.ones(np.shape(p_log), bool)
    if isinstance(q_log, Stored):
        keep = keep & q_log.kept

    def log_normalised(x):
        x = np.where(keep, np.asarray(x, np.float64), -np.inf)
        top = x.max(-1, keepdims=True)
        return x - top - np.log(np.exp(x - top).sum(-1, keepdims=True))

    lp, lq = log_normalised(p_log), log_normalised(q_log)
    with np.errstate(invalid="ignore"):  # the left-out tokens: -inf - -inf, masked
        kld = np.where(keep, np.exp(lp) * (lp - lq), 0).sum(-1)
    return float(kld.mean()), float((p_log.argmax(-1) == q_log.argmax(-1)).mean())


def perplexity(logp: np.ndarray, tokens: np.ndarray) -> float:
    first = tokens.shape[1] // 2
    targets = tokens[:, first + 1:]
    return float(np.exp(-np.take_along_axis(logp, targets[..., None], -1).mean()))


def reading(binary: Path, files: dict, text: Path, base: str = None) -> None:
    """Per file: both readers' perplexity, mlx-dpo's divergence from llama.cpp; against ``base``'s too."""
    print("\n| file | PPL llama.cpp | PPL mlx-dpo | KL(llama.cpp, mlx-dpo) | same top token |"
          + (" KL to float32, llama.cpp / mlx-dpo | same top as float32 |" if base else "")
          + "\n|---|---:|---:|---:|---:|" + ("---:|---:|" if base else ""))
    seen = {}
    for label, path in files.items():
        ppl, tokens, theirs = llama_cpp_logprobs(binary, path, text)
        ours = mlx_dpo_logprobs(path, tokens)
        kld, same = divergence(theirs, ours)
        seen[label] = (theirs, ours)
        row = f"| {label} | {ppl:.3f} | {perplexity(ours, tokens):.3f} | {kld:.2e} | {100 * same:.1f}% |"
        if base and label != base:
            (b_theirs, b_ours) = seen[base]
            k1, s1 = divergence(b_theirs, theirs)
            k2, s2 = divergence(b_ours, ours)
            row += f" {k1:.4f} / {k2:.4f} | {100 * s1:.1f}% / {100 * s2:.1f}% |"
        elif base:
            row += " | |"
        print(row, flush=True)


def greedy(binary: Path, gguf: Path) -> None:
    code = ("import sys; from mlx_lm import generate; from mlx_dpo import DPOConfig; "
            "from mlx_dpo.model.loader import load_model; m, t, _ = load_model(DPOConfig(model=sys.argv[1])); "
            f"print(generate(m, t, {PROMPT!r}, max_tokens=32))")
    ours = sh(sys.executable, "-c", code, gguf).strip().splitlines()[-1]
    theirs = sh(binary / "llama-simple", "-m", gguf, "-n", 32, PROMPT)
    theirs = theirs.split(PROMPT, 1)[-1].split("\n")[0].strip()
    print(f"\ngreedy, 32 tokens of {PROMPT!r} on the float32 export:\n  llama.cpp: {theirs!r}\n  mlx-dpo:   {ours!r}"
          f"\n  {'equal' if ours.strip() == theirs.strip() else 'DIFFERENT'}", flush=True)


MULTILINGUAL = ("Hello world!  Tabs\tand  double  spaces. Français: où est la café? Deutsch: Größe, Straße.\n"
                "日本語のテキストです。中文：你好，世界！ Русский текст. العربية. 🙂🎉 numbers 1234567 and 3.14159.\n"
                "  leading spaces, trailing spaces   \nnewlines\n\nand code: def f(x): return x**2  # comment\n")


def tokenization(binary: Path, work: Path, files: dict) -> None:
    """mlx-dpo's tokenizer (rebuilt from each file's vocabulary) against ``llama-tokenize`` on
    :data:`MULTILINGUAL`, special tokens (BOS) as each file asks."""
    import ast

    from mlx_dpo import DPOConfig
    from mlx_dpo.model.loader import load_model

    text = work / "multilingual.txt"
    text.write_text(MULTILINGUAL)
    for label, path in files.items():
        theirs = ast.literal_eval(sh(binary / "llama-tokenize", "-m", path, "-f", text, "--ids",
                                     "--log-disable").strip().splitlines()[-1])
        ours = load_model(DPOConfig(model=str(path)))[1].encode(MULTILINGUAL)
        print(f"tokens of a multilingual text, {label}: {len(theirs)}, "
              f"{'the same ids' if ours == theirs else 'DIFFERENT ids'} from llama.cpp and mlx-dpo", flush=True)


def tensors(path: Path) -> dict:
    from gguf import GGUFReader

    return {t.name: (t.tensor_type.name, np.asarray(t.data).tobytes()) for t in GGUFReader(str(path)).tensors}


def compare_files(ours: Path, theirs: Path) -> str:
    a, b = tensors(ours), tensors(theirs)
    same_type = sum(a[k][0] == b[k][0] for k in b if k in a)
    same_bytes = sum(a[k] == b[k] for k in b if k in a)
    return f"{len(b)} tensors (mlx-dpo's file {len(a)}): types equal {same_type}, bytes equal {same_bytes}"


def smollm2(binary: Path, work: Path, text: Path) -> None:
    run, common = work / "run", ["--no-progress-bar", "--cache-dir", work / "cache"]
    if not (run / "adapters.safetensors").exists():
        sh("mlx-dpo", "train", "--model", "demo:smollm2", "--data", "toy", "--output-dir", run, "--max-steps", 2,
           "--batch-size", 2, "--max-length", 128, "--eval-steps", 0, "--no-eval-on-start",
           "--no-generate-during-eval", "--learning-rate", 1e-4, *common)
    files = {}
    for dtype in ("float32", *MIXES):
        out = work / f"ours-{dtype}"
        if not (out / "model.gguf").exists():
            tic = time.perf_counter()
            sh("mlx-dpo", "export", "--adapter-path", run, "--output", out, "--format", "gguf", "--dtype", dtype)
            print(f"mlx-dpo export {dtype}: {time.perf_counter() - tic:.1f} s", flush=True)
        files[f"mlx-dpo {dtype}"] = out / "model.gguf"
    for dtype, name in MIXES.items():
        out = work / f"llama-quantize-{name}.gguf"
        if not out.exists():
            tic = time.perf_counter()
            sh(binary / "llama-quantize", files["mlx-dpo float32"], out, name)
            print(f"llama-quantize {name}: {time.perf_counter() - tic:.1f} s", flush=True)
        files[f"llama-quantize {name}"] = out
        print(f"{name}: mlx-dpo vs llama-quantize: {compare_files(files[f'mlx-dpo {dtype}'], out)}", flush=True)
    tokenization(binary, work, {"SmolLM2 (byte-level BPE)": files["mlx-dpo float32"]})
    reading(binary, files, text, base="mlx-dpo float32")
    greedy(binary, files["mlx-dpo float32"])
    tic = time.perf_counter()
    sh("mlx-dpo", "train", "--model", files["llama-quantize Q4_K_M"], "--data", "toy", "--output-dir",
       work / "run-on-llama-q4km", "--max-steps", 2, "--batch-size", 2, "--max-length", 128, "--eval-steps", 0,
       "--no-eval-on-start", "--no-generate-during-eval", "--overwrite-output-dir", *common)
    print(f"\nmlx-dpo train on llama-quantize's Q4_K_M: 2 steps, {time.perf_counter() - tic:.1f} s", flush=True)


def architectures(binary: Path, work: Path, text: Path) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    from gguf_cli_e2e import ARCHS, run

    from mlx_dpo.model.toy import build_toy_dataset

    data = build_toy_dataset(work / "data", n_train=16, n_valid=4)
    files = {}
    for arch in ARCHS:
        if not (work / f"{arch}-gguf" / "model.gguf").exists():
            run(arch, work, data)
        if not (work / f"{arch}-f32" / "model.gguf").exists():
            sh("mlx-dpo", "export", "--adapter-path", work / f"{arch}-run", "--output", work / f"{arch}-f32",
               "--format", "gguf", "--dtype", "float32")
        files[f"{arch} float32"] = work / f"{arch}-f32" / "model.gguf"
        files[f"{arch} q4_k_m"] = work / f"{arch}-gguf" / "model.gguf"
    tokenization(binary, work, {arch: work / f"{arch}.gguf" for arch in ARCHS})
    reading(binary, files, text)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", required=True, type=Path, help="llama.cpp's build/bin")
    ap.add_argument("--work", default="/tmp/llama-cpp-check", type=Path)
    ap.add_argument("--archs", action="store_true", help="also the six architectures' synthetic files")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    text = english(args.work)
    smollm2(args.bin, args.work, text)
    if args.archs:
        architectures(args.bin, args.work, text)


if __name__ == "__main__":
    main()
