"""GGUF files (llama.cpp's format) as a model source.

A ``.gguf`` file is converted once into an MLX model directory in the cache
(``<MLX_DPO_CACHE>/gguf/<name>-<key>/``: ``config.json``, ``model.safetensors``, tokenizer
files and ``gguf_source.json`` naming the file), which mlx-lm then loads like any other.
The quantization is kept as stored wherever MLX's affine quantization (``w = scale * q + bias``,
group 32) holds it exactly (``model/ggml.py``: every type but Q6_K and Q2_K), so the model
trains on exactly the weights llama.cpp runs.

llama.cpp stores the ``attn_q``/``attn_k`` rows of Llama models permuted for its rope
layout (``convert_hf_to_gguf.py``: per head, rows ``(2, d/2) -> (d/2, 2)``); they are put
back in the Hugging Face order. Quantization groups lie within rows, so this works on the
packed weights, scales and biases alike. The tokenizer and chat template are rebuilt from
the metadata by transformers' own GGUF conversion.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

from ..errors import ConfigError
from ..util.io import atomic_directory, atomic_write_text, save_safetensors
from ..util.paths import cache_subdir
from .ggml import GROUP, SUPPORTED, decode
from .gguf_arch import GGUF_ARCHS, HPARAMS, TOP, rope_scaling
from .gguf_tokenizer import TOKENIZER_ARRAYS, write_tokenizer

ROPE_FREQS = "rope_freqs.weight"  # llama.cpp's llama3 rope factors
VERSION = 2  # of the conversion: part of the cache key (2: K types, SentencePiece spaces)
# GGUF value types (gguf spec): struct formats of the scalars; 8 is a string, 9 an array
SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


# --------------------------------------------------------------------------- reading the header


def read_header(path: Path, arrays: tuple = ()) -> dict:
    """The metadata (scalars and strings; arrays as their length, those named in ``arrays`` as
    lists), the tensor table ``{name: (shape, ggml type name)}`` and where each tensor's data
    starts (``offsets``, bytes from the file's start) of the GGUF file ``path``, without
    reading tensor data. A file that is not GGUF, or shorter than its tensor table says,
    is a ``ConfigError``."""
    import mmap

    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 24 or f.read(4) != b"GGUF":
            raise ConfigError(f"model: {path} is not a GGUF file (it does not start with the bytes 'GGUF')")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            try:
                metadata, tensors, offsets, end = _parse(buf, GGML_QUANT_SIZES, GGMLQuantizationType, arrays)
            except (struct.error, UnicodeDecodeError, ValueError, KeyError) as e:
                raise ConfigError(f"model: {path} is a truncated or damaged GGUF file ({type(e).__name__}: {e})"
                                  ) from None
    if end > size:
        raise ConfigError(f"model: {path} is truncated ({size} bytes, its tensor table describes {end}): "
                          "an incomplete copy or download?")
    return {"metadata": metadata, "tensors": tensors, "offsets": offsets}


def _parse(buf, sizes, types, arrays=()):
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
    if version not in (2, 3):
        raise ValueError(f"GGUF version {version}; versions 2 and 3 are read")
    pos, metadata = 24, {}
    for _ in range(n_kv):
        key, pos = _string(buf, pos)
        (kind,) = struct.unpack_from("<I", buf, pos)
        metadata[key], pos = _value(buf, pos + 4, kind, key in arrays)
    tensors, offsets, ends = {}, {}, []
    for _ in range(n_tensors):
        name, pos = _string(buf, pos)
        (ndim,) = struct.unpack_from("<I", buf, pos)
        dims = struct.unpack_from(f"<{ndim}Q", buf, pos + 4)
        kind, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * ndim)
        pos += 16 + 8 * ndim
        kind = types(kind)
        block, nbytes = sizes[kind]
        count = 1
        for d in dims:
            count *= d
        tensors[name] = (tuple(reversed(dims)), kind.name)  # ggml lists the fastest-moving dimension first
        offsets[name] = offset
        ends.append(offset + count // block * nbytes)
    align = int(metadata.get("general.alignment", 32))
    start = (pos + align - 1) // align * align
    return metadata, tensors, {k: start + v for k, v in offsets.items()}, start + max(ends, default=0)


def _string(buf, pos):
    (n,) = struct.unpack_from("<Q", buf, pos)
    if pos + 8 + n > len(buf):
        raise ValueError("a string runs past the end of the file")
    return bytes(buf[pos + 8:pos + 8 + n]).decode("utf-8"), pos + 8 + n


def _value(buf, pos, kind, full: bool = False):
    """A metadata value at ``pos`` and the position after it; an array as its length unless ``full``."""
    if kind in SCALARS:
        fmt = "<" + SCALARS[kind]
        return struct.unpack_from(fmt, buf, pos)[0], pos + struct.calcsize(fmt)
    if kind == 8:
        return _string(buf, pos)
    if kind != 9:
        raise ValueError(f"unknown metadata value type {kind}")
    inner, n = struct.unpack_from("<IQ", buf, pos)
    pos += 12
    if inner in SCALARS:
        end = pos + n * struct.calcsize("<" + SCALARS[inner])
        if end > len(buf):
            raise ValueError("an array runs past the end of the file")
        return (list(struct.unpack_from(f"<{n}{SCALARS[inner]}", buf, pos)) if full else n), end
    items = []
    for _ in range(n):  # strings (or nested arrays): kept when ``full``, else walked and counted
        item, pos = _value(buf, pos, inner, full)
        if full:
            items.append(item)
    return (items if full else n), pos


# --------------------------------------------------------------------------- checking and the config


def check_supported(path: Path, header: dict) -> str:
    """The architecture of a GGUF ``path`` this module converts; a ``ConfigError`` naming
    what is not supported (architecture, tensor type, tensor) otherwise."""
    meta, tensors = header["metadata"], header["tensors"]
    arch = meta.get("general.architecture")
    if arch not in GGUF_ARCHS:
        raise ConfigError(f"model: {path}: GGUF architecture {arch!r} is not supported; supported: "
                          f"{', '.join(GGUF_ARCHS)} (llama covers Llama, SmolLM and Mistral files)")
    missing = [f"{arch}.{key}" for key, _, _, default in HPARAMS if default is None and f"{arch}.{key}" not in meta]
    missing += [] if "token_embd.weight" in tensors else ["tensor token_embd.weight"]
    if missing:
        raise ConfigError(f"model: {path}: the GGUF file lacks {', '.join(missing)}, which the model needs (llama.cpp's "
                          "convert_hf_to_gguf.py writes them); it cannot be loaded")
    bad = sorted({kind for _, kind in tensors.values() if kind not in SUPPORTED})
    if bad:
        names = [n for n, (_, kind) in tensors.items() if kind in bad]
        raise ConfigError(f"model: {path} holds tensors of type {', '.join(bad)} (e.g. {names[0]}), which mlx-dpo "
                          f"cannot read; supported types: {', '.join(SUPPORTED)}: use a Q4_K_M, Q5_K_M, Q8_0 or "
                          "F16 file of the model (IQ* and TQ* files need an importance matrix or ternary kernels)")
    for name in tensors:
        if name != ROPE_FREQS:
            hf_name(name, arch, path)
    return arch


def hf_name(name: str, arch: str, path: Path) -> str:
    """mlx-lm's (Hugging Face) name of the GGUF tensor ``name``: ``blk.3.attn_q.scales`` ->
    ``model.layers.3.self_attn.q_proj.scales``."""
    stem, _, suffix = name.rpartition(".")
    parts, block = stem.split("."), GGUF_ARCHS[arch].block
    if len(parts) == 1 and parts[0] in TOP:
        mapped = TOP[parts[0]]
    elif len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in block:
        mapped = f"model.layers.{parts[1]}.{block[parts[2]]}"
    else:
        mapped = None
    biased = suffix == "bias" and parts[-1] in GGUF_ARCHS[arch].biased
    if mapped is None or not (suffix in ("weight", "scales", "biases") or biased):
        raise ConfigError(f"model: {path}: tensor {name!r} has no place in a {arch} model (only plain "
                          f"{'/'.join(GGUF_ARCHS)} transformer tensors are supported)")
    return f"{mapped}.{suffix}"


def config_from_gguf(header: dict, arch: str, rope_factors=None) -> dict:
    """The Hugging Face ``config.json`` mlx-lm's ``arch`` model reads, from the GGUF metadata (and
    ``rope_factors``: a Llama 3 file's ``rope_freqs``); the quantization entry is the converted
    weights' (:func:`quantization_of`). ``ValueError`` for a rope scaling that is not supported."""
    meta, tensors = header["metadata"], header["tensors"]

    def get(key, default=None):
        return meta.get(f"{arch}.{key}", default)

    spec = GGUF_ARCHS[arch]
    config = {"model_type": spec.model_type, "architectures": [spec.hf_class],
              **{hf: kind(get(key, default)) for key, hf, kind, default in HPARAMS}}
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    config.update({
        "num_key_value_heads": int(get("attention.head_count_kv", heads)),
        "head_dim": int(get("attention.key_length", hidden // heads)),
        "vocab_size": int(get("vocab_size", tensors["token_embd.weight"][0][0])),
        "tie_word_embeddings": "output.weight" not in tensors, "hidden_act": spec.hidden_act,
    })
    if spec.extra_config:
        config.update(spec.extra_config(meta, config))
    scaling = rope_scaling(meta, arch, config, rope_factors)
    if scaling:
        config["rope_scaling"] = scaling
    for key in ("bos_token_id", "eos_token_id", "padding_token_id"):
        if f"tokenizer.ggml.{key}" in meta:
            config[key.replace("padding", "pad")] = int(meta[f"tokenizer.ggml.{key}"])
    return config


def quantization_of(weights: dict) -> dict:
    """mlx-lm's ``quantization`` entry for the quantized ``weights``: the most common bits as
    the default, a per-layer entry for every layer stored otherwise (the 8-bit embedding);
    ``{}`` if nothing is quantized. Bits = packed uint32 columns / groups per row."""
    layers = {k[:-len(".scales")]: weights[k[:-len(".scales")] + ".weight"].shape[-1] // weights[k].shape[-1]
              for k in weights if k.endswith(".scales")}
    if not layers:
        return {}
    bits = max(set(layers.values()), key=list(layers.values()).count)
    quantization = {"group_size": GROUP, "bits": bits, "mode": "affine"}
    quantization.update({p: {"group_size": GROUP, "bits": b} for p, b in sorted(layers.items()) if b != bits})
    return quantization


# --------------------------------------------------------------------------- converting


def unpermute_rows(w, n_head: int):
    """Undo llama.cpp's rope permutation of ``attn_q``/``attn_k`` rows (per head
    ``(2, d/2) -> (d/2, 2)``); works on packed weights, scales, biases and 1-D biases."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_tensor(data, header: dict, name: str, path: Path) -> dict:
    """Tensor ``name`` of the GGUF file ``path`` (its bytes mapped in ``data``) as MLX arrays: ``{"weight": w}``, or
    ``weight``/``scales``/``biases`` of MLX affine quantization (:mod:`.ggml`)."""
    import mlx.core as mx
    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    shape, kind = header["tensors"][name]
    block, nbytes = GGML_QUANT_SIZES[GGMLQuantizationType[kind]]
    count = int(np.prod(shape))
    if shape[-1] % block:
        raise ConfigError(f"model: {path}: tensor {name} ({kind}) has rows of {shape[-1]} values, not a multiple "
                          f"of its {block}-value blocks: a damaged file")
    start = header["offsets"][name]
    raw = data[start:start + count // block * nbytes]
    parts = decode(raw, kind, shape)
    for part, value in parts.items():
        if part != "bits" and value.dtype.kind == "f" and not np.isfinite(value).all():
            raise ConfigError(f"model: {path}: tensor {name} ({kind}) holds NaN or infinite values (a damaged or "
                              "badly converted file); it cannot be trained")
    out = {part: mx.array(value) for part, value in parts.items() if part != "bits"}
    return {**out, "weight": out["weight"].astype(mx.bfloat16)} if kind == "BF16" else out


def convert_weights(path: Path, arch: str, header: dict) -> dict:
    """The tensors of ``path`` under mlx-lm's names, quantized as stored (:func:`read_tensor`),
    q/k rows un-permuted (llama), Gemma's norms back to transformers' ``w`` (stored ``1 + w``)."""
    import numpy as np

    meta = header["metadata"]
    heads = int(meta[f"{arch}.attention.head_count"])
    kv_heads = int(meta.get(f"{arch}.attention.head_count_kv", heads))
    spec, weights = GGUF_ARCHS[arch], {}
    data = np.memmap(path, dtype=np.uint8, mode="r")
    for name in header["tensors"]:
        if name == ROPE_FREQS:  # the rope's frequency factors: config.json's rope_scaling
            continue
        stem, _, suffix = name.rpartition(".")
        layer = stem.rpartition(".")[2]
        for part, w in read_tensor(data, header, name, path).items():
            if spec.rope_permuted and layer in ("attn_q", "attn_k"):
                w = unpermute_rows(w, heads if layer == "attn_q" else kv_heads)
            if spec.norm_plus_one and layer.endswith("norm"):
                w = w - 1
            weights[hf_name(f"{stem}.{part if suffix == 'weight' else suffix}", arch, path)] = w
    return weights


def conversion_key(path: Path) -> str:
    """What the converted directory depends on: the file (its resolved path, size, mtime) and
    this conversion's :data:`VERSION`."""
    st = path.stat()
    return hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{VERSION}".encode()).hexdigest()[:12]


def source_gguf(model_dir: Path):
    """The GGUF file a model directory was converted from (its ``gguf_source.json``), if it is still there."""
    info = Path(model_dir) / "gguf_source.json"
    path = json.loads(info.read_text()).get("gguf_file") if info.is_file() else None
    return Path(path) if path and Path(path).is_file() else None


def rope_factors(path: Path, header: dict):
    """The ``rope_freqs.weight`` of a Llama 3 file as a float32 numpy vector (``None`` without one)."""
    import mlx.core as mx
    import numpy as np

    if ROPE_FREQS not in header["tensors"]:
        return None
    factors = read_tensor(np.memmap(path, dtype=np.uint8, mode="r"), header, ROPE_FREQS, path)["weight"]
    return np.array(factors.astype(mx.float32))


def gguf_model_dir(path, cache_dir=None) -> Path:
    """The MLX model directory of the GGUF file ``path``, converted on first use into
    ``<cache_dir or MLX_DPO_CACHE>/gguf/<name>-<key>`` (written atomically: an interrupted
    conversion leaves nothing behind)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"model: {path} is not a file")
    header = read_header(path)
    arch = check_supported(path, header)
    target = cache_subdir(cache_dir, "gguf") / f"{path.stem}-{conversion_key(path)}"
    if (target / "gguf_source.json").is_file():
        return target
    try:  # before the conversion: what is refused, is refused first
        config = config_from_gguf(header, arch, rope_factors(path, header))
    except ValueError as e:
        raise ConfigError(f"model: {path}: {e}") from None
    weights = convert_weights(path, arch, header)
    quantization = quantization_of(weights)
    if quantization:
        config["quantization"] = config["quantization_config"] = quantization
    with atomic_directory(target, overwrite=True) as tmp:
        save_safetensors(tmp / "model.safetensors", weights, {"format": "mlx"})
        atomic_write_text(tmp / "config.json", json.dumps(config, indent=2))
        write_tokenizer(read_header(path, TOKENIZER_ARRAYS)["metadata"], tmp, path)
        source = {"gguf_file": str(path.resolve()), "size": path.stat().st_size, "architecture": arch,
                  "file_type": header["metadata"].get("general.file_type"), "conversion_version": VERSION}
        atomic_write_text(tmp / "gguf_source.json", json.dumps(source, indent=2))
    return target


__all__ = ["read_header", "check_supported", "hf_name", "config_from_gguf", "quantization_of", "unpermute_rows",
           "convert_weights", "conversion_key", "source_gguf", "gguf_model_dir"]
