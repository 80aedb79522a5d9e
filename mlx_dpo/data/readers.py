"""Reading data files into :class:`Row` s.

A ``.jsonl``, ``.json`` (a list of records, or JSON Lines) or ``.parquet`` file,
optionally gzipped (``.jsonl.gz``, ``.json.gz``). :data:`READERS` maps each suffix to
its reader, so a new file type is one entry there.

Bad input raises :class:`DataError` naming the file and the line (``.jsonl``) or
record index (``.json``/``.parquet``, 0-based).
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import List, Optional

from .base import Row
from ..errors import DataError


def read_text(path: Path) -> str:
    """The UTF-8 text of ``path`` (gunzipped for ``.gz``); ``DataError`` naming the line of a bad byte."""
    data = path.read_bytes()
    if path.name.lower().endswith(".gz"):
        try:
            data = gzip.decompress(data)
        except OSError as e:
            raise DataError(f"{path}: not a valid gzip file ({e})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: invalid UTF-8 ({e.reason} at byte {e.start})") from None


def _jsonl_rows(path: Path, text: str) -> List[Row]:
    rows = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{i}: malformed JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{i}: expected a JSON object, got {type(record).__name__}")
        rows.append(Row(f"{path}:{i}", record))
    return rows


def _json_rows(path: Path, text: str) -> List[Row]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # JSON Lines saved as .json, common on the Hub
            return _jsonl_rows(path, text)
        raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(data, list):
        found = f"an object with keys {', '.join(map(str, data))}" if isinstance(data, dict) else type(data).__name__
        raise DataError(f"{path}: expected a list of records (or JSON Lines), got {found}")
    rows = []
    for i, record in enumerate(data):
        if not isinstance(record, dict):
            raise DataError(f"{path} record index {i}: expected a JSON object, got {type(record).__name__}")
        rows.append(Row(f"{path} record index {i}", record))
    return rows


def read_jsonl(path: Path) -> List[Row]:
    return _jsonl_rows(path, read_text(path))


def read_json(path: Path) -> List[Row]:
    return _json_rows(path, read_text(path))


def read_parquet(path: Path) -> List[Row]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow, or mlx-dpo[parquet])") from None
    try:
        records = pq.read_table(path).to_pylist()
    except Exception as e:
        raise DataError(f"{path}: cannot read Parquet file ({e})") from None
    return [Row(f"{path} record index {i}", r) for i, r in enumerate(records)]


READERS = {
    ".jsonl": read_jsonl,
    ".json": read_json,
    ".parquet": read_parquet,
    ".jsonl.gz": read_jsonl,
    ".json.gz": read_json,
}
DATA_SUFFIXES = tuple(READERS)


def data_suffix(name: str) -> Optional[str]:
    """The longest suffix of :data:`READERS` that ``name`` ends with (case-insensitive), or ``None``."""
    name = name.lower()
    return next((s for s in sorted(DATA_SUFFIXES, key=len, reverse=True) if name.endswith(s)), None)


def read_file(path: Path) -> List[Row]:
    """All records of one data file; an empty file is an error."""
    suffix = data_suffix(path.name)
    if suffix is None:
        raise DataError(f"{path}: unsupported file type (expected one of {', '.join(DATA_SUFFIXES)})")
    rows = READERS[suffix](path)
    if not rows:
        raise DataError(f"{path}: empty file (no records)")
    return rows
