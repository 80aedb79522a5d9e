"""llama.cpp's K-quant quantizers (``ggml-quants.c``'s reference, non-imatrix rules), in numpy.

``quantize_row_q4_K_ref``, ``q5_K`` and ``q6_K`` work on 256-weight super-blocks: each 32
(Q4_K, Q5_K) or 16 (Q6_K) weights get a scale (and a min) from a small search
(``make_qkx2_quants``, ``make_qx_quants``), the scales are quantized to 6 (8) bits against one
float16 super-scale, and the weights are rounded against the stored scales. Everything here is
vectorized over the sub-blocks and computed in float32 as the C code is (rounding half to even,
as ``nearest_int``; sums in the C loops' order).
``tests/test_kquants.py`` checks the bytes against a line-by-line transcription of the C code.
"""

from __future__ import annotations

import numpy as np

F32 = np.float32
QK_K = 256
GROUP_MAX_EPS = F32(1e-15)


def _rint(x):
    """``nearest_int``: the level as float32 (a float32 times an int32 array is float64 in numpy,
    whose products round differently from the C code's float ones and can settle a near-tie of two
    trial scales the other way)."""
    return np.rint(x).astype(F32)


def _f16(x) -> np.ndarray:
    return np.asarray(x, F32).astype(np.float16)


def _sum(x):
    """Sum over the last axis in order, in float32, as the C loops add (numpy's pairwise sum rounds
    otherwise, which can settle a near-tie of two trial scales the other way)."""
    columns = np.ascontiguousarray(np.moveaxis(x, -1, 0), dtype=F32)
    total = columns[0].copy()
    for column in columns[1:]:
        total += column
    return total


def make_qkx2_quants(x, weights, nmax: int, rmin: float, rdelta: float, nstep: int):
    """Per row of ``x`` ``[g, n]``: the scale, the min (as a positive offset) and the levels
    ``L`` of the best weighted fit ``x ~ scale * L - min`` over ``nstep + 1`` trial scales."""
    x, w = x.astype(F32), weights.astype(F32)
    low, high = np.minimum(x.min(axis=-1), 0).astype(F32), x.max(axis=-1)
    sum_w, sum_x = _sum(w), _sum(w * x)
    flat = high == low
    span = np.where(flat, F32(1), high - low).astype(F32)
    iscale = F32(nmax) / span
    scale = (F32(1) / iscale).astype(F32)
    L = np.clip(_rint(iscale[:, None] * (x - low[:, None])), 0, nmax)
    best = _sum(w * (scale[:, None] * L + low[:, None] - x) ** 2)
    with np.errstate(divide="ignore", invalid="ignore"):
        for step in range(nstep + 1):
            trial = ((F32(rmin) + F32(rdelta) * F32(step) + F32(nmax)) / (high - low)).astype(F32)
            aux = np.clip(_rint(trial[:, None] * (x - low[:, None])), 0, nmax)
            sum_l, sum_l2, sum_xl = _sum(w * aux), _sum(w * aux * aux), _sum(w * aux * x)
            det = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
            positive = this_min > 0
            this_scale = np.where(positive, sum_xl / sum_l2, this_scale).astype(F32)
            this_min = np.where(positive, 0, this_min).astype(F32)
            err = _sum(w * (this_scale[:, None] * aux + this_min[:, None] - x) ** 2)
            better = (det > 0) & (err < best) & ~flat
            L = np.where(better[:, None], aux, L)
            best, scale, low = (np.where(better, a, b) for a, b in ((err, best), (this_scale, scale), (this_min, low)))
    return np.where(flat, 0, scale).astype(F32), (-low).astype(F32), np.where(flat[:, None], 0, L)


def make_qx_quants(x, nmax: int):
    """Per row of ``x`` ``[g, n]`` (``rmse_type`` 1: weights ``x**2``): the signed scale and the
    levels ``L + nmax`` of the best fit ``x ~ scale * L`` over 19 trial scales."""
    x = x.astype(F32)
    at = np.abs(x).argmax(axis=-1)
    peak = np.take_along_axis(x, at[:, None], axis=-1)[:, 0]
    zero = np.abs(peak) < GROUP_MAX_EPS
    peak = np.where(zero, F32(1), peak).astype(F32)
    w = x * x

    def fit(iscale):
        levels = np.clip(_rint(iscale[:, None] * x), -nmax, nmax - 1)
        return levels, _sum(w * x * levels), _sum(w * levels * levels)

    L, sumlx, suml2 = fit((F32(-nmax) / peak).astype(F32))
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(suml2 != 0, sumlx / suml2, 0).astype(F32)
        best = scale * sumlx
        for step in [s for s in range(-9, 10) if s]:
            levels, sumlx, suml2 = fit((-(F32(nmax) + F32(0.1) * F32(step)) / peak).astype(F32))
            better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
            L = np.where(better[:, None], levels, L)
            scale = np.where(better, sumlx / suml2, scale).astype(F32)
            best = np.where(better, scale * sumlx, best).astype(F32)
    return np.where(zero, 0, scale).astype(F32), np.where(zero[:, None], 0, L + nmax)


def _pack_scales_k4(ls, lm):
    """Q4_K/Q5_K's 8 six-bit scales and mins ``[nb, 8]`` into 12 bytes ``[nb, 12]``."""
    out = np.zeros((ls.shape[0], 12), np.uint8)
    out[:, 0:4] = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    out[:, 4:8] = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    out[:, 8:12] = (ls[:, 4:] & 15) | ((lm[:, 4:] & 15) << 4)
    return out


def _k4_levels(x, nmax: int, rmin: float, nstep: int):
    """The shared part of Q4_K and Q5_K: ``d``, ``dmin`` (float16), packed scales and the levels."""
    nb = x.shape[0]
    g = x.reshape(nb * 8, 32).astype(F32)
    av = np.sqrt(_sum(g * g) / F32(32)).astype(F32)
    scales, mins, L = make_qkx2_quants(g, av[:, None] + np.abs(g), nmax, rmin, 0.1, nstep)
    scales, mins = scales.reshape(nb, 8), mins.reshape(nb, 8)
    max_scale, max_min = np.maximum(scales.max(axis=1), 0), np.maximum(mins.max(axis=1), 0)
    with np.errstate(divide="ignore"):
        inv_scale = np.where(max_scale > 0, F32(63) / max_scale, 0).astype(F32)
        inv_min = np.where(max_min > 0, F32(63) / max_min, 0).astype(F32)
    ls = np.minimum(63, _rint(inv_scale[:, None] * scales)).astype(np.uint8)
    lm = np.minimum(63, _rint(inv_min[:, None] * mins)).astype(np.uint8)
    d, dmin = _f16(max_scale / F32(63)), _f16(max_min / F32(63))
    step = d.astype(F32)[:, None] * ls
    offset = dmin.astype(F32)[:, None] * lm
    with np.errstate(divide="ignore", invalid="ignore"):
        again = np.clip(_rint((g.reshape(nb, 8, 32) + offset[..., None]) / step[..., None]), 0, nmax)
    L = np.where(step[..., None] != 0, again, L.reshape(nb, 8, 32)).astype(np.uint8)
    return d, dmin, _pack_scales_k4(ls, lm), L


def _halves(L):
    """Levels ``[nb, 8, 32]`` as 4 chunks of (group 2c, group 2c+1): ``[nb, 4, 32]`` each."""
    return L[:, 0::2], L[:, 1::2]


def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    """``quantize_row_q4_K_ref`` of float32 ``x`` ``[nb, 256]``: blocks ``[nb, 144]``."""
    d, dmin, scales, L = _k4_levels(x, 15, -1.0, 20)
    low, high = _halves(L)
    qs = (low | (high << 4)).reshape(-1, 128)
    return np.concatenate([d.view(np.uint8).reshape(-1, 2), dmin.view(np.uint8).reshape(-1, 2), scales, qs], axis=1)


def quantize_q5_k(x: np.ndarray) -> np.ndarray:
    """``quantize_row_q5_K_ref``: blocks ``[nb, 176]``."""
    d, dmin, scales, L = _k4_levels(x, 31, -0.5, 15)
    low, high = _halves(L)
    qs = ((low & 15) | ((high & 15) << 4)).reshape(-1, 128)
    bits = (L >> 4).astype(np.uint8)  # [nb, 8, 32]: group g's 5th bit goes to bit g of qh
    qh = (bits << np.arange(8, dtype=np.uint8)[None, :, None]).sum(axis=1, dtype=np.uint8)
    return np.concatenate([d.view(np.uint8).reshape(-1, 2), dmin.view(np.uint8).reshape(-1, 2), scales, qh, qs],
                          axis=1)


def quantize_q6_k(x: np.ndarray) -> np.ndarray:
    """``quantize_row_q6_K_ref``: blocks ``[nb, 210]``."""
    nb = x.shape[0]
    g = x.reshape(nb * 16, 16).astype(F32)
    scales, L = make_qx_quants(g, 32)
    scales, L = scales.reshape(nb, 16), L.reshape(nb, 16, 16)
    at = np.abs(scales).argmax(axis=1)
    max_scale = np.take_along_axis(scales, at[:, None], axis=1)[:, 0]
    empty = np.abs(max_scale) < GROUP_MAX_EPS
    with np.errstate(divide="ignore"):
        iscale = np.where(empty, 0, F32(-128) / max_scale).astype(F32)
        d = np.where(empty, np.float16(0), _f16(F32(1) / iscale))
    sc = np.where(empty[:, None], 0, np.minimum(127, _rint(iscale[:, None] * scales))).astype(np.int8)
    step = d.astype(F32)[:, None] * sc
    with np.errstate(divide="ignore", invalid="ignore"):
        again = np.clip(_rint(g.reshape(nb, 16, 16) / step[..., None]), -32, 31) + 32
    L = np.where(step[..., None] != 0, again, np.where(empty[:, None, None], 0, L)).astype(np.uint8)
    L = L.reshape(nb, 2, 4, 32)  # per half of 128: weights l, l+32, l+64, l+96
    ql = np.concatenate([(L[:, :, 0] & 15) | ((L[:, :, 2] & 15) << 4), (L[:, :, 1] & 15) | ((L[:, :, 3] & 15) << 4)],
                        axis=-1).reshape(nb, 128)
    qh = ((L >> 4) << (2 * np.arange(4, dtype=np.uint8))[None, None, :, None]).sum(axis=2, dtype=np.uint8)
    return np.concatenate([ql, qh.reshape(nb, 64), sc.view(np.uint8), d.view(np.uint8).reshape(-1, 2)], axis=1)


QUANTIZERS = {"Q4_K": quantize_q4_k, "Q5_K": quantize_q5_k, "Q6_K": quantize_q6_k}


CHUNK = 1 << 14  # super-blocks quantized at once (4M weights): bounds the temporaries' memory


def quantize_k(w: np.ndarray, kind: str) -> np.ndarray:
    """Float32 ``w`` ``[rows, n]`` (``n`` a multiple of 256) as ``kind`` blocks ``[rows, bytes]``."""
    rows, n = w.shape
    if n % QK_K:
        raise ValueError(f"{kind} needs rows of a multiple of {QK_K} weights; these have {n}")
    blocks = w.reshape(rows * n // QK_K, QK_K)
    out = [QUANTIZERS[kind](blocks[i:i + CHUNK]) for i in range(0, len(blocks), CHUNK)]
    return np.concatenate(out).reshape(rows, -1)


__all__ = ["QUANTIZERS", "quantize_k", "make_qkx2_quants", "make_qx_quants"]
