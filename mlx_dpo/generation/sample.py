"""On-policy preference pairs: K samples per prompt from the model itself, scored by a judge,
the best against the worst written as TRL preference pairs (iterative / online DPO, e.g.
Xu et al. 2023, arXiv:2312.16682; Yuan et al. 2024, arXiv:2401.10020).

For every prompt, ``K`` completions are sampled with mlx-lm's continuous-batching
``BatchGenerator`` (temperature / top-p from ``mlx_lm.sample_utils.make_sampler``, seeded
with ``mx.random.seed``), each is scored by a judge ``f(prompt, completion) -> float``
(higher is better), and ``chosen = argmax``, ``rejected = argmin`` (the first of equal
scores); a prompt whose best and worst scores are equal is a tie and is skipped.

The prompt is encoded exactly as training will encode the written pair (``data.tokenize``):
with a chat template, a string prompt becomes one user message and the pair is written in
TRL's conversational form (``prompt``: messages, ``chosen``/``rejected``: one assistant
message), so the pair trains on the text the completion was sampled after; without one,
plain strings (the prompt with the tokenizer's special tokens, e.g. BOS).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional, Tuple, Union

from ..config.fields import DPOConfig
from ..errors import ConfigError, DataError, RunError, SampleError
from ..data import tokenize
from .generate import generate_samples, template_config
from ..util.io import atomic_write_text, unwritable_ancestor
from .judges import Judge, make_judge, pick_pair, score

# The sampling options' defaults (the API's and the command line's).
DEFAULTS = {"num_samples": 4, "temperature": 1.0, "top_p": 1.0, "seed": 0, "max_tokens": 256, "batch_size": 32}


# --------------------------------------------------------------------------- prompts


def encode_prompt(prompt: Union[str, list], tokenizer, where: str,
                  cfg: Optional[DPOConfig] = None) -> Tuple[List[int], bool]:
    """``(token ids, chat)``: the prompt as training encodes it (:func:`data.tokenize.encode_prompt`)."""
    try:
        return tokenize.encode_prompt(prompt, tokenizer, where, cfg)
    except DataError as e:
        raise SampleError(str(e)) from None


# --------------------------------------------------------------------------- pairs


def check_options(num_samples: int, temperature: float, top_p: float, max_tokens: int, batch_size: int) -> None:
    if not isinstance(num_samples, int) or num_samples < 2:
        raise SampleError(f"num_samples must be an integer >= 2 (best against worst), got {num_samples!r}")
    if temperature < 0:
        raise SampleError(f"temperature must be >= 0 (0: greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise SampleError(f"top_p must be in (0, 1], got {top_p}")
    for name, value in (("max_tokens", max_tokens), ("batch_size", batch_size)):
        if not isinstance(value, int) or value < 1:
            raise SampleError(f"{name} must be an integer >= 1, got {value!r}")


def pair_record(prompt, chosen: str, rejected: str, scores: Tuple[float, float], chat: bool) -> dict:
    """A TRL preference record (conversational when ``chat``) with the judge's scores."""
    if chat:
        prompt = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        chosen, rejected = ({"role": "assistant", "content": t} for t in (chosen, rejected))
        chosen, rejected = [chosen], [rejected]
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "score_chosen": scores[0],
            "score_rejected": scores[1]}


def sample_pairs(model, tokenizer, prompts: List[Union[str, list]], judge: Union[str, Judge],
                 num_samples: int = DEFAULTS["num_samples"], temperature: float = DEFAULTS["temperature"],
                 top_p: float = DEFAULTS["top_p"], seed: int = DEFAULTS["seed"],
                 max_tokens: int = DEFAULTS["max_tokens"], batch_size: int = DEFAULTS["batch_size"],
                 progress: bool = False, cfg: Optional[DPOConfig] = None) -> Tuple[List[dict], dict]:
    """``(records, summary)``: ``num_samples`` completions of every prompt from ``model`` (adapters
    as they are switched), the judge's best against its worst as TRL pairs, ties skipped. Prompts
    render with ``cfg``'s ``tools`` and ``chat_template_kwargs`` (a run's: as it trained)."""
    import mlx.core as mx
    from mlx_lm.sample_utils import make_sampler
    from tqdm import tqdm

    check_options(num_samples, temperature, top_p, max_tokens, batch_size)
    judge = make_judge(judge)
    if not prompts:
        raise SampleError("no prompts given")
    encoded = [encode_prompt(p, tokenizer, f"prompt {i}", cfg) for i, p in enumerate(prompts)]
    mx.random.seed(seed)
    sampler = make_sampler(temperature, top_p=top_p if top_p < 1 else 0.0)
    with tqdm(total=len(prompts), unit="prompt", desc="sampling", disable=not progress) as bar:
        tokens, finished, stats = generate_samples(model, tokenizer, [ids for ids, _ in encoded], num_samples,
                                                   sampler, max_tokens, batch_size, lambda: bar.update(1))
    records, lengths = [], []
    for i, (prompt, (_, chat)) in enumerate(zip(prompts, encoded)):
        texts = [tokenizer.decode(t) for t in tokens[i]]
        scores = [score(judge, prompt, text, f"prompt {i}, sample {s}") for s, text in enumerate(texts)]
        pair = pick_pair(scores)
        if pair is not None and texts[pair[0]] != texts[pair[1]]:
            records.append(pair_record(prompt, texts[pair[0]], texts[pair[1]], (scores[pair[0]], scores[pair[1]]),
                                       chat))
            lengths.append((len(tokens[i][pair[0]]), len(tokens[i][pair[1]])))
    generated = sum(len(t) for row in tokens for t in row)
    summary = {
        "prompts": len(prompts), "samples": len(prompts) * num_samples, "pairs": len(records),
        "ties": len(prompts) - len(records), "cut_at_max_tokens": sum(not f for row in finished for f in row),
        "mean_chosen_tokens": sum(c for c, _ in lengths) / len(lengths) if lengths else None,
        "mean_rejected_tokens": sum(r for _, r in lengths) / len(lengths) if lengths else None,
        "generated_tokens": generated, "seconds": stats.wall_time,
        "tokens_per_sec": generated / stats.wall_time if stats.wall_time > 0 else 0.0,
        "peak_memory_gb": stats.peak_memory, "temperature": temperature, "seed": seed,
    }
    return records, summary


def load_sampler_model(model: Optional[str], adapter_path: Optional[str], trust_remote_code: bool = False,
                       **template) -> tuple:
    """``(model, tokenizer, cfg)``: ``model`` alone, or a run's adapters on its base (or on ``model``), and
    the config its prompts render with: the run's, with ``template`` (``chat_template``,
    ``chat_template_kwargs``) over it (:func:`.generate.template_config`). ``trust_remote_code``: the
    command's own flag (a run's config never sets it: :mod:`mlx_dpo.model.trained`)."""
    from ..model.loader import dequantize_for_inference, load_model
    from ..model.trained import load_adapter_run

    if adapter_path:
        run = load_adapter_run(adapter_path, model, trust_remote_code)
        return run.model, run.tokenizer, template_config(run.cfg, run.tokenizer, **template)
    if not model:
        raise SampleError("pass --model (a model to sample from) or --adapter-path (a training run)")
    cfg = template_config(DPOConfig(model=model, trust_remote_code=trust_remote_code), None, **template)
    loaded, tokenizer, _ = load_model(cfg)
    dequantize_for_inference(loaded)
    return loaded, tokenizer, cfg


def sample(prompts: Union[str, Path], output: Union[str, Path], judge: Union[str, Judge], model: Optional[str] = None,
           adapter_path: Optional[str] = None, overwrite: bool = False, trust_remote_code: bool = False,
           chat_template: Optional[str] = None, chat_template_kwargs: Optional[dict] = None, **options) -> dict:
    """Read ``prompts`` (:func:`generate.read_prompts`), :func:`sample_pairs` from ``model`` (with the
    adapters of the run ``adapter_path``) and write the pairs to ``output`` (JSONL, atomically;
    nothing is written when every prompt tied). Prompts render with the run's chat template options,
    or the ``chat_template`` / ``chat_template_kwargs`` given. Returns the summary, with ``output``."""
    from .generate import read_prompts

    output = Path(output)
    if output.exists() and not overwrite:
        raise SampleError(f"output {output} already exists; pass --overwrite to replace it")
    if output.is_dir():
        raise SampleError(f"output {output} is a directory; expected a .jsonl file path")
    blocked = unwritable_ancestor(output.parent)
    if blocked is not None:
        raise SampleError(f"output {output}: {blocked} is not a writable directory (checked before sampling)")
    unknown = sorted(set(options) - set(DEFAULTS) - {"progress"})
    if unknown:
        raise TypeError(f"sample() got unexpected options {unknown}")
    given = {**DEFAULTS, **options}
    check_options(given["num_samples"], given["temperature"], given["top_p"], given["max_tokens"], given["batch_size"])
    judge = make_judge(judge)  # before the (slow) model load
    try:
        texts = read_prompts(prompts, messages=True)
    except DataError as e:
        raise SampleError(str(e)) from None
    if not texts:
        raise SampleError(f"prompts file {prompts} holds no prompts")
    try:
        loaded, tokenizer, cfg = load_sampler_model(model, adapter_path, trust_remote_code, chat_template=chat_template,
                                                    chat_template_kwargs=chat_template_kwargs)
    except (RunError, ConfigError) as e:
        raise SampleError(str(e)) from None
    records, summary = sample_pairs(loaded, tokenizer, texts, judge, cfg=cfg, **options)
    if records:
        atomic_write_text(output, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return {**summary, "output": str(output) if records else None}


def format_summary(s: dict) -> str:
    """The summary as a few lines for the terminal."""
    lines = [f"{s['prompts']} prompts x {s['samples'] // s['prompts']} samples: {s['pairs']} pairs written, "
             f"{s['ties']} ties skipped (best score == worst score)"]
    if s["pairs"]:
        lines.append(f"mean length (tokens): chosen {s['mean_chosen_tokens']:.1f}, rejected "
                     f"{s['mean_rejected_tokens']:.1f}")
    elif s["temperature"] == 0:
        lines.append("every prompt tied: temperature 0 (greedy) gives the same completion K times; sample with "
                     "--temperature > 0")
    memory = f", peak memory {s['peak_memory_gb']:.2f} GB" if s["peak_memory_gb"] >= 0.01 else ""
    lines.append(f"{s['generated_tokens']} tokens in {s['seconds']:.1f} s ({s['tokens_per_sec']:.1f} tokens/s{memory}); "
                 f"{s['cut_at_max_tokens']} samples cut at max_tokens")
    lines.append(f"pairs: {s['output']}" if s.get("output") else "no pairs: no file written")
    return "\n".join(lines)
