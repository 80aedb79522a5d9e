"""Helpers shared by the tests (and the benchmarks, which put this directory on ``sys.path``):
oracles and workloads that are not part of the package."""

import json
import os
import signal
import socket
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np


def sequence_logps_reference(model: nn.Module, tokens, prompt_len: int) -> float:
    """Slow, loop-based sum of completion log-probs of ONE unpadded sequence (for tests):
    full forward, token ``t`` scored by the logits at ``t - 1``."""
    logits = model(mx.array([tokens]))[0].astype(mx.float32)
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    total = 0.0
    for t in range(prompt_len, len(tokens)):
        total += logp[t - 1, tokens[t]].item()
    return total


# Token lengths of UltraFeedback-binarized-like pairs: lognormal (median, sigma) per
# field (see benchmarks/README.md for where they come from).
ULTRAFEEDBACK_LENGTHS = {"prompt": (90, 0.9), "chosen": (240, 0.7), "rejected": (200, 0.8)}


def lognormal_lengths(n: int, seed: int = 0, max_length: int = 1024, max_prompt_length: int = 512,
                      model: Optional[dict] = None) -> list:
    """``n`` (prompt, chosen, rejected) token lengths drawn from ``model`` (default
    :data:`ULTRAFEEDBACK_LENGTHS`), cut as the data loader cuts them: the prompt to
    ``max_prompt_length``, each completion to ``max_length - prompt``; all >= 1."""
    rng = np.random.default_rng(seed)
    model = model or ULTRAFEEDBACK_LENGTHS
    draw = {k: np.maximum(1, np.round(med * np.exp(sigma * rng.standard_normal(n)))).astype(int)
            for k, (med, sigma) in model.items()}
    out = []
    for p, c, r in zip(draw["prompt"], draw["chosen"], draw["rejected"]):
        p = int(min(p, max_prompt_length))
        out.append((p, int(min(c, max_length - p)), int(min(r, max_length - p))))
    return out


def write_local_hostfile(path, ranks: int):
    """A ring hostfile for ``ranks`` processes on this machine, one free 127.0.0.1 port each (what
    ``mlx.launch -n N`` writes for one host), for runs started without the launcher: each process
    gets ``MLX_RANK`` and ``MLX_HOSTFILE``. Returns ``path``."""
    socks = [socket.socket() for _ in range(ranks)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    path.write_text(json.dumps([[f"127.0.0.1:{port}"] for port in ports]))
    return path


def inject(trainer, at_step, fault):
    """Wrap the compiled step: ``fault(outputs)`` runs once, during step ``at_step`` (1-based)."""
    step = trainer.grad_step
    fired = []

    def wrapped(batch, loss_state):
        out = step(batch, loss_state)
        if trainer.step + 1 == at_step and not fired:
            fired.append(True)
            return fault(out)
        return out

    trainer.grad_step = wrapped


def interrupt_in_step(trainer, at_step: int) -> None:
    """A SIGINT during step ``at_step`` (1-based): the run saves a checkpoint and stops after it."""
    inject(trainer, at_step, lambda out: (os.kill(os.getpid(), signal.SIGINT), out)[1])


def feedback_rows(toy_data_dir, n: int = 48) -> list:
    """Unpaired rows from the toy pairs: one side of each of the first ``n`` pairs, labels alternating
    in blocks of 3 (rows 0-2 desirable: the chosen side, 3-5 undesirable: the rejected side, ...)."""
    records = [json.loads(line) for line in (toy_data_dir / "train.jsonl").read_text().splitlines()][:n]
    return [{"prompt": r["prompt"], "completion": r["chosen" if (i // 3) % 2 == 0 else "rejected"],
             "label": (i // 3) % 2 == 0} for i, r in enumerate(records)]
