"""Metal memory hygiene, as mlx-lm's trainer and generator do it (no-ops on other backends).

- :func:`wired_limit` (around training): wire up to Metal's recommended working set
  (``mx.set_wired_limit``) so the weights and activations stay resident between steps, and
  restore the previous limit afterwards; warn when the weights alone exceed 90% of that set
  (the machine will swap).
- :func:`release_cache`: ``mx.clear_cache()`` after evaluation and after the reference
  precompute, whose buffer shapes the training step does not reuse (MLX keeps freed buffers
  in its cache for reuse; on a Mac that memory is the GPU's and the rest of the system's).
"""

from __future__ import annotations

import contextlib
import os
from typing import Callable, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .io import soft_rlimit


def weights_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters as stored (quantized weights packed)."""
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def system_memory_bytes() -> int:
    """Memory MLX may use: Metal's recommended working set, else the device's memory
    (``memory_size``; ``total_memory`` on CUDA), else physical RAM (the CPU backend)."""
    info = mx.device_info()
    for key in ("max_recommended_working_set_size", "memory_size", "total_memory"):
        if info.get(key):
            return int(info[key])
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def peak_memory_gb() -> float:
    """MLX's peak memory so far (``mx.get_peak_memory``), in GB."""
    return mx.get_peak_memory() / 1e9


@contextlib.contextmanager
def wired_limit(model: nn.Module, log: Callable[[str], None] = print):
    """On Metal: ``mx.set_wired_limit(max_recommended_working_set_size)`` for the block, then the
    old limit back (after ``mx.synchronize``); elsewhere nothing."""
    if not mx.metal.is_available():
        yield
        return
    limit = system_memory_bytes()  # on Metal: max_recommended_working_set_size
    weights = weights_bytes(model)
    if weights > 0.9 * limit:
        log(f"warning: the weights ({weights / 1e9:.2f} GB) are over 90% of Metal's recommended working set "
            f"({limit / 1e9:.2f} GB): expect swapping; use a smaller or quantized model")
    old = mx.set_wired_limit(limit)
    try:
        yield
    finally:
        mx.synchronize()
        mx.set_wired_limit(old)


def memory_rlimit() -> Optional[int]:
    """The smallest memory limit set on this process (``ulimit -v``/``-d``: RLIMIT_AS, RLIMIT_DATA),
    in bytes, or None. MLX cannot report an allocation past it: the process dies with SIGSEGV."""
    return soft_rlimit("AS", "DATA")


def memory_limit_warning() -> Optional[str]:
    """The line to print before training when :func:`memory_rlimit` is set: what happens past it
    and what to do (a segmentation fault cannot be caught and explained when it comes)."""
    limit = memory_rlimit()
    if limit is None:
        return None
    return (f"warning: this process has a memory limit (ulimit -v/-d: {limit / 1e9:.2f} GB); MLX cannot report an "
            "allocation past it and the run would end in a segmentation fault. Raise the limit, or lower the peak "
            "(mlx-dpo plan estimates it: smaller batch_size or max_length, gradient_checkpointing: true)")


def release_cache() -> None:
    """Free MLX's cache of unused buffers (``mx.clear_cache``)."""
    mx.clear_cache()


__all__ = ["wired_limit", "release_cache", "weights_bytes", "system_memory_bytes", "peak_memory_gb", "memory_rlimit",
           "memory_limit_warning"]
