"""The ggml type of each tensor of an exported GGUF file, and its bytes.

``export --dtype`` names a file type as ``llama-quantize`` does. The K mixes follow llama.cpp's
``llama_tensor_get_type`` (``src/llama-quant.cpp``) for a dense model without an importance
matrix: the output head (the token embedding when it is tied) is Q6_K; ``q4_k_m``/``q5_k_m`` give
``attn_v`` and ``ffn_down`` Q6_K in the layers ``use_more_bits`` picks and the fused ``attn_qkv``
one step more; a row length that does not fill 256-weight blocks falls back to Q5_0/Q5_1/Q8_0,
then F16. ``source`` keeps each tensor's type in the GGUF file the model was loaded from (Q2_K
and Q3_K, which have no writer here, become Q4_K). Norms and other 1-D tensors stay F32.
"""

from __future__ import annotations

import re
from typing import Optional

import numpy as np

from ..errors import GGUFExportError

# export --dtype -> (general.file_type, the type of the 2-D weights)
FILE_TYPES = {"float32": (0, "F32"), "float16": (1, "F16"), "bfloat16": (32, "BF16"), "q8_0": (7, "Q8_0"),
              "q4_0": (2, "Q4_0"), "q4_1": (3, "Q4_1"), "q4_k_m": (15, "Q4_K"), "q5_k_m": (17, "Q5_K"),
              "q6_k": (18, "Q6_K")}
SOURCE = "source"
K_MIXES = ("q4_k_m", "q5_k_m")
FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}  # llama.cpp's, for rows that do not fill 256
UNWRITTEN = {"Q2_K": "Q4_K", "Q3_K": "Q4_K"}  # source types without a writer here -> the next one written


def use_more_bits(layer: int, layers: int) -> bool:
    """llama.cpp's choice of the layers that keep more bits in ``_M`` mixes."""
    return layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2


def mix_type(name: str, dtype: str, layers: int, tied: bool) -> str:
    """The type ``dtype``'s mix gives the 2-D weight ``name`` (llama.cpp's name), before fallback."""
    base = FILE_TYPES[dtype][1]
    if base in ("F32", "F16", "BF16"):
        return base
    if name == "output.weight" or (tied and name == "token_embd.weight"):
        return base if base == "Q8_0" else "Q6_K"
    layer = re.match(r"blk\.(\d+)\.", name)
    if dtype in K_MIXES and layer:
        if re.search(r"\.(attn_v|ffn_down)\.weight$", name) and use_more_bits(int(layer.group(1)), layers):
            return "Q6_K"
        if name.endswith(".attn_qkv.weight"):
            return "Q5_K" if dtype == "q4_k_m" else "Q6_K"
    return base


def tensor_type(name: str, shape: tuple, dtype: str, layers: int, tied: bool,
                source_types: Optional[dict] = None) -> str:
    """The ggml type tensor ``name`` of ``shape`` is written as for ``export --dtype dtype``."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    if len(shape) == 1:
        return "F32"
    if dtype == SOURCE:
        kind = (source_types or {}).get(name, (None, "F16"))[1]
        kind = UNWRITTEN.get(kind, kind)
    else:
        kind = mix_type(name, dtype, layers, tied)
    for _ in range(2):
        if kind in ("F32", "F16", "BF16") or shape[-1] % GGML_QUANT_SIZES[GGMLQuantizationType[kind]][0] == 0:
            return kind
        kind = FALLBACK.get(kind, "F16")
    return kind


def encode(w: np.ndarray, kind: str):
    """``(data, raw_dtype)`` for ``GGUFWriter.add_tensor``: floats as numpy arrays, quantized types
    as their byte blocks (``gguf.quants.quantize``; the K types: :mod:`.kquants`)."""
    from gguf import GGMLQuantizationType as T
    from gguf import quants

    from .kquants import QUANTIZERS, quantize_k

    if kind == "F32":
        return w.astype(np.float32), None
    if kind == "F16":
        return w.astype(np.float16), None
    if kind in QUANTIZERS:
        return quantize_k(w.astype(np.float32), kind), T[kind]
    try:
        return quants.quantize(w.astype(np.float32), T[kind]), T[kind]
    except NotImplementedError:
        raise GGUFExportError(f"GGUF export cannot write tensors of type {kind}") from None


def file_type(dtype: str, source_meta: Optional[dict] = None) -> int:
    """``general.file_type`` of the export (``source``: the source file's)."""
    if dtype == SOURCE:
        return int((source_meta or {}).get("general.file_type", 1))
    return FILE_TYPES[dtype][0]


__all__ = ["FILE_TYPES", "SOURCE", "use_more_bits", "mix_type", "tensor_type", "encode", "file_type"]
