"""``forward/cpu_math.py``: polynomial exp/sigmoid and the ops built on them against float64
formulas, and a model's log-probs and gradients with them against MLX's own kernels."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_dpo.forward import cpu_math
from mlx_dpo.data.batching import collate
from mlx_dpo.forward.blocks import ChunkCache
from mlx_dpo.forward.logprobs import completion_logps

from test_blocks import adapted, long_pairs, model_source, weights_of


def f64(x):
    return np.array(x.astype(mx.float32), dtype=np.float64)


def test_exp_relative_error_on_the_whole_float32_range():
    x = mx.concatenate([mx.linspace(-87.0, 0.0, 400_001), -mx.abs(mx.random.normal((100_000,), key=mx.random.key(0)))])
    got, want = f64(mx.compile(cpu_math.exp_nonpositive)(x)), np.exp(f64(x))
    assert np.max(np.abs(got - want) / want) < 2e-7
    assert cpu_math.exp_nonpositive(mx.array([0.0])).item() == 1.0
    below = f64(cpu_math.exp_nonpositive(mx.array([-88.0, -1e4, -1e30])))
    assert np.all(below < 2e-38)  # underflow: zero to float32's smallest normals
    g = mx.grad(lambda x: cpu_math.exp_nonpositive(x).sum())(mx.array([-3.0, -0.5]))
    np.testing.assert_allclose(f64(g), np.exp([-3.0, -0.5]), rtol=2e-7)


def test_sigmoid_and_its_gradient():
    x = mx.concatenate([mx.linspace(-40.0, 40.0, 200_001), mx.array([0.0, 1e-8, -1e-8])])
    want = 1.0 / (1.0 + np.exp(-f64(x)))
    got = f64(mx.compile(cpu_math.sigmoid)(x))
    assert np.max(np.abs(got - want)) < 4e-7
    g = f64(mx.grad(lambda x: cpu_math.sigmoid(x).sum())(x))
    assert np.max(np.abs(g - want * (1.0 - want))) < 4e-7


def test_swiglu_value_and_gradients_against_float64():
    k1, k2, k3 = mx.random.split(mx.random.key(1), 3)
    gate, up, cot = (mx.random.normal((64, 96), key=k) * 4 for k in (k1, k2, k3))
    g, u, c = f64(gate), f64(up), f64(cot)
    s = 1.0 / (1.0 + np.exp(-g))
    value, vjps = mx.vjp(mx.compile(cpu_math.swiglu), [gate, up], [cot])
    # sigmoid's absolute error (4e-7), scaled by what multiplies it, plus float32 rounding
    for got, want, factor in ((value[0], g * s * u, g * u), (vjps[1], c * g * s, c * g),
                              (vjps[0], c * u * s * (1 + g * (1 - s)), c * u * (1 + np.abs(g)))):
        err = np.abs(f64(got) - want)
        assert np.all(err <= 5e-7 * np.abs(factor) + 2e-6 * np.abs(want) + 1e-12)
    half = cpu_math.swiglu(gate.astype(mx.bfloat16), up.astype(mx.bfloat16))
    assert half.dtype == mx.bfloat16
    np.testing.assert_allclose(f64(half), g * s * u, rtol=2e-2, atol=2e-2)


def test_geglu_value_and_gradients_against_float64():
    """``gelu_approx(g) * u`` (Gemma's MLP): MLX's tanh formula in float64, its derivative by hand,
    and the value against MLX's own ``nn.gelu_approx``."""
    k1, k2, k3 = mx.random.split(mx.random.key(4), 3)
    gate, up, cot = (mx.random.normal((64, 96), key=k) * 3 for k in (k1, k2, k3))
    g, u, c = f64(gate), f64(up), f64(cot)
    inner = np.sqrt(2 / np.pi) * (g + 0.044715 * g ** 3)
    t = np.tanh(inner)
    gelu = 0.5 * g * (1 + t)
    dgelu = 0.5 * (1 + t) + 0.5 * g * (1 - t ** 2) * np.sqrt(2 / np.pi) * (1 + 3 * 0.044715 * g ** 2)
    value, vjps = mx.vjp(mx.compile(cpu_math.geglu), [gate, up], [cot])
    # tanh's absolute error (4e-7), scaled by what multiplies it, plus float32 rounding
    for got, want, factor in ((value[0], gelu * u, g * u), (vjps[1], c * gelu, c * g),
                              (vjps[0], c * u * dgelu, c * u * (1 + g ** 2))):
        err = np.abs(f64(got) - want)
        assert np.all(err <= 5e-7 * np.abs(factor) + 2e-6 * np.abs(want) + 1e-12), err.max()
    np.testing.assert_allclose(f64(value[0]), f64(nn.gelu_approx(gate) * up), rtol=1e-5, atol=1e-5)
    half = cpu_math.geglu(gate.astype(mx.bfloat16), up.astype(mx.bfloat16))
    assert half.dtype == mx.bfloat16
    np.testing.assert_allclose(f64(half), gelu * u, rtol=2e-2, atol=5e-2)


def test_softmax_value_and_gradient_against_float64():
    k1, k2 = mx.random.split(mx.random.key(2))
    x, cot = mx.random.normal((6, 300), key=k1) * 8, mx.random.normal((6, 300), key=k2)
    xs, c = f64(x), f64(cot)
    p = np.exp(xs - xs.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    value, (grad,) = mx.vjp(cpu_math.softmax, [x], [cot])
    np.testing.assert_allclose(f64(value[0]), p, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(f64(grad), p * (c - (c * p).sum(-1, keepdims=True)), rtol=1e-5, atol=1e-6)


def attention_f64(q, k, v, scale, allowed):
    """Grouped-head attention in float64; ``allowed`` (B or 1, 1, L, S) boolean."""
    q, k, v = f64(q), f64(k), f64(v)
    rep = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
    s = np.where(allowed, q @ k.swapaxes(-1, -2) * scale, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v


@pytest.mark.parametrize("mask", ["causal", "bool", "additive", None])
def test_attention_against_float64_and_mlx_gradients(mask):
    keys = mx.random.split(mx.random.key(3), 5)
    b, hq, hkv, length, s, d = 2, 4, 2, 5, 9, 8
    q, k, v, cot = (mx.random.normal(shape, key=key) for shape, key in
                    zip([(b, hq, length, d), (b, hkv, s, d), (b, hkv, s, d), (b, hq, length, d)], keys))
    causal = np.arange(s - length, s)[:, None] >= np.arange(s)[None]
    random_mask = np.array(mx.random.uniform(shape=(b, 1, length, s), key=keys[4]) > 0.4) | causal
    allowed, arg = {
        "causal": (causal[None, None], "causal"),
        "bool": (random_mask, mx.array(random_mask)),
        "additive": (random_mask, mx.where(mx.array(random_mask), 0.0, -mx.inf)),
        None: (np.ones((1, 1, length, s), bool), None),
    }[mask]
    ours = lambda q, k, v: cpu_math.attention(q, k, v, 0.35, arg)  # noqa: E731
    mlx = lambda q, k, v: mx.fast.scaled_dot_product_attention(q, k, v, scale=0.35, mask=arg)  # noqa: E731
    np.testing.assert_allclose(f64(ours(q, k, v)), attention_f64(q, k, v, 0.35, allowed), rtol=1e-5, atol=1e-6)
    _, got = mx.vjp(mx.compile(ours), [q, k, v], [cot])
    _, want = mx.vjp(mlx, [q, k, v], [cot])
    for a, w in zip(got, want):
        np.testing.assert_allclose(f64(a), f64(w), rtol=1e-4, atol=1e-5)


def test_the_wrapper_only_takes_enabled_chunk_caches(llama_dir, monkeypatch):
    model = adapted(llama_dir)
    assert cpu_math.enable_cpu_math(model) and cpu_math.enable_cpu_math(model)  # idempotent
    module = __import__(type(model.layers[0].self_attn).__module__, fromlist=["x"])
    calls = []
    monkeypatch.setattr(cpu_math, "attention", lambda *a: calls.append(1) or a[0])
    q = mx.zeros((1, 2, 3, 4))
    module.scaled_dot_product_attention(q, q, q, ChunkCache(cpu_math=True), 1.0, "causal")
    assert calls == [1]
    for cache in (None, ChunkCache(), ChunkCache(cpu_math=True)):
        sinks = mx.zeros((2,)) if cache is not None and cache.cpu_math else None
        module.scaled_dot_product_attention(q, q, q, cache, 1.0, "causal", sinks)
    assert calls == [1]  # MLX's kernel for generation's caches, other models, attention sinks
    mlp, swiglus = model.layers[0].mlp, []
    monkeypatch.setattr(cpu_math, "swiglu", lambda g, u: swiglus.append(g.shape) or g * u)
    hidden = model.args.hidden_size
    mlp(mx.zeros((1, cpu_math.MIN_TOKENS - 1, hidden)))  # a few tokens (decoding): mlx-lm's MLP
    assert swiglus == []
    mlp(mx.zeros((2, cpu_math.MIN_TOKENS // 2, hidden)))
    assert len(swiglus) == 1
    assert cpu_math.enable_cpu_math(nn.Linear(2, 2)) is False  # not a known architecture


@pytest.mark.parametrize("layout", ["unshared", "prefix", "packed"])
@pytest.mark.parametrize("arch, dtype", [("llama_dir", mx.float32), ("qwen2_dir", mx.float32),
                                          ("llama_dir", mx.bfloat16), ("gemma3_text", mx.float32),
                                          ("gemma3_text", mx.bfloat16), ("gemma2", mx.float32), ("phi3", mx.float32)])
def test_model_logps_and_gradients_equal_mlx_kernels(arch, dtype, layout, request, monkeypatch):
    """SwiGLU (Llama, Qwen2; Phi-3's fused gate_up_proj) and GeGLU (Gemma) MLPs, and attention through
    the module's scaled_dot_product_attention (all but Gemma 2, whose soft-capped attention is its own).
    In float32 against MLX's kernels; in bfloat16 (the Mac's compute dtype) both against the float32
    result: ours may stray from it by at most twice what MLX's own bfloat16 kernels stray (plus
    bfloat16's 1e-2 of the gradient's scale)."""
    model = adapted(model_source(arch, request))
    pairs = long_pairs(model.args.vocab_size)
    arrays = {k: mx.array(v) for k, v in collate(pairs, [0, 1, 2], layout=layout).arrays().items()}
    w = weights_of(6)

    def loss(m):
        return (completion_logps(m, arrays)["token_logps"].sum(axis=-1).astype(mx.float32) * w).sum()

    def measured():
        value, grads = nn.value_and_grad(model, loss)(model)
        return value.item(), {k: f64(g) for k, g in tree_flatten(grads)}

    expected, expected_grads = measured()  # MLX's kernels, float32
    if dtype != mx.float32:
        model.set_dtype(dtype, lambda d: mx.issubdtype(d, mx.floating))
        mlx_half = measured()
    assert cpu_math.enable_cpu_math(model)
    calls = {"attention": 0, "swiglu": 0, "geglu": 0}
    for name in calls:
        fn = getattr(cpu_math, name)
        monkeypatch.setattr(cpu_math, name, lambda *a, _fn=fn, _n=name: calls.__setitem__(_n, calls[_n] + 1) or _fn(*a))
    value, grads = measured()
    gated = "geglu" if arch.startswith("gemma") else "swiglu"
    assert calls[gated] >= len(model.layers) and calls["swiglu" if gated == "geglu" else "geglu"] == 0
    assert (calls["attention"] >= 2 * len(model.layers)) == (arch != "gemma2")
    assert grads.keys() == expected_grads.keys() and len(grads) > 0
    scales = {k: np.abs(g).max() for k, g in expected_grads.items()}
    assert min(scales.values()) > 1e-4  # not trivially zero
    if dtype == mx.float32:
        assert abs(value - expected) < 1e-5 * abs(expected)
        for key, g in expected_grads.items():
            np.testing.assert_allclose(grads[key], g, atol=2e-4 * scales[key], rtol=1e-3, err_msg=key)
        return
    assert abs(value - expected) <= 2 * abs(mlx_half[0] - expected) + 1e-4 * abs(expected)
    for key, g in expected_grads.items():  # two roundings' worth: 1.1-1.7x seen, and bfloat16's 1e-2 of the scale
        ours, theirs = (np.abs(x[key] - g).max() / scales[key] for x in (grads, mlx_half[1]))
        assert ours <= 2 * theirs + 1e-2, (key, ours, theirs)


@pytest.mark.parametrize("enabled", [True, False])
def test_the_trainer_enables_it_on_the_cpu_backend_unless_switched_off(enabled, llama_dir, toy_data_dir, tmp_path):
    from mlx_dpo import DPOConfig, DPOTrainer

    logs = []
    cfg = DPOConfig(model=str(llama_dir), data=str(toy_data_dir), output_dir=str(tmp_path / "run"), max_steps=1,
                    progress_bar=False, cpu_fast_math=enabled)
    trainer = DPOTrainer(cfg, log=logs.append)
    layers = trainer.model.model.layers
    assert [getattr(layer, "cpu_math", False) for layer in layers] == [enabled] * len(layers)
    assert [getattr(type(layer.mlp), "cpu_math", False) for layer in layers] == [enabled] * len(layers)
    assert any("cpu_math.py" in str(line) for line in logs) == enabled
