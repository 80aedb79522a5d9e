"""Generate from a trained run: the policy (adapters on) beside the reference (adapters
off), on the same prompts and from the same loaded weights, each side one batch through
mlx-lm's continuous-batching ``BatchGenerator`` (also used by ``mlx-dpo sample``).

Greedy by default (``temp=0``); with ``temp > 0`` both sides sample from the same seed.
A run trained with ``prompt_template`` gets its prompts wrapped the same way; otherwise a
tokenizer with a chat template renders each prompt as a user turn, as training and
``mlx-dpo sample`` encode it.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import List, Optional, Union

import mlx.core as mx

from ..model.adapters import adapter_mode
from ..forward.decode import detokenize, generate_samples  # noqa: F401 (sample.py and users import them here)
from ..model.loader import use_chat_template
from ..config.fields import DPOConfig
from ..errors import ConfigError, DataError
from ..model.trained import load_adapter_run
from ..data.formats import check_value
from ..data import tokenize
from ..data.readers import read_text


def read_prompts(path: Union[str, Path], messages: bool = False) -> List[Union[str, list]]:
    """Prompts from a text file (one a line) or a JSONL file (a ``prompt`` string per record;
    with ``messages``, also a list of ``{role, content}`` messages, TRL's conversational form)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"prompts file {path} does not exist")
    lines = [line for line in read_text(path).splitlines() if line.strip()]
    if path.suffix != ".jsonl":
        return lines
    prompts = []
    for n, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: not JSON ({e.msg})") from None
        prompt = record.get("prompt") if isinstance(record, dict) else None
        if messages and isinstance(prompt, list):
            prompt = check_value(prompt, "prompt", f"{path}:{n}", as_messages=True)
        elif not isinstance(prompt, str):
            kind = "a 'prompt' string or message list" if messages else "a 'prompt' string"
            raise DataError(f"{path}:{n}: expected an object with {kind}")
        prompts.append(prompt)
    return prompts


def prompt_ids(prompt: Union[str, list], tokenizer, cfg: DPOConfig, where: str) -> List[int]:
    """The prompt's token ids as training encodes it: wrapped in the run's (``cfg``) ``prompt_template``
    (with special tokens), else through the chat template when the tokenizer has one, with the run's
    ``tools`` and ``chat_template_kwargs``."""
    if cfg.prompt_template:
        return tokenize.encode(tokenizer, cfg.prompt_template.replace("{prompt}", prompt), True)
    return tokenize.encode_prompt(prompt, tokenizer, where, cfg)[0]


def template_config(cfg: DPOConfig, tokenizer, **given) -> DPOConfig:
    """``cfg`` (a run's) with the ``chat_template`` / ``chat_template_kwargs`` in ``given`` that are
    set over it, the template applied to ``tokenizer``: how ``generate`` and ``sample`` render prompts."""
    given = {k: v for k, v in given.items() if v is not None}
    if given:
        cfg = replace(cfg, **given)  # validated again: a template file is read, a bad path refused
        use_chat_template(tokenizer, cfg)
    return cfg


def generate(run_dir: Union[str, Path], prompts: List[str], max_tokens: int = 64, temp: float = 0.0,
             seed: int = 0, batch_size: int = 16, trust_remote_code: bool = False,
             chat_template: Optional[str] = None, chat_template_kwargs: Optional[dict] = None) -> List[dict]:
    """``{prompt, policy: {text, tokens}, reference: {text, tokens}}`` for every prompt, each side
    generated as one batch (``batch_size`` sequences at a time); ``tokens`` counts the EOS
    that ended a completion, as mlx-lm's ``stream_generate`` does. ``trust_remote_code``: the command's own
    flag (:mod:`mlx_dpo.model.trained`). Prompts render as the run's training did (its
    ``chat_template``, ``chat_template_kwargs``, ``tools``), or with the ``chat_template`` /
    ``chat_template_kwargs`` given."""
    from mlx_lm.sample_utils import make_sampler

    if not prompts:
        raise ConfigError("no prompts given (pass --prompt TEXT or --prompts FILE)")
    if max_tokens < 1 or temp < 0:
        raise ConfigError(f"max_tokens must be >= 1 and temp >= 0; got {max_tokens} and {temp}")
    run = load_adapter_run(run_dir, trust_remote_code=trust_remote_code)
    cfg = template_config(run.cfg, run.tokenizer, chat_template=chat_template,
                          chat_template_kwargs=chat_template_kwargs)
    ids = [prompt_ids(p, run.tokenizer, cfg, f"prompt {n}") for n, p in enumerate(prompts)]
    results = [{"prompt": p} for p in prompts]
    for side, mode in (("policy", "policy"), ("reference", "base")):
        mx.random.seed(seed)
        with adapter_mode(run.model, mode):
            tokens, finished, _ = generate_samples(run.model, run.tokenizer, ids, 1, make_sampler(temp),
                                                   max_tokens, batch_size)
        for row, sample, done in zip(results, tokens, finished):
            row[side] = {"text": detokenize(run.tokenizer, sample[0]), "tokens": len(sample[0]) + int(done[0])}
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
