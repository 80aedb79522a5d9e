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

import json
import math
import os
import select
import signal
import sys
import threading
import time
from typing import Callable, Optional

import mlx.core as mx

_WORLD = None


def check_launch() -> None:
    """The environment ``mlx.launch`` (or a user) set for this process: ``MLX_HOSTFILE`` a readable
    JSON list of hosts (each a list of ``"host:port"``) and ``MLX_RANK`` an index into it. MLX itself
    raises a bare JSON or ring error for each; this names the variable, the file and the fix."""
    from ..errors import ConfigError

    hostfile, rank = os.environ.get("MLX_HOSTFILE"), os.environ.get("MLX_RANK")
    if not hostfile:
        return
    how = "mlx.launch writes it: run `mlx.launch --backend ring -n N -- mlx-dpo train ...`"
    try:
        with open(hostfile) as f:
            hosts = json.load(f)
    except OSError as e:
        raise ConfigError(f"MLX_HOSTFILE={hostfile}: cannot read it ({e.strerror}); {how}") from None
    except ValueError as e:
        raise ConfigError(f"MLX_HOSTFILE={hostfile}: not JSON ({e}); {how}") from None
    if not (isinstance(hosts, list) and hosts and all(isinstance(h, list) and h and all(
            isinstance(a, str) and a.rpartition(":")[2].isdigit() for a in h) for h in hosts)):
        raise ConfigError(f"MLX_HOSTFILE={hostfile}: expected a JSON list of hosts, each a list of \"host:port\" "
                          f"strings, e.g. [[\"127.0.0.1:5000\"], [\"127.0.0.1:5001\"]]; {how}")
    if rank is None or not rank.isdigit() or int(rank) >= len(hosts):
        raise ConfigError(f"MLX_RANK={rank}: expected a rank from 0 to {len(hosts) - 1} (MLX_HOSTFILE={hostfile} "
                          f"lists {len(hosts)} hosts); {how}")


def world(timeout: Optional[float] = None):
    """The global group (``mx.distributed.init()``, cached); size 1 when not launched. The launch
    environment is checked first (:func:`check_launch`). ``timeout``: seconds to wait for the other
    ranks to join (``ddp_timeout``), after which this process ends with a message naming its rank
    (MLX's ring backend would wait for ever for a rank that never starts)."""
    global _WORLD
    if _WORLD is None:
        check_launch()
        watcher = _watch_join(timeout) if timeout and os.environ.get("MLX_HOSTFILE") else None
        try:
            _WORLD = mx.distributed.init()
        finally:
            if watcher is not None:
                os.close(watcher[0])  # joined (or failed): the watcher exits quietly
                os.waitpid(watcher[1], 0)
    return _WORLD


def _watch_join(timeout: float):
    """A forked watcher for ``mx.distributed.init()``, which blocks in C++ holding the GIL (no
    Python thread or signal handler runs meanwhile): unless this process closes the pipe within
    ``timeout`` seconds, the watcher prints the error and sends it SIGTERM. Returns (pipe, pid)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(write)
        ready, _, _ = select.select([read], [], [], timeout)
        if not ready:
            os.write(2, (f"error: rank {os.environ.get('MLX_RANK')}: the other ranks did not join within "
                         f"ddp_timeout ({timeout:g} s); start every rank (mlx.launch starts them all) and check "
                         f"that the hosts of {os.environ.get('MLX_HOSTFILE')} can reach each other\n").encode())
            os.kill(os.getppid(), signal.SIGTERM)
        os._exit(0)
    os.close(read)
    return write, pid


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
    ``last_checkpoint()`` names the checkpoint to resume from in the message.

    SIGTERM/SIGINT during a guarded section that does not end within ``grace`` seconds (a
    peer died: ``mlx.launch`` then terminates the other ranks, whose Python handlers cannot
    run while MLX blocks) also ends the process, with exit code 128 + signal. The thread
    sees the signal through ``signal.set_wakeup_fd``."""

    def __init__(self, timeout: float, rank: int, ranks: int, last_checkpoint: Callable[[], str] = lambda: "none",
                 exit_code: int = 124, grace: float = 5.0):
        self.timeout, self.rank, self.ranks, self.exit_code, self.grace = timeout, rank, ranks, exit_code, grace
        self.last_checkpoint = last_checkpoint
        self._deadline: Optional[float] = None
        self._signal: Optional[tuple] = None  # (signum, time) of a stop signal during a guarded section
        self._what = ""
        self._closed = False
        self._wakeup, self._old_wakeup = None, -1
        r, w = os.pipe()
        os.set_blocking(w, False)
        try:  # only the main thread may set it
            self._old_wakeup = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
            self._wakeup = (r, w)
        except ValueError:
            os.close(r)
            os.close(w)
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
        self._signal = None

    def close(self) -> None:
        self._closed = True
        if self._wakeup is not None:
            try:
                signal.set_wakeup_fd(self._old_wakeup)
            except ValueError:
                pass

    def _watch(self) -> None:
        peers = ", ".join(str(r) for r in range(self.ranks) if r != self.rank)
        while not self._closed:
            self._wait_for_signal(min(0.5, self.timeout / 4))
            deadline, now = self._deadline, time.monotonic()
            if deadline is not None and now > deadline:
                self._exit(f"{self._what} waited more than {self.timeout:g} s (ddp_timeout) for the other ranks "
                           f"({peers}); one of them has died or hung", self.exit_code)
            if deadline is not None and self._signal is not None and now > self._signal[1] + self.grace:
                name = signal.Signals(self._signal[0]).name
                self._exit(f"{name} while {self._what} waited for the other ranks ({peers}); one of them has "
                           "stopped", 128 + self._signal[0])

    def _wait_for_signal(self, seconds: float) -> None:
        if self._wakeup is None:
            time.sleep(seconds)
            return
        ready, _, _ = select.select([self._wakeup[0]], [], [], seconds)
        if ready:
            for signum in os.read(self._wakeup[0], 64):
                if signum in (signal.SIGTERM, signal.SIGINT) and self._deadline is not None and self._signal is None:
                    self._signal = (signum, time.monotonic())

    def _exit(self, what: str, code: int) -> None:
        sys.stderr.write(f"\nerror: rank {self.rank} of {self.ranks}: {what}. Stopping this rank; last checkpoint: "
                         f"{self.last_checkpoint()}\n")
        sys.stderr.flush()
        os._exit(code)


def peer_lost_message(error: Exception, this_rank: int, ranks: int) -> Optional[str]:
    """The message for a collective that failed because a peer went away, else None."""
    text = str(error)
    if "[ring]" not in text and "peer" not in text.lower():
        return None
    peers = ", ".join(str(r) for r in range(ranks) if r != this_rank)
    return f"rank {this_rank} of {ranks}: lost the connection to another rank ({peers}): {text}"
