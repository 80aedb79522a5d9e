"""Preference losses: per-pair formulas, reductions, the batch loss."""
