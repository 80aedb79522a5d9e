"""``export --format gguf``: the merged model as one GGUF file for llama.cpp, Ollama, LM Studio.

Written with the ``gguf`` package (llama.cpp's own Python writer). Tensor names and
metadata follow llama.cpp's ``convert_hf_to_gguf.py`` for the architectures the reader
knows (:data:`mlx_dpo.model.gguf_arch.GGUF_ARCHS`: ``llama`` for Llama, SmolLM and Mistral,
``qwen2``, ``qwen3``, ``gemma3``, ``phi3``), undoing what the reader undoes: llama.cpp's
``llama`` rope pairs dimension ``i`` with ``i + 1`` where transformers pairs ``i`` with
``i + d/2``, so the rows of ``q_proj``/``k_proj`` are permuted per head
(:func:`permute_rope`); Gemma's norms are stored as ``1 + w``.

Tokenizer metadata comes from the source GGUF when the model was loaded from one
(copied field by field), else from ``tokenizer.json`` (byte-level BPE, llama.cpp's
``gpt2`` model) or ``tokenizer.model`` (SentencePiece, llama.cpp's ``llama`` model).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

import mlx.core as mx
import numpy as np

from ..model.gguf_arch import GGUF_ARCHS, HPARAMS, LLAMA3_ROPE, TOP, llama3_rope_factors
from ..errors import GGUFExportError
from .gguf_types import FILE_TYPES, SOURCE, encode, file_type, tensor_type

GGUF_FILE = "model.gguf"
# export --dtype: a llama-quantize file type (:mod:`.gguf_types`), or ``source``: each tensor's type in the source GGUF
GGUF_DTYPES = (*FILE_TYPES, SOURCE)
# model_type -> general.architecture
GGUF_ARCH = {"mistral": "llama", **{spec.model_type: arch for arch, spec in GGUF_ARCHS.items()}}
GGUF_TOP = {hf: name for name, hf in TOP.items()}  # model.norm -> output_norm
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6


def gguf_tensor_name(name: str, arch: str) -> str:
    """llama.cpp's name of a merged weight under transformers' (= mlx-lm's) name: the inverse of
    the reader's tables (:data:`mlx_dpo.model.gguf_arch.TOP`, :data:`mlx_dpo.model.gguf_arch.BLOCK`)."""
    stem, _, suffix = name.rpartition(".")
    layer = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", stem)
    block = {hf: name for name, hf in GGUF_ARCHS[arch].block.items()}  # self_attn.q_proj -> attn_q
    if layer and layer.group(2) in block:
        target = f"blk.{layer.group(1)}.{block[layer.group(2)]}"
    else:
        target = GGUF_TOP.get(stem)
    biased = suffix == "bias" and target and target.rpartition(".")[2] in GGUF_ARCHS[arch].biased
    if target is None or not (suffix == "weight" or biased):
        raise GGUFExportError(f"no GGUF name for tensor {name!r}")
    return f"{target}.{suffix}"


def permute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """transformers' half-split rope rows -> llama.cpp's interleaved ones, per head
    (``convert_hf_to_gguf.py``'s ``permute``): row ``h·d + 2j + s`` <- ``h·d + s·d/2 + j``."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# --------------------------------------------------------------------------- metadata


def model_fields(config: dict) -> dict:
    """``{arch}.*`` hyper-parameters from a transformers ``config.json``."""
    model_type = config.get("model_type")
    if model_type not in GGUF_ARCH:
        raise GGUFExportError(f"GGUF export supports model types {', '.join(GGUF_ARCH)}; this model is "
                              f"{model_type!r} (use --format hf and llama.cpp's convert_hf_to_gguf.py)")
    scaling = config.get("rope_scaling") or {}
    if scaling and rope_type(config) not in (None, "default", "linear", "llama3"):
        raise GGUFExportError(f"GGUF export: rope_scaling {scaling} is not supported "
                              "(use --format hf and llama.cpp's convert_hf_to_gguf.py)")
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    arch = GGUF_ARCH[model_type]
    fields = {key: kind(config[hf] if default is None else config.get(hf, default)) for key, hf, kind, default in HPARAMS}
    fields.update({"attention.head_count_kv": config.get("num_key_value_heads", heads),
                   "rope.dimension_count": head_dim, "vocab_size": config["vocab_size"]})
    if rope_type(config) == "linear":
        fields["rope.scaling.type"], fields["rope.scaling.factor"] = "linear", float(scaling["factor"])
    if config.get("head_dim"):  # convert_hf_to_gguf.py writes it whenever the config has it
        fields["attention.key_length"] = fields["attention.value_length"] = config["head_dim"]
    if config.get("partial_rotary_factor"):  # Phi-4-mini: 3/4 of each head rotates
        fields["rope.dimension_count"] = int(head_dim * config["partial_rotary_factor"])
    if arch in ("gemma2", "gemma3"):
        fields["attention.sliding_window"] = config["sliding_window"]
    if arch == "gemma2":
        fields["attn_logit_softcapping"] = float(config["attn_logit_softcapping"])
        fields["final_logit_softcapping"] = float(config["final_logit_softcapping"])
    return {f"{arch}.{k}": v for k, v in fields.items()}


def hf_tokenizer_fields(base_dir: Path, vocab_size: int) -> dict:
    """``tokenizer.ggml.*`` from a Hugging Face tokenizer directory."""
    base_dir = Path(base_dir)
    tok_cfg = _read_json(base_dir / "tokenizer_config.json")
    if (base_dir / "tokenizer.json").is_file():
        fields = bpe_fields(_read_json(base_dir / "tokenizer.json"))
    elif (base_dir / "tokenizer.model").is_file():
        fields = sentencepiece_fields(base_dir / "tokenizer.model")
    else:
        raise GGUFExportError(f"GGUF export needs tokenizer.json or tokenizer.model in {base_dir}")
    tokens = fields["tokenizer.ggml.tokens"]
    if len(tokens) > vocab_size:
        raise GGUFExportError(f"the tokenizer has {len(tokens)} tokens, the embedding {vocab_size} rows")
    pad = vocab_size - len(tokens)  # an embedding padded past the tokenizer, as convert_hf_to_gguf.py pads
    fields["tokenizer.ggml.tokens"] = tokens + [f"[PAD{i}]" for i in range(len(tokens), vocab_size)]
    fields["tokenizer.ggml.token_type"] = fields["tokenizer.ggml.token_type"] + [TOKEN_UNUSED] * pad
    if "tokenizer.ggml.scores" in fields:
        fields["tokenizer.ggml.scores"] = fields["tokenizer.ggml.scores"] + [-1000.0] * pad
    index = {t: i for i, t in enumerate(fields["tokenizer.ggml.tokens"])}
    for role in ("bos", "eos", "pad", "unk"):
        token = _token_text(tok_cfg.get(f"{role}_token"))
        if token in index:
            fields[f"tokenizer.ggml.{'unknown' if role == 'unk' else role}_token_id"] = index[token]
    if "add_bos_token" in tok_cfg:
        fields["tokenizer.ggml.add_bos_token"] = bool(tok_cfg["add_bos_token"])
    template = tok_cfg.get("chat_template")
    if template is None and (base_dir / "chat_template.jinja").is_file():
        template = (base_dir / "chat_template.jinja").read_text()
    if isinstance(template, str):
        fields["tokenizer.chat_template"] = template
    return fields


def bpe_fields(tokenizer: dict) -> dict:
    """A byte-level BPE ``tokenizer.json`` as llama.cpp's ``gpt2`` tokenizer."""
    model = tokenizer.get("model", {})
    if model.get("type") != "BPE":
        raise GGUFExportError(f"GGUF export: tokenizer.json model type {model.get('type')!r} is not BPE")
    vocab = dict(model["vocab"])
    special = {}
    for added in tokenizer.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
        special[added["id"]] = TOKEN_CONTROL if added.get("special") else TOKEN_USER_DEFINED
    size = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(size)]
    for text, i in vocab.items():
        tokens[i] = text
    ids = set(vocab.values())
    types = [special.get(i, TOKEN_NORMAL if i in ids else TOKEN_UNUSED) for i in range(size)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "default", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": merges}


def sentencepiece_fields(path: Path) -> dict:
    """A SentencePiece ``tokenizer.model`` as llama.cpp's ``llama`` tokenizer."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(path))
    n = sp.vocab_size()
    types = [TOKEN_UNKNOWN if sp.is_unknown(i) else TOKEN_CONTROL if sp.is_control(i) else
             TOKEN_BYTE if sp.is_byte(i) else TOKEN_UNUSED if sp.is_unused(i) else TOKEN_NORMAL for i in range(n)]
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": [sp.id_to_piece(i) for i in range(n)],
            "tokenizer.ggml.scores": [float(sp.get_score(i)) for i in range(n)], "tokenizer.ggml.token_type": types}


def gguf_tokenizer_fields(source: Path) -> dict:
    """Every ``tokenizer.*`` field of a GGUF file, as ``{key: (value, type, sub_type)}``."""
    from gguf import GGUFReader, GGUFValueType

    fields = {}
    for key, field in GGUFReader(str(source)).fields.items():
        if key.startswith("tokenizer."):
            sub = field.types[1] if field.types[0] == GGUFValueType.ARRAY else None
            fields[key] = (field.contents(), field.types[0], sub)
    return fields


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _token_text(token):
    return token.get("content") if isinstance(token, dict) else token


# --------------------------------------------------------------------------- writing


def rope_type(config: dict):
    scaling = config.get("rope_scaling") or {}
    return scaling.get("rope_type", scaling.get("type"))


def gguf_tensors(weights: dict, config: dict, dtype: str, source_types: Optional[dict] = None):
    """``(gguf name, data, raw_dtype)`` for every merged float weight, rope rows permuted (llama),
    norms as ``1 + w`` (Gemma), each of the type :func:`.gguf_types.tensor_type` gives."""
    arch = GGUF_ARCH[config["model_type"]]
    tied = bool(config.get("tie_word_embeddings")) or "lm_head.weight" not in weights
    spec = GGUF_ARCHS[arch]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads", heads)
    for name in sorted(weights):
        if name == "lm_head.weight" and config.get("tie_word_embeddings"):
            continue
        w = np.array(weights[name].astype(mx.float32))
        if spec.rope_permuted and re.search(r"self_attn\.[qk]_proj\.", name):
            w = permute_rope(w, heads if ".q_proj." in name else kv_heads)
        if spec.norm_plus_one and name.rpartition(".")[0].endswith("norm"):
            w = w + 1
        target = gguf_tensor_name(name, arch)
        kind = tensor_type(target, w.shape, dtype, config["num_hidden_layers"], tied, source_types)
        yield (target, *encode(w, kind))
    if rope_type(config) == "llama3":  # llama.cpp reads Llama 3's rope as per-frequency factors
        params = {k: config["rope_scaling"][k] for k in ("factor", *LLAMA3_ROPE)}
        head_dim = config.get("head_dim") or config["hidden_size"] // heads
        yield "rope_freqs.weight", llama3_rope_factors(config["rope_theta"], head_dim, **params), None


def write_gguf_file(path: Path, weights: dict, config: dict, dtype: str, tokenizer_fields: dict,
                    name: str = "model", source: Optional[dict] = None) -> None:
    """One GGUF file: ``general.*``, the model's hyper-parameters, the tokenizer, the tensors
    (``source``: the header of the GGUF file the model came from, for ``--dtype source``)."""
    import gguf
    from tqdm import tqdm

    arch = GGUF_ARCH.get(config.get("model_type"))
    hparams = model_fields(config)  # refuses unsupported architectures before anything is written
    if dtype == SOURCE and source is None:
        raise GGUFExportError("--dtype source keeps the tensor types of the GGUF file the model was loaded from; "
                              "this model was not loaded from one: pick a type (e.g. --dtype q4_k_m)")
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(name)
    writer.add_file_type(file_type(dtype, source and source["metadata"]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, value in {**hparams, **tokenizer_fields}.items():
        if isinstance(value, tuple):  # copied from a GGUF with its own types
            writer.add_key_value(key, *value)
        else:
            writer.add_key_value(key, value, *_value_type(value))
    tensors = gguf_tensors(weights, config, dtype, source and source["tensors"])
    # K quantization takes ~1 s per million weights: a bar on a terminal (tqdm leaves logs alone)
    for tensor_name, data, raw_dtype in tqdm(tensors, total=len(weights), desc=f"gguf {dtype}", unit="tensor",
                                             disable=None, leave=False):
        writer.add_tensor(tensor_name, data, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _value_type(value):
    from gguf import GGUFValueType as V

    def scalar(v):
        return V.BOOL if isinstance(v, bool) else V.UINT32 if isinstance(v, int) else \
            V.FLOAT32 if isinstance(v, float) else V.STRING

    if isinstance(value, list):
        return V.ARRAY, (V.INT32 if value and type(value[0]) is int else scalar(value[0]) if value else V.STRING)
    if isinstance(value, int) and not isinstance(value, bool) and value < 0:
        return (V.INT32,)
    return (scalar(value),)


__all__ = ["GGUF_FILE", "GGUF_DTYPES", "GGUFExportError", "gguf_tensor_name", "permute_rope", "model_fields",
           "hf_tokenizer_fields", "gguf_tokenizer_fields", "write_gguf_file"]
