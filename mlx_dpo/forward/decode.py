"""Decoding with the model as it is in memory: mlx-lm's continuous-batching ``BatchGenerator``
over token ids (``mlx-dpo generate`` and ``sample`` use it on a loaded run, training on its own
model for ``generate_during_eval``), and the text of generated tokens."""

from __future__ import annotations

from typing import Callable, List, Tuple


def generate_samples(model, tokenizer, prompt_ids: List[List[int]], k: int, sampler, max_tokens: int,
                     batch_size: int, on_prompt_done: Callable = lambda: None) -> Tuple[list, list, object]:
    """``k`` completions of every prompt with mlx-lm's ``BatchGenerator`` (continuous batching,
    ``batch_size`` sequences at once): ``(tokens[prompt][sample], finished[prompt][sample], stats)``,
    ``finished`` False for a completion cut at ``max_tokens``; EOS is not part of the tokens."""
    from mlx_lm.generate import BatchGenerator

    gen = BatchGenerator(model, max_tokens=max_tokens, stop_tokens=[[t] for t in tokenizer.eos_token_ids],
                         sampler=sampler, completion_batch_size=batch_size, prefill_batch_size=min(batch_size, 8))
    uids = gen.insert([ids for ids in prompt_ids for _ in range(k)])
    slot = {uid: divmod(n, k) for n, uid in enumerate(uids)}
    tokens = [[[] for _ in range(k)] for _ in prompt_ids]
    finished = [[False] * k for _ in prompt_ids]
    left = [k] * len(prompt_ids)
    try:
        with gen.stats() as stats:
            while responses := gen.next_generated():
                for r in responses:
                    p, s = slot[r.uid]
                    if r.finish_reason != "stop":
                        tokens[p][s].append(r.token)
                    if r.finish_reason is not None:
                        finished[p][s] = r.finish_reason == "stop"
                        left[p] -= 1
                        if not left[p]:
                            on_prompt_done()
    finally:
        gen.close()
    return tokens, finished, stats


def detokenize(tokenizer, tokens: List[int]) -> str:
    """The text of generated ``tokens`` as mlx-lm's streaming detokenizer writes it (which, unlike
    ``decode``, drops a SentencePiece word-start space before the first token)."""
    detokenizer = tokenizer.detokenizer
    detokenizer.reset()
    for token in tokens:
        detokenizer.add_token(token)
    detokenizer.finalize()
    return detokenizer.text
