"""Weights of (possibly quantized) linear and embedding layers.

MLX's CPU ``quantized_matmul`` is ~30x slower than de-quantize + fp32 GEMM, so on the
CPU backend a quantized weight stays quantized at rest and is expanded per matmul.
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


__all__ = ["on_cpu", "dequantized_weight", "dense_weight", "base_linear"]
