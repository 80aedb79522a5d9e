"""Leaf helpers: atomic files, paths and cache locations, Hub timeouts, Metal memory, ranks, the clock."""
