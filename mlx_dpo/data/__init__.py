"""Preference data: finding, reading, validating, rendering and tokenizing pairs.

:func:`load_datasets` is the entry point. The steps live in submodules, lowest first:

- :mod:`.base`: :class:`Row` (a raw record), :class:`TokenizedPair`;
- :mod:`.readers`: ``.jsonl`` / ``.json`` / ``.parquet`` (+ ``.gz``) files -> rows;
- :mod:`.sources`: ``data`` / ``eval_data`` (a file, a directory, a Hub dataset or
  ``toy``) and split specs (``train[:10%]``) -> the files of the train and eval sets;
- :mod:`.formats`: one class per format (``standard``, ``conversational``,
  ``implicit``): detection, validation, rendering to text; ``columns`` and
  ``prompt_template``;
- :mod:`.tokenize`: encoding at the prompt / completion boundary, EOS, truncation;
- :mod:`.cache`: the tokenized result, cached by files, tokenizer and settings.

A pair whose prompt encodes to no tokens (an empty prompt, or an implicit pair
differing from its first character, with a tokenizer that adds no BOS, as
Qwen2/Qwen3) is dropped: see :func:`tokenize_pairs`. Counts of truncated and dropped
pairs are logged.

Bad input raises :class:`~mlx_dpo.errors.DataError` naming the file, the line (``.jsonl``) or
record index (``.json``/``.parquet``, 0-based) and the field, before training starts.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import List, Optional, Tuple

from ..config.fields import DPOConfig
from . import formats
from .base import Row, TokenizedPair
from ..errors import DataError
from .cache import data_cache_key, cache_path, load_cache, save_cache, tokenizer_fingerprint
from .formats import (FIELDS, FORMATS, check_format_options, column_map, detect_format, extract_prompt, format_names,
                      get_format)
from .readers import DATA_SUFFIXES, READERS, read_file
from .sources import (find_split_files, parse_split, plan_sources, resolve_source, slice_rows,
                      split_files)
from .tokenize import tokenize_pairs

__all__ = [
    "DataError", "Row", "TokenizedPair", "FIELDS", "FORMATS", "DATA_SUFFIXES", "READERS",
    "data_cache_key", "cache_path", "check_format_options", "column_map", "detect_format", "extract_prompt",
    "find_split_files", "format_names", "get_format", "load_cache", "load_datasets", "load_records", "parse_split",
    "plan_sources", "read_file", "read_rows", "resolve_source", "save_cache", "slice_rows",
    "split_files", "tokenize_pairs", "tokenizer_fingerprint",
]


def read_rows(files: List[Path], cfg: DPOConfig) -> List[Row]:
    """Read files and tag each record with its format (detected on each file's first record)."""
    mapping = column_map(cfg)
    rows = []
    for path in files:
        file_rows = read_file(path)
        fmt = detect_format(file_rows[0], mapping, cfg)
        for row in file_rows:
            row.format = fmt
        rows += file_rows
    return rows


def load_records(cfg: DPOConfig, plan: Optional[dict] = None) -> Tuple[List[Row], List[Row]]:
    """Raw train and eval rows (sliced, with the ``eval_split`` hold-out applied)."""
    plan = plan or plan_sources(cfg)
    files, spec = plan["train"]
    train = slice_rows(read_rows(files, cfg), spec)
    evals = []
    if plan["eval"]:
        files, spec = plan["eval"]
        evals = slice_rows(read_rows(files, cfg), spec)
    if not train:
        raise DataError(f"data: split {cfg.dataset_split!r} of {cfg.data} has no records")
    if cfg.eval_split > 0 and not evals:
        rng = random.Random(cfg.seed)
        order = list(range(len(train)))
        rng.shuffle(order)
        n_eval = max(1, int(round(cfg.eval_split * len(train))))
        if n_eval >= len(train):
            raise DataError(f"eval_split {cfg.eval_split} of {len(train)} records holds out {n_eval}, leaving no "
                            "training data; lower eval_split or pass eval_data")
        held = set(order[:n_eval])
        evals = [r for i, r in enumerate(train) if i in held]
        train = [r for i, r in enumerate(train) if i not in held]
    return train, evals


def _summary(name: str, s: dict, unpaired: bool = False) -> str:
    """The set's counts; unpaired rows (a completion and a label) have no chosen == rejected to skip."""
    text = f"{name}: {s['kept']} {'rows' if unpaired else 'pairs'} ({s['truncated']} truncated, "
    text += f"{s['dropped_too_long']} dropped as too long"
    if not unpaired:
        text += f", {s['dropped_identical']} skipped with chosen == rejected"
    if s.get("dropped_no_prompt"):
        text += f", {s['dropped_no_prompt']} skipped with no prompt (no implicit prompt to extract, or 0 prompt tokens)"
    return text + ")"


def _tokenize_and_cache(cfg: DPOConfig, tokenizer, plan: dict, path: Path, log) -> tuple:
    """``(train, eval, stats)`` read and tokenized afresh, and saved to the cache at ``path``."""
    train_rows, eval_rows = load_records(cfg, plan)
    train, train_stats = tokenize_pairs(train_rows, tokenizer, cfg)
    evals, eval_stats = tokenize_pairs(eval_rows, tokenizer, cfg) if eval_rows else ([], None)
    stats = {"train": train_stats, "eval": eval_stats}
    if train:
        try:
            save_cache(path, train, evals, stats)
        except OSError as e:  # a read-only cache only costs re-tokenizing next time
            log(f"warning: could not cache the tokenized data at {path}: {e}")
    return train, evals, stats


def load_datasets(cfg: DPOConfig, tokenizer, log=print) -> Tuple[List[TokenizedPair], List[TokenizedPair]]:
    """Read, validate and tokenize the train and eval sets (cached); log truncation counts."""
    formats.check_data_format(cfg)
    plan = plan_sources(cfg)
    if plan["eval"] and cfg.eval_split > 0:
        log(f"warning: eval_split {cfg.eval_split} is not used: the eval set comes from "
            f"{', '.join(str(p) for p in plan['eval'][0])}")
    path = cache_path(cfg, data_cache_key(plan, cfg, tokenizer))
    cached = load_cache(path)
    if cached is not None:
        train, evals, stats = cached
        source = f" (cached: {path})"
    else:
        train, evals, stats = _tokenize_and_cache(cfg, tokenizer, plan, path, log)
        source = ""
    unpaired = bool(train) and train[0].label is not None  # prompt/completion/label rows (data/unpaired.py)
    fields = "prompt, completion and label as an earlier row" if unpaired else \
        "prompt, chosen and rejected as an earlier pair"
    for name in ("train", "eval"):
        if stats.get(name):
            log(_summary(name, stats[name], unpaired) + source)
        if (stats.get(name) or {}).get("duplicates"):
            log(f"warning: {name}: {stats[name]['duplicates']} exact-duplicate {'rows' if unpaired else 'pairs'} "
                f"(the same {fields}); they are kept and weigh more; remove them if that is not intended")
        if (stats.get(name) or {}).get("prompt_end_dropped"):
            log(f"warning: {name}: in {stats[name]['prompt_end_dropped']} pairs the chat template renders the prompt "
                "alone differently from the conversation (e.g. a thinking template's empty think block); as TRL 1.16 "
                "does, the prompt's end is left out and the model trains on a context it will not see at inference "
                "(mlx-dpo lint lists them; chat_template_kwargs, e.g. enable_thinking, or chat_template can avoid it)")
    if not train:
        raise DataError(f"data: no usable training pairs in {cfg.data}" + _why_none(stats.get("train"), cfg))
    return train, evals


def _why_none(stats: Optional[dict], cfg: DPOConfig) -> str:
    """The setting to change when every pair was dropped."""
    if stats and stats["pairs"] and stats["dropped_too_long"] == stats["pairs"]:
        return (f": every prompt fills max_length ({cfg.max_length}) (truncation_mode: keep_start); raise max_length, "
                "set max_prompt_length below it, or truncation_mode: keep_end")
    if stats and stats["pairs"] and stats["dropped_identical"] == stats["pairs"]:
        return ": every pair has chosen == rejected"
    return ""
