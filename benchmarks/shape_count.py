"""Distinct padded training-batch shapes and padding over one epoch (no model, no training).

    python benchmarks/shape_count.py                       # this checkout, max_batch_shapes 16
    python benchmarks/shape_count.py --max-batch-shapes 8
    python benchmarks/shape_count.py --before /work/main   # the batching.py of another checkout

Pairs with ``toy.ULTRAFEEDBACK_LENGTHS`` lengths (8k, max_length 1024), batch 2/4/8, with and
without prefix sharing. Each distinct shape compiles the training step once. Padding = share of
the input positions the forward runs that are padding (tokens (2B, L) unshared; prompt (B, P)
+ completions (2B, C - 1) shared); "floor" = the padding of one-pair batches (chosen and
rejected padded to the longer one), which no bucketing removes.
"""

import argparse
import sys
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mlx_dpo.data import TokenizedPair  # noqa: E402
from mlx_dpo.toy import lognormal_lengths  # noqa: E402


def old_batching(src: str):
    """``mlx_dpo/batching.py`` of another checkout, as a module (it needs only ``.data``)."""
    code = (Path(src) / "mlx_dpo" / "batching.py").read_text().replace("from .data import", "from mlx_dpo.data import")
    module = types.ModuleType("old_batching")
    sys.modules[module.__name__] = module
    exec(code, module.__dict__)
    return module


def widths(pairs, indices, prefix):
    """(slots, real) input positions of a batch padded by its arrays' shapes."""
    real = sum(len(pairs[i].prompt) * (1 if prefix else 2) + len(pairs[i].chosen) + len(pairs[i].rejected) - 2
               for i in indices)
    return real


def epoch(pairs, batch_size, prefix, args):
    if args.before:
        old = old_batching(args.before)
        sampler = old.BatchSampler(pairs, batch_size, 0)
        groups = [sampler.groups[i] for i in sampler.epoch_order(0)]
        make = lambda g: old.collate([pairs[i] for i in g], g, prefix=prefix)  # noqa: E731
    else:
        from mlx_dpo.batching import BatchSampler, collate
        from mlx_dpo.shapes import MIN_BATCHES_PER_SHAPE, ShapePlan

        plan = ShapePlan(pairs, prefix, args.max_batch_shapes, min_pairs=MIN_BATCHES_PER_SHAPE * batch_size)
        groups = BatchSampler(pairs, batch_size, 0, shapes=plan).epoch_batches(0)
        make = lambda g: collate([pairs[i] for i in g], g, prefix=prefix,  # noqa: E731
                                 shape=plan.cell([pairs[i] for i in g]))
    shapes, slots, real = set(), 0, 0
    for g in groups:
        arrays = make(g).arrays()
        shapes.add(tuple(v.shape for v in arrays.values()))
        slots += arrays["prompt"].size + arrays["completion"].size if prefix else arrays["tokens"].size
        real += widths(pairs, g, prefix)
    return len(shapes), 1 - real / slots, len({i for g in groups for i in g})


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=8000)
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--max-batch-shapes", type=int, default=16)
    ap.add_argument("--before", default=None, help="count with the batching.py of this checkout instead")
    args = ap.parse_args()
    lengths = lognormal_lengths(args.pairs, seed=0, max_length=args.max_length)
    pairs = [TokenizedPair([1] * p, [5] * c, [6] * r) for p, c, r in lengths]
    print("| prefix sharing | batch | shapes | padding | floor | pairs seen |")
    print("|---|---:|---:|---:|---:|---:|")
    for prefix in (False, True):
        floor_real = sum(widths(pairs, [i], prefix) for i in range(len(pairs)))
        floor_slots = sum((p + 2 * (max(c, r) - 1)) if prefix else 2 * (p + max(c, r) - 1) for p, c, r in lengths)
        for b in (2, 4, 8):
            n, padding, seen = epoch(pairs, b, prefix, args)
            print(f"| {'on' if prefix else 'off'} | {b} | {n} | {100 * padding:.1f}% | "
                  f"{100 * (1 - floor_real / floor_slots):.1f}% | {seen}/{len(pairs)} |")


if __name__ == "__main__":
    main()
