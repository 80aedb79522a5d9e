"""Preference data: reading, validating and tokenizing ``prompt``/``chosen``/``rejected`` pairs.

Tokenization: the prompt is encoded alone (with BOS as the tokenizer adds it) and
``prompt + completion`` is encoded whole; the completion's tokens are the tokens
after the prompt's. Where the tokenizer merges characters across the boundary
(the whole-text encoding does not start with the prompt's tokens), the completion
is encoded on its own without special tokens instead, so that chosen and rejected
always share exactly the same prompt tokens. EOS is appended to every completion
that does not already end with it.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

from .config import DPOConfig


class DataError(ValueError):
    """Bad input data: the message names the file, the record and the field."""


@dataclass
class TokenizedPair:
    prompt: List[int]
    chosen: List[int]
    rejected: List[int]

    @property
    def length(self) -> int:
        return len(self.prompt) + max(len(self.chosen), len(self.rejected))


FIELDS = ("prompt", "chosen", "rejected")


def read_jsonl(path: Path) -> List[dict]:
    records = []
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: invalid UTF-8 ({e.reason})") from None
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{i}: malformed JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{i}: expected a JSON object, got {type(record).__name__}")
        records.append(record)
    if not records:
        raise DataError(f"{path}: empty file (no records)")
    for i, record in enumerate(records, 1):
        check_record(record, f"{path}:{i}")
    return records


def check_record(record: dict, where: str) -> None:
    for name in FIELDS:
        if name not in record:
            raise DataError(f"{where}: missing field '{name}' (have: {', '.join(sorted(record))})")
        value = record[name]
        if not isinstance(value, str):
            raise DataError(f"{where}: field '{name}' must be a string, got {type(value).__name__}")
        if name != "prompt" and not value.strip():
            raise DataError(f"{where}: field '{name}' is empty")


def split_paths(data: str) -> Tuple[Path, Optional[Path]]:
    """A file, or an mlx-lm style directory with train.jsonl and valid/test.jsonl."""
    if data == "toy":
        from .toy import resolve_toy_data

        data = str(resolve_toy_data())
    path = Path(data).expanduser()
    if path.is_dir():
        train = path / "train.jsonl"
        if not train.is_file():
            raise DataError(f"{path}: no train.jsonl in data directory")
        evals = [path / n for n in ("valid.jsonl", "test.jsonl") if (path / n).is_file()]
        return train, (evals[0] if evals else None)
    if not path.is_file():
        raise DataError(f"data: {data} does not exist")
    return path, None


def load_records(cfg: DPOConfig) -> Tuple[List[dict], List[dict]]:
    train_path, eval_path = split_paths(cfg.data)
    train = read_jsonl(train_path)
    if cfg.eval_data:
        eval_path, _ = split_paths(cfg.eval_data)
    evals = read_jsonl(eval_path) if eval_path else []
    if cfg.eval_split > 0 and not evals:
        rng = random.Random(cfg.seed)
        order = list(range(len(train)))
        rng.shuffle(order)
        n_eval = max(1, int(round(cfg.eval_split * len(train))))
        held = set(order[:n_eval])
        evals = [r for i, r in enumerate(train) if i in held]
        train = [r for i, r in enumerate(train) if i not in held]
    return train, evals


def _encode_completion(tokenizer, prompt: str, prompt_ids: List[int], completion: str) -> List[int]:
    full = tokenizer.encode(prompt + completion)
    if full[: len(prompt_ids)] == prompt_ids and len(full) > len(prompt_ids):
        ids = full[len(prompt_ids):]
    else:
        ids = tokenizer.encode(completion, add_special_tokens=False)
    eos = tokenizer.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        ids = ids + [eos]
    return ids


def _truncate(ids: List[int], n: Optional[int], mode: str) -> List[int]:
    if n is None or len(ids) <= n:
        return ids
    return ids[-n:] if mode == "keep_end" else ids[:n]


def tokenize_pairs(records: List[dict], tokenizer, cfg: DPOConfig) -> Tuple[List[TokenizedPair], dict]:
    """Tokenize and truncate pairs with TRL's meaning of the length options.

    - the prompt is cut to ``max_prompt_length`` (``keep_end`` keeps its end, ``keep_start`` its start);
    - completions are cut to ``max_completion_length`` (keeping their start);
    - then completions are cut so ``prompt + completion <= max_length``; a pair left
      with no completion token (a prompt longer than ``max_length``) is dropped.
    """
    stats = {"pairs": len(records), "truncated": 0, "dropped_too_long": 0, "dropped_identical": 0}
    pairs = []
    for record in records:
        if record["chosen"] == record["rejected"]:
            stats["dropped_identical"] += 1
            continue
        prompt_ids = tokenizer.encode(record["prompt"])
        chosen = _encode_completion(tokenizer, record["prompt"], prompt_ids, record["chosen"])
        rejected = _encode_completion(tokenizer, record["prompt"], prompt_ids, record["rejected"])
        before = (len(prompt_ids), len(chosen), len(rejected))
        prompt_ids = _truncate(prompt_ids, cfg.max_prompt_length, cfg.truncation_mode)
        chosen = _truncate(chosen, cfg.max_completion_length, "keep_start")
        rejected = _truncate(rejected, cfg.max_completion_length, "keep_start")
        if cfg.max_length is not None:
            room = cfg.max_length - len(prompt_ids)
            if room < 1:
                stats["dropped_too_long"] += 1
                continue
            chosen, rejected = chosen[:room], rejected[:room]
        if (len(prompt_ids), len(chosen), len(rejected)) != before:
            stats["truncated"] += 1
        pairs.append(TokenizedPair(prompt_ids, chosen, rejected))
    stats["kept"] = len(pairs)
    return pairs, stats


def load_datasets(cfg: DPOConfig, tokenizer, log=print) -> Tuple[List[TokenizedPair], List[TokenizedPair]]:
    """Read, validate and tokenize the train and eval sets; print truncation counts."""
    train_records, eval_records = load_records(cfg)
    train, stats = tokenize_pairs(train_records, tokenizer, cfg)
    evals, eval_stats = tokenize_pairs(eval_records, tokenizer, cfg) if eval_records else ([], None)
    for name, s in (("train", stats), ("eval", eval_stats)):
        if s:
            log(f"{name}: {s['kept']} pairs ({s['truncated']} truncated, {s['dropped_too_long']} dropped as too long, "
                f"{s['dropped_identical']} skipped with chosen == rejected)")
    if not train:
        raise DataError(f"data: no usable training pairs in {cfg.data}")
    return train, evals
