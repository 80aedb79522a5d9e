"""Preference data: finding, reading, validating, rendering and tokenizing pairs.

Sources (``data`` / ``eval_data``):

- a ``.jsonl``, ``.json`` (a list of records, or JSON Lines) or ``.parquet`` file,
  optionally gzipped (``.jsonl.gz``, ``.json.gz``);
- a directory holding ``train`` and ``valid``/``validation``/``test`` files in any
  of those formats (``train.jsonl``, ``data/train-00000-of-00001.parquet``, ...);
- a Hub dataset id ``org/name``: the snapshot is fetched with
  ``huggingface_hub.snapshot_download`` into the normal HF cache and its files are
  read as a directory (``dataset_subset`` picks the ``<subset>/`` folder);
- ``toy``: the synthetic set from :mod:`mlx_dpo.toy`.

``dataset_split`` / ``eval_dataset_split`` name the split and may slice it like
``datasets`` does: ``train[:10%]``, ``train[10:20]``, ``test[-100:]``. Without an
explicit eval set, a directory's ``valid``/``validation``/``test`` split is used,
then ``eval_split`` holds out a seeded random fraction of the training records.

Formats (``data_format: auto`` looks at the first record of each file):

- ``standard``: ``prompt``, ``chosen``, ``rejected`` strings;
- ``conversational``: ``prompt`` a list of ``{role, content}`` messages, ``chosen`` /
  ``rejected`` lists of assistant messages (TRL's conversational preference format),
  rendered with the tokenizer's chat template: the prompt with
  ``add_generation_prompt=True`` (``continue_final_message`` when it ends with an
  assistant message), a completion as ``render(prompt + completion)`` minus the
  rendered prompt. ``system_prompt`` is prepended as a system message when the
  prompt has none; ``tools`` is passed to ``apply_chat_template``;
- ``implicit``: only ``chosen`` / ``rejected`` (strings or message lists) that share
  a prefix, as Anthropic/hh-rlhf. The prompt is the longest common prefix, with
  TRL's ``extract_prompt`` rule: for strings, when the character before the first
  difference is a space, that space goes to the completions; for message lists, the
  common leading messages. Pairs with no common prompt (message lists) or where one
  side is a prefix of the other are skipped and counted. With ``data_format:
  implicit`` a ``prompt`` field, if present, is ignored.

``columns`` renames fields (``{prompt: question, chosen: response_j, rejected:
response_k}``) and ``prompt_template`` (``"Question: {prompt}\\n\\nAnswer: "``)
wraps string prompts.

Tokenization: the prompt is encoded alone (string prompts with the tokenizer's
special tokens such as BOS; chat-rendered text without, since the template carries
its own) and ``prompt + completion`` is encoded whole; the completion's tokens are
the tokens after the prompt's. Where the tokenizer merges characters across the
boundary (``"Answer: " + "blue"`` encodes as ``Answer: | blue`` rather than
``Answer: |  | blue``), the whole-text encoding no longer starts with the prompt's
tokens; the completion is then encoded *as a continuation*: ``encode("\\n" +
completion)`` minus the tokens of ``"\\n"``. That avoids the leading-space marker
SentencePiece adds to text encoded on its own, so ``decode(prompt + completion)``
is still the original text, and chosen and rejected always share exactly the same
prompt tokens. EOS is appended to a completion unless it already ends with an EOS
token (possibly followed by whitespace, as chat templates end a turn with
``<eos>\\n``).

Truncation follows TRL (see :func:`tokenize_pairs`); counts of truncated and
dropped pairs are logged. A pair whose prompt encodes to no tokens (an empty
prompt, or an implicit pair differing from its first character, with a tokenizer
that adds no BOS, as Qwen2/Qwen3) is dropped: see :func:`tokenize_pairs`. The
tokenized result is cached under
``<cache root>/tokenized/<hash>.npz`` (numpy arrays, no pickle), keyed by the data
files (path, size, mtime), the tokenizer files and every setting that changes the
result, so a second run skips reading and tokenizing.

Bad input raises :class:`DataError` naming the file, the line (``.jsonl``) or
record index (``.json``/``.parquet``, 0-based) and the field, before training starts.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import sys
import types
from pathlib import Path
from typing import Any, List, Optional, Tuple, Union

import numpy as np

from ..config import DPOConfig, config_keys
from . import sources
from .base import DataError, Row, TokenizedPair
from .readers import DATA_SUFFIXES, READERS, read_file
from .sources import parse_split, plan_sources, resolve_source, slice_rows, snapshot_download

CACHE_VERSION = 3  # 2: pairs with a 0-token prompt are dropped; 3: key from config roles
FIELDS = ("prompt", "chosen", "rejected")
TOKENIZER_FILES = (
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




class _Package(types.ModuleType):
    """Setting ``mlx_dpo.data.snapshot_download`` (as tests do) sets the one :mod:`.sources` calls."""

    def __setattr__(self, name, value):
        if name == "snapshot_download":
            setattr(sources, name, value)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


# ---------------------------------------------------------------------------
# Formats: column mapping, detection, validation
# ---------------------------------------------------------------------------


def _column_map(cfg: DPOConfig) -> dict:
    columns = dict(cfg.columns or {})
    unknown = set(columns) - set(FIELDS)
    if unknown:
        raise DataError(f"columns: unknown key(s) {', '.join(sorted(unknown))}; expected a mapping of {', '.join(FIELDS)}")
    return {name: str(columns.get(name, name)) for name in FIELDS}


def detect_format(row: Row, mapping: dict, cfg: DPOConfig) -> str:
    """``standard``, ``conversational`` or ``implicit`` from a record (after column mapping)."""
    record = _map_columns(row, mapping)
    if cfg.data_format != "auto":
        return cfg.data_format
    keys = set(record)
    if {"chosen", "rejected"} <= keys:
        if "prompt" not in keys:
            return "implicit"
        return "conversational" if isinstance(record["prompt"], list) else "standard"
    found = ", ".join(sorted(map(str, row.record))) or "none"
    hint = " (set `columns` to map other names)" if not cfg.columns else ""
    raise DataError(
        f"{row.where}: unknown format: found keys {found}; expected prompt/chosen/rejected "
        f"(standard strings or conversational message lists) or chosen/rejected (implicit prompt){hint}"
    )


def _map_columns(row: Row, mapping: dict) -> dict:
    out = {}
    for name, column in mapping.items():
        if column in row.record:
            out[name] = row.record[column]
        elif column != name:
            found = ", ".join(sorted(map(str, row.record)))
            raise DataError(f"{row.where}: columns maps '{name}' to '{column}', which does not exist (columns: {found})")
    return out


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _check_string(value: Any, name: str, where: str, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{name}' must be a string, got {_type_name(value)}")
    if not allow_empty and not value.strip():
        raise DataError(f"{where}: field '{name}' is empty")
    return value


def _check_messages(value: Any, name: str, where: str) -> list:
    if not isinstance(value, list):
        raise DataError(f"{where}: field '{name}' must be a list of messages, got {_type_name(value)}")
    if not value:
        raise DataError(f"{where}: field '{name}' is empty")
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise DataError(f"{where}: field '{name}' message {i} must be an object, got {_type_name(message)}")
        for key in ("role", "content"):
            if key not in message:
                raise DataError(f"{where}: field '{name}' message {i} has no '{key}'")
        if not isinstance(message["role"], str):
            raise DataError(f"{where}: field '{name}' message {i}: 'role' must be a string, got {_type_name(message['role'])}")
        if not isinstance(message["content"], str):
            raise DataError(
                f"{where}: field '{name}' message {i}: 'content' must be a string, got {_type_name(message['content'])}"
            )
    return value


def _check_value(value: Any, name: str, where: str, as_messages: bool) -> Any:
    if as_messages:
        return _check_messages(value, name, where)
    return _check_string(value, name, where, allow_empty=(name == "prompt"))


def extract_prompt(chosen, rejected) -> Tuple[Any, Any, Any]:
    """TRL's implicit prompt: the longest common prefix of chosen and rejected.

    For strings a space just before the first difference stays with the completions.
    Returns ``(prompt, chosen, rejected)``.
    """
    n = min(len(chosen), len(rejected))
    idx = n
    for i in range(n):
        if chosen[i] != rejected[i]:
            idx = i
            if isinstance(chosen, str) and i > 0 and chosen[i - 1] == " ":
                idx -= 1
            break
    return chosen[:idx], chosen[idx:], rejected[idx:]


def normalize_row(row: Row, mapping: dict, cfg: DPOConfig) -> Union[dict, str]:
    """Validate one record: ``{prompt, chosen, rejected, chat}``, or why it is skipped
    (``"identical"``, ``"no_prompt"``)."""
    rec = _map_columns(row, mapping)
    fmt = row.format
    need = ("chosen", "rejected") if fmt == "implicit" else FIELDS
    for name in need:
        if name not in rec:
            found = ", ".join(sorted(map(str, row.record)))
            mapped = f" (mapped from column '{mapping[name]}')" if mapping[name] != name else ""
            raise DataError(f"{row.where}: missing field '{mapping[name]}'{mapped} (have: {found})")
    if fmt == "implicit":
        as_messages = isinstance(rec["chosen"], list)
        chosen = _check_value(rec["chosen"], mapping["chosen"], row.where, as_messages)
        rejected = _check_value(rec["rejected"], mapping["rejected"], row.where, as_messages)
        if chosen == rejected:
            return "identical"
        prompt, chosen, rejected = extract_prompt(chosen, rejected)
        if not chosen or not rejected or (as_messages and not prompt):
            return "no_prompt"
    else:
        as_messages = fmt == "conversational"
        prompt = _check_value(rec["prompt"], mapping["prompt"], row.where, as_messages)
        chosen = _check_value(rec["chosen"], mapping["chosen"], row.where, as_messages)
        rejected = _check_value(rec["rejected"], mapping["rejected"], row.where, as_messages)
        if chosen == rejected:
            return "identical"
    if as_messages:
        if cfg.system_prompt and prompt[0]["role"] != "system":
            prompt = [{"role": "system", "content": cfg.system_prompt}] + list(prompt)
    elif cfg.prompt_template:
        if "{prompt}" not in cfg.prompt_template:
            raise DataError(f"prompt_template must contain {{prompt}}, got {cfg.prompt_template!r}")
        prompt = cfg.prompt_template.replace("{prompt}", prompt)
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "chat": as_messages}


def read_rows(files: List[Path], cfg: DPOConfig) -> List[Row]:
    """Read files and tag each record with its format (detected on each file's first record)."""
    mapping = _column_map(cfg)
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
        held = set(order[:n_eval])
        evals = [r for i, r in enumerate(train) if i in held]
        train = [r for i, r in enumerate(train) if i not in held]
    return train, evals


# ---------------------------------------------------------------------------
# Rendering and tokenization
# ---------------------------------------------------------------------------


def _encode(tokenizer, text: str, special: bool) -> List[int]:
    return list(tokenizer.encode(text, add_special_tokens=special))


def _encode_continuation(tokenizer, text: str) -> List[int]:
    """Tokens of ``text`` as it would continue other text (no SentencePiece leading-space marker)."""
    anchor = _encode(tokenizer, "\n", False)
    ids = _encode(tokenizer, "\n" + text, False)
    if ids[: len(anchor)] == anchor and len(ids) > len(anchor):
        return ids[len(anchor):]
    return _encode(tokenizer, text, False)


def _eos_ids(tokenizer) -> set:
    ids = set(getattr(tokenizer, "eos_token_ids", None) or [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def _ends_with_eos(tokenizer, ids: List[int], eos: set) -> bool:
    """True if ``ids`` ends with EOS, possibly followed by whitespace tokens."""
    j = len(ids)
    while j > 0 and ids[j - 1] not in eos and not tokenizer.decode([ids[j - 1]]).strip():
        j -= 1
    return j > 0 and ids[j - 1] in eos


def _encode_completion(tokenizer, prompt: str, prompt_ids: List[int], completion: str, special: bool) -> List[int]:
    full = _encode(tokenizer, prompt + completion, special)
    if full[: len(prompt_ids)] == prompt_ids and len(full) > len(prompt_ids):
        ids = full[len(prompt_ids):]
    else:  # merged across the boundary: see the module docstring
        ids = _encode_continuation(tokenizer, completion)
    eos = _eos_ids(tokenizer)
    if tokenizer.eos_token_id is not None and not _ends_with_eos(tokenizer, ids, eos):
        ids = ids + [tokenizer.eos_token_id]
    return ids


def render_chat(example: dict, tokenizer, cfg: DPOConfig, where: str) -> Tuple[str, str, str]:
    """Conversational example -> (prompt text, chosen text, rejected text) via the chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{where}: conversational data needs a tokenizer with a chat_template; this one has none")
    prompt = example["prompt"]
    cont = prompt[-1]["role"] == "assistant"
    kwargs = {"tools": cfg.tools} if cfg.tools else {}
    try:
        prompt_text = tokenizer.apply_chat_template(
            prompt, tokenize=False, add_generation_prompt=not cont, continue_final_message=cont, **kwargs
        )
        texts = []
        for name in ("chosen", "rejected"):
            full = tokenizer.apply_chat_template(prompt + example[name], tokenize=False, **kwargs)
            if not full.startswith(prompt_text):
                raise DataError(
                    f"{where}: the chat template applied to prompt + {name} does not start with the template "
                    f"applied to the prompt alone; this template cannot be split into prompt and completion"
                )
            texts.append(full[len(prompt_text):])
    except DataError:
        raise
    except Exception as e:  # jinja errors, e.g. a template that rejects a role order
        raise DataError(f"{where}: chat template failed: {e}") from None
    return prompt_text, texts[0], texts[1]


def _truncate(ids: List[int], n: Optional[int], mode: str) -> List[int]:
    if n is None or len(ids) <= n:
        return ids
    return ids[-n:] if mode == "keep_end" else ids[:n]


def _new_stats(n: int) -> dict:
    return {"pairs": n, "kept": 0, "truncated": 0, "dropped_too_long": 0, "dropped_identical": 0, "dropped_no_prompt": 0}


def check_format_options(examples: list, cfg: DPOConfig) -> None:
    """Options that only one kind of data can use are errors, not silently ignored."""
    chat = sum(1 for _, ex in examples if ex["chat"])
    if chat == 0 and (cfg.system_prompt or cfg.tools):
        name = "system_prompt" if cfg.system_prompt else "tools"
        raise DataError(f"{name} applies to conversational data (message lists rendered with the chat template), "
                        f"but {cfg.data} holds plain strings; remove {name} or use prompt_template")
    if examples and chat == len(examples) and cfg.prompt_template:
        raise DataError(f"prompt_template applies to plain-string data, but {cfg.data} is conversational "
                        "(rendered with the chat template); remove prompt_template or use system_prompt")


def tokenize_pairs(records: list, tokenizer, cfg: DPOConfig) -> Tuple[List[TokenizedPair], dict]:
    """Validate, render, tokenize and truncate pairs with TRL's meaning of the length options.

    ``records`` are :class:`Row` s or plain dicts in any supported format.

    - the prompt is cut to ``max_prompt_length`` (``keep_end`` keeps its end, ``keep_start`` its start);
    - completions are cut to ``max_completion_length`` (keeping their start);
    - then completions are cut so ``prompt + completion <= max_length``; a pair left
      with no completion token (a prompt longer than ``max_length``) is dropped.

    A pair whose prompt has 0 tokens after encoding and truncation (``""``, or an
    implicit pair that differs from the first character, with a tokenizer that adds
    no BOS) is dropped and counted as ``dropped_no_prompt``: the first completion token
    is scored from the hidden state of the last prompt token, so it needs at least
    one prompt token (e.g. BOS). TRL has the same requirement.
    """
    rows = [r if isinstance(r, Row) else Row(f"record index {i}", r) for i, r in enumerate(records)]
    mapping = _column_map(cfg)
    examples = []
    stats = _new_stats(len(rows))
    for row in rows:  # validate everything before the (slower) tokenization
        if row.format == "auto":
            row.format = detect_format(row, mapping, cfg)
        example = normalize_row(row, mapping, cfg)
        if isinstance(example, str):
            stats["dropped_" + example] += 1
        else:
            examples.append((row.where, example))
    check_format_options(examples, cfg)
    pairs = []
    for where, ex in examples:
        if ex["chat"]:
            prompt, chosen, rejected = render_chat(ex, tokenizer, cfg, where)
        else:
            prompt, chosen, rejected = ex["prompt"], ex["chosen"], ex["rejected"]
        special = not ex["chat"]
        prompt_ids = _encode(tokenizer, prompt, special)
        chosen_ids = _encode_completion(tokenizer, prompt, prompt_ids, chosen, special)
        rejected_ids = _encode_completion(tokenizer, prompt, prompt_ids, rejected, special)
        before = (len(prompt_ids), len(chosen_ids), len(rejected_ids))
        prompt_ids = _truncate(prompt_ids, cfg.max_prompt_length, cfg.truncation_mode)
        if not prompt_ids:  # nothing to score the first completion token from
            stats["dropped_no_prompt"] += 1
            continue
        chosen_ids = _truncate(chosen_ids, cfg.max_completion_length, "keep_start")
        rejected_ids = _truncate(rejected_ids, cfg.max_completion_length, "keep_start")
        if cfg.max_length is not None:
            room = cfg.max_length - len(prompt_ids)
            if room < 1:
                stats["dropped_too_long"] += 1
                continue
            chosen_ids, rejected_ids = chosen_ids[:room], rejected_ids[:room]
        if (len(prompt_ids), len(chosen_ids), len(rejected_ids)) != before:
            stats["truncated"] += 1
        pairs.append(TokenizedPair(prompt_ids, chosen_ids, rejected_ids))
    stats["kept"] = len(pairs)
    return pairs, stats


# ---------------------------------------------------------------------------
# Cache of tokenized datasets
# ---------------------------------------------------------------------------


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of the tokenizer's files (or, without a local directory, its vocabulary)."""
    h = hashlib.sha256()
    inner = getattr(tokenizer, "_tokenizer", tokenizer)
    path = getattr(inner, "name_or_path", None)
    if path and Path(path).is_dir():
        for name in TOKENIZER_FILES:
            if (Path(path) / name).is_file():
                h.update(name.encode() + b"\0" + (Path(path) / name).read_bytes())
    else:
        h.update(json.dumps(sorted(inner.get_vocab().items())).encode())
    extra = [getattr(tokenizer, "chat_template", None), sorted(_eos_ids(tokenizer)), getattr(tokenizer, "bos_token_id", None)]
    h.update(json.dumps(extra, default=str).encode())
    return h.hexdigest()


def _file_id(path: Path) -> list:
    st = path.stat()
    return [str(path.resolve()), st.st_size, st.st_mtime_ns]


def cache_key(plan: dict, cfg: DPOConfig, tokenizer) -> str:
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
    from ..toy import cache_subdir

    return cache_subdir(cfg.cache_dir, "tokenized") / f"{key}.npz"


def _pack(pairs: List[TokenizedPair]) -> Tuple[np.ndarray, np.ndarray]:
    lengths = np.array([[len(p.prompt), len(p.chosen), len(p.rejected)] for p in pairs], dtype=np.int64).reshape(-1, 3)
    ids = [t for p in pairs for t in (*p.prompt, *p.chosen, *p.rejected)]
    return np.array(ids, dtype=np.int32), lengths


def _unpack(ids: np.ndarray, lengths: np.ndarray) -> List[TokenizedPair]:
    flat = ids.tolist()
    pairs, pos = [], 0
    for a, b, c in lengths.tolist():
        pairs.append(TokenizedPair(flat[pos:pos + a], flat[pos + a:pos + a + b], flat[pos + a + b:pos + a + b + c]))
        pos += a + b + c
    return pairs


def save_cache(path: Path, train, evals, stats: dict) -> None:
    from ..io import atomic_write_bytes

    train_ids, train_len = _pack(train)
    eval_ids, eval_len = _pack(evals)
    buf = io.BytesIO()
    np.savez(
        buf, train_ids=train_ids, train_lengths=train_len, eval_ids=eval_ids, eval_lengths=eval_len,
        stats=np.array(json.dumps(stats)),
    )
    atomic_write_bytes(path, buf.getvalue())


def load_cache(path: Path):
    """``(train, eval, stats)`` from a cache file, or ``None`` if missing or unreadable."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            train = _unpack(f["train_ids"], f["train_lengths"])
            evals = _unpack(f["eval_ids"], f["eval_lengths"])
            stats = json.loads(str(f["stats"]))
    except Exception:
        return None
    return train, evals, stats


# ---------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------


def _summary(name: str, s: dict) -> str:
    text = f"{name}: {s['kept']} pairs ({s['truncated']} truncated, {s['dropped_too_long']} dropped as too long, "
    text += f"{s['dropped_identical']} skipped with chosen == rejected"
    if s.get("dropped_no_prompt"):
        text += f", {s['dropped_no_prompt']} skipped with no prompt (no implicit prompt to extract, or 0 prompt tokens)"
    return text + ")"


def load_datasets(cfg: DPOConfig, tokenizer, log=print) -> Tuple[List[TokenizedPair], List[TokenizedPair]]:
    """Read, validate and tokenize the train and eval sets (cached); log truncation counts."""
    plan = plan_sources(cfg)
    if plan["eval"] and cfg.eval_split > 0:
        log(f"warning: eval_split {cfg.eval_split} is not used: the eval set comes from "
            f"{', '.join(str(p) for p in plan['eval'][0])}")
    path = cache_path(cfg, cache_key(plan, cfg, tokenizer))
    cached = load_cache(path)
    if cached is not None:
        train, evals, stats = cached
        source = f" (cached: {path})"
    else:
        train_rows, eval_rows = load_records(cfg, plan)
        train, train_stats = tokenize_pairs(train_rows, tokenizer, cfg)
        evals, eval_stats = tokenize_pairs(eval_rows, tokenizer, cfg) if eval_rows else ([], None)
        stats = {"train": train_stats, "eval": eval_stats}
        source = ""
        if train:
            try:
                save_cache(path, train, evals, stats)
            except OSError as e:  # a read-only cache only costs re-tokenizing next time
                log(f"warning: could not cache the tokenized data at {path}: {e}")
    for name in ("train", "eval"):
        if stats.get(name):
            log(_summary(name, stats[name]) + source)
    if not train:
        raise DataError(f"data: no usable training pairs in {cfg.data}")
    return train, evals
