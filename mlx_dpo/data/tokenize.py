"""Tokenizing pairs: prompt / completion boundaries, EOS and truncation, as TRL 1.16.

The prompt and each ``prompt + completion`` are encoded whole: string data with the
tokenizer's special tokens (``tokenizer(text)``: BOS where the tokenizer adds one),
chat-rendered text without (the template carries its own). A completion's tokens are
those after the prompt's; where the tokenizer merges characters across the join
(``"Answer: " + "blue"`` encodes as ``Answer: | blue``, not ``Answer: |  | blue``) the
prompt is cut to the tokens it shares with both ``prompt + chosen`` and ``prompt +
rejected`` (TRL's ``common_prefix_length``), so the merged token belongs to the
completions and chosen and rejected share the same prompt tokens. A chat template that
renders the prompt alone differently (a generation prompt the conversation lacks, as a
thinking model's think block) is split the same way (TRL 1.16's ``_prepare_dataset``):
the prompt's tokens after the shared ones are left out; a completion left with no token
is an error naming the row. EOS is appended to a
string completion unless it already ends with an EOS token (possibly followed by
whitespace); a chat completion ends as the template ends the turn (no EOS added), as TRL.

Truncation follows TRL 1.16 (see :func:`tokenize_pairs`); counts of truncated and
dropped pairs are returned as stats.
"""

from __future__ import annotations

import json

from typing import List, Optional, Tuple

from ..config.fields import DPOConfig
from ..errors import DataError
from .base import Row, TokenizedPair
from .formats import Conversational, check_format_options, column_map, detect_format, get_format


def encode(tokenizer, text: str, special: bool) -> List[int]:
    return list(tokenizer.encode(text, add_special_tokens=special))


def encode_prompt(prompt, tokenizer, where: str, cfg: Optional[DPOConfig] = None) -> Tuple[List[int], bool]:
    """``(token ids, chat)``: a prompt for generation as training encodes it: a string as is
    (with special tokens) when the tokenizer has no chat template, else (and for a message
    list) rendered by the chat template with the generation prompt and ``cfg``'s ``tools`` and
    ``chat_template_kwargs`` (a run's, so generation renders as training did). Raises ``DataError``."""
    if isinstance(prompt, str) and not getattr(tokenizer, "chat_template", None):
        return encode(tokenizer, prompt, True), False
    messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    return encode(tokenizer, Conversational.render_prompt(messages, tokenizer, cfg or DPOConfig(), where), False), True


def eos_ids(tokenizer) -> set:
    """Every EOS token id of the tokenizer."""
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


def common_prefix_length(a: List[int], b: List[int]) -> int:
    """Number of leading tokens ``a`` and ``b`` share."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def encode_pair(tokenizer, prompt: str, prompt_chosen: str, prompt_rejected: str, chat: bool):
    """``(prompt_ids, chosen_ids, rejected_ids, left_out)`` of rendered text: the prompt and each
    prompt + completion (see the module docstring); ``left_out``: the prompt's end tokens that are
    not in the conversations (a chat template rendering the prompt alone differently)."""
    prompt_ids = encode(tokenizer, prompt, not chat)
    full = [encode(tokenizer, text, not chat) for text in (prompt_chosen, prompt_rejected)]
    if not chat and tokenizer.eos_token_id is not None:
        full = [ids if _ends_with_eos(tokenizer, ids, eos_ids(tokenizer)) else ids + [tokenizer.eos_token_id]
                for ids in full]
    n = min(common_prefix_length(prompt_ids, ids) for ids in full)
    return prompt_ids[:n], full[0][n:], full[1][n:], len(prompt_ids) - n


def _keep(ids: List[int], n: Optional[int], end: bool) -> List[int]:
    """``ids`` cut to ``n`` tokens, keeping their end or their start."""
    if n is None or len(ids) <= n:
        return ids
    return ids[len(ids) - n:] if end else ids[:n]


def _new_stats(n: int) -> dict:
    return {"pairs": n, "kept": 0, "truncated": 0, "dropped_too_long": 0, "dropped_identical": 0, "dropped_no_prompt": 0}


def _validate(rows: List[Row], cfg: DPOConfig, stats: dict) -> List[Tuple[Row, dict]]:
    """Detect (where still ``auto``) and normalize every row; skipped pairs are counted in ``stats``."""
    mapping = column_map(cfg)
    examples, seen = [], set()
    for row in rows:
        if row.format == "auto":
            row.format = detect_format(row, mapping, cfg)
        example = get_format(row.format).normalize(row, mapping, cfg)
        if isinstance(example, str):
            stats["dropped_" + example] += 1
            continue
        examples.append((row, example))
        key = json.dumps(example, sort_keys=True, default=str)
        if key in seen:  # kept (as TRL does), counted for one warning
            stats["duplicates"] = stats.get("duplicates", 0) + 1
        seen.add(key)
    check_format_options([ex for _, ex in examples], cfg)
    return examples


def _encode_example(row: Row, example: dict, tokenizer, cfg: DPOConfig,
                    stats: dict) -> Tuple[List[int], List[int], List[int]]:
    """The pair's token ids; a completion with no token after the shared prompt is refused. A chat
    prompt whose end is not in the conversation (its rendered tokens are no prefix of it) is counted
    as ``prompt_end_dropped`` (TRL 1.16 warns once)."""
    *ids, left_out = encode_pair(tokenizer, *get_format(row.format).render(example, tokenizer, cfg, row.where),
                                 example["chat"])
    if example["chat"] and left_out:
        stats["prompt_end_dropped"] = stats.get("prompt_end_dropped", 0) + 1
    for name, completion in zip(("chosen", "rejected"), ids[1:]):
        if not completion:
            raise DataError(f"{row.where}: cannot split into prompt and completion: the chat template renders the "
                            f"conversation with the {name} reply with no token after the prompt; set chat_template "
                            "to a template that renders the assistant turn")
    return ids


def _truncate_pair(prompt_ids, chosen_ids, rejected_ids, cfg: DPOConfig, stats: dict) -> Optional[TokenizedPair]:
    """The truncated pair, or ``None`` (counted in ``stats``) when it is dropped."""
    before = (len(prompt_ids), len(chosen_ids), len(rejected_ids))
    prompt_ids = _keep(prompt_ids, cfg.max_prompt_length, end=True)
    if not prompt_ids:  # nothing to score the first completion token from
        stats["dropped_no_prompt"] += 1
        return None
    chosen_ids = _keep(chosen_ids, cfg.max_completion_length, end=False)
    rejected_ids = _keep(rejected_ids, cfg.max_completion_length, end=False)
    if cfg.max_length is not None and cfg.truncation_mode == "keep_start":
        if len(prompt_ids) >= cfg.max_length:  # no completion token would be left
            stats["dropped_too_long"] += 1
            return None
    elif cfg.max_length is not None:  # keep_end: the prompt's start goes first, one prompt token stays
        prompt_ids = _keep(prompt_ids, max(1, cfg.max_length - max(len(chosen_ids), len(rejected_ids))), end=True)
    if cfg.max_length is not None:
        room, end = cfg.max_length - len(prompt_ids), cfg.truncation_mode == "keep_end"
        chosen_ids, rejected_ids = _keep(chosen_ids, room, end), _keep(rejected_ids, room, end)
    if (len(prompt_ids), len(chosen_ids), len(rejected_ids)) != before:
        stats["truncated"] += 1
    return TokenizedPair(prompt_ids, chosen_ids, rejected_ids)


def tokenize_pairs(records: list, tokenizer, cfg: DPOConfig) -> Tuple[List[TokenizedPair], dict]:
    """Validate, render, tokenize and truncate pairs with TRL's meaning of the length options.

    ``records`` are :class:`Row` s or plain dicts in any supported format.

    - (our extras, off by default) the prompt is cut to ``max_prompt_length`` keeping its
      end, completions to ``max_completion_length`` keeping their start;
    - then ``truncation_mode`` cuts each joined ``prompt + completion`` to ``max_length``
      (TRL 1.16's collator): ``keep_start`` (default) keeps its start, so completions lose
      their end and a pair whose prompt alone fills ``max_length`` is dropped;
      ``keep_end`` keeps its end: the prompt loses its start so the longer completion
      fits (both completions share the prompt, so the shorter one loses the same prompt
      tokens), keeping at least one prompt token (then completions keep their end).

    A pair whose prompt has 0 tokens after encoding and truncation (``""``, or an
    implicit pair that differs from the first character, with a tokenizer that adds
    no BOS, as Qwen2/Qwen3) is dropped and counted as ``dropped_no_prompt``: the first
    completion token is scored from the hidden state of the last prompt token, so it
    needs at least one prompt token (e.g. BOS). TRL has the same requirement.
    """
    rows = [r if isinstance(r, Row) else Row(f"record index {i}", r) for i, r in enumerate(records)]
    stats = _new_stats(len(rows))
    examples = _validate(rows, cfg, stats)  # everything before the (slower) tokenization
    pairs = []
    for row, example in examples:
        pair = _truncate_pair(*_encode_example(row, example, tokenizer, cfg, stats), cfg, stats)
        if pair is not None:
            pair.label = example.get("label")  # unpaired rows
            pairs.append(pair)
    stats["kept"] = len(pairs)
    return pairs, stats
