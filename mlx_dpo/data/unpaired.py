"""Unpaired (KTO) rows, as TRL 1.16's ``KTOTrainer`` prepares them.

A tokenized unpaired row is a :class:`TokenizedPair` with a ``label`` (True: desirable):
``chosen`` is its completion and ``rejected`` its KL completion -- the completion of the
previous row of its batch (the first row takes the batch's last), TRL's
``add_kl_completion_ids`` over fixed batches of ``batch_size`` rows in data order. So one
forward pass scores both, the KL sequence sharing the row's prompt (prefix sharing, the
reference cache). ``apo_zero_unpaired`` uses no KL term: its rows have none (``rejected``
empty) and are forwarded alone. The batches are then walked in that order (TRL's sequential sampling).

Paired data given to an unpaired loss becomes one desirable and one undesirable row per pair
in TRL's ``unpair_preference_dataset`` order: per block of 1000 pairs (``datasets.map``'s
batch), the chosen rows then the rejected rows.

Batches are full, as for pairs (``batching.BatchSampler``: bounded compiled shapes): TRL's
dataloader keeps a smaller last batch, here the last ``len(rows) % batch_size`` rows never train
(:func:`leftover_warning`).
"""

from __future__ import annotations

from typing import Callable, List, Optional

from ..config.fields import DPOConfig
from ..errors import DataError
from .base import TokenizedPair

MAP_BATCH = 1000  # datasets.map's default batch size, the blocks TRL unpairs


def has_labels(pairs: List[TokenizedPair]) -> bool:
    """Whether ``pairs`` are unpaired rows; a mix of pairs and rows is refused."""
    kinds = {p.label is not None for p in pairs}
    if len(kinds) > 1:
        raise DataError("the data mixes paired records (prompt/chosen/rejected) and unpaired ones "
                        "(prompt/completion/label); use one kind per run")
    return kinds == {True}


def unpair(pairs: List[TokenizedPair]) -> List[TokenizedPair]:
    """TRL's ``unpair_preference_dataset`` on tokenized pairs (module docstring)."""
    rows = []
    for start in range(0, len(pairs), MAP_BATCH):
        block = pairs[start:start + MAP_BATCH]
        rows += [TokenizedPair(p.prompt, p.chosen, p.chosen, True) for p in block]
        rows += [TokenizedPair(p.prompt, p.rejected, p.rejected, False) for p in block]
    return rows


def with_kl_completions(rows: List[TokenizedPair], batch_size: int, kl: bool = True,
                        max_length: Optional[int] = None) -> List[TokenizedPair]:
    """Each row with its KL completion (module docstring), cut to ``max_length`` with its
    prompt as TRL's collator cuts it; ``kl=False`` (apo_zero_unpaired, TRL's ``calculate_KL``
    False): none (``rejected`` empty), so a batch forwards only the rows (``batching.second_rows``)."""
    out = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        others = [chunk[-1].chosen] + [r.chosen for r in chunk[:-1]] if kl else [[] for _ in chunk]
        for row, other in zip(chunk, others):
            if max_length is not None:
                other = other[:max(0, max_length - len(row.prompt))]
            out.append(TokenizedPair(row.prompt, row.chosen, other, row.label))
    return out


def prepare_rows(pairs: List[TokenizedPair], cfg: DPOConfig, kl: bool, log: Callable = print,
                 split: str = "train") -> List[TokenizedPair]:
    """Unpaired rows with KL completions for an unpaired loss, from unpaired or paired data."""
    if not pairs:
        return pairs
    if not has_labels(pairs):
        pairs = unpair(pairs)
        log(f"{split}: paired data unpaired for loss_type {cfg.loss_type}: {len(pairs)} rows "
            "(each pair's chosen desirable, rejected undesirable, as TRL's unpair_preference_dataset)")
    if split == "train":
        for warning in label_warnings(pairs, cfg):
            log(warning)
    return with_kl_completions(pairs, cfg.batch_size, kl, cfg.max_length if cfg.truncation_mode == "keep_start"
                               else None)


def leftover_warning(n_rows: int, batch_size: int, ranks: int = 1) -> Optional[str]:
    """What the sequential walk drops (``batching.BatchSampler``: full batches only, for bounded
    compiled shapes, as for pairs): the same last ``n_rows % (batch_size * ranks)`` rows every epoch."""
    step = batch_size * ranks
    left = n_rows % step
    if not left:
        return None
    per = f"batch_size {batch_size}" + (f" x {ranks} ranks" if ranks > 1 else "")
    return (f"warning: the last {left} of the {n_rows} training rows never train: batches are full ({per}; "
            f"TRL's last smaller batch would hold them) and unpaired rows are walked in order; give a multiple "
            f"of {step} rows (e.g. {n_rows - left} or {n_rows - left + step}) to train every row")


def check_paired(pairs: List[TokenizedPair], cfg: DPOConfig) -> None:
    """A paired loss refuses unpaired rows, naming the fix."""
    if pairs and has_labels(pairs):
        raise DataError(f"{cfg.data} holds unpaired rows (prompt/completion/label) but loss_type {cfg.loss_type} "
                        "needs pairs (prompt/chosen/rejected): set loss_type: kto (or apo_zero_unpaired) to train "
                        "on unpaired feedback, or give paired data")


def label_warnings(rows: List[TokenizedPair], cfg: DPOConfig) -> List[str]:
    """TRL's warning on the weighted desirable/undesirable ratio (Eq. 8 of the KTO paper, its
    bounds and rounding), and what a set with one label means."""
    out = []
    labels = [bool(r.label) for r in rows]
    if all(labels) or not any(labels):
        kind, other = ("desirable", "undesirable") if all(labels) else ("undesirable", "desirable")
        out.append(f"warning: every training row is {kind} ({len(rows)} rows): KTO only moves their reward "
                   f"against the KL reference point; add {other} rows for a contrast")
    n_des = max(sum(labels), 1)
    n_und = max(len(labels) - n_des, 1)
    if n_des == n_und:
        return out
    dw, uw = cfg.desirable_weight, cfg.undesirable_weight
    des = (round(n_und * uw / n_des, 2), round(n_und * uw / n_des * 1.33, 2))
    und = (round(n_des * dw / n_und / 1.33, 2), round(n_des * dw / n_und, 2))
    if not (des[0] <= dw <= des[1] or und[0] <= uw <= und[1]):
        out.append(f"warning: {n_des} desirable and {n_und} undesirable rows, but desirable_weight {dw} and "
                   f"undesirable_weight {uw} are not in the recommended range (KTO paper, Eq. 8; TRL's check): set "
                   f"EITHER desirable_weight in [{des[0]}, {des[1]}] OR undesirable_weight in [{und[0]}, {und[1]}] "
                   "(not both)")
    return out
