"""Preference formats: one class per format, detection, validation and rendering to text.

:data:`FORMATS` lists them in detection order (``data_format: auto`` looks at the
first record of each file, after ``columns``):

- ``standard``: ``prompt``, ``chosen``, ``rejected`` strings;
- ``conversational``: ``prompt`` a list of ``{role, content}`` messages, ``chosen`` /
  ``rejected`` lists of assistant messages (TRL's conversational preference format),
  rendered with the tokenizer's chat template: the prompt with
  ``add_generation_prompt=True`` (``continue_final_message`` when it ends with an
  assistant message), and ``render(prompt + completion)``; a completion is the tokens
  after those the two share (TRL 1.16's ``common_prefix_length``), so a template that
  renders the prompt differently alone (a thinking model's empty think block) still
  splits. Assistant messages keep their other fields (``reasoning_content``,
  ``tool_calls``) for the template to read. ``system_prompt`` is prepended as a system message when the
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

- ``unpaired``: ``prompt``, ``completion``, boolean ``label`` (TRL's KTO format), strings or messages.

A format is a :class:`Format` subclass (``name``, ``detect``, ``normalize``, ``render``: the
prompt and each prompt + completion as text) and its entry in :data:`FORMATS`.
"""

from __future__ import annotations

from typing import Any, List, Optional, Tuple, Union

from ..config.fields import DPOConfig
from ..errors import ConfigError, DataError
from .base import Row, render_chat

PAIRED = ("prompt", "chosen", "rejected")
FIELDS = PAIRED + ("completion", "label")  # paired, then unpaired (TRL's KTO format)
ROW_OPTIONS = {"tools": list, "chat_template_kwargs": dict}  # optional per-row columns (TRL's names)


# ---------------------------------------------------------------------------
# Column mapping and field validation
# ---------------------------------------------------------------------------


def column_map(cfg: DPOConfig) -> dict:
    """``{field: column}`` for every field of :data:`FIELDS`, from ``columns``."""
    columns = dict(cfg.columns or {})
    unknown = set(columns) - set(FIELDS)
    if unknown:
        raise DataError(f"columns: unknown key(s) {', '.join(sorted(unknown))}; expected a mapping of {', '.join(FIELDS)}")
    return {name: str(columns.get(name, name)) for name in FIELDS}


def map_columns(row: Row, mapping: dict) -> dict:
    """The fields of :data:`FIELDS` that ``row`` has, under their own names."""
    out = {}
    for name, column in mapping.items():
        if column in row.record:
            out[name] = row.record[column]
        elif column != name:
            found = ", ".join(sorted(map(str, row.record)))
            raise DataError(f"{row.where}: columns maps '{name}' to '{column}', which does not exist (columns: {found})")
    return out


def require_fields(row: Row, mapping: dict, names: tuple) -> dict:
    """:func:`map_columns`, with an error naming the first of ``names`` that is missing."""
    rec = map_columns(row, mapping)
    for name in names:
        if name not in rec:
            found = ", ".join(sorted(map(str, row.record)))
            mapped = f" (mapped from column '{mapping[name]}')" if mapping[name] != name else ""
            raise DataError(f"{row.where}: missing field '{mapping[name]}'{mapped} (have: {found})")
    return rec


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__

ROLES = ("system", "user", "assistant", "tool")


def _check_text(value: str, what: str, where: str) -> None:
    """A lone UTF-16 surrogate (``"\\ud83d"``, half of a cut emoji) cannot be encoded: name it."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(f"{where}: {what} has a lone UTF-16 surrogate {value[e.start]!r} at character {e.start} "
                        "(half of an emoji cut in two?); remove it or restore the whole character") from None


def _check_string(value: Any, name: str, where: str, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{name}' must be a string, got {_type_name(value)}")
    if not allow_empty and not value.strip():
        raise DataError(f"{where}: field '{name}' is empty")
    _check_text(value, f"field '{name}'", where)
    return value


def _check_messages(value: Any, name: str, where: str) -> list:
    if not isinstance(value, list):
        raise DataError(f"{where}: field '{name}' must be a list of messages, got {_type_name(value)}")
    if not value:
        raise DataError(f"{where}: field '{name}' is empty")
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise DataError(f"{where}: field '{name}' message {i} must be an object, got {_type_name(message)}")
        if "role" not in message or "content" not in message:
            raise DataError(f"{where}: field '{name}' message {i} has no '{'content' if 'role' in message else 'role'}'")
        if not isinstance(message["role"], str):
            raise DataError(f"{where}: field '{name}' message {i}: 'role' must be a string, got {_type_name(message['role'])}")
        if not isinstance(message["content"], str):
            raise DataError(
                f"{where}: field '{name}' message {i}: 'content' must be a string, got {_type_name(message['content'])}"
            )
        if message["role"] not in ROLES:
            raise DataError(f"{where}: field '{name}' message {i} has role {message['role']!r}; "
                            f"valid roles: {', '.join(ROLES)}")
        _check_text(message["content"], f"field '{name}' message {i} 'content'", where)
    return value


def check_value(value: Any, name: str, where: str, as_messages: bool) -> Any:
    """A message list, or a string (non-empty unless it is the prompt); ``name`` is the column."""
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


# ---------------------------------------------------------------------------
# Formats
# ---------------------------------------------------------------------------


class Format:
    """A preference format. ``normalize`` returns an example ``{prompt, chosen, rejected,
    chat}`` (``chat``: the texts come from a chat template, so they are encoded without
    the tokenizer's special tokens), or why the pair is skipped (``"identical"``,
    ``"no_prompt"``); ``render`` turns an example into ``(prompt, prompt + chosen, prompt +
    rejected)`` text."""

    name = ""
    chat = False  # fields are message lists rendered with the chat template

    @classmethod
    def detect(cls, record: dict) -> bool:
        """Whether ``record`` (``columns`` applied, other fields kept) is in this format."""
        raise NotImplementedError

    @classmethod
    def normalize(cls, row: Row, mapping: dict, cfg: DPOConfig) -> Union[dict, str]:
        rec = require_fields(row, mapping, PAIRED)
        prompt, chosen, rejected = [check_value(rec[name], mapping[name], row.where, cls.chat) for name in PAIRED]
        if chosen == rejected:
            return "identical"
        return cls.row_options(cls.example(prompt, chosen, rejected, cfg), row)

    @classmethod
    def example(cls, prompt, chosen, rejected, cfg: DPOConfig) -> dict:
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "chat": cls.chat}

    @staticmethod
    def row_options(example: Union[dict, str], row: Row) -> Union[dict, str]:
        """``example`` with the row's own chat template options (TRL's ``tools`` and
        ``chat_template_kwargs`` columns), checked; they apply to conversational rows only."""
        found = {k: row.record[k] for k in ROW_OPTIONS if row.record.get(k) is not None}
        if not found or not isinstance(example, dict):
            return example
        if not example["chat"]:
            raise DataError(f"{row.where}: field '{next(iter(found))}' applies to conversational rows (message lists) "
                            "only; this row's prompt and completions are strings")
        for key, kind in ROW_OPTIONS.items():
            if key in found and not isinstance(found[key], kind):
                raise DataError(f"{row.where}: field '{key}' must be a {kind.__name__}, got {_type_name(found[key])}")
        return {**example, **found}

    @classmethod
    def render(cls, example: dict, tokenizer, cfg: DPOConfig, where: str) -> Tuple[str, str, str]:
        """``(prompt, prompt + chosen, prompt + rejected)`` as text."""
        return example["prompt"], example["prompt"] + example["chosen"], example["prompt"] + example["rejected"]


class Standard(Format):
    """``prompt``, ``chosen``, ``rejected`` strings; ``prompt_template`` wraps the prompt."""

    name = "standard"

    @classmethod
    def detect(cls, record: dict) -> bool:
        return set(PAIRED) <= set(record) and not isinstance(record["prompt"], list)

    @classmethod
    def example(cls, prompt, chosen, rejected, cfg: DPOConfig) -> dict:
        if cfg.prompt_template:
            if "{prompt}" not in cfg.prompt_template:
                raise DataError(f"prompt_template must contain {{prompt}}, got {cfg.prompt_template!r}")
            prompt = cfg.prompt_template.replace("{prompt}", prompt)
        return super().example(prompt, chosen, rejected, cfg)


class Conversational(Format):
    """Message lists (TRL's conversational format), rendered with the tokenizer's chat template."""

    name = "conversational"
    chat = True

    @classmethod
    def detect(cls, record: dict) -> bool:
        return set(PAIRED) <= set(record) and isinstance(record["prompt"], list)

    @classmethod
    def example(cls, prompt, chosen, rejected, cfg: DPOConfig) -> dict:
        if cfg.system_prompt and prompt[0]["role"] != "system":
            prompt = [{"role": "system", "content": cfg.system_prompt}] + list(prompt)
        return super().example(prompt, chosen, rejected, cfg)

    @staticmethod
    def template_kwargs(cfg: DPOConfig, example: Optional[dict] = None) -> dict:
        """What ``apply_chat_template`` gets besides the messages: ``tools`` and ``chat_template_kwargs``,
        the run's (``cfg``) with the row's (``example``) over them."""
        row = example or {}
        tools = row.get("tools", cfg.tools)
        return {**({"tools": tools} if tools else {}), **(cfg.chat_template_kwargs or {}),
                **row.get("chat_template_kwargs", {})}

    @classmethod
    def render_prompt(cls, prompt: list, tokenizer, cfg: DPOConfig, where: str, example: Optional[dict] = None) -> str:
        """The prompt messages rendered with the generation prompt (``continue_final_message``
        when they end with an assistant message): the text a completion follows."""
        if not getattr(tokenizer, "chat_template", None):
            raise DataError(f"{where}: conversational data (message lists) needs a chat template and this model's "
                            "tokenizer has none: set chat_template (a Jinja file or the template text), or use "
                            "standard data (prompt/chosen/rejected strings)")
        cont = prompt[-1]["role"] == "assistant"
        kwargs = cls.template_kwargs(cfg, example)
        try:
            return render_chat(tokenizer, prompt, add_generation_prompt=not cont, continue_final_message=cont, **kwargs)
        except Exception as e:  # jinja errors, e.g. a template that rejects a role order
            raise DataError(f"{where}: chat template failed: {e}") from None

    @classmethod
    def render(cls, example: dict, tokenizer, cfg: DPOConfig, where: str) -> Tuple[str, str, str]:
        """The prompt with the generation prompt, and the whole conversation with each completion. Where
        a template renders the prompt differently alone (a thinking template's empty think block in the
        generation prompt, reasoning stripped from the conversation) the first is no prefix of the
        others: :func:`.tokenize.encode_pair` splits at their common tokens, as TRL 1.16."""
        prompt = example["prompt"]
        prompt_text = cls.render_prompt(prompt, tokenizer, cfg, where, example)
        kwargs = cls.template_kwargs(cfg, example)
        try:
            return (prompt_text, *(render_chat(tokenizer, prompt + example[name], **kwargs)
                                   for name in ("chosen", "rejected")))
        except Exception as e:  # jinja errors, e.g. a template that rejects a role order
            raise DataError(f"{where}: chat template failed: {e}") from None


class Unpaired(Format):
    """TRL's unpaired format (KTO): ``prompt``, ``completion`` (strings or message lists) and a boolean
    ``label`` (desirable or not). The example holds the completion as both ``chosen`` and ``rejected``
    (so it renders and truncates as a pair does) and its ``label``; ``data/unpaired.py`` builds the KL pairs."""

    name = "unpaired"

    @classmethod
    def detect(cls, record: dict) -> bool:
        return not {"chosen", "rejected"} & set(record) and bool({"completion", "label"} & set(record))

    @classmethod
    def normalize(cls, row: Row, mapping: dict, cfg: DPOConfig) -> Union[dict, str]:
        rec = require_fields(row, mapping, ("prompt", "completion", "label"))
        chat = isinstance(rec["prompt"], list)
        prompt, completion = (check_value(rec[k], mapping[k], row.where, chat) for k in ("prompt", "completion"))
        label = rec["label"]
        if type(label).__name__ not in ("bool", "bool_"):  # numpy's bool from parquet too
            raise DataError(f"{row.where}: field '{mapping['label']}' must be true or false (desirable or not), "
                            f"got {_type_name(label)} {label!r}")
        example = Implicit._kind(chat).example(prompt, completion, completion, cfg)
        return cls.row_options({**example, "label": bool(label)}, row)

    @classmethod
    def render(cls, example: dict, tokenizer, cfg: DPOConfig, where: str) -> Tuple[str, str, str]:
        return Implicit._kind(example["chat"]).render(example, tokenizer, cfg, where)


class Implicit(Format):
    """``chosen`` / ``rejected`` only (strings or message lists); the prompt is their common prefix."""

    name = "implicit"

    @classmethod
    def detect(cls, record: dict) -> bool:
        return {"chosen", "rejected"} <= set(record) and "prompt" not in record

    @staticmethod
    def _kind(chat: bool) -> type:
        return Conversational if chat else Standard

    @classmethod
    def normalize(cls, row: Row, mapping: dict, cfg: DPOConfig) -> Union[dict, str]:
        rec = require_fields(row, mapping, ("chosen", "rejected"))
        chat = isinstance(rec["chosen"], list)
        chosen = check_value(rec["chosen"], mapping["chosen"], row.where, chat)
        rejected = check_value(rec["rejected"], mapping["rejected"], row.where, chat)
        if chosen == rejected:
            return "identical"
        prompt, chosen, rejected = extract_prompt(chosen, rejected)
        if not chosen or not rejected or (chat and not prompt):
            return "no_prompt"
        return cls.row_options(cls._kind(chat).example(prompt, chosen, rejected, cfg), row)

    @classmethod
    def render(cls, example: dict, tokenizer, cfg: DPOConfig, where: str) -> Tuple[str, str, str]:
        return cls._kind(example["chat"]).render(example, tokenizer, cfg, where)


FORMATS: List[type] = [Standard, Conversational, Unpaired, Implicit]  # detection order


# ---------------------------------------------------------------------------
# Choosing a format
# ---------------------------------------------------------------------------


def format_names() -> tuple:
    """The ``data_format`` values besides ``auto``."""
    return tuple(fmt.name for fmt in FORMATS)


def check_data_format(cfg: DPOConfig) -> None:
    """``data_format`` is ``auto`` or a registered format (checked before anything loads;
    config/fields.py sits below this package, so the choices are checked here)."""
    choices = ("auto", *format_names())
    if cfg.data_format not in choices:
        raise ConfigError(f"data_format must be one of {', '.join(choices)}; got {cfg.data_format!r}")


def get_format(name: str) -> type:
    """The format class called ``name``."""
    for fmt in FORMATS:
        if fmt.name == name:
            return fmt
    raise DataError(f"data_format: unknown format {name!r} (expected one of {', '.join(format_names())})")


def detect_format(row: Row, mapping: dict, cfg: DPOConfig) -> str:
    """``cfg.data_format``, or the name of the first of :data:`FORMATS` that accepts the record."""
    record = {**row.record, **map_columns(row, mapping)}
    if cfg.data_format != "auto":
        return cfg.data_format
    for fmt in FORMATS:
        if fmt.detect(record):
            return fmt.name
    found = ", ".join(sorted(map(str, row.record))) or "none"
    hint = " (set `columns` to map other names)" if not cfg.columns else ""
    raise DataError(
        f"{row.where}: unknown format: found keys {found}; expected prompt/chosen/rejected "
        f"(standard strings or conversational message lists), chosen/rejected (implicit prompt) or "
        f"prompt/completion/label (unpaired){hint}"
    )


def check_format_options(examples: List[dict], cfg: DPOConfig) -> None:
    """Options that only one kind of data can use are errors, not silently ignored."""
    chat = sum(1 for ex in examples if ex["chat"])
    if chat == 0 and (cfg.system_prompt or cfg.tools):
        name = "system_prompt" if cfg.system_prompt else "tools"
        raise DataError(f"{name} applies to conversational data (message lists rendered with the chat template), "
                        f"but {cfg.data} holds plain strings; remove {name} or use prompt_template")
    if examples and chat == len(examples) and cfg.prompt_template:
        raise DataError(f"prompt_template applies to plain-string data, but {cfg.data} is conversational "
                        "(rendered with the chat template); remove prompt_template or use system_prompt")
