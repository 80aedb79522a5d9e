"""Lint preference data before training: the problems that make DPO learn the wrong thing,
or nothing.

:func:`lint` reads the training records the way ``train`` does (:func:`load_records`),
renders and tokenizes each pair with the run's tokenizer and length options, and
counts (with a few examples, each named by its ``file:line``):

- ``empty``: a chosen or rejected completion that is empty or only whitespace;
- ``duplicates``: a pair (prompt, chosen, rejected) that appears again;
- ``identical``: chosen == rejected after truncation (or before it);
- ``length_bias``: the mean chosen/rejected token-length ratio and the fraction of pairs
  whose chosen completion is the longer one (ties count half: the AUC of length alone as
  a predictor of "chosen"); above 0.7 (or below 0.3) DPO will learn length;
- ``prompt_echo``: the prompt (at least 8 characters) repeated inside a completion;
- ``truncation``: pairs that lose completion tokens at ``max_length`` /
  ``max_completion_length``, the tokens lost, and pairs dropped with no room left;
- ``boundary``: pairs where the tokenizer merges characters across the
  prompt/completion join, or the chat template renders the prompt alone differently
  (see :mod:`mlx_dpo.data.tokenize`);
- ``split``: conversational pairs the chat template leaves no completion token in
  (``train`` refuses them): set ``chat_template``.

``fatal`` is set when no pair is usable for training (every pair empty, identical or
dropped): the CLI then exits 1.
"""

from __future__ import annotations

from typing import List, Optional

from ..config.fields import DPOConfig
from ..data import Row, column_map, get_format, load_records, tokenize_pairs
from ..data.formats import map_columns
from ..data.tokenize import encode, encode_pair
from ..model.loader import use_chat_template

MAX_EXAMPLES = 3
BIAS_THRESHOLD = 0.7
MIN_ECHO_CHARS = 8
CHECKS = ("empty", "duplicates", "identical", "length_bias", "prompt_echo", "truncation", "boundary", "split")


def _text(value) -> str:
    """A field as plain text: a string, or the contents of a message list joined."""
    if isinstance(value, list):
        return "\n".join(str(m.get("content", "")) for m in value if isinstance(m, dict))
    return value if isinstance(value, str) else ""


def _prompt_text(value) -> str:
    """The user's words of a prompt: the string, or the last user message."""
    if isinstance(value, list):
        users = [m for m in value if isinstance(m, dict) and m.get("role") == "user"]
        return _text(users[-1:])
    return _text(value)


def _short(text: str, n: int = 60) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 3] + "..."


def _new_check() -> dict:
    return {"count": 0, "examples": []}


def _note(check: dict, where: str, detail: str = "") -> None:
    check["count"] += 1
    if len(check["examples"]) < MAX_EXAMPLES:
        check["examples"].append(f"{where}{': ' + detail if detail else ''}")


def _encode_full(row: Row, example: dict, tokenizer, cfg: DPOConfig) -> dict:
    """Untruncated token ids of one pair, and whether either completion merges at the join."""
    prompt, chosen, rejected = get_format(row.format).render(example, tokenizer, cfg, row.where)
    special = not example["chat"]
    prompt_ids = encode(tokenizer, prompt, special)
    merged = [name for name, text in (("chosen", chosen), ("rejected", rejected))
              if encode(tokenizer, text, special)[: len(prompt_ids)] != prompt_ids]
    _, chosen_ids, rejected_ids, _ = encode_pair(tokenizer, prompt, chosen, rejected, example["chat"])
    unlike = "" if chosen.startswith(prompt) and rejected.startswith(prompt) else "the chat template renders the prompt alone differently"
    return {"chosen": chosen_ids, "rejected": rejected_ids, "merged": merged, "unlike": unlike}


def _check_row(row: Row, tokenizer, cfg: DPOConfig, checks: dict, seen: dict) -> Optional[tuple]:
    """Run the per-pair checks on one row; ``(chosen_len, rejected_len)`` when the pair is usable."""
    mapping = column_map(cfg)
    rec = map_columns(row, mapping)
    chosen, rejected = _text(rec.get("chosen")), _text(rec.get("rejected"))
    if not chosen.strip() or not rejected.strip():
        _note(checks["empty"], row.where, "chosen" if not chosen.strip() else "rejected")
        return None
    key = repr([rec.get(name) for name in ("prompt", "chosen", "rejected")])
    if key in seen:
        _note(checks["duplicates"], row.where, f"same as {seen[key]}")
    seen.setdefault(key, row.where)
    prompt = _prompt_text(rec.get("prompt", "")).strip()
    if len(prompt) >= MIN_ECHO_CHARS and (prompt in chosen or prompt in rejected):
        _note(checks["prompt_echo"], row.where, _short(prompt))
    example = get_format(row.format).normalize(row, mapping, cfg)
    if example == "identical":
        _note(checks["identical"], row.where, "chosen == rejected")
        return None
    if isinstance(example, str):  # no prompt to extract: counted by train too
        return None
    full = _encode_full(row, example, tokenizer, cfg)
    if not full["chosen"] or not full["rejected"]:
        _note(checks["split"], row.where, "the chat template leaves no completion token after the prompt "
              "(set chat_template)")
        return None
    if full["merged"]:
        _note(checks["boundary"], row.where, full["unlike"] + ": its end is left out (TRL 1.16's split)" if
              full["unlike"] else f"{' and '.join(full['merged'])} merge with the prompt's last token")
    pairs, stats = tokenize_pairs([row], tokenizer, cfg)
    if not pairs:
        if stats["dropped_too_long"]:
            checks["truncation"]["dropped"] += 1
        return None
    pair = pairs[0]
    lost = len(full["chosen"]) - len(pair.chosen) + len(full["rejected"]) - len(pair.rejected)
    if lost:
        _note(checks["truncation"], row.where, f"{lost} completion tokens cut")
        checks["truncation"]["tokens_lost"] += lost
    if pair.chosen == pair.rejected:
        _note(checks["identical"], row.where, "identical after truncation")
        return None
    return len(full["chosen"]), len(full["rejected"])


def length_bias(lengths: List[tuple]) -> dict:
    """Mean chosen/rejected length ratio and the fraction of pairs whose chosen is longer (ties: half)."""
    if not lengths:
        return {"mean_ratio": None, "chosen_longer": None, "biased": False}
    mean_c = sum(c for c, _ in lengths) / len(lengths)
    mean_r = sum(r for _, r in lengths) / len(lengths)
    auc = sum(1.0 if c > r else 0.5 if c == r else 0.0 for c, r in lengths) / len(lengths)
    return {"mean_ratio": round(mean_c / mean_r, 3) if mean_r else None, "chosen_longer": round(auc, 3),
            "biased": auc > BIAS_THRESHOLD or auc < 1 - BIAS_THRESHOLD}


def lint_rows(rows: List[Row], tokenizer, cfg: DPOConfig) -> dict:
    """The lint result of ``rows`` (see the module docstring)."""
    checks = {name: _new_check() for name in CHECKS if name != "length_bias"}
    checks["truncation"].update(tokens_lost=0, dropped=0)
    seen, lengths = {}, []
    for row in rows:
        usable = _check_row(row, tokenizer, cfg, checks, seen)
        if usable is not None:
            lengths.append(usable)
    result = {"pairs": len(rows), "usable": len(lengths), "max_length": cfg.max_length,
              "max_prompt_length": cfg.max_prompt_length, "max_completion_length": cfg.max_completion_length,
              "checks": {**checks, "length_bias": length_bias(lengths)}}
    result["problems"] = problems(result)
    result["fatal"] = not lengths
    return result


def problems(result: dict) -> List[str]:
    """One line per problem found."""
    c, n = result["checks"], result["pairs"]
    lines = []
    for name, what in (("empty", "have an empty or whitespace completion"), ("duplicates", "are duplicates"),
                       ("identical", "have chosen == rejected (after truncation)"),
                       ("prompt_echo", "repeat the prompt inside a completion"),
                       ("boundary", "change tokens at the prompt/completion join"),
                       ("split", "cannot be split into prompt and completion (training refuses them)")):
        if c[name]["count"]:
            lines.append(f"{c[name]['count']} of {n} pairs {what}")
    t = c["truncation"]
    if t["count"] or t["dropped"]:
        limits = f"max_length {result['max_length']}" + "".join(
            f", {k} {result[k]}" for k in ("max_prompt_length", "max_completion_length") if result.get(k))
        lines.append(f"{t['count']} pairs lose {t['tokens_lost']} completion tokens at {limits}; "
                     f"{t['dropped']} dropped (the prompt fills max_length)")
    bias = c["length_bias"]
    if bias["biased"]:
        side = "longer" if bias["chosen_longer"] > 0.5 else "shorter"
        share = bias["chosen_longer"] if side == "longer" else 1 - bias["chosen_longer"]
        lines.append(f"length bias: the chosen completion is the {side} one in {share:.0%} of pairs "
                     f"(mean length ratio {bias['mean_ratio']}): DPO will learn to write {side}")
    if not result["usable"]:
        lines.append("no usable pairs: training would be meaningless")
    return lines


def load_tokenizer(cfg: DPOConfig):
    """The model's tokenizer alone (no weights loaded), with ``cfg.chat_template`` where it is set."""
    from ..model.loader import load_tokenizer as load, resolve_model_path

    return use_chat_template(load(resolve_model_path(cfg.model, cfg.revision), cfg.trust_remote_code), cfg)


def lint(cfg: DPOConfig, tokenizer=None) -> dict:
    """Lint the training records of ``cfg.data`` with the tokenizer of ``cfg.model``."""
    rows, _ = load_records(cfg)
    tokenizer = load_tokenizer(cfg) if tokenizer is None else use_chat_template(tokenizer, cfg)
    return lint_rows(rows, tokenizer, cfg)


def format_text(result: dict) -> str:
    """The human-readable report."""
    c = result["checks"]
    lines = [f"{result['pairs']} pairs, {result['usable']} usable"]
    for name in CHECKS:
        if name == "length_bias":
            b = c[name]
            lines.append(f"  length_bias: mean chosen/rejected length ratio {b['mean_ratio']}, chosen longer in "
                         f"{b['chosen_longer']} of pairs" + (" (biased)" if b["biased"] else ""))
            continue
        extra = f", {c[name]['tokens_lost']} tokens lost, {c[name]['dropped']} dropped" if name == "truncation" else ""
        lines.append(f"  {name}: {c[name]['count']}{extra}")
        lines += [f"    {e}" for e in c[name]["examples"]]
    lines += [f"problem: {p}" for p in result["problems"]] or ["no problems found"]
    return "\n".join(lines)
