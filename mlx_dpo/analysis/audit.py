"""Audit a trained run: the implicit reward margin of every pair, most negative first.

``margin = beta * [(log pi(c) - log pi_ref(c)) - (log pi(r) - log pi_ref(r))]`` with the
policy = the run's adapters on and the reference = adapters off, on the same loaded
weights (summed completion log-probs, as the sigmoid DPO loss uses them). A pair the
trained model still ranks the wrong way round after training is often mislabeled: the
most negative margins are written as JSONL for review.

An unpaired (KTO) run: each row's reward ``beta * (log pi(y) - log pi_ref(y))`` signed by its label
(``+`` for a desirable row, ``-`` for an undesirable one), so a row the trained model still rates
against its label comes first, with its reward and label.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import List, Optional, Union

import mlx.core as mx
import numpy as np

from ..model.adapters import adapter_mode
from ..data.batching import collate, eval_batches
from ..errors import AuditError, ConfigError, DataError
from ..data import load_records, tokenize_pairs
from ..data.formats import column_map, map_columns
from ..model.trained import TrainedRun, load_adapter_run
from ..train.rundir import RunLock
from ..util.io import atomic_write_text
from ..forward.logprobs import completion_logps


def sequence_logps(model, pairs: list, indices: List[int], pad_id: int, mode: str) -> np.ndarray:
    """Summed completion log-probs ``(B, 2)`` (chosen, rejected) of ``pairs[indices]`` in ``mode``."""
    batch = collate([pairs[i] for i in indices], indices, pad_id)
    with adapter_mode(model, mode):
        out = completion_logps(model, {k: mx.array(v) for k, v in batch.arrays().items()})
        sums = np.array(out["token_logps"].sum(axis=-1))
    b = len(indices)
    return np.stack([sums[:b], sums[b:]], axis=1)


def rewards(model, pairs: list, beta: float, pad_id: int = 0, batch_size: int = 8) -> np.ndarray:
    """The implicit rewards ``(N, 2)`` (chosen, rejected) of every pair (policy = adapters on,
    reference = adapters off)."""
    out = np.zeros((len(pairs), 2), dtype=np.float64)
    for indices in eval_batches(pairs, batch_size):
        policy = sequence_logps(model, pairs, indices, pad_id, "policy")
        reference = sequence_logps(model, pairs, indices, pad_id, "base")
        out[indices] = beta * (policy - reference)
    return out


def margins(model, pairs: list, beta: float, pad_id: int = 0, batch_size: int = 8) -> np.ndarray:
    """The implicit reward margin of every pair."""
    r = rewards(model, pairs, beta, pad_id, batch_size)
    return r[:, 0] - r[:, 1]


def _entry(row, mapping, index: int, value: float, pair, reward: float) -> dict:
    """One audit line: the pair's margin, or an unpaired row's signed reward, its reward and label."""
    rec = map_columns(row, mapping)
    if pair.label is None:
        return {"index": index, "where": row.where, "margin": round(value, 6), "prompt": rec.get("prompt"),
                "chosen": rec.get("chosen"), "rejected": rec.get("rejected")}
    return {"index": index, "where": row.where, "signed_reward": round(value, 6), "reward": round(reward, 6),
            "label": bool(pair.label), "prompt": rec.get("prompt"), "completion": rec.get("completion")}


def check_auditable(run_dir: Path, data: Optional[str]) -> None:
    """Before loading anything: ``run_dir`` is not being trained, and the data to audit is known."""
    try:
        RunLock(run_dir).check()
    except ConfigError as e:  # held by a training run (or a planted link): its adapters are not final
        raise AuditError(f"audit: {e}") from None
    if not data and run_dir.is_dir() and not (run_dir / "config.yaml").is_file():
        raise AuditError(f"{run_dir} has no config.yaml naming its training data; pass --data FILE")


def _records(run: TrainedRun, data: Optional[str]) -> tuple:
    """``(rows, pairs)`` of every record of ``data`` (default: the run's), pairs ``None`` where dropped."""
    cfg = dataclasses.replace(run.cfg, data=data or run.cfg.data, eval_split=0.0, eval_data=None)
    try:
        rows, _ = load_records(cfg)
        pairs = [tokenize_pairs([row], run.tokenizer, cfg)[0] for row in rows]
    except (DataError, FileNotFoundError) as e:
        raise AuditError(str(e)) from None
    return cfg, rows, [p[0] if p else None for p in pairs]


def audit(run_dir: Union[str, Path], data: Optional[str] = None, top: int = 20,
          output: Optional[Union[str, Path]] = None, batch_size: int = 8, trust_remote_code: bool = False) -> dict:
    """Margins of every pair of ``data`` under the run's adapters, sorted ascending; the ``top``
    most negative written to ``output`` (default ``RUN_DIR/audit.jsonl``) as JSONL. Refused while a
    training run holds ``run_dir`` (its adapters are stale), and without ``data`` for a run that
    records no config (there is no training data to fall back on)."""
    if top < 1:
        raise AuditError(f"top must be >= 1, got {top}")
    check_auditable(Path(run_dir), data)
    run = load_adapter_run(run_dir, trust_remote_code=trust_remote_code)
    cfg, rows, pairs = _records(run, data)
    kept = [i for i, p in enumerate(pairs) if p is not None]
    if not kept:
        raise AuditError(f"no usable pairs in {cfg.data}")
    pad_id = getattr(run.tokenizer, "pad_token_id", None) or 0
    r = rewards(run.model, [pairs[i] for i in kept], cfg.beta, pad_id, batch_size)
    labels = [pairs[i].label for i in kept]
    unpaired = labels[0] is not None
    values = np.where(labels, r[:, 0], -r[:, 0]) if unpaired else r[:, 0] - r[:, 1]
    order = np.argsort(values, kind="stable")
    mapping = column_map(cfg)
    ranked = [_entry(rows[kept[j]], mapping, kept[j], float(values[j]), pairs[kept[j]], float(r[j, 0]))
              for j in order]
    path = Path(output) if output else Path(run_dir) / "audit.jsonl"
    worst = ranked[:top]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in worst))
    return {"output": str(path), "pairs": len(kept), "skipped": len(rows) - len(kept), "beta": cfg.beta,
            "unpaired": unpaired, "negative": int((values < 0).sum()), "mean_margin": float(values.mean()),
            "worst": worst}
