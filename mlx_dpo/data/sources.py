"""Finding the data files of the train and eval sets (``data`` / ``eval_data``).

A source is:

- a data file (see :mod:`.readers` for the file types);
- a directory holding ``train`` and ``valid``/``validation``/``test`` files in any
  of those formats (``train.jsonl``, ``data/train-00000-of-00001.parquet``, ...);
- a Hub dataset id ``org/name``: the snapshot is fetched with
  ``huggingface_hub.snapshot_download`` into the normal HF cache and its files are
  read as a directory (``dataset_subset`` picks the ``<subset>/`` folder);
- ``toy``: the synthetic set from :mod:`mlx_dpo.model.toy`.

``dataset_split`` / ``eval_dataset_split`` name the split and may slice it like
``datasets`` does: ``train[:10%]``, ``train[10:20]``, ``test[-100:]``. Without an
explicit eval set, a directory's ``valid``/``validation``/``test`` split is used,
then ``eval_split`` holds out a seeded random fraction of the training records.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import List, Optional, Tuple

from ..config.fields import DPOConfig
from ..util import hubnet
from ..errors import DataError
from .readers import DATA_SUFFIXES, data_suffix

EVAL_SPLITS = ("valid", "validation", "test")
_SPLIT_RE = re.compile(r"^\s*([\w.-]+)\s*(?:\[\s*(-?\d+%?)?\s*:\s*(-?\d+%?)?\s*\])?\s*$")


def parse_split(spec: str) -> Tuple[str, Optional[str], Optional[str]]:
    """``"train[:10%]"`` -> ``("train", None, "10%")``."""
    m = _SPLIT_RE.match(spec or "")
    if not m:
        raise DataError(f"split {spec!r}: expected a name with an optional slice, e.g. train, train[:10%], train[10:20]")
    return m.group(1), m.group(2), m.group(3)


def slice_rows(rows: list, spec: str) -> list:
    """Apply the slice of a split spec (percentages round to the nearest record)."""
    _, start, stop = parse_split(spec)

    def bound(b):
        if b is None:
            return None
        if b.endswith("%"):
            return int(round(float(b[:-1]) * len(rows) / 100))
        return int(b)

    return rows[bound(start):bound(stop)]


def _is_data_file(path: Path) -> bool:
    return path.is_file() and data_suffix(path.name) is not None


def _stem(path: Path) -> str:
    suffix = data_suffix(path.name)
    return path.name[: -len(suffix)] if suffix else path.name


def _matches_split(path: Path, base: Path, split: str) -> bool:
    """``train.jsonl``, ``train-00000-of-00002.parquet``, ``train_0.json``, ``train/x.parquet``."""
    stem = _stem(path)
    if re.match(rf"^{re.escape(split)}(?:$|[-.]|_\d)", stem):  # not train_prefs for train
        return True
    return path.parent != base and path.parent.name == split


def find_split_files(root: Path, split: str, subset: Optional[str] = None) -> List[Path]:
    """Data files of ``split`` in a directory laid out like mlx-lm or a Hub dataset."""
    if subset:
        bases = [root / subset, root / "data" / subset]
        if not any(b.is_dir() for b in bases):
            subsets = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
            raise DataError(f"{root}: no subset '{subset}' (folders: {', '.join(subsets) or 'none'})")
    else:
        bases = [root / "data", root]
    for base in bases:
        if not base.is_dir():
            continue
        files = [p for p in sorted(base.iterdir()) if _is_data_file(p) and _matches_split(p, base, split)]
        if (base / split).is_dir():
            files += [p for p in sorted((base / split).iterdir()) if _is_data_file(p)]
        if files:
            return files
    if not subset:  # e.g. Anthropic/hh-rlhf: <subset>/train.jsonl.gz in several folders, read together
        files = [
            p for p in sorted(root.rglob("*"))
            if _is_data_file(p) and not any(part.startswith(".") for part in p.relative_to(root).parts)
            and _matches_split(p, p.parent, split)
        ]
        return files
    return []


def _looks_like_hub_id(spec: str) -> bool:
    return bool(re.match(r"^[\w][\w.-]*/[\w][\w.-]*$", spec)) and not spec.lower().endswith(DATA_SUFFIXES)


def resolve_source(spec: str, subset: Optional[str] = None, revision: Optional[str] = None) -> Path:
    """A local file or directory for ``data``: ``toy``, a path, or a Hub dataset snapshot."""
    if spec == "toy":
        from ..model.toy import resolve_toy_data

        return resolve_toy_data()
    path = Path(spec).expanduser()
    if path.exists():
        return path
    if path.parent != Path(".") and path.parent.is_dir():  # a local directory: a typo, not a Hub id
        close = difflib.get_close_matches(path.name, sorted(p.name for p in path.parent.iterdir()), n=1, cutoff=0.6)
        hint = f"; did you mean {path.parent / close[0]}?" if close else ""
        raise DataError(f"data: {spec} does not exist (its directory {path.parent} does){hint}")
    if _looks_like_hub_id(spec):
        patterns = [f"{subset}/*", f"data/{subset}/*"] if subset else [f"*{s}" for s in DATA_SUFFIXES]
        try:
            return hubnet.fetch(spec, "dataset", revision, patterns)
        except Exception as e:  # network, auth, offline mode without a cached copy, unknown repo
            raise DataError(
                f"data: '{spec}' is not a local path, and fetching it as a Hugging Face Hub dataset failed: {e}"
            ) from None
    raise DataError(f"data: {spec} does not exist (expected a file, a directory or a Hub dataset id org/name)")


def split_files(source: Path, split_spec: str, subset: Optional[str], required: bool = True) -> List[Path]:
    """The files of one split of a source; a single file is its own (only) split."""
    if source.is_file():
        return [source]
    name, _, _ = parse_split(split_spec)
    files = find_split_files(source, name, subset)
    if not files and required:
        found = [str(p.relative_to(source)) for p in sorted(source.rglob("*")) if _is_data_file(p)]
        raise DataError(
            f"{source}: no '{name}' split files (data files found: {', '.join(found[:10]) or 'none'})"
        )
    return files


def _first_split(source: Path, splits, subset: Optional[str]) -> Optional[tuple]:
    for split in splits:
        files = split_files(source, split, subset, required=False)
        if files:
            return files, split
    return None


def _eval_plan(cfg: DPOConfig, source: Path) -> Optional[tuple]:
    """The eval set's ``(files, split spec)``: ``eval_data``, ``eval_dataset_split`` or a directory's eval split."""
    split = cfg.eval_dataset_split
    if cfg.eval_data:
        eval_source = resolve_source(cfg.eval_data, cfg.dataset_subset, cfg.dataset_revision)
        if eval_source.is_file():
            return [eval_source], split or "eval"
        if split:
            return split_files(eval_source, split, cfg.dataset_subset), split
        found = _first_split(eval_source, EVAL_SPLITS, cfg.dataset_subset)
        if found is None:
            raise DataError(f"eval_data: no {'/'.join(EVAL_SPLITS)} split files in {eval_source}")
        return found
    if split:
        if source.is_file():
            raise DataError(f"eval_dataset_split {split!r} needs a directory or Hub dataset, but data is a file: {source}")
        return split_files(source, split, cfg.dataset_subset), split
    if source.is_dir():
        return _first_split(source, EVAL_SPLITS, cfg.dataset_subset)
    return None


def plan_sources(cfg: DPOConfig) -> dict:
    """Which files (and split specs) make the train and eval sets: resolved, not read."""
    source = resolve_source(cfg.data, cfg.dataset_subset, cfg.dataset_revision)
    train = (split_files(source, cfg.dataset_split, cfg.dataset_subset), cfg.dataset_split)
    return {"train": train, "eval": _eval_plan(cfg, source)}
