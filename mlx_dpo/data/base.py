"""Types and helpers shared by the data modules: a raw record, a tokenized pair, rendering a chat."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional


@dataclass
class TokenizedPair:
    """A pair, or (``label`` set: True desirable, False undesirable) an unpaired row of KTO data:
    ``chosen`` is its completion and ``rejected`` its KL completion (see ``data/unpaired.py``)."""

    prompt: List[int]
    chosen: List[int]
    rejected: List[int]
    label: Optional[bool] = None

    @property
    def length(self) -> int:
        return len(self.prompt) + max(len(self.chosen), len(self.rejected))


@dataclass
class Row:
    """One raw record and where it came from (``file:line`` or ``file record index i``).

    ``format`` is the name of its format (see :mod:`.formats`), ``auto`` until detected.
    """

    where: str
    record: dict
    format: str = "auto"


def render_chat(tokenizer, messages: list, **kwargs) -> str:
    """``apply_chat_template`` as transformers (and TRL 1.16) call it, with only these keyword
    arguments: mlx-lm's wrapper adds its own ``enable_thinking`` default (false where the vocabulary
    has no ``<think>``), so it is bypassed unless it implements the template itself."""
    inner = getattr(tokenizer, "_tokenizer", None)
    if inner is None or getattr(tokenizer, "_chat_template", None) is not None:
        return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
    return inner.apply_chat_template(messages, tokenize=False, **kwargs)
