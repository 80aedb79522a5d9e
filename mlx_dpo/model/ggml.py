"""ggml's tensor types (the blocks of a GGUF file) as MLX arrays, weights kept quantized.

A ggml block holds 32 weights (``Q4_0`` .. ``Q8_0``) or a 256-weight super-block of 16 or
32-weight sub-blocks (the K types). Each decoder here reads a tensor's raw blocks and returns
its weights as groups of 32, ``w = scale * q + bias`` with integer ``q``, which is MLX's affine
quantization (``mx.quantize``, group size 32) when it is exact:

==========  ====  ==================================  =====================================
type        bits  scale                               bias
==========  ====  ==================================  =====================================
Q4_0        4     d                                   -8 d
Q4_1        4     d                                   m
Q5_0        5     d                                   -16 d
Q5_1        5     d                                   m
Q8_0        8     d                                   -128 d  (q + 128)
Q4_K        4     d * sc  (sub-block's 6-bit scale)   -dmin * m  (its 6-bit min)
Q5_K        5     d * sc                              -dmin * m
Q3_K        8     d                                   d * min(k) (k = (sc - 32) * q3, in [-124, 128])
==========  ====  ==================================  =====================================

Scales and biases are stored as float16 where that is exact (the 32-weight types), float32
otherwise (``d * sc`` needs 17 bits): the weights equal ``gguf.quants.dequantize`` in float32.

``Q6_K`` and ``Q2_K`` have 16-weight groups with their own scale (and, for Q2_K, min), which
no MLX group size (32, 64, 128) holds exactly: they are de-quantized exactly to float32, then
quantized to 8-bit affine, group 32, from each group's minimum in steps of its range / 255
(:func:`affine8`: an error of at most half a step; see ``DENSE_TO_8BIT``). ``F32``, ``F16`` and ``BF16``
stay as they are.
"""

from __future__ import annotations

import numpy as np

GROUP = 32  # weights per MLX quantization group
QK_K = 256  # weights per K-type super-block
FLOAT_TYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}
# types without an exact MLX affine form: de-quantized, then 8-bit affine group 32; the error this adds is
# measured in tests/test_gguf_types.py and stated in the README (at most half an 8-bit step of the group's range)
DENSE_TO_8BIT = ("Q6_K", "Q2_K")


def _f16(raw) -> np.ndarray:
    """Little-endian float16 fields (``[..., 2]`` bytes) as float32 ``[...]``."""
    return np.ascontiguousarray(raw).view(np.float16)[..., 0].astype(np.float32)


def _nibbles(qs) -> np.ndarray:
    """``[n, 16]`` bytes -> ``[n, 32]``: weights 0-15 are the low nibbles, 16-31 the high ones."""
    return np.concatenate([qs & 15, qs >> 4], axis=-1)


def _high_bits(qh) -> np.ndarray:
    """The 5th bit of the 32 weights of a Q5_0/Q5_1 block (bit j of a little-endian uint32) as ``[n, 32]``."""
    bits = np.unpackbits(np.ascontiguousarray(qh), axis=-1, bitorder="little")
    return bits << 4


def q4_0(b):
    d = _f16(b[:, 0:2])
    return 4, _nibbles(b[:, 2:18]), d, -8 * d


def q4_1(b):
    return 4, _nibbles(b[:, 4:20]), _f16(b[:, 0:2]), _f16(b[:, 2:4])


def q5_0(b):
    d = _f16(b[:, 0:2])
    return 5, _nibbles(b[:, 6:22]) | _high_bits(b[:, 2:6]), d, -16 * d


def q5_1(b):
    return 5, _nibbles(b[:, 8:24]) | _high_bits(b[:, 4:8]), _f16(b[:, 0:2]), _f16(b[:, 2:4])


def q8_0(b):
    d = _f16(b[:, 0:2])
    q = b[:, 2:34].view(np.int8).astype(np.int16) + 128
    return 8, q.astype(np.uint8), d, -128 * d


def _k4_scales(s):
    """Q4_K/Q5_K's 8 six-bit scales and mins packed in 12 bytes (``get_scale_min_k4``): ``[n, 8]`` each."""
    lo, hi = s[:, 0:4], s[:, 8:12]
    sc = np.concatenate([lo & 63, (hi & 15) | ((lo >> 6) << 4)], axis=-1)
    m = np.concatenate([s[:, 4:8] & 63, (hi >> 4) | ((s[:, 4:8] >> 6) << 4)], axis=-1)
    return sc.astype(np.float32), m.astype(np.float32)


def _k_groups(qs):
    """K-type 4-bit payload ``[n, 128]`` -> ``[n, 8, 32]``: each 32 bytes are group 2c (low nibbles), 2c+1 (high)."""
    q = qs.reshape(-1, 4, 1, 32)
    return np.concatenate([q & 15, q >> 4], axis=2).reshape(-1, 8, 32)


def q4_k(b):
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    sc, m = _k4_scales(b[:, 4:16])
    return 4, _k_groups(b[:, 16:144]), d[:, None] * sc, -dmin[:, None] * m


def q5_k(b):
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    sc, m = _k4_scales(b[:, 4:16])
    qh = b[:, 16:48][:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]  # bit g: group g's 5th bit
    return 5, _k_groups(b[:, 48:176]) | ((qh & 1) << 4), d[:, None] * sc, -dmin[:, None] * m


def _q3_k_scales(s):
    """Q3_K's 16 six-bit scales packed in 12 bytes, minus 32: ``[n, 16]`` int."""
    low = np.concatenate([s[:, 0:8] & 15, s[:, 0:8] >> 4], axis=-1)
    high = (s[:, 8:12][:, None, :] >> (2 * np.arange(4, dtype=np.uint8))[None, :, None]) & 3  # [n, 4 (i//4), 4 (i%4)]
    return (low | (high.reshape(-1, 16) << 4)).astype(np.int16) - 32


def _two_bit_groups(qs):
    """K-type 2-bit payload ``[n, 64]`` -> ``[n, 8, 32]``: half h, shift 2j is group 4h + j."""
    q = qs.reshape(-1, 2, 1, 32) >> (2 * np.arange(4, dtype=np.uint8))[None, None, :, None]
    return (q & 3).reshape(-1, 8, 32)


def q3_k(b):
    d = _f16(b[:, 108:110])
    hm = b[:, 0:32][:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]  # bit g of hmask: group g
    q = _two_bit_groups(b[:, 32:96]).astype(np.int16) - 4 * (1 - (hm & 1)).astype(np.int16)  # in [-4, 3]
    k = q * np.repeat(_q3_k_scales(b[:, 96:108]), 16, axis=-1).reshape(-1, 8, 32)  # in [-124, 128]
    low = k.min(axis=-1)
    return 8, (k - low[..., None]).astype(np.uint8), np.repeat(d[:, None], 8, axis=1), d[:, None] * low


def q2_k(b):
    """Q2_K de-quantized to float32 ``[n, 256]`` (no exact MLX form)."""
    s = b[:, 0:16]
    d, dmin = _f16(b[:, 80:82]), _f16(b[:, 82:84])
    scale = np.repeat(d[:, None] * (s & 15), 16, axis=-1).reshape(-1, 8, 32)
    low = np.repeat(dmin[:, None] * (s >> 4), 16, axis=-1).reshape(-1, 8, 32)
    return (scale * _two_bit_groups(b[:, 16:80]) - low).reshape(-1, QK_K)


def q6_k(b):
    """Q6_K de-quantized to float32 ``[n, 256]`` (no exact MLX form)."""
    ql, qh = b[:, 0:128].reshape(-1, 2, 64), b[:, 128:192].reshape(-1, 2, 1, 32)
    sc = b[:, 192:208].view(np.int8).astype(np.float32)
    low = np.concatenate([ql & 15, ql >> 4], axis=-1).reshape(-1, 2, 4, 32)  # [l, l+32, l+64, l+96] per half
    high = (qh >> (2 * np.arange(4, dtype=np.uint8))[None, None, :, None]) & 3
    q = (low | (high << 4)).astype(np.float32) - 32
    return (np.repeat(_f16(b[:, 208:210])[:, None] * sc, 16, axis=-1) * q.reshape(-1, QK_K))


DECODERS = {"Q4_0": q4_0, "Q4_1": q4_1, "Q5_0": q5_0, "Q5_1": q5_1, "Q8_0": q8_0,
            "Q4_K": q4_k, "Q5_K": q5_k, "Q3_K": q3_k, "Q2_K": q2_k, "Q6_K": q6_k}
SUPPORTED = tuple(FLOAT_TYPES) + tuple(DECODERS)


def affine8(w: np.ndarray):
    """Float32 weights ``[..., 256]`` as 8-bit affine groups of 32: ``q = round((w - min) / step)``,
    ``step = (max - min) / 255``; every weight within half a step of its value."""
    groups = w.reshape(-1, 8, GROUP)
    low, high = groups.min(axis=-1), groups.max(axis=-1)
    step = np.where(high > low, (high - low) / 255, 1).astype(np.float32)
    q = np.clip(np.rint((groups - low[..., None]) / step[..., None]), 0, 255)
    return 8, q.astype(np.uint8), step, low


def pack(q: np.ndarray, bits: int) -> np.ndarray:
    """Integers ``q`` (``[rows, n]``, each below ``2**bits``) packed as MLX packs them: a
    little-endian bit stream, ``bits`` bits per value, read as uint32 ``[rows, n * bits / 32]``."""
    rows, n = q.shape
    shifts = np.arange(8, dtype=np.uint64) * np.uint64(bits)
    v = (q.reshape(rows, n // 8, 8).astype(np.uint64) << shifts).sum(axis=-1, dtype=np.uint64)
    packed = v[..., None].view(np.uint8).reshape(rows, n // 8, 8)[..., :bits]
    return np.ascontiguousarray(packed).reshape(rows, n * bits // 8).view(np.uint32)


def _narrowest(*arrays):
    """The arrays as float16 if every value is exactly a float16, else as float32."""
    exact = all(np.array_equal(a.astype(np.float16).astype(np.float32), a) for a in arrays)
    return [a.astype(np.float16 if exact else np.float32) for a in arrays]


def decode(raw: np.ndarray, kind: str, shape: tuple) -> dict:
    """The tensor of ggml type ``kind`` and (row-major) ``shape`` from its bytes ``raw``:
    ``{"weight": w}`` for float types (numpy, bf16 as float32), or MLX affine parts
    ``{"weight": packed uint32, "scales", "biases", "bits"}``."""
    if kind in FLOAT_TYPES:
        w = raw.view(FLOAT_TYPES[kind]).reshape(shape)
        return {"weight": (w.astype(np.uint32) << 16).view(np.float32) if kind == "BF16" else w}
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    _, nbytes = GGML_QUANT_SIZES[GGMLQuantizationType[kind]]
    out = DECODERS[kind](raw.reshape(-1, nbytes))
    rows = int(np.prod(shape[:-1]))
    bits, q, scale, bias = affine8(out) if kind in DENSE_TO_8BIT else out
    scales, biases = _narrowest(scale.reshape(rows, -1), bias.reshape(rows, -1))
    return {"weight": pack(q.reshape(rows, -1), bits).reshape(*shape[:-1], -1), "bits": bits,
            "scales": scales.reshape(*shape[:-1], -1), "biases": biases.reshape(*shape[:-1], -1)}


__all__ = ["GROUP", "SUPPORTED", "DENSE_TO_8BIT", "decode", "affine8", "pack"]
