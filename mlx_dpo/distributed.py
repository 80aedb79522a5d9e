"""Data parallelism on ``mx.distributed`` (as mlx-lm's LoRA trainer): no transport of our own.

``mlx.launch --backend ring -n 2 -- mlx-dpo train ...`` (or ``MLX_RANK`` + ``MLX_HOSTFILE``)
starts one process per rank; :func:`world` is ``mx.distributed.init()``'s group (size 1
when not launched). Each rank takes its slice of every global micro-batch, the step
averages the gradients (``nn.average_gradients``) and all-reduces its metrics, so every
rank holds the same weights and optimizer state; rank 0 prints and writes.

Exactness against one process with the global batch: a rank's loss is the mean of its
pairs' losses, and the mean over ranks of those is the global mean. Losses that couple the
batch (``aot``, ``kto_pair``, ``bco_pair``'s reward mean) see the whole global batch
through :func:`gather`, whose backward pass sums every rank's cotangent (each rank owns
one term of the global loss), so the averaged gradient is the global loss's gradient.
Token-weighted means (NLL, ``logits/*``) divide by the all-summed token count.

:class:`Watchdog`: a collective that waits longer than ``ddp_timeout`` (a rank died or
hung; the ring backend raises itself when a peer's socket closes) ends the process with a
message naming the rank, instead of blocking forever.
"""

from __future__ import annotations

import math
import os
import sys
import threading
import time
from typing import Callable, Optional

import mlx.core as mx

_WORLD = None


def world():
    """The global group (``mx.distributed.init()``, cached); size 1 when not launched."""
    global _WORLD
    if _WORLD is None:
        _WORLD = mx.distributed.init()
    return _WORLD


def rank() -> int:
    return world().rank()


def size() -> int:
    return world().size()


def all_sum(x: mx.array, group=None) -> mx.array:
    """Sum over the ranks of ``group`` (identity without one, or with one rank)."""
    if group is None or group.size() == 1:
        return x
    return mx.distributed.all_sum(x, group=group)


def all_mean(x: mx.array, group=None) -> mx.array:
    return x if group is None or group.size() == 1 else all_sum(x, group) / group.size()


def gather(x: mx.array, group=None) -> mx.array:
    """Concatenate ``x`` (``(B, ...)``, the same B on every rank) over the ranks in rank order.
    Backward: this rank's slice of the *sum* of the ranks' cotangents (MLX's own all_gather
    keeps only the local one, which would drop the other ranks' terms of the loss)."""
    if group is None or group.size() == 1:
        return x
    r = group.rank()

    @mx.custom_function
    def _gather(x):
        return mx.distributed.all_gather(x, group=group)

    @_gather.vjp
    def _gather_vjp(primal, cotangent, output):
        b = primal.shape[0]
        return mx.distributed.all_sum(cotangent, group=group)[r * b:(r + 1) * b]

    return _gather(x)


def local(x: mx.array, group=None) -> mx.array:
    """This rank's rows of a gathered ``(size * B, ...)`` array."""
    if group is None or group.size() == 1:
        return x
    b = x.shape[0] // group.size()
    return x[group.rank() * b:(group.rank() + 1) * b]


def global_batch_message(batch_size: int, accumulation: int, ranks: int) -> str:
    return (f"global batch {batch_size * accumulation * ranks} = batch_size {batch_size} x "
            f"gradient_accumulation_steps {accumulation} x {ranks} rank{'s' if ranks > 1 else ''}")


# Assumed sustained TCP bandwidths (GB/s) for :func:`ring_seconds` estimates: measure yours.
LINKS_GB_S = {"1 GbE": 0.117, "10 GbE": 1.17, "Thunderbolt (TCP bridge)": 2.5}


def allreduce_bytes(trainable, accumulation: int = 1, metrics: int = 16) -> int:
    """Bytes each rank all-reduces per optimizer step: every trainable gradient (in its dtype) once
    per micro-batch (``nn.average_gradients`` in each step), plus ``metrics`` float32 values and the
    batch gathers (a few floats per pair, left out). ``trainable``: ``[(name, array)]`` or shapes
    ``[(shape, itemsize)]``."""
    total = 0
    for a, b in trainable:
        total += b.nbytes if hasattr(b, "nbytes") else int(math.prod(a)) * b
    return accumulation * (total + 4 * metrics)


def ring_seconds(nbytes: int, ranks: int, gb_per_s: float) -> float:
    """Time of a ring all-reduce of ``nbytes`` over ``ranks`` at ``gb_per_s`` per link: each rank
    sends and receives ``2 (N - 1) / N * nbytes`` (reduce-scatter, then all-gather)."""
    return 0.0 if ranks <= 1 else 2 * (ranks - 1) / ranks * nbytes / (gb_per_s * 1e9)


class Watchdog:
    """Ends the process when a guarded section (a step with collectives) runs past
    ``timeout`` seconds: the main thread is then blocked inside MLX, so a thread writes the
    message to stderr and calls ``os._exit(exit_code)``. ``with dog.guard("step 3"): ...``;
    ``last_checkpoint()`` names the checkpoint to resume from in the message."""

    def __init__(self, timeout: float, rank: int, ranks: int, last_checkpoint: Callable[[], str] = lambda: "none",
                 exit_code: int = 124):
        self.timeout, self.rank, self.ranks, self.exit_code = timeout, rank, ranks, exit_code
        self.last_checkpoint = last_checkpoint
        self._deadline: Optional[float] = None
        self._closed = False
        self._what = ""
        self._thread = threading.Thread(target=self._watch, daemon=True, name="mlx-dpo-watchdog")
        self._thread.start()

    def guard(self, what: str) -> "Watchdog":
        self._what = what
        return self

    def __enter__(self) -> "Watchdog":
        self._deadline = time.monotonic() + self.timeout
        return self

    def __exit__(self, *exc) -> None:
        self._deadline = None

    def close(self) -> None:
        self._closed = True

    def _watch(self) -> None:
        while not self._closed:
            time.sleep(min(0.5, self.timeout / 4))
            deadline = self._deadline
            if deadline is not None and time.monotonic() > deadline:
                peers = ", ".join(str(r) for r in range(self.ranks) if r != self.rank)
                sys.stderr.write(f"\nerror: rank {self.rank} of {self.ranks}: {self._what} waited more than "
                                 f"{self.timeout:g} s (ddp_timeout) for the other ranks ({peers}); one of them has "
                                 f"died or hung. Stopping this rank; last checkpoint: {self.last_checkpoint()}\n")
                sys.stderr.flush()
                os._exit(self.exit_code)


def peer_lost_message(error: Exception, this_rank: int, ranks: int) -> Optional[str]:
    """The message for a collective that failed because a peer went away, else None."""
    text = str(error)
    if "[ring]" not in text and "peer" not in text.lower():
        return None
    peers = ", ".join(str(r) for r in range(ranks) if r != this_rank)
    return f"rank {this_rank} of {ranks}: lost the connection to another rank ({peers}): {text}"
