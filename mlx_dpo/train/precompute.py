"""Precomputed reference log-probabilities (TRL's ``precompute_ref_log_probs``).

One inference pass over the train and eval pairs computes the reference
log-probs (base with adapters off, or base + frozen reference adapter) reduced as
the loss needs them, and stores them on disk keyed by (model, reference adapter,
tokenized data, reductions). Training then skips the reference forward; a second
run with the same key loads the file and runs no reference forward at all.

Data parallel: rank k runs batches k, k + N, ... of the same batches one process runs,
the values are all-summed (each row is filled on one rank, zero elsewhere: the sum is
exact) and rank 0 writes the same cache file one process would.
"""

from __future__ import annotations

import hashlib
import io
import json
from functools import partial
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from ..util import distributed
from ..model.adapters import adapter_mode, reference_mode
from ..data.batching import eval_batches
from ..config.fields import DPOConfig, config_keys
from ..data import TokenizedPair
from ..util.io import atomic_write_bytes
from ..util.paths import cache_subdir
from ..forward.logprobs import completion_logps
from ..model.loader import compute_dtype
from ..loss.reduce import reduce_logps

CACHE_VERSION = 2  # 2: key from config roles


def _hash_file(h, path: Path) -> None:
    """Small files by content; weight files by name, size and mtime (cheap for 8B models)."""
    st = path.stat()
    if st.st_size < (1 << 20):
        h.update(path.read_bytes())
    else:
        h.update(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())


def weights_fingerprint(model) -> str:
    """A cheap fingerprint of the weights the reference pass reads: name, shape, dtype and
    (sum, sum |w|, sum w^2) in float32 of every frozen parameter (the base, a frozen
    reference adapter). Trainable ones are left out: adapters start random and a resumed
    full fine-tune has moved its trained blocks, neither of which changes the reference."""
    trainable = {k for k, _ in tree_flatten(model.trainable_parameters())}
    h = hashlib.sha256()
    for name, w in tree_flatten(model.parameters()):
        if name in trainable:
            continue
        x = w.astype(mx.float32)
        stats = mx.stack([mx.sum(x), mx.sum(mx.abs(x)), mx.sum(x * x)])
        h.update(f"{name}:{tuple(w.shape)}:{w.dtype}:".encode())
        h.update(np.array(stats).tobytes())
    return h.hexdigest()


def reference_cache_key(model, pairs: List[TokenizedPair], cfg: DPOConfig, model_path: Optional[Path],
              reductions: List[str]) -> str:
    """Hash of what the reference log-probs depend on: the model's files and the frozen
    weights in memory, the reference adapter, the ``ref_cache`` config keys (compute dtype
    resolved), the reductions and every pair's tokens."""
    h = hashlib.sha256()
    if model_path is not None and Path(model_path).is_dir():
        model_path = Path(model_path)
        for p in sorted(model_path.glob("*.safetensors")) + sorted(model_path.glob("config.json")):
            _hash_file(h, p)
    else:
        h.update(str(model_path).encode())
    mode = reference_mode(model)
    if mode == "reference" and cfg.ref_adapter_path:
        _hash_file(h, Path(cfg.ref_adapter_path) / "adapters.safetensors")
    # the weights actually in memory: a model passed to DPOTrainer need not be the one in cfg.model
    h.update(weights_fingerprint(model).encode())
    settings = {name: getattr(cfg, name) for name in config_keys("ref_cache")}
    settings.update(version=CACHE_VERSION, compute_dtype=str(compute_dtype(cfg)),  # resolved: "auto" differs by device
                    reference=mode, reductions=list(reductions))
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    for p in pairs:
        h.update(np.asarray(p.prompt + [-1] + p.chosen + [-2] + p.rejected + [-3], dtype=np.int64).tobytes())
    return h.hexdigest()[:32]


def cache_file(cfg: DPOConfig, key: str) -> Path:
    return cache_subdir(cfg.cache_dir, "ref_logps") / f"{key}.npz"


def compute_reference_logps(model, pairs: List[TokenizedPair], cfg: DPOConfig, collate: Callable,
                            reductions: List[str], progress: bool = False,
                            group=None) -> Tuple[Dict[str, np.ndarray], int]:
    """Reference log-probs of ``pairs`` in inference mode: ``{reduction: (N, 2)}`` with
    columns (chosen, rejected) (unpaired rows: completion, KL completion, 0 without one), and the
    number of batches run (by this rank). ``collate(pairs, indices)`` builds a batch as the trainer does
    (shared-prefix layout when it uses it); with a data-parallel ``group`` the batches are split over its ranks."""
    mode = "base" if cfg.train_type == "full" else reference_mode(model)

    @partial(mx.compile, inputs=[model.state])
    def forward(batch):
        with adapter_mode(model, mode):
            out = completion_logps(model, batch)
        return {r: reduce_logps(out["token_logps"], out["mask"], r, cfg) for r in reductions}

    result = {r: np.zeros((len(pairs), 2), dtype=np.float32) for r in reductions}
    batch_size = cfg.precompute_ref_batch_size or cfg.eval_batch_size or cfg.batch_size
    was_training = model.training
    model.eval()
    groups = list(eval_batches(pairs, batch_size))
    if group is not None:
        groups = groups[group.rank()::group.size()]
    for indices in _progress(groups, progress):
        batch = collate(pairs, indices)
        out = forward({k: mx.array(v) for k, v in batch.arrays().items()})
        mx.eval(out)
        n = len(indices)
        for r, values in out.items():
            values = np.array(values)
            result[r][indices, 0] = values[:n]
            if batch.two_rows:  # else unpaired rows with no KL completion: their column stays 0
                result[r][indices, 1] = values[n:]
    model.train(was_training)
    if group is not None:
        summed = distributed.all_sum(mx.stack([mx.array(result[r]) for r in reductions]), group)
        result = dict(zip(reductions, np.array(summed)))
    return result, len(groups)


def precompute_reference_logps(model, pairs: List[TokenizedPair], cfg: DPOConfig, collate: Callable, *,
                               reductions: List[str], model_path: Optional[Path], split: str = "train",
                               log: Callable = print, initial: bool = True,
                               group=None) -> Tuple[Dict[str, np.ndarray], int]:
    """Load the cached reference log-probs for ``pairs``, or compute and cache them.

    Returns ``(values, reference batches run)`` (0 when loaded from the cache). ``initial``: the model still holds its initial weights
    (a full fine-tune's reference can only be computed then). ``group``: data-parallel ranks
    share the work (:func:`compute_reference_logps`); they load the cache only if every one has it."""
    path = cache_file(cfg, reference_cache_key(model, pairs, cfg, model_path, reductions))
    cached = {}
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as f:
                cached = {r: f[r] for r in reductions if r in f.files}
        except Exception as e:  # truncated or corrupt: recompute and overwrite it
            log(f"warning: ignoring unreadable reference log-prob cache {path} ({e}); recomputing")
    complete = len(cached) == len(reductions) and all(v.shape == (len(pairs), 2) for v in cached.values())
    if _everyone(complete, group):
        log(f"{split}: reference log-probs loaded from {path}")
        return cached, 0
    if cfg.train_type == "full" and not initial:
        raise RuntimeError(
            f"reference log-probs for full fine-tuning must come from the initial weights, but {path} is missing "
            "after training started; restore the cache or start the run again")
    log(f"{split}: precomputing reference log-probs for {len(pairs)} pairs")
    result, batches = compute_reference_logps(model, pairs, cfg, collate, reductions,
                                              progress=cfg.progress_bar and (group is None or group.rank() == 0),
                                              group=group)
    if group is None or group.rank() == 0:
        buf = io.BytesIO()
        np.savez(buf, **result)
        atomic_write_bytes(path, buf.getvalue())
    return result, batches


def _everyone(found: bool, group) -> bool:
    """Whether every rank of ``group`` found the cache (True without a group)."""
    if group is None:
        return found
    return int(distributed.all_sum(mx.array(int(found)), group).item()) == group.size()


def _progress(items, enabled: bool):
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc="reference log-probs", leave=False)
