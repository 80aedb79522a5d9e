"""Every ggml tensor type a GGUF file holds, read as MLX arrays (mlx_dpo.model.ggml).

Oracles: ``gguf.quants.dequantize`` (gguf-py's reference de-quantization) for each type's
weights, and transformers' own GGUF loading for a whole model mixing the types as llama.cpp's
``_K_M`` files do.
"""

import re

import mlx.core as mx
import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from gguf_files import K_TYPES, Q, random_blocks, write_tiny_gguf  # noqa: E402
from mlx_dpo.config.fields import DPOConfig  # noqa: E402
from mlx_dpo.model.gguf import read_header, read_tensor  # noqa: E402
from mlx_dpo.model.loader import load_model  # noqa: E402

EXACT = (Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q3_K, Q.Q4_K, Q.Q5_K)
RE_QUANTIZED = (Q.Q2_K, Q.Q6_K)  # 16-weight groups: de-quantized, then MLX 8-bit affine group 32
BITS = {Q.Q4_0: 4, Q.Q4_1: 4, Q.Q5_0: 5, Q.Q5_1: 5, Q.Q8_0: 8, Q.Q3_K: 8, Q.Q4_K: 4, Q.Q5_K: 5,
        Q.Q2_K: 8, Q.Q6_K: 8}


def blocks(rng, kind, shape, std=0.02):
    if kind in K_TYPES:
        return random_blocks(rng, shape, kind, std)
    return gguf.quants.quantize(rng.normal(0, std, shape).astype(np.float32), kind)


def one_tensor_file(tmp_path, kind, raw, shape):
    path = tmp_path / f"{kind.name}.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tensor("blk.0.ffn_up.weight", raw, raw_shape=shape if kind in (Q.F32, Q.F16) else None,
                 raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def mlx_weights(path):
    header = read_header(path)
    data = np.memmap(path, dtype=np.uint8, mode="r")
    parts = read_tensor(data, header, "blk.0.ffn_up.weight", path)
    if "scales" not in parts:
        return np.array(parts["weight"].astype(mx.float32)), None
    w, s, b = parts["weight"], parts["scales"], parts["biases"]
    bits = w.shape[-1] * 32 // (s.shape[-1] * 32)
    return np.array(mx.dequantize(w, s.astype(mx.float32), b.astype(mx.float32), group_size=32, bits=bits)), bits


@pytest.mark.parametrize("kind", EXACT + RE_QUANTIZED, ids=lambda k: k.name)
def test_each_type_reads_as_gguf_dequantizes_it(kind, tmp_path):
    """The weights MLX computes from our arrays equal gguf's reference de-quantization: exactly
    for the types MLX's affine quantization holds, within half an 8-bit step of each 32-weight
    group's range for Q2_K and Q6_K (the error the README states)."""
    rng = np.random.default_rng(kind.value)
    shape = (8, 512)
    raw = blocks(rng, kind, shape)
    ours, bits = mlx_weights(one_tensor_file(tmp_path, kind, raw, shape))
    theirs = gguf.quants.dequantize(raw, kind).reshape(shape)
    assert bits == BITS[kind] and np.abs(theirs).max() > 0
    if kind in EXACT:
        np.testing.assert_array_equal(ours, theirs)
        return
    groups = theirs.reshape(-1, 32)
    half_step = (groups.max(-1) - groups.min(-1)) / 255 / 2
    err = np.abs(ours.reshape(-1, 32) - groups).max(-1)
    assert (err <= half_step * 1.01 + 1e-7).all() and err.max() > 0


@pytest.mark.parametrize("kind", [Q.F32, Q.F16, Q.BF16], ids=lambda k: k.name)
def test_float_types_stay_as_stored(kind, tmp_path):
    rng = np.random.default_rng(1)
    values = rng.normal(0, 1, (4, 64)).astype(np.float32)
    raw = {Q.F32: values, Q.F16: values.astype(np.float16),
           Q.BF16: gguf.quants.quantize(values, Q.BF16) if kind == Q.BF16 else None}[kind]
    path = one_tensor_file(tmp_path, kind, raw, values.shape)
    data = np.memmap(path, dtype=np.uint8, mode="r")
    parts = read_tensor(data, read_header(path), "blk.0.ffn_up.weight", path)
    assert parts["weight"].dtype == {Q.F32: mx.float32, Q.F16: mx.float16, Q.BF16: mx.bfloat16}[kind]
    expected = gguf.quants.dequantize(raw, kind).reshape(values.shape)
    np.testing.assert_array_equal(np.array(parts["weight"].astype(mx.float32)), expected)


# A Q4_K_M-like mix (llama.cpp gives attn_v and half of ffn_down Q6_K, output Q6_K) and one of only exact types.
MIXES = {
    "q4_k_m": {"embd": Q.Q4_K, "attn": Q.Q4_K, "attn_v": Q.Q6_K, "ffn": Q.Q4_K, "ffn_down": Q.Q6_K,
               "output": Q.Q6_K},
    "exact": {"embd": Q.Q8_0, "attn": Q.Q5_K, "attn_v": Q.Q3_K, "ffn": Q.Q4_K, "ffn_down": Q.Q5_0,
              "ffn_up": Q.Q5_1, "output": Q.BF16},
}


@pytest.mark.parametrize("mix", MIXES)
def test_a_k_quant_model_computes_transformers_logits(mix, tmp_path):
    """A llama of 256-wide rows (K types need 256) mixing the types: our logits equal the ones
    transformers computes from the same file (it de-quantizes to float32 with gguf-py), to 1e-4 of
    their scale where every type is exact; the Q6_K mix within what its 8-bit re-quantization costs."""
    torch = pytest.importorskip("torch")
    from test_gguf import prompt_ids, transformers_logits

    path = write_tiny_gguf(tmp_path / f"{mix}.gguf", "llama", MIXES[mix], "smollm", hidden=256, inter=512,
                           heads=4, kv_heads=2, seed=3)
    model, tokenizer, _ = load_model(DPOConfig(model=str(path), cache_dir=str(tmp_path / "cache")))
    ids = prompt_ids(tokenizer)
    with torch.no_grad():
        theirs = transformers_logits(path, ids)
    ours = np.array(model(mx.array([ids]))[0].astype(mx.float32))
    scale = np.abs(theirs).max()
    assert scale > 1.0
    err = np.abs(ours - theirs).max() / scale
    print(f"{mix}: max |logit error| / max |logit| = {err:.2e}")
    assert err < (1e-4 if mix == "exact" else 2e-2)
    assert (ours.argmax(-1) == theirs.argmax(-1)).mean() >= (1.0 if mix == "exact" else 0.9)


# Qwen3 (q/k norms, no rope permutation), Phi-3 (fused projections) and Gemma 3 (norms stored as 1 + w, pre/post norms, GeGLU,
# sliding-window layers: a 4-token window and 6 layers, so the 6th is global) as llama.cpp writes them.
ARCH_FILES = {
    "qwen3": dict(types={"embd": Q.Q8_0, "attn": Q.Q4_K, "ffn": Q.Q5_K}, hidden=256, inter=512, heads=4,
                  kv_heads=2, head_dim=128, tied=True),  # transformers reads no head_dim for qwen3: 128
    "gemma3": dict(types={"embd": Q.Q4_K, "attn": Q.Q5_K, "ffn": Q.Q4_K, "ffn_down": Q.Q8_0}, hidden=256,
                   inter=512, heads=2, kv_heads=1, head_dim=256, layers=6, tied=True, sliding_window=4,
                   embd_std=0.05),  # Gemma scales embeddings by sqrt(hidden): small, so attention shows
    "gemma2": dict(types={"embd": Q.Q5_K, "attn": Q.Q4_K, "ffn": Q.Q3_K}, hidden=256, inter=512, heads=2,
                   kv_heads=1, head_dim=256, tied=True, embd_std=0.05),  # softcaps at llama.cpp's defaults
    "phi3": dict(types={"embd": Q.Q3_K, "attn": Q.Q4_K, "ffn": Q.Q5_K, "output": Q.Q8_0}, hidden=256, inter=512,
                 heads=4, kv_heads=4),  # fused qkv and gate_up
}


@pytest.mark.parametrize("arch", ARCH_FILES)
def test_new_architectures_compute_transformers_logits(arch, tmp_path):
    """A K-quant Qwen3 and Gemma 3 file: our logits equal transformers' (its own GGUF loading of the
    same file) within 2e-5 of their scale, on a prompt longer than Gemma's sliding window (no window
    moves Gemma's logits by 8e-5 of their scale: the tolerance sees it)."""
    pytest.importorskip("torch")
    from test_gguf import prompt_ids, transformers_logits

    path = write_tiny_gguf(tmp_path / f"{arch}.gguf", arch, pre="qwen2", seed=4, **ARCH_FILES[arch])
    model, tokenizer, model_dir = load_model(DPOConfig(model=str(path), cache_dir=str(tmp_path / "cache")))
    ids = prompt_ids(tokenizer)
    assert len(ids) > 3 * ARCH_FILES[arch].get("sliding_window", 0)
    theirs = transformers_logits(path, ids)
    ours = np.array(model(mx.array([ids]))[0].astype(mx.float32))
    scale = np.abs(theirs).max()
    assert scale > 1.0 and np.abs(ours - theirs).max() < 2e-5 * scale, np.abs(ours - theirs).max() / scale
    assert model.model_type == {"qwen3": "qwen3", "gemma3": "gemma3_text", "phi3": "phi3", "gemma2": "gemma2"}[arch]


MULTILINGUAL = ["Hello world", "Grüße aus Köln, naïve café", "日本の首都は東京です。", "Привет, мир!",
                "  two leading spaces and trailing  ", "emoji 🙂 and digits 12345", "<|im_start|>user\nhi<|im_end|>"]


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_a_sentencepiece_gguf_vocabulary_encodes_as_sentencepiece(arch, tmp_path):
    """A SentencePiece vocabulary as llama.cpp stores it (``tokenizer.ggml.model = llama``; Gemma's
    files are such, with 262k pieces): our tokenizer gives llama.cpp's ids on multilingual text:
    BOS, then SentencePiece's own encoding of each piece of text between special tokens (llama.cpp
    adds the space prefix to each such piece; Gemma's vocabulary has none), byte fallback for
    characters the vocabulary lacks. Decoding gives the text back."""
    import sentencepiece as spm

    path = write_tiny_gguf(tmp_path / f"{arch}-spm.gguf", arch, {}, "default", sentencepiece=True,
                           **({"head_dim": 16, "tied": True} if arch == "gemma3" else {}))
    _, tokenizer, _ = load_model(DPOConfig(model=str(path), cache_dir=str(tmp_path / "cache")))
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / f"{arch}-spm-tok" / "tokenizer.model"))
    specials = ("<|im_start|>", "<|im_end|>")
    for text in MULTILINGUAL:
        expected = [sp.bos_id()]
        for piece in re.split("(<\\|im_start\\|>|<\\|im_end\\|>)", text):
            expected += [sp.piece_to_id(piece)] if piece in specials else sp.encode(piece) if piece else []
        ids = tokenizer.encode(text)
        assert ids == expected, text
        if not any(s in text for s in specials):
            assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert any(sp.is_byte(i) for i in sp.encode(MULTILINGUAL[2]))


def llama3_factors(theta, head_dim, factor, low=1.0, high=4.0, original=8192):
    """convert_hf_to_gguf.py's rope_freqs for a llama3 rope, written out."""
    import math

    out = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        smooth = (original / wavelen - low) / (high - low)
        out.append(1.0 if wavelen < original / high else factor if wavelen > original / low
                   else 1 / ((1 - smooth) / factor + smooth))
    return np.array(out, np.float32)


ROPES = {  # Llama 3.2's rope (factor 32, as llama.cpp stores it: rope_freqs) and Gemma 3 4B+'s (linear 8)
    "llama3": dict(arch="llama", extra={"rope_freqs.weight": (llama3_factors(10000.0, 16, 32.0), None)}),
    "linear": dict(arch="gemma3", head_dim=256, heads=2, kv_heads=1, layers=6, tied=True, sliding_window=4,
                   embd_std=0.05, rope_linear=8.0),
}
HF_ROPES = {"llama3": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 8192}, "linear": {"rope_type": "linear", "factor": 8.0}}


@pytest.mark.parametrize("rope", ROPES)
def test_rope_scaling_computes_transformers_logits(rope, tmp_path):
    """A Llama 3 file with llama.cpp's rope_freqs and a Gemma 3 file with linear rope scaling: our
    logits equal transformers' on the same file with the rope set as the model's config.json sets it
    (transformers' GGUF reader reads neither), over 1500 positions so the scaled frequencies turn."""
    torch = pytest.importorskip("torch")
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(ROPES[rope])
    path = write_tiny_gguf(tmp_path / f"{rope}.gguf", spec.pop("arch"), {}, "smollm", seed=6, **spec)
    model, _, model_dir = load_model(DPOConfig(model=str(path), cache_dir=str(tmp_path / "cache")))
    config = AutoConfig.from_pretrained(str(tmp_path), gguf_file=path.name)
    if rope == "llama3":
        config.rope_parameters = {**HF_ROPES[rope], "rope_theta": 10000.0}
    else:
        config.rope_parameters["full_attention"].update(HF_ROPES[rope])  # Gemma 3: global layers only
    theirs_model = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, config=config,
                                                        dtype=torch.float32).eval()
    ids = np.random.default_rng(0).integers(10, 300, 1500).tolist()
    with torch.no_grad():
        theirs = theirs_model(torch.tensor([ids])).logits[0].numpy()
    ours = np.array(model(mx.array([ids]))[0].astype(mx.float32))
    scale = np.abs(theirs).max()
    assert np.abs(ours - theirs).max() < 1e-4 * scale, np.abs(ours - theirs).max() / scale


def test_rope_freqs_that_are_not_llama3s_are_refused(tmp_path):
    from mlx_dpo.errors import ConfigError

    odd = llama3_factors(10000.0, 16, 32.0) * 1.5
    path = write_tiny_gguf(tmp_path / "odd.gguf", "llama", {}, "smollm", extra={"rope_freqs.weight": (odd, None)})
    with pytest.raises(ConfigError, match="odd.gguf: its rope_freqs are not Llama 3.1/3.2's llama3 rope"):
        load_model(DPOConfig(model=str(path), cache_dir=str(tmp_path / "cache")))
    assert not (tmp_path / "cache" / "gguf").exists() or not any((tmp_path / "cache" / "gguf").iterdir())


@pytest.mark.parametrize("rope", ROPES)
def test_export_writes_the_rope_back(rope, tmp_path):
    """GGUF export of such a model stores its rope as llama.cpp reads it (Llama 3's rope_freqs equal
    to the source's, Gemma's linear scaling in the metadata): read back, the same logits."""
    import json

    from mlx.utils import tree_flatten

    from mlx_dpo.export.gguf_export import gguf_tokenizer_fields, write_gguf_file

    spec = dict(ROPES[rope])
    path = write_tiny_gguf(tmp_path / f"{rope}.gguf", spec.pop("arch"), {}, "smollm", seed=6, **spec)
    model, _, model_dir = load_model(DPOConfig(model=str(path), cache_dir=str(tmp_path / "cache")))
    config = json.loads((model_dir / "config.json").read_text())
    out = tmp_path / "out" / "back.gguf"
    out.parent.mkdir()
    write_gguf_file(out, dict(tree_flatten(model.parameters())), config, "float32", gguf_tokenizer_fields(path))
    written = {t.name: t for t in gguf.GGUFReader(str(out)).tensors}
    source = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    if rope == "llama3":
        np.testing.assert_allclose(written["rope_freqs.weight"].data, source["rope_freqs.weight"].data, rtol=1e-6)
    back, _, back_dir = load_model(DPOConfig(model=str(out), cache_dir=str(tmp_path / "cache")))
    assert json.loads((back_dir / "config.json").read_text())["rope_scaling"] == config["rope_scaling"]
    ids = mx.array([list(range(10, 400))])
    ours, theirs = np.array(model(ids)), np.array(back(ids))
    assert np.abs(ours - theirs).max() < 1e-5 * np.abs(ours).max()
