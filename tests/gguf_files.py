"""Small GGUF files for the tests, written with gguf's writer: random weights in llama.cpp's
names and layout, a byte-level BPE vocabulary. The 32-weight types are quantized by gguf's own
quantizer; the K types (which it cannot quantize) are random blocks with their float16 scales
set so the weights have the asked spread: whatever the blocks say is the model, and
``gguf.quants.dequantize`` is the oracle of its weights."""

import json
from pathlib import Path

import gguf
import numpy as np

from mlx_dpo.model.toy import CHAT_TEMPLATE, build_bpe_tokenizer, build_sentencepiece_tokenizer

Q = gguf.GGMLQuantizationType
# byte offsets of the float16 fields (d, dmin) in a block of each type (ggml-common.h)
F16_FIELDS = {Q.Q4_0: [0], Q.Q4_1: [0, 2], Q.Q5_0: [0], Q.Q5_1: [0, 2], Q.Q8_0: [0], Q.Q2_K: [80, 82],
              Q.Q3_K: [108], Q.Q4_K: [0, 2], Q.Q5_K: [0, 2], Q.Q6_K: [208]}
K_TYPES = (Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K)


def random_blocks(rng, shape: tuple, kind, std: float) -> np.ndarray:
    """Raw blocks of a ``kind`` tensor of ``shape`` (rows, row length) with random payload and
    float16 fields scaled so the weights' standard deviation is about ``std``."""
    block, nbytes = gguf.GGML_QUANT_SIZES[kind]
    raw = rng.integers(0, 256, size=(shape[0], shape[1] // block, nbytes), dtype=np.uint8)
    for at in F16_FIELDS[kind]:
        raw[..., at:at + 2] = np.array([1.0], np.float16).view(np.uint8)
    spread = gguf.quants.dequantize(raw.reshape(shape[0], -1), kind).std()
    for at in F16_FIELDS[kind]:
        raw[..., at:at + 2] = np.array([std / spread], np.float16).view(np.uint8)
    return raw.reshape(shape[0], -1)


def add_bpe_vocab(w, tok_dir: Path, pre: str) -> list:
    """A byte-level BPE vocabulary trained by ``tokenizers`` (llama.cpp's ``gpt2`` model)."""
    tok_dir.mkdir(parents=True, exist_ok=True)
    build_bpe_tokenizer(tok_dir)
    model = json.loads((tok_dir / "tokenizer.json").read_text())["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]] + ["Ġ Ġ"]
    tokens.append("ĠĠ")  # so that where llama.cpp's smollm split puts two spaces together shows
    specials = {"<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_merges(merges)
    w.add_token_types([3 if t in specials else 1 for t in tokens])
    w.add_add_bos_token(False)
    return tokens


def add_sentencepiece_vocab(w, tok_dir: Path, pre: str, gemma: bool = False) -> list:
    """A SentencePiece BPE model (byte fallback) trained by ``sentencepiece``, as llama.cpp stores
    one: pieces, scores and token types (normal 1, unknown 2, control 3, user-defined 4, byte 6);
    ``gemma``: without the dummy prefix, and the file says ``add_space_prefix: false`` as Gemma's do."""
    import sentencepiece as spm

    tok_dir.mkdir(parents=True, exist_ok=True)
    build_sentencepiece_tokenizer(tok_dir, dummy_prefix=not gemma)
    if gemma:
        w.add_add_space_prefix(False)
    sp = spm.SentencePieceProcessor(model_file=str(tok_dir / "tokenizer.model"))
    tokens = [sp.id_to_piece(i) for i in range(sp.vocab_size())]
    kinds = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else
             4 if tokens[i].startswith("<|") else 1 for i in range(len(tokens))]
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores([sp.get_score(i) for i in range(len(tokens))])
    w.add_token_types(kinds)
    w.add_add_bos_token(True)
    return tokens + ["<|im_end|>"] * ("<|im_end|>" not in tokens)


def write_tiny_gguf(path: Path, arch: str, types: dict, pre: str, hidden=64, layers=2, heads=4, kv_heads=2,
                    inter=128, tied=False, seed=0, extra=None, drop=(), head_dim=None, sliding_window=None,
                    embd_std=0.5, std=0.3, sentencepiece=False, rope_linear=None) -> Path:
    """A random-weight ``arch`` model in GGUF (llama.cpp's names and layout), with a
    byte-level BPE vocabulary trained by ``tokenizers``; ``types`` maps a tensor kind
    (``embd``, ``attn``, ``ffn``, ``output``) to its ggml type; ``extra`` adds or replaces tensors,
    ``drop`` leaves out hyper-parameters (``feed_forward_length``). ``qwen3`` adds q/k norms,
    ``gemma3`` those and the norms after attention and MLP (stored as 1 + w, as llama.cpp does).
    ``sentencepiece``: a SentencePiece BPE vocabulary (llama.cpp's ``llama`` tokenizer model:
    pieces, scores, token types, as ``convert_hf_to_gguf.py`` writes them) instead."""
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny")
    w.add_block_count(layers)
    w.add_context_length(2048)
    w.add_embedding_length(hidden)
    if "feed_forward_length" not in drop:
        w.add_feed_forward_length(inter)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    hd = head_dim or hidden // heads
    w.add_rope_dimension_count(hd)
    if head_dim:
        w.add_key_length(hd)
        w.add_value_length(hd)
    if sliding_window:
        w.add_sliding_window(sliding_window)
    if rope_linear:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope_linear)
    tok_dir = path.parent / f"{path.stem}-tok"
    tokens = (add_sentencepiece_vocab(w, tok_dir, pre, gemma=arch.startswith("gemma")) if sentencepiece
              else add_bpe_vocab(w, tok_dir, pre))
    w.add_bos_token_id(tokens.index("<s>"))
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_pad_token_id(tokens.index("<pad>"))
    w.add_chat_template(CHAT_TEMPLATE)

    def add(name, shape, kind, std=0.05, mean=0.0):
        if name in (extra or {}):
            return
        a = (mean + std * rng.standard_normal(shape)).astype(np.float32)
        t = Q.F32 if len(shape) == 1 else types.get(name.split(".")[-2], types.get(kind, Q.F32))  # by layer, kind
        if t == Q.F32:
            w.add_tensor(name, a)
        elif t == Q.F16:
            w.add_tensor(name, a.astype(np.float16))
        elif t in K_TYPES:
            w.add_tensor(name, random_blocks(rng, shape, t, std), raw_dtype=t)
        else:
            w.add_tensor(name, gguf.quants.quantize(a, t), raw_dtype=t)

    add("token_embd.weight", (len(tokens), hidden), "embd", std=embd_std)
    add("output_norm.weight", (hidden,), "norm", 0.1, 1.0)
    if not tied:
        add("output.weight", (len(tokens), hidden), "output", std=0.5)
    for i in range(layers):
        p = f"blk.{i}."
        add(p + "attn_norm.weight", (hidden,), "norm", 0.1, 1.0)
        add(p + "ffn_norm.weight", (hidden,), "norm", 0.1, 1.0)
        if arch == "phi3":  # fused q/k/v and gate/up, as Phi-3 stores them
            add(p + "attn_qkv.weight", ((heads + 2 * kv_heads) * hd, hidden), "attn", std)
            add(p + "ffn_up.weight", (2 * inter, hidden), "ffn", std)
        else:
            add(p + "attn_q.weight", (heads * hd, hidden), "attn", std)
            add(p + "attn_k.weight", (kv_heads * hd, hidden), "attn", std)
            add(p + "attn_v.weight", (kv_heads * hd, hidden), "attn", std)
            add(p + "ffn_gate.weight", (inter, hidden), "ffn", std)
            add(p + "ffn_up.weight", (inter, hidden), "ffn", std)
        add(p + "attn_output.weight", (hidden, heads * hd), "attn", std)
        add(p + "ffn_down.weight", (hidden, inter), "ffn", std)
        if arch in ("qwen3", "gemma3"):  # q/k scaled down: soft attention, so the sliding window shows
            add(p + "attn_q_norm.weight", (hd,), "norm", 0.1, 0.5)
            add(p + "attn_k_norm.weight", (hd,), "norm", 0.1, 0.5)
        if arch in ("gemma2", "gemma3"):
            add(p + "post_attention_norm.weight", (hidden,), "norm", 0.1, 1.0)
            add(p + "post_ffw_norm.weight", (hidden,), "norm", 0.1, 1.0)
        if arch == "qwen2":
            for name, rows in (("attn_q", heads * hd), ("attn_k", kv_heads * hd), ("attn_v", kv_heads * hd)):
                add(p + name + ".bias", (rows,), "bias", 0.3)
    for name, (data, raw) in (extra or {}).items():
        w.add_tensor(name, data, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
