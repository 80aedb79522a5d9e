"""Types shared by the data modules: the error, a raw record and a tokenized pair."""

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
