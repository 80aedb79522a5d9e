"""Generate from a trained run: the policy (adapters on) beside the reference (adapters
off), on the same prompts and from the same loaded weights, with mlx-lm's generator.

Greedy by default (``temp=0``); with ``temp > 0`` both sides sample from the same seed.
A run trained with ``prompt_template`` gets its prompts wrapped the same way; otherwise a
tokenizer with a chat template renders each prompt as a user turn, as training and
``mlx-dpo sample`` encode it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional, Union

import mlx.core as mx

from .adapters import adapter_mode
from .audit import AuditError, load_run
from .data import DataError
from .data.formats import check_value
from .data.tokenize import encode_prompt


def read_prompts(path: Union[str, Path], messages: bool = False) -> List[Union[str, list]]:
    """Prompts from a text file (one a line) or a JSONL file (a ``prompt`` string per record;
    with ``messages``, also a list of ``{role, content}`` messages, TRL's conversational form)."""
    path = Path(path)
    if not path.is_file():
        raise AuditError(f"prompts file {path} does not exist")
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    if path.suffix != ".jsonl":
        return lines
    prompts = []
    for n, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise AuditError(f"{path}:{n}: not JSON ({e.msg})") from None
        prompt = record.get("prompt") if isinstance(record, dict) else None
        if messages and isinstance(prompt, list):
            try:
                prompt = check_value(prompt, "prompt", f"{path}:{n}", as_messages=True)
            except DataError as e:
                raise AuditError(str(e)) from None
        elif not isinstance(prompt, str):
            kind = "a 'prompt' string or message list" if messages else "a 'prompt' string"
            raise AuditError(f"{path}:{n}: expected an object with {kind}")
        prompts.append(prompt)
    return prompts


def complete(model, tokenizer, prompt: Union[str, List[int]], max_tokens: int, temp: float, seed: int) -> dict:
    """One generation with mlx-lm from a prompt text or its token ids: ``{text, tokens}``."""
    from mlx_lm import stream_generate
    from mlx_lm.sample_utils import make_sampler

    mx.random.seed(seed)
    text, tokens = "", 0
    for response in stream_generate(model, tokenizer, prompt, max_tokens=max_tokens, sampler=make_sampler(temp)):
        text += response.text
        tokens = response.generation_tokens
    return {"text": text, "tokens": tokens}


def generate(run_dir: Union[str, Path], prompts: List[str], max_tokens: int = 64, temp: float = 0.0,
             seed: int = 0) -> List[dict]:
    """``{prompt, policy: {text, tokens}, reference: {text, tokens}}`` for every prompt."""
    if not prompts:
        raise AuditError("no prompts given (pass --prompt TEXT or --prompts FILE)")
    run = load_run(run_dir)
    template = run.cfg.prompt_template
    results = []
    for n, prompt in enumerate(prompts):
        if template:
            text = template.replace("{prompt}", prompt)
        else:  # as training encodes it: through the chat template when the tokenizer has one
            try:
                text = encode_prompt(prompt, run.tokenizer, f"prompt {n}")[0]
            except DataError as e:
                raise AuditError(str(e)) from None
        row = {"prompt": prompt}
        for side, mode in (("policy", "policy"), ("reference", "base")):
            with adapter_mode(run.model, mode):
                row[side] = complete(run.model, run.tokenizer, text, max_tokens, temp, seed)
        results.append(row)
    return results


def format_text(results: List[dict]) -> str:
    lines = []
    for r in results:
        lines.append(f"prompt: {r['prompt']}")
        for side in ("policy", "reference"):
            lines.append(f"  {side:<9} ({r[side]['tokens']} tokens): {r[side]['text']!r}")
    return "\n".join(lines)


def gather_prompts(prompt: Optional[tuple], prompts_file: Optional[str]) -> List[str]:
    """The prompts of ``--prompt`` (repeatable) and ``--prompts FILE``."""
    return list(prompt or ()) + (read_prompts(prompts_file) if prompts_file else [])
