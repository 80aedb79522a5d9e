"""Distinct padded training-batch shapes and padding over one epoch (no model, no training).

    python benchmarks/shape_count.py                       # max_batch_shapes 16
    python benchmarks/shape_count.py --max-batch-shapes 8

Pairs with ``ULTRAFEEDBACK_LENGTHS`` (tests/helpers.py) lengths (8k, max_length 1024), batch 2/4/8, in each
batch layout: unshared, shared prefix (``prefix_sharing``), packed (``padding_free``). Each
distinct shape compiles the training step once. Padding = share of the input positions the
forward runs that are padding (``Batch.padding_fraction``: tokens (2B, L) unshared; prompt (B, P)
+ completions (2B, C - 1) shared; rows (B, S) packed); "floor" = the padding of one-pair
batches (chosen and rejected padded to the longer one), which no bucketing removes.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # helpers.py

from mlx_dpo.data.batching import LAYOUTS, BatchSampler, collate  # noqa: E402
from mlx_dpo.data import TokenizedPair  # noqa: E402
from mlx_dpo.data.shapes import ShapePlan  # noqa: E402
from helpers import lognormal_lengths  # noqa: E402

FLOOR = {  # input positions of a one-pair batch with no rounding, by layout
    "unshared": lambda p, c, r: 2 * (p + max(c, r) - 1),
    "prefix": lambda p, c, r: p + 2 * (max(c, r) - 1),
    "packed": lambda p, c, r: p + c + r - 2,
}


def epoch(pairs, batch_size, layout, max_shapes):
    """(distinct shapes, padding fraction, pairs seen) of epoch 0."""
    plan = ShapePlan(pairs, layout, max_shapes, batch_size=batch_size, passes=1.0)
    shapes, slots, filled, seen = set(), 0, 0, set()
    for g in BatchSampler(pairs, batch_size, 0, shapes=plan).epoch_batches(0):
        chosen = [pairs[i] for i in g]
        batch = collate(chosen, g, layout=layout, shape=plan.cell(chosen))
        shapes.add(tuple(v.shape for v in batch.arrays().values()))
        slots, filled, seen = slots + batch.slots, filled + batch.filled, seen | set(g)
    return len(shapes), 1 - filled / slots, len(seen)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=8000)
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--max-batch-shapes", type=int, default=16)
    args = ap.parse_args()
    lengths = lognormal_lengths(args.pairs, seed=0, max_length=args.max_length)
    pairs = [TokenizedPair([1] * p, [5] * c, [6] * r) for p, c, r in lengths]
    print("| layout | batch | shapes | padding | floor | input positions / pair | pairs seen |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for layout in LAYOUTS:
        real = sum(FLOOR["packed"](*x) + (x[0] if layout == "unshared" else 0) for x in lengths)
        floor = 1 - real / sum(FLOOR[layout](*x) for x in lengths)
        for b in (2, 4, 8):
            n, padding, seen = epoch(pairs, b, layout, args.max_batch_shapes)
            print(f"| {layout} | {b} | {n} | {100 * padding:.1f}% | {100 * floor:.1f}% | "
                  f"{real / len(pairs) / (1 - padding):.0f} | {seen}/{len(pairs)} |")


if __name__ == "__main__":
    main()
