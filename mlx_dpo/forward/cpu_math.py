"""exp, sigmoid and the ops built on them, from multiplies and adds, for MLX's CPU backend.

MLX's CPU backend evaluates transcendental element-wise ops one element at a time
(``exp``, ``sigmoid``: ~15 ns per element here), while a fused chain of multiplies and
adds in a compiled graph costs ~0.1 ns per op per element. Training spends most of its
non-GEMM time in two such ops, the softmax inside attention and the gated MLP's
``silu(gate) * up`` (Gemma's ``gelu_approx(gate) * up``: a tanh). This module writes them
from polynomials MLX fuses:

- ``exp`` for ``x <= 0``: Cephes' ``expf`` (Moshier, 1984): ``x = n ln2 + r``,
  ``|r| <= ln2 / 2``, ``e^r = 1 + r + r^2 P(r)`` (degree-5 ``P``) and ``2^n`` written
  straight into the float's exponent bits. Relative error <= 1e-7 on [-87, 0] (8e-8 measured).
- ``tanh`` (and ``sigmoid(x) = (1 + tanh(x / 2)) / 2``): the rational minimax
  approximation Eigen and XLA use for float32 (degree 13 / 6 in ``x``, argument clamped to
  +-7.9053), absolute error <= 4e-7. (Relative error grows where sigmoid is small, x < -5;
  the GEMM that consumes ``silu(gate) * up`` sees the absolute error, and MLX's own
  ``sigmoid`` is 4e-6 relative.)

Gradients are the exact derivatives written in the same functions (``exp' = exp``,
``sigmoid' = s (1 - s)``), not derivatives of the polynomials. :func:`enable_cpu_math` puts
them into a model's blocks (the trainer does so on the CPU backend only; Metal keeps MLX's
kernels). Measured here (34M Llama, 8 x 640 tokens, forward and backward, float32,
``benchmarks/cpu_math.py``): 9.20 s -> 6.94 s (1.33x), loss equal to 1.2e-7, gradients to 8e-7
of their largest entry.
"""

from __future__ import annotations

import math
import sys

import mlx.core as mx
import mlx.nn as nn

from ..model.architectures import has_feature, model_type

_LOG2E = 1.4426950408889634
_LN2_HI, _LN2_LO = 0.693359375, -2.12194440e-4
_EXP_P = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2,
          1.6666665459e-1, 5.0000001201e-1)
_TANH_CLAMP = 7.90531110763549805
_TANH_P = (-2.76076847742355e-16, 2.00018790482477e-13, -8.60467152213735e-11,
           5.12229709037114e-08, 1.48572235717979e-05, 6.37261928875436e-04,
           4.89352455891786e-03)
_TANH_Q = (1.19825839466702e-06, 1.18534705686654e-04, 2.26843463243900e-03,
           4.89352518554385e-03)


def _split(x: mx.array) -> mx.array:
    """End a fused kernel here (``stop_gradient`` is not fused). A kernel that mixes the
    float->int->float round trip or a clamp with the polynomial runs 2-4x slower on the
    CPU backend than the two halves apart (measured: exp 8.5 vs 2.1 ns per element). The
    gradients of the functions below are their own ``vjp`` functions, so nothing is lost."""
    return mx.stop_gradient(x)


def _horner(coeffs, x):
    acc = coeffs[0]
    for c in coeffs[1:]:
        acc = acc * x + c
    return acc


@mx.custom_function
def exp_nonpositive(x: mx.array) -> mx.array:
    """``e^x`` for float32 ``x <= 0`` (``x < -87`` gives ~1e-38 instead of 0)."""
    x = mx.maximum(x, -87.0)
    n = (x * _LOG2E - 0.5).astype(mx.int32)  # round(x / ln2) for x <= 0 (truncation)
    nf = _split(n.astype(mx.float32))
    r = x - nf * _LN2_HI - nf * _LN2_LO
    er = _horner(_EXP_P, r) * r * r + r + 1.0
    return er * mx.left_shift(n + 127, 23).view(mx.float32)


@exp_nonpositive.vjp
def _exp_vjp(primals, cotangent, output):
    return cotangent * output


def _tanh(x: mx.array) -> mx.array:
    x = _split(mx.clip(x, -_TANH_CLAMP, _TANH_CLAMP))
    x2 = x * x
    return x * _horner(_TANH_P, x2) / _horner(_TANH_Q, x2)


@mx.custom_function
def sigmoid(x: mx.array) -> mx.array:
    """``1 / (1 + e^-x)`` as ``(1 + tanh(x / 2)) / 2``."""
    return 0.5 + 0.5 * _tanh(0.5 * x)


@sigmoid.vjp
def _sigmoid_vjp(primals, cotangent, output):
    return cotangent * output * (1.0 - output)


@mx.custom_function
def _swiglu(gate: mx.array, up: mx.array) -> mx.array:
    g = gate.astype(mx.float32)
    return (g * sigmoid(g) * up.astype(mx.float32)).astype(up.dtype)


@_swiglu.vjp
def _swiglu_vjp(primals, cotangent, output):
    """``d/dg = c u s (1 + g (1 - s))``, ``d/du = c g s`` with ``s = sigmoid(g)``."""
    gate, up = primals
    g, u, c = (a.astype(mx.float32) for a in (gate, up, cotangent))
    s = sigmoid(g)
    return (c * u * s * (1.0 + g * (1.0 - s))).astype(gate.dtype), (c * g * s).astype(up.dtype)


_GELU_C, _GELU_A = math.sqrt(2.0 / math.pi), 0.044715


@mx.custom_function
def _geglu(gate: mx.array, up: mx.array) -> mx.array:
    """``gelu_approx(gate) * up`` (MLX's tanh approximation, which Gemma uses), in float32."""
    g = gate.astype(mx.float32)
    return (0.5 * g * (1.0 + _tanh(_GELU_C * (g + _GELU_A * g * g * g))) * up.astype(mx.float32)).astype(up.dtype)


@_geglu.vjp
def _geglu_vjp(primals, cotangent, output):
    """``d/dg = c u (0.5 (1 + t) + 0.5 g (1 - t^2) C (1 + 3 A g^2))``, ``d/du = c gelu(g)``."""
    gate, up = primals
    g, u, c = (a.astype(mx.float32) for a in (gate, up, cotangent))
    t = _tanh(_GELU_C * (g + _GELU_A * g * g * g))
    dgelu = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * _GELU_C * (1.0 + 3.0 * _GELU_A * g * g)
    return (c * u * dgelu).astype(gate.dtype), (c * 0.5 * g * (1.0 + t)).astype(up.dtype)


# ``silu(gate) * up`` (mlx-lm's ``swiglu``) and ``gelu_approx(gate) * up``, computed in float32.
# Compiled (per shape: a ``custom_function`` cannot be shapeless) for the MLPs' calls outside a
# compiled step, as in generation: eager, their ~30 separate ops take twice mlx-lm's time for a
# decoded token.
swiglu = mx.compile(_swiglu)
geglu = mx.compile(_geglu)


@mx.custom_function
def softmax(x: mx.array) -> mx.array:
    """``e^{x_i} / sum_j e^{x_j}`` along the last axis."""
    e = exp_nonpositive(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@softmax.vjp
def _softmax_vjp(primals, cotangent, output):
    return output * (cotangent - (cotangent * output).sum(axis=-1, keepdims=True))


def attention(queries, keys, values, scale: float, mask=None) -> mx.array:
    """``softmax(q k^T scale + mask) v`` with grouped heads, as
    ``mx.fast.scaled_dot_product_attention``: queries (B, Hq, L, D), keys/values
    (B, Hkv, S, D); ``mask`` ``"causal"`` (aligned to the last key), boolean or additive,
    broadcastable to (B, Hq, L, S). The ``Hq / Hkv`` query heads of a key head are stacked
    along the query axis: one GEMM per key head, no broadcast keys."""
    b, hq, length, d = queries.shape
    hkv, s = keys.shape[1], keys.shape[2]
    rep = hq // hkv
    q = (queries * scale).astype(mx.float32).reshape(b, hkv, rep * length, d)
    scores = q @ keys.astype(mx.float32).swapaxes(-1, -2)
    if isinstance(mask, str):
        mask = mx.arange(s - length, s)[:, None] >= mx.arange(s)[None]
    if mask is not None:  # additive, at the mask's own shape (a broadcast ``where`` is 4x slower)
        mask = mx.where(mask, 0.0, -1e30) if mask.dtype == mx.bool_ else mask.astype(mx.float32)
        if mask.ndim == 4:  # (B, 1 or Hq, L, S) -> grouped heads
            mask = mask[:, :, None] if mask.shape[1] == 1 else mask.reshape(b, hkv, rep, length, s)
        scores = (scores.reshape(b, hkv, rep, length, s) + mask).reshape(b, hkv, rep * length, s)
    out = softmax(scores).astype(values.dtype) @ values
    return out.reshape(b, hq, length, -1).astype(queries.dtype)


# --------------------------------------------------------------------------- installing


def _fast_sdpa(original):
    """mlx-lm's ``scaled_dot_product_attention(q, k, v, cache, scale, mask, sinks)``, through
    :func:`attention` when ``cache`` asks for it (``blocks.ChunkCache`` of an enabled block)."""
    def scaled_dot_product_attention(queries, keys, values, cache, scale, mask, sinks=None):
        if getattr(cache, "cpu_math", False) and sinks is None:
            return attention(queries, keys, values, scale, mask)
        return original(queries, keys, values, cache, scale, mask, sinks)

    scaled_dot_product_attention.original = original
    return scaled_dot_product_attention


MIN_TOKENS = 64  # fewer (a decoded token): mlx-lm's own MLP, whose one fused kernel costs less


def _gated(self, x):
    """The MLP's gate and up projections of ``x`` (``model/architectures.py``'s ``mlp`` form)."""
    if self.mlp_form == "fused_swiglu":  # Phi-3: one gate_up_proj, gate first
        return mx.split(self.gate_up_proj(x), 2, axis=-1)
    return self.gate_proj(x), self.up_proj(x)


def _mlp_class(cls, form: str):
    """A subclass of the MLP class ``cls`` whose gated unit is :func:`swiglu` or :func:`geglu`."""
    def __call__(self, x):
        if x.size < MIN_TOKENS * x.shape[-1]:
            return cls.__call__(self, x)
        gate, up = _gated(self, x)
        return self.down_proj((geglu if form == "geglu" else swiglu)(gate, up))

    return type(cls.__name__ + "CPUMath", (cls,), {"__call__": __call__, "cpu_math": True, "mlp_form": form})


def enable_cpu_math(model: nn.Module) -> bool:
    """Run the blocks' attention (architectures with the ``cpu_math`` feature) and gated MLP (those
    with an ``mlp`` form, ``model/architectures.py``) through this module; returns whether it
    did. Idempotent; call it before the step functions are compiled. The MLPs get a subclass
    per instance (parameters unchanged); attention goes through the model's module-level
    ``scaled_dot_product_attention``, replaced once by a wrapper that changes nothing for any
    cache but an enabled block's ``ChunkCache`` (generation, other models)."""
    kind = model_type(model)
    attention_too, form = has_feature(kind, "cpu_math"), has_feature(kind, "mlp")
    if not (attention_too or form):
        return False
    for layer in model.model.layers:
        module = sys.modules[type(layer.self_attn).__module__]
        if attention_too and not hasattr(module.scaled_dot_product_attention, "original"):
            module.scaled_dot_product_attention = _fast_sdpa(module.scaled_dot_product_attention)
        mlp = layer.mlp
        if form and not getattr(type(mlp), "cpu_math", False):
            mlp.__class__ = _mlp_class(type(mlp), form)
        layer.cpu_math = True
    return True


__all__ = ["exp_nonpositive", "sigmoid", "swiglu", "geglu", "softmax", "attention", "enable_cpu_math"]
