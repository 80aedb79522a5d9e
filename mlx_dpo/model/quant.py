"""Weights of (possibly quantized) linear and embedding layers.

MLX's CPU ``quantized_matmul`` is ~10-30x slower than de-quantize + fp32 GEMM (measured on
SmolLM2-135M, 4-bit: a 32x16-token forward 98.7 s vs 9.1 s), so on the CPU backend a
quantized weight stays quantized at rest and is expanded per matmul: in the adapters
(:func:`base_linear`), the LM head, and every other quantized layer of a prepared model
(:func:`expand_on_cpu`). On Metal the fused quantized kernels run.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn


def on_cpu() -> bool:
    return mx.default_device() == mx.cpu


def dequantized_weight(module: nn.Module) -> mx.array:
    """The de-quantized weight of a ``QuantizedLinear`` or ``QuantizedEmbedding``."""
    return mx.dequantize(module.weight, module.scales, module.get("biases"), group_size=module.group_size,
                         bits=module.bits, mode=getattr(module, "mode", "affine"))


def dense_weight(layer: nn.Module) -> mx.array:
    """The float32 weight of a (possibly quantized) linear or embedding layer."""
    quantized = isinstance(layer, (nn.QuantizedLinear, nn.QuantizedEmbedding))
    return (dequantized_weight(layer) if quantized else layer.weight).astype(mx.float32)


def base_linear(linear: nn.Module, x: mx.array) -> mx.array:
    """``linear(x)``; on the CPU backend a quantized weight is de-quantized for this call
    (``x W^T + b``), on Metal the fused quantized kernel is used."""
    if isinstance(linear, nn.QuantizedLinear) and on_cpu():
        y = x @ dequantized_weight(linear).astype(x.dtype).T
        return y + linear.bias if "bias" in linear else y
    return linear(x)


class ExpandedOnCPULinear(nn.QuantizedLinear):
    """A ``QuantizedLinear`` that de-quantizes its weight per call on the CPU backend."""

    def __call__(self, x: mx.array) -> mx.array:
        return base_linear(self, x) if on_cpu() else super().__call__(x)


class ExpandedOnCPUEmbedding(nn.QuantizedEmbedding):
    """A ``QuantizedEmbedding`` whose tied head (``as_linear``) de-quantizes on the CPU backend
    (the lookup itself de-quantizes only the rows it gathers)."""

    def as_linear(self, x: mx.array) -> mx.array:
        return x @ dequantized_weight(self).astype(x.dtype).T if on_cpu() else super().as_linear(x)


def expand_on_cpu(model: nn.Module) -> int:
    """Make ``model``'s quantized linears and embeddings take the de-quantize + GEMM path on
    the CPU backend (in place, same weights and numbers); returns how many layers changed."""
    swap = {nn.QuantizedLinear: ExpandedOnCPULinear, nn.QuantizedEmbedding: ExpandedOnCPUEmbedding}
    changed = 0
    for _, module in model.named_modules():
        if type(module) in swap:
            module.__class__ = swap[type(module)]
            changed += 1
    return changed


__all__ = ["on_cpu", "dequantized_weight", "dense_weight", "base_linear", "expand_on_cpu", "ExpandedOnCPULinear",
           "ExpandedOnCPUEmbedding"]
