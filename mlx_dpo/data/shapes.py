"""A bounded set of padded batch shapes: each one compiles the training step once.

Every pair has two padded widths ("dims"), fixed by the batch layout (``batching.py``):

- ``unshared``: ``(L, T)`` = (prompt + longer completion - 1 inputs, longer completion)
- ``prefix`` (shared prefix): ``(P, C)`` = (prompt, longer completion)
- ``packed`` (padding-free): ``(S, T)`` = (prompt + chosen + rejected - 2 inputs, longer completion)

A batch pads to a *cell* ``(a, b)`` that holds all its pairs. :func:`plan_cells`
picks at most ``max_cells`` cells for a data set: each pair's dims are rounded up to
``bucket_length(., 16)`` (<= 25% padding per dim), then the two cells whose merge
(their componentwise max) adds the least padded work, ``count x (w_a a + w_b b)``,
are merged until ``max_cells - 1`` are left and each holds ``min_pairs`` (the trainer:
``MIN_BATCHES_PER_SHAPE`` batches' worth), and the cell holding every pair is added. The weights are the relative cost of a padded column: unshared, ``L`` runs
the whole model on 2 rows and ``T`` only the LM head (``w = (1, 1/4)``); shared,
``P`` runs on 1 row and ``C`` on 2 (``w = (1, 2)``); packed, ``S`` runs on 1 row and ``T`` only
the LM head on 2 (``w = (1, 1/2)``). So a run traces at most
``max_cells`` train shapes, whatever the lengths (and batch sizes: batches are full).

Merging also goes on while a merge pads less work over the whole run than one more shape
costs (:class:`ShapePlan` with ``batch_size``: ``COMPILE_STEPS`` median batches per shape,
against the padding of the run's ``passes`` through the pairs), so a short run gets a few
shapes and a long one up to ``max_cells``.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import numpy as np

Cell = Tuple[int, int]
MIN_BATCHES_PER_SHAPE = 1  # a shape compiles the step: it must hold a batch at least
# What one more shape costs a run (tracing, MLX's compilation and the first run of the step at it, which
# first touches its buffers), in steps of a median batch: measured 0.4 (AMD EPYC, kernels cached) to ~1
# (Xeon, issue 33) on 2-core CPUs (benchmarks/README.md, "Where the time goes").
COMPILE_STEPS = 1.0
WEIGHTS = {"unshared": (1.0, 0.25), "prefix": (1.0, 2.0), "packed": (1.0, 0.5)}


def bucket_length(n: int, minimum: int = 32) -> int:
    """Round ``n`` up to the next bucket: multiples of ``minimum`` up to 4x it, then
    steps of an eighth of the next power of two (at most 25% padding)."""
    if n <= 4 * minimum:
        return max(minimum, -(-n // minimum) * minimum)
    step = 2 ** (int(n - 1).bit_length() - 3)
    return -(-n // step) * step


def pair_dims(pair, layout: str) -> Cell:
    """The two widths ``pair`` needs in a batch of ``layout`` (module docstring)."""
    c = max(len(pair.chosen), len(pair.rejected))
    if layout == "packed":
        return len(pair.prompt) + len(pair.chosen) - 1 + max(len(pair.rejected) - 1, 0), c
    return (len(pair.prompt), c) if layout == "prefix" else (len(pair.prompt) + c - 1, c)


def cell_cost(cell: Sequence[int], layout: str) -> float:
    wa, wb = WEIGHTS[layout]
    return wa * cell[0] + wb * cell[1]


def plan_cells(dims: np.ndarray, layout: str, max_cells: int, min_pairs: int = 1, passes: float = 1.0,
               compile_cost: float = 0.0) -> List[Cell]:
    """At most ``max_cells`` cells covering ``dims`` (N, 2), cheapest first (module docstring).
    Merging goes on while a cell holds fewer than ``min_pairs`` pairs, and while the cheapest
    merge adds less padded work over the run (``passes`` times through the pairs) than one more
    shape's ``compile_cost`` (in the same units: one pair-column of :func:`cell_cost`)."""
    fine = np.array([[bucket_length(int(a), 16), bucket_length(int(b), 16)] for a, b in dims], dtype=np.int64)
    top = tuple(int(x) for x in fine.max(axis=0))
    cells, counts = np.unique(fine, axis=0, return_counts=True)
    cells, counts = cells.astype(np.float64), counts.astype(np.float64)
    w = np.array(WEIGHTS[layout])
    alive = np.ones(len(cells), dtype=bool)
    while alive.sum() > 1:
        idx = np.flatnonzero(alive)
        c, n = cells[idx], counts[idx]
        small = n < min_pairs
        merged = np.maximum(c[:, None, :], c[None, :, :]) @ w  # (k, k) cost of the merged cell
        own = c @ w
        added = (n[:, None] + n[None, :]) * merged - (n * own)[:, None] - (n * own)[None, :]
        np.fill_diagonal(added, np.inf)
        if len(idx) <= max(1, max_cells - 1):  # within the bound: merges that fill a small cell or pay for
            worth = small[:, None] | small[None, :] | (added * passes < compile_cost)  # their compile
            added[~worth] = np.inf
            if not np.isfinite(added).any():
                break
        i, j = np.unravel_index(np.argmin(added), added.shape)
        a, b = idx[i], idx[j]
        cells[a], counts[a] = np.maximum(cells[a], cells[b]), counts[a] + counts[b]
        alive[b] = False
    out = {tuple(int(x) for x in cell) for cell in cells[alive]} | {top}
    return sorted(out, key=lambda cell: (cell_cost(cell, layout), cell))


def run_passes(max_steps: int, num_train_epochs: float, pairs_per_step: int, num_pairs: int) -> float:
    """How many times a run goes through its training pairs."""
    return num_train_epochs if max_steps < 0 else max_steps * pairs_per_step / max(num_pairs, 1)


class ShapePlan:
    """The cells of a run (:func:`plan_cells` over the training pairs) and the cell of a batch.

    With ``batch_size``, each shape must hold a batch (``MIN_BATCHES_PER_SHAPE``) and pay for
    its compile (``COMPILE_STEPS`` steps of a median batch) with the padding it saves over the
    run's ``passes`` through the pairs: a short run gets few shapes, a long one up to ``max_cells``."""

    def __init__(self, pairs: list, layout: str, max_cells: int, min_pairs: int = 1, batch_size: int = 0,
                 passes: float = 1.0):
        assert layout in WEIGHTS, layout
        self.layout, self.max_cells = layout, max_cells
        dims = np.array([pair_dims(p, layout) for p in pairs])
        compile_cost = 0.0
        if batch_size:
            min_pairs = max(min_pairs, MIN_BATCHES_PER_SHAPE * batch_size)
            compile_cost = COMPILE_STEPS * batch_size * float(np.median(dims @ np.array(WEIGHTS[layout])))
        self.cells = plan_cells(dims, layout, max_cells, min_pairs, passes, compile_cost)

    def cell(self, pairs: list) -> Cell:
        """The cheapest cell that holds every pair of ``pairs``; pairs longer than every
        cell (eval pairs) get their own bucketed widths instead."""
        need = np.max([pair_dims(p, self.layout) for p in pairs], axis=0)
        for cell in self.cells:  # cheapest first
            if cell[0] >= need[0] and cell[1] >= need[1]:
                return cell
        return bucket_length(int(need[0]), 16), bucket_length(int(need[1]), 16)

    def assign(self, pairs: list) -> List[int]:
        """The index (into ``cells``) of each pair's own cell."""
        return [self.cells.index(self.cell([p])) for p in pairs]
