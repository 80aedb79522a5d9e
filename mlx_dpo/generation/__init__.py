"""Generation from a trained run: side-by-side generation, on-policy sampling, judges."""
