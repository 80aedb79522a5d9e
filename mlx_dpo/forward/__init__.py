"""Completion log-probs: blocks, prefix sharing, packed rows, CPU math, logprobs."""
