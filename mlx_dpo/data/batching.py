"""Batches of preference pairs: bounded shapes, resumable seeded order.

Each pair's chosen and rejected sequences go through ONE forward pass: a batch of
``B`` pairs is a ``(2B, L)`` token array, rows ``[0:B]`` = prompt + chosen and rows
``[B:2B]`` = prompt + rejected, right-padded (unpaired rows: completion, KL completion; rows
without a KL completion, apo_zero_unpaired's, are ``B`` rows only: :func:`second_rows`). Batches
pad to one of the few cells of a :class:`~mlx_dpo.data.shapes.ShapePlan` (at most
``max_batch_shapes``), so ``mx.compile`` traces a small bounded number of shapes per run.

With ``layout="prefix"`` the batch holds each prompt once instead (see ``forward/prefix.py``):
``prompt`` (B, P) left-padded, ``prompt_lens`` (B,) and ``completion`` (2B, T - 1).
With ``layout="packed"`` (``padding_free``, see ``forward/packed.py``) row ``i`` of ``tokens`` (B, S) is
pair ``i``'s prompt, chosen and rejected inputs, with ``rope_pos`` and ``branch`` per token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np

from .base import TokenizedPair
from .shapes import ShapePlan, bucket_length, pair_dims


PROMPT, CHOSEN, REJECTED, PAD = 0, 1, 2, 3  # the packed layout's branch of each token (forward/packed.py)

@dataclass
class Batch:
    """Host-side arrays of one batch (numpy; the step converts them to ``mx.array``).

    - ``tokens``   (2B, L) int32: prompt + completion, right-padded
    - ``positions`` (2B, T) int32: index of the hidden state that predicts each completion token
    - ``targets``  (2B, T) int32: the completion tokens
    - ``mask``     (2B, T) float32: 1 for real completion tokens
    - ``indices``  (B,) dataset indices of the pairs (for precomputed reference log-probs)
    - shared-prefix layout instead of ``tokens``/``positions``: ``prompt``, ``prompt_lens``, ``completion``
    - packed layout: ``tokens`` (B, S), ``positions`` flat indices into ``tokens``' B * S
      positions, ``rope_pos`` and ``branch`` (B, S)
    """

    tokens: Optional[np.ndarray]
    positions: Optional[np.ndarray]
    targets: np.ndarray
    mask: np.ndarray
    indices: np.ndarray
    num_tokens: int
    prompt: Optional[np.ndarray] = None
    prompt_lens: Optional[np.ndarray] = None
    completion: Optional[np.ndarray] = None
    rope_pos: Optional[np.ndarray] = None
    branch: Optional[np.ndarray] = None
    slots: int = 0  # input positions the forward runs (real + padding)
    filled: int = 0  # of which real tokens
    labels: Optional[np.ndarray] = None  # (B,) float32 of unpaired rows: 1 desirable, 0 not (data/unpaired.py)

    @property
    def num_pairs(self) -> int:
        return len(self.indices)

    @property
    def two_rows(self) -> bool:
        """Whether each item has a second row (:func:`second_rows`): ``targets`` is (2B, T), else (B, T)."""
        return self.targets.shape[0] > len(self.indices)

    @property
    def padding_fraction(self) -> float:
        return 1.0 - self.filled / max(self.slots, 1)

    def arrays(self) -> Dict[str, np.ndarray]:
        keys = ("prompt", "prompt_lens", "completion") if self.prompt is not None else ("tokens", "positions")
        if self.branch is not None:
            keys += ("rope_pos", "branch")
        if self.labels is not None:
            keys += ("labels",)
        return {**{k: getattr(self, k) for k in keys}, "targets": self.targets, "mask": self.mask}


LAYOUTS = ("unshared", "prefix", "packed")


def second_rows(pairs: List[TokenizedPair]) -> bool:
    """Whether each item of ``pairs`` is forwarded as two sequences: a pair's chosen and rejected,
    an unpaired row's completion and KL completion. Unpaired rows without a KL completion
    (``rejected`` empty: apo_zero_unpaired, ``data/unpaired.py``) are forwarded once, a (B, ...) batch."""
    return pairs[0].label is None or any(p.rejected for p in pairs)


def real_tokens(pairs: List[TokenizedPair]) -> int:
    """Tokens of the sequences of each item, the prompt counted once per sequence (``Batch.num_tokens``,
    what tokens/s counts in every layout)."""
    return sum((1 + bool(p.rejected)) * len(p.prompt) + len(p.chosen) + len(p.rejected) for p in pairs)


def collate(pairs: List[TokenizedPair], indices: List[int], pad_id: int = 0, bucket: int = 32,
            layout: str = "unshared", shape: Optional[Tuple[int, int]] = None) -> Batch:
    """Pad ``pairs`` to ``shape`` (a cell of ``layout``, see ``shapes.pair_dims``), or
    without one to their own widths rounded up by :func:`~mlx_dpo.data.shapes.bucket_length`."""
    assert layout in LAYOUTS, layout
    empty = [i for i, p in zip(indices, pairs) if not p.prompt]
    if empty:  # position len(prompt) - 1 would be -1: the first completion token scored from padding
        raise ValueError(f"pairs {empty[:5]} have an empty prompt; the first completion token needs at least one "
                         "prompt token (e.g. BOS) to be scored (tokenize_pairs drops such pairs)")
    batch = _collate(pairs, indices, pad_id, bucket, layout, shape)
    if pairs[0].label is not None:
        batch.labels = np.array([float(p.label) for p in pairs], dtype=np.float32)
    return batch


def _collate(pairs, indices, pad_id, bucket, layout, shape) -> Batch:
    if layout == "prefix":
        return collate_prefix(pairs, indices, pad_id, bucket, shape)
    if layout == "packed":
        return collate_packed(pairs, indices, pad_id, shape)
    rows = [(p.prompt, p.chosen) for p in pairs]
    rows += [(p.prompt, p.rejected) for p in pairs] if second_rows(pairs) else []
    # Inputs are the sequence minus its last token; hidden state t predicts token t + 1.
    seq_len, comp_len = shape or (bucket_length(max(len(a) + len(b) for a, b in rows) - 1, bucket),
                                  bucket_length(max(len(b) for _, b in rows), min(bucket, 16)))
    n = len(rows)
    tokens = np.full((n, seq_len), pad_id, dtype=np.int32)
    positions = np.zeros((n, comp_len), dtype=np.int32)
    targets = np.zeros((n, comp_len), dtype=np.int32)
    mask = np.zeros((n, comp_len), dtype=np.float32)
    for i, (prompt, completion) in enumerate(rows):
        seq = prompt + completion
        tokens[i, : len(seq) - 1] = seq[:-1]
        k = len(completion)
        positions[i, :k] = np.arange(len(prompt) - 1, len(seq) - 1)
        targets[i, :k] = completion
        mask[i, :k] = 1.0
    num_tokens = real_tokens(pairs)
    return Batch(tokens, positions, targets, mask, np.asarray(indices, dtype=np.int64), num_tokens,
                 slots=tokens.size, filled=num_tokens - n)


def collate_prefix(pairs: List[TokenizedPair], indices: List[int], pad_id: int = 0, bucket: int = 32,
                   shape: Optional[Tuple[int, int]] = None) -> Batch:
    """Shared-prefix layout: prompts once, left-padded to a bucketed ``P``; chosen then
    rejected completions (minus the last token) right-padded to ``T - 1``."""
    completions = [p.chosen for p in pairs] + ([p.rejected for p in pairs] if second_rows(pairs) else [])
    p_len, comp_len = shape or (bucket_length(max(len(p.prompt) for p in pairs), min(bucket, 16)),
                                bucket_length(max(len(c) for c in completions), min(bucket, 16)))
    b, n = len(pairs), len(completions)
    prompt = np.full((b, p_len), pad_id, dtype=np.int32)
    for i, p in enumerate(pairs):
        prompt[i, p_len - len(p.prompt):] = p.prompt
    completion = np.full((n, comp_len - 1), pad_id, dtype=np.int32)
    targets = np.zeros((n, comp_len), dtype=np.int32)
    mask = np.zeros((n, comp_len), dtype=np.float32)
    for i, c in enumerate(completions):
        completion[i, : len(c) - 1] = c[:-1]
        targets[i, : len(c)] = c
        mask[i, : len(c)] = 1.0
    num_tokens = real_tokens(pairs)
    filled = sum(len(p.prompt) for p in pairs) + sum(len(c) - 1 for c in completions)
    return Batch(None, None, targets, mask, np.asarray(indices, dtype=np.int64), num_tokens,
                 prompt=prompt, prompt_lens=np.array([len(p.prompt) for p in pairs], dtype=np.int32),
                 completion=completion, slots=prompt.size + completion.size, filled=filled)


def collate_packed(pairs: List[TokenizedPair], indices: List[int], pad_id: int = 0,
                   shape: Optional[Tuple[int, int]] = None) -> Batch:
    """Padding-free layout (``forward/packed.py``): row ``i`` = pair ``i``'s prompt, chosen[:-1] and
    rejected[:-1], right-padded to ``S``; completions scored from flat row positions."""
    dims = np.array([pair_dims(p, "packed") for p in pairs])
    width, comp_len = shape or (bucket_length(int(dims[:, 0].max()), 16), bucket_length(int(dims[:, 1].max()), 16))
    b = len(pairs)
    kinds = (PROMPT, CHOSEN, REJECTED) if second_rows(pairs) else (PROMPT, CHOSEN)
    tokens = np.full((b, width), pad_id, dtype=np.int32)
    rope_pos = np.zeros((b, width), dtype=np.int32)
    branch = np.full((b, width), PAD, dtype=np.int32)
    positions = np.zeros(((len(kinds) - 1) * b, comp_len), dtype=np.int32)
    targets = np.zeros_like(positions)
    mask = np.zeros(positions.shape, dtype=np.float32)
    for i, p in enumerate(pairs):
        n_p, start = len(p.prompt), 0
        for kind in kinds:
            part = (p.prompt, p.chosen[:-1], p.rejected[:-1])[kind]
            end = start + len(part)
            tokens[i, start:end], branch[i, start:end] = part, kind
            rope_pos[i, start:end] = np.arange(len(part)) + (0 if kind == PROMPT else n_p)
            if kind != PROMPT:  # token j of the completion is scored at prompt end (j = 0), else input j - 1
                row, completion = (i, p.chosen) if kind == CHOSEN else (b + i, p.rejected)
                k = len(completion)
                positions[row, :k] = i * width + np.concatenate([[n_p - 1], np.arange(start, start + k - 1)])
                targets[row, :k], mask[row, :k] = completion, 1.0
            start = end
    num_tokens = real_tokens(pairs)
    return Batch(tokens, positions, targets, mask, np.asarray(indices, dtype=np.int64), num_tokens,
                 rope_pos=rope_pos, branch=branch, slots=tokens.size, filled=int(dims[:, 0].sum()))


@dataclass
class SamplerState:
    epoch: int = 0
    index: int = 0  # batches of this epoch already consumed
    seed: int = 0


class BatchSampler:
    """Batches of exactly ``batch_size`` pairs that share a cell of ``shapes`` (a
    :class:`~mlx_dpo.data.shapes.ShapePlan`; default: one over ``pairs`` with 16 cells).

    Epoch ``e`` is a pure function of ``seed + e``: each cell's pairs are shuffled and cut
    into batches; the < ``batch_size`` left over in each cell are pooled, shuffled and cut
    too (they pad to a cell holding them all), the last < ``batch_size`` of the pool are
    dropped (different pairs each epoch), and the batch order is shuffled. So the order
    resumes exactly from ``(epoch, index)`` and every epoch has the same length.

    Every batch is full on purpose (TRL's dataloader keeps a smaller last batch instead,
    ``dataloader_drop_last=False``): a smaller batch would be one more shape for ``mx.compile`` to
    trace at each cell it falls in, data-parallel ranks each need ``batch_size`` rows, and an epoch's
    length and position stay a pure function of ``(epoch, index)``.

    ``sequential``: the batches are consecutive ``batch_size`` rows in data order, every epoch
    (unpaired rows, whose KL completions were drawn from those batches; TRL's sequential sampling).
    So the same last ``len(pairs) % batch_size`` rows are dropped every epoch: they never train
    (the trainer warns, :func:`~mlx_dpo.data.unpaired.leftover_warning`).

    Data parallel: the global micro-batches hold ``batch_size * ranks`` pairs (the batches
    one process with that batch size walks over, in the same order) and rank ``rank``
    yields its ``batch_size`` of each, ``[rank * batch_size, (rank + 1) * batch_size)``."""

    def __init__(self, pairs: List[TokenizedPair], batch_size: int, seed: int, shuffle: bool = True,
                 shapes: Optional[ShapePlan] = None, rank: int = 0, ranks: int = 1, sequential: bool = False):
        self.rank, self.per_rank = rank, batch_size
        batch_size *= ranks
        if len(pairs) < batch_size:
            raise ValueError(f"{len(pairs)} training pairs is fewer than batch_size {batch_size}")
        self.pairs = pairs
        self.batch_size = batch_size
        self.shuffle = shuffle and not sequential
        self.state = SamplerState(seed=seed)
        self.shapes = shapes or ShapePlan(pairs, "unshared", max_cells=16)
        if sequential:  # one group in data order: the batches are the consecutive rows
            self.members = [np.arange(len(pairs))]
        else:
            cell_of = np.array(self.shapes.assign(pairs))
            self.members = [np.flatnonzero(cell_of == k) for k in range(len(self.shapes.cells))]
        leftover = sum(len(m) % batch_size for m in self.members)
        self.num_batches = sum(len(m) // batch_size for m in self.members) + leftover // batch_size
        self._epoch: Optional[Tuple[int, List[List[int]]]] = None

    def __len__(self) -> int:
        return self.num_batches

    def epoch_batches(self, epoch: int) -> List[List[int]]:
        """The batches of ``epoch``, in order (see the class docstring)."""
        if self._epoch is not None and self._epoch[0] == epoch:
            return self._epoch[1]
        rng = np.random.default_rng(self.state.seed + epoch)
        mix = rng.permutation if self.shuffle else np.asarray
        b, batches, pool = self.batch_size, [], []
        for members in self.members:
            members = mix(members)
            full = len(members) // b * b
            batches += [members[i: i + b].tolist() for i in range(0, full, b)]
            pool += members[full:].tolist()
        pool = mix(np.array(pool, dtype=np.int64))
        batches += [pool[i: i + b].tolist() for i in range(0, len(pool) // b * b, b)]
        order = mix(np.arange(len(batches)))
        self._epoch = (epoch, [batches[i] for i in order])
        return self._epoch[1]

    def __iter__(self) -> Iterator[List[int]]:
        while True:
            batches = self.epoch_batches(self.state.epoch)
            while self.state.index < len(batches):
                group = batches[self.state.index]
                self.state.index += 1
                yield group[self.rank * self.per_rank:(self.rank + 1) * self.per_rank]
            self.state.epoch += 1
            self.state.index = 0


def eval_batches(pairs: List[TokenizedPair], batch_size: int, max_batches: int = -1,
                 sequential: bool = False) -> Iterator[List[int]]:
    """Every eval pair once, grouped by length; the last batch may be smaller.

    With ``max_batches >= 0`` only ``max_batches * batch_size`` pairs are evaluated: a
    subset evenly spaced over the original order (the same on every call, and not
    biased to the shortest pairs), then grouped by length.

    ``sequential``: consecutive rows in data order (the first ``max_batches * batch_size``), as
    transformers' evaluation loop walks them: unpaired rows, whose KL reference point is each
    batch's mean over the rows it holds (TRL's ``KTOTrainer``), take TRL's batches."""
    subset = range(len(pairs))
    if 0 <= max_batches * batch_size < len(pairs):
        subset = (range(max_batches * batch_size) if sequential else
                  np.linspace(0, len(pairs), max_batches * batch_size, endpoint=False).astype(int).tolist())
    order = list(subset) if sequential else sorted(subset, key=lambda i: (pairs[i].length, i))
    groups = [order[i: i + batch_size] for i in range(0, len(order), batch_size)]
    return iter(groups)
