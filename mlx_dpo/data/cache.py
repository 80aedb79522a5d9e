"""Cache of tokenized datasets.

The tokenized result is cached under ``<cache root>/tokenized/<hash>.npz`` (numpy
arrays, no pickle), keyed by the data files (path, size, mtime), the tokenizer files
and every setting that changes the result (``config_keys("data_cache")``), so a
second run skips reading and tokenizing.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np

from ..config.fields import DPOConfig, config_keys
from ..util.paths import cache_subdir
from .base import TokenizedPair
from .tokenize import eos_ids

CACHE_VERSION = 5  # 2: pairs with a 0-token prompt are dropped; 3: key from config roles;
# 4: TRL 1.16's truncation_mode and tokenization at the join; 5: chat pairs split at their common tokens and
# rendered with only the given template arguments (TRL 1.16), unpaired rows' labels
TOKENIZER_HASHED_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of the tokenizer's files (or, without a local directory, its vocabulary)."""
    h = hashlib.sha256()
    inner = getattr(tokenizer, "_tokenizer", tokenizer)
    path = getattr(inner, "name_or_path", None)
    if path and Path(path).is_dir():
        for name in TOKENIZER_HASHED_FILES:
            if (Path(path) / name).is_file():
                h.update(name.encode() + b"\0" + (Path(path) / name).read_bytes())
    else:
        h.update(json.dumps(sorted(inner.get_vocab().items())).encode())
    extra = [getattr(tokenizer, "chat_template", None), sorted(eos_ids(tokenizer)), getattr(tokenizer, "bos_token_id", None)]
    h.update(json.dumps(extra, default=str).encode())
    return h.hexdigest()


def _file_id(path: Path) -> list:
    st = path.stat()
    return [str(path.resolve()), st.st_size, st.st_mtime_ns]


def data_fingerprint(pairs, sample: int = 1000) -> str:
    """Hash of every pair's lengths and of the tokens of ~``sample`` evenly spaced pairs
    (cheap for large data sets; a changed data file changes it)."""
    h = hashlib.sha256(np.array([(len(p.prompt), len(p.chosen), len(p.rejected)) for p in pairs],
                                dtype=np.int64).tobytes())
    if any(p.label is not None for p in pairs):  # unpaired rows: their labels too
        h.update(_labels(pairs).tobytes())
    for p in pairs[:: max(1, len(pairs) // sample)]:
        h.update(np.asarray([*p.prompt, -1, *p.chosen, -1, *p.rejected], dtype=np.int64).tobytes())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------- saving


def data_cache_key(plan: dict, cfg: DPOConfig, tokenizer) -> str:
    """Hash of the planned files, the data settings and the tokenizer."""
    settings = {name: getattr(cfg, name) for name in config_keys("data_cache")}
    key = {
        "version": CACHE_VERSION,
        "train": [[_file_id(p) for p in plan["train"][0]], plan["train"][1]],
        "eval": [[_file_id(p) for p in plan["eval"][0]], plan["eval"][1]] if plan["eval"] else None,
        "settings": settings,
        "tokenizer": tokenizer_fingerprint(tokenizer),
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:32]


def cache_path(cfg: DPOConfig, key: str) -> Path:
    return cache_subdir(cfg.cache_dir, "tokenized") / f"{key}.npz"


def _pack(pairs: List[TokenizedPair]) -> Tuple[np.ndarray, np.ndarray]:
    lengths = np.array([[len(p.prompt), len(p.chosen), len(p.rejected)] for p in pairs], dtype=np.int64).reshape(-1, 3)
    ids = [t for p in pairs for t in (*p.prompt, *p.chosen, *p.rejected)]
    return np.array(ids, dtype=np.int32), lengths


def _labels(pairs: List[TokenizedPair]) -> np.ndarray:
    """Unpaired rows' labels: 1 desirable, 0 undesirable, -1 a pair."""
    return np.array([-1 if p.label is None else int(p.label) for p in pairs], dtype=np.int8)


def _unpack(ids: np.ndarray, lengths: np.ndarray, labels: Optional[np.ndarray] = None) -> List[TokenizedPair]:
    flat = ids.tolist()
    labels = [-1] * len(lengths) if labels is None else labels.tolist()
    pairs, pos = [], 0
    for (a, b, c), label in zip(lengths.tolist(), labels):
        pairs.append(TokenizedPair(flat[pos:pos + a], flat[pos + a:pos + a + b], flat[pos + a + b:pos + a + b + c],
                                   None if label < 0 else bool(label)))
        pos += a + b + c
    return pairs


def save_cache(path: Path, train, evals, stats: dict) -> None:
    from ..util.io import atomic_write_bytes

    train_ids, train_len = _pack(train)
    eval_ids, eval_len = _pack(evals)
    buf = io.BytesIO()
    np.savez(
        buf, train_ids=train_ids, train_lengths=train_len, eval_ids=eval_ids, eval_lengths=eval_len,
        train_labels=_labels(train), eval_labels=_labels(evals),
        stats=np.array(json.dumps(stats)),
    )
    atomic_write_bytes(path, buf.getvalue())


def load_cache(path: Path):
    """``(train, eval, stats)`` from a cache file, or ``None`` if missing or unreadable."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            labels = {k: f[f"{k}_labels"] if f"{k}_labels" in f.files else None for k in ("train", "eval")}
            train = _unpack(f["train_ids"], f["train_lengths"], labels["train"])
            evals = _unpack(f["eval_ids"], f["eval_lengths"], labels["eval"])
            stats = json.loads(str(f["stats"]))
    except Exception:
        return None
    return train, evals, stats
