"""llama.cpp's K-quant quantizers (mlx_dpo.export.kquants).

Oracle: a line-by-line transcription of ``ggml-quants.c``'s reference quantizers (scalar loops,
float32, sequential sums, as the C code runs) below, on the same inputs: the blocks must be the
same bytes. ``gguf.quants.dequantize`` then reads them back within each type's expected error.
"""

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from mlx_dpo.export.kquants import quantize_k  # noqa: E402

f32 = np.float32


def nearest_int(v):
    return int(np.rint(f32(v)))


def c_make_qkx2(x, w, nmax, rmin, rdelta, nstep):
    n = len(x)
    mn, mx, sum_w = x[0], x[0], w[0]
    sum_x = f32(sum_w * x[0])
    for i in range(1, n):
        mn, mx = min(mn, x[i]), max(mx, x[i])
        sum_w = f32(sum_w + w[i])
        sum_x = f32(sum_x + f32(w[i] * x[i]))
    mn = min(mn, f32(0))
    if mx == mn:
        return f32(0), f32(-mn), [0] * n
    iscale = f32(f32(nmax) / f32(mx - mn))
    scale = f32(1 / iscale)
    L = [max(0, min(nmax, nearest_int(f32(iscale * f32(x[i] - mn))))) for i in range(n)]
    best = f32(0)
    for i in range(n):
        diff = f32(f32(f32(scale * L[i]) + mn) - x[i])
        best = f32(best + f32(w[i] * f32(diff * diff)))
    for step in range(nstep + 1):
        iscale = f32(f32(f32(f32(rmin) + f32(f32(rdelta) * step)) + nmax) / f32(mx - mn))
        aux = [max(0, min(nmax, nearest_int(f32(iscale * f32(x[i] - mn))))) for i in range(n)]
        sl = sl2 = sxl = f32(0)
        for i in range(n):
            sl = f32(sl + f32(w[i] * aux[i]))
            sl2 = f32(sl2 + f32(f32(w[i] * aux[i]) * aux[i]))
            sxl = f32(sxl + f32(f32(w[i] * aux[i]) * x[i]))
        det = f32(f32(sum_w * sl2) - f32(sl * sl))
        if det > 0:
            this_scale = f32(f32(f32(sum_w * sxl) - f32(sum_x * sl)) / det)
            this_min = f32(f32(f32(sl2 * sum_x) - f32(sl * sxl)) / det)
            if this_min > 0:
                this_min, this_scale = f32(0), f32(sxl / sl2)
            err = f32(0)
            for i in range(n):
                diff = f32(f32(f32(this_scale * aux[i]) + this_min) - x[i])
                err = f32(err + f32(w[i] * f32(diff * diff)))
            if err < best:
                L, best, scale, mn = aux, err, this_scale, this_min
    return scale, f32(-mn), L


def c_quantize_k4(x, nmax, rmin, nstep):
    """quantize_row_q4_K_ref / q5_K_ref for one super-block: (d, dmin, ls, lm, L)."""
    scales, mins, L = [], [], []
    for j in range(8):
        g = x[32 * j:32 * j + 32]
        sum_x2 = f32(0)
        for v in g:
            sum_x2 = f32(sum_x2 + f32(v * v))
        av = f32(np.sqrt(f32(sum_x2 / 32)))
        s, m, lev = c_make_qkx2(g, [f32(av + abs(v)) for v in g], nmax, rmin, 0.1, nstep)
        scales.append(s), mins.append(m), L.extend(lev)
    max_scale, max_min = max([f32(0)] + scales), max([f32(0)] + mins)
    inv_s = f32(63 / max_scale) if max_scale > 0 else f32(0)
    inv_m = f32(63 / max_min) if max_min > 0 else f32(0)
    ls = [min(63, nearest_int(f32(inv_s * s))) for s in scales]
    lm = [min(63, nearest_int(f32(inv_m * m))) for m in mins]
    d, dmin = np.float16(f32(max_scale / 63)), np.float16(f32(max_min / 63))
    for j in range(8):
        step = f32(f32(d) * ls[j])
        if step == 0:
            continue
        off = f32(f32(dmin) * lm[j])
        for i in range(32):
            L[32 * j + i] = max(0, min(nmax, nearest_int(f32(f32(x[32 * j + i] + off) / step))))
    return d, dmin, ls, lm, L


def c_pack_k4(d, dmin, ls, lm, L, five_bits):
    scales = [0] * 12
    for j in range(8):
        if j < 4:
            scales[j], scales[j + 4] = ls[j], lm[j]
        else:
            scales[j + 4] = (ls[j] & 15) | ((lm[j] & 15) << 4)
            scales[j - 4] |= (ls[j] >> 4) << 6
            scales[j] |= (lm[j] >> 4) << 6
    qs, qh = [], [0] * 32
    for c in range(4):
        for i in range(32):
            lo, hi = L[64 * c + i], L[64 * c + 32 + i]
            if five_bits:
                qh[i] |= ((lo > 15) << (2 * c)) | ((hi > 15) << (2 * c + 1))
                lo, hi = lo & 15, hi & 15
            qs.append(lo | (hi << 4))
    head = list(np.array([d, dmin], np.float16).view(np.uint8)) + scales
    return bytes(head + (qh if five_bits else []) + qs)


def c_make_qx(x, nmax):
    amax, peak = f32(0), f32(0)
    for v in x:
        if abs(v) > amax:
            amax, peak = abs(v), v
    if amax < f32(1e-15):
        return f32(0), [0] * len(x)

    def fit(iscale):
        levels, slx, sl2 = [], f32(0), f32(0)
        for v in x:
            lv = max(-nmax, min(nmax - 1, nearest_int(f32(iscale * v))))
            levels.append(lv)
            w = f32(v * v)
            slx = f32(slx + f32(f32(w * v) * lv))
            sl2 = f32(sl2 + f32(f32(w * lv) * lv))
        return levels, slx, sl2

    L, slx, sl2 = fit(f32(-nmax / peak))
    scale = f32(slx / sl2) if sl2 else f32(0)
    best = f32(scale * slx)
    for step in [s for s in range(-9, 10) if s]:
        levels, slx, sl2 = fit(f32(-f32(nmax + f32(f32(0.1) * step)) / peak))
        if sl2 > 0 and f32(slx * slx) > f32(best * sl2):
            L, scale = levels, f32(slx / sl2)
            best = f32(scale * slx)
    return scale, [lv + nmax for lv in L]


def c_quantize_q6(x):
    scales, L = [], []
    for ib in range(16):
        s, lev = c_make_qx(x[16 * ib:16 * ib + 16], 32)
        scales.append(s), L.extend(lev)
    max_scale = max(scales, key=abs)  # the first of the largest magnitude, as the C loop keeps it
    if abs(max_scale) < f32(1e-15):
        return bytes(210)
    iscale = f32(-128 / max_scale)
    d = np.float16(f32(1 / iscale))
    sc = [min(127, nearest_int(f32(iscale * s))) for s in scales]
    for j in range(16):
        step = f32(f32(d) * sc[j])
        if step == 0:
            continue
        for i in range(16):
            L[16 * j + i] = max(-32, min(31, nearest_int(f32(x[16 * j + i] / step)))) + 32
    ql, qh = [0] * 128, [0] * 64
    for h in range(2):
        base = 128 * h
        for i in range(32):
            q = [L[base + i + 32 * k] for k in range(4)]
            ql[64 * h + i] = (q[0] & 15) | ((q[2] & 15) << 4)
            ql[64 * h + i + 32] = (q[1] & 15) | ((q[3] & 15) << 4)
            qh[32 * h + i] = (q[0] >> 4) | ((q[1] >> 4) << 2) | ((q[2] >> 4) << 4) | ((q[3] >> 4) << 6)
    return bytes(ql + qh + list(np.array(sc, np.int8).view(np.uint8)) + list(np.array([d]).view(np.uint8)))


def c_reference(x, kind):
    if kind == "Q6_K":
        return c_quantize_q6(x)
    five = kind == "Q5_K"
    return c_pack_k4(*c_quantize_k4(x, 31 if five else 15, -0.5 if five else -1.0, 15 if five else 20), five)


def weights(seed):
    """Weights as a model has them: normal rows, a few outliers, one all-zero and one constant block."""
    rng = np.random.default_rng(seed)
    w = rng.normal(0, 0.02, (3, 512)).astype(np.float32)
    w[0, 5] = 0.4
    w[1, :256] = 0
    w[2, 256:] = 0.01
    return w


@pytest.mark.parametrize("kind", ["Q4_K", "Q5_K", "Q6_K"])
def test_k_quantizers_write_llama_cpps_bytes(kind):
    w = weights(1)
    ours = quantize_k(w, kind)
    theirs = np.array([list(c_reference(list(row[i:i + 256]), kind)) for row in w for i in (0, 256)],
                      np.uint8).reshape(ours.shape)
    np.testing.assert_array_equal(ours, theirs)


# Near ties: super-blocks of N(0, 0.02) weights (``default_rng(0)``, 4000 x 256) where two trial scales
# fit within a float32 rounding. Products of float32 weights and integer levels taken in float64
# (numpy's float32 x int32) settled them the other way from llama.cpp's C: 0.2-0.4% of blocks (a
# real SmolLM2-135M Q6_K export: 401 of 103680 blocks, found against llama.cpp's own library,
# benchmarks/llama_cpp_check.py).
NEAR_TIES = {"Q4_K": [273, 1020, 1747], "Q5_K": [481, 3272], "Q6_K": [468, 1341, 1414]}


@pytest.mark.parametrize("kind", ["Q4_K", "Q5_K", "Q6_K"])
def test_near_ties_settle_as_llama_cpp_settles_them(kind):
    blocks = (np.random.default_rng(0).standard_normal((4000, 256)) * 0.02).astype(np.float32)[NEAR_TIES[kind]]
    theirs = np.array([list(c_reference(list(b), kind)) for b in blocks], np.uint8)
    np.testing.assert_array_equal(quantize_k(blocks, kind), theirs)


@pytest.mark.parametrize("kind,bound", [("Q4_K", 0.12), ("Q5_K", 0.06), ("Q6_K", 0.03)])
def test_k_quantized_weights_read_back_within_the_types_error(kind, bound):
    """gguf's de-quantization of our blocks: the RMS error relative to the weights' RMS shrinks by
    about half per extra bit (measured 0.085, 0.042, 0.021 here)."""
    w = np.random.default_rng(2).normal(0, 0.02, (64, 1024)).astype(np.float32)
    back = gguf.quants.dequantize(quantize_k(w, kind), gguf.GGMLQuantizationType[kind]).reshape(w.shape)
    rel = np.sqrt(np.mean((back - w) ** 2)) / np.sqrt(np.mean(w ** 2))
    print(f"{kind}: relative RMS error {rel:.4f}")
    assert rel < bound and rel > bound / 4


# relative RMS error of each type on these weights, with room (measured 0.008-0.08)
TYPE_ERROR = {"Q4_K": 0.12, "Q5_K": 0.06, "Q6_K": 0.03, "Q8_0": 0.01, "F32": 0.0}


@pytest.mark.parametrize("dtype", ["q4_k_m", "q5_k_m", "q6_k", "source"])
def test_a_run_exports_as_k_quant_gguf(dtype, tmp_path, toy_data_dir):
    """A run on a Q4_K_M-like file exported with a K mix: each tensor has the type llama.cpp's rules
    give (output and the use_more_bits layers' attn_v/ffn_down Q6_K) or its source's type, and holds
    the run's merged weights (its float32 export, which transformers reads as the in-memory model:
    test_gguf.py) within that type's error, as gguf de-quantizes it."""
    from gguf_files import Q, write_tiny_gguf
    from mlx_dpo.config.fields import DPOConfig
    from mlx_dpo.export.exporter import export
    from mlx_dpo.train.trainer import train

    types = {"embd": Q.Q4_K, "attn": Q.Q4_K, "attn_v": Q.Q6_K, "ffn": Q.Q5_K, "output": Q.Q6_K}
    source = write_tiny_gguf(tmp_path / "k.gguf", "llama", types, "smollm", hidden=256, inter=512, seed=7, std=0.06)
    cfg = DPOConfig(model=str(source), data=str(toy_data_dir), output_dir=str(tmp_path / "run"), max_steps=2,
                    batch_size=2, lora_rank=4, max_length=64, learning_rate=1e-3, progress_bar=False,
                    cache_dir=str(tmp_path / "cache"))
    train(cfg)
    exact = export(tmp_path / "run", tmp_path / "f32", format="gguf", dtype="float32")
    out = export(tmp_path / "run", tmp_path / "gguf", format="gguf", dtype=dtype)
    reference = {t.name: t for t in gguf.GGUFReader(str(exact / "model.gguf")).tensors}
    written = {t.name: t for t in gguf.GGUFReader(str(out / "model.gguf")).tensors}
    kinds = {name: t.tensor_type.name for name, t in written.items()}
    if dtype == "source":
        assert kinds == {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(source)).tensors}
    else:
        base, more = {"q4_k_m": ("Q4_K", "Q6_K"), "q5_k_m": ("Q5_K", "Q6_K"), "q6_k": ("Q6_K", "Q6_K")}[dtype]
        expected = {"output.weight": "Q6_K", "token_embd.weight": base, "blk.0.attn_v.weight": base,
                    "blk.1.attn_v.weight": more, "blk.0.ffn_down.weight": base, "blk.1.ffn_down.weight": more,
                    "blk.0.ffn_up.weight": base, "blk.1.attn_q.weight": base, "blk.0.attn_norm.weight": "F32"}
        assert {k: kinds[k] for k in expected} == expected
    for name, t in written.items():
        w = gguf.quants.dequantize(reference[name].data, reference[name].tensor_type).reshape(-1)
        back = gguf.quants.dequantize(t.data, t.tensor_type).reshape(-1)
        rel = np.sqrt(np.mean((back - w) ** 2) / np.mean(w ** 2))
        assert rel <= TYPE_ERROR[kinds[name]] + 1e-7, (name, kinds[name], rel)
