"""generate_during_eval (TRL's name): at each evaluation the training model's greedy completions of
fixed eval prompts, the reference's once; checked against a greedy decode written here, on the run's
saved adapters loaded afresh."""

import html
import json

import mlx.core as mx
import pytest

from mlx_dpo import DPOConfig, DPOTrainer
from mlx_dpo.analysis.report import report
from mlx_dpo.errors import ConfigError, TrainingInterrupted
from mlx_dpo.model.adapters import adapter_mode
from mlx_dpo.model.trained import load_adapter_run
from helpers import interrupt_in_step

PROMPTS, TOKENS = 3, 10


def _without_timing(text: bytes) -> list:
    timing = ("tokens_per_second", "peak_memory_gb", "compile_seconds", "train_runtime")
    return [{k: v for k, v in json.loads(line).items() if k not in timing and not k.startswith("time/")}
            for line in text.decode().splitlines()]


def greedy(model, tokenizer, ids, max_tokens):
    """Greedy decoding without a cache: the whole sequence through the model for every token."""
    out = []
    for _ in range(max_tokens):
        token = int(mx.argmax(model(mx.array([ids + out]))[0, -1]).item())
        if token in tokenizer.eos_token_ids:
            break
        out.append(token)
    return out


def test_completions_of_policy_and_reference_at_each_evaluation(llama_dir, toy_data_dir, tmp_path):
    out, lines = tmp_path / "run", []
    cfg = DPOConfig(model=str(llama_dir), data=str(toy_data_dir), output_dir=str(out), max_steps=8, batch_size=8,
                    learning_rate=1e-2, logging_steps=4, eval_steps=4, max_eval_batches=1, progress_bar=False,
                    seed=0, generate_during_eval=True, generate_eval_prompts=PROMPTS, generate_max_new_tokens=TOKENS)
    trainer = DPOTrainer(cfg, log=lines.append)
    prompts = []
    for pair in trainer.eval_pairs:  # the first distinct eval prompts
        if list(pair.prompt) not in prompts:
            prompts.append(list(pair.prompt))
    prompts = prompts[:PROMPTS]
    trainer.train()
    rows = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    assert [(r["step"], r["model"]) for r in rows] == [(4, "reference")] * 3 + [(4, "policy")] * 3 + [(8, "policy")] * 3
    assert sum(line.startswith("completions: 3 prompts x reference and policy, ") for line in lines) == 1
    assert sum(line.startswith("completions: 3 prompts x policy, ") for line in lines) == 1

    run = load_adapter_run(out)  # the saved adapters on a fresh copy of the base
    tok = run.tokenizer
    assert [r["prompt"] for r in rows[:3]] == [tok.decode(p, skip_special_tokens=True) for p in prompts]
    with adapter_mode(run.model, "base"):
        reference = [tok.decode(greedy(run.model, tok, p, TOKENS)) for p in prompts]
    policy = [tok.decode(greedy(run.model, tok, p, TOKENS)) for p in prompts]
    # (mlx-lm's streaming detokenizer drops the leading space of the first generated word)
    assert [r["completion"] for r in rows[:3]] == [t.lstrip() for t in reference]
    assert [r["completion"] for r in rows[6:]] == [t.lstrip() for t in policy]
    assert policy != reference  # training moved the policy

    # generating changed nothing in training: a run without it ends with the same adapters and metrics
    plain = DPOTrainer(DPOConfig(**{**cfg.to_dict(), "output_dir": str(tmp_path / "plain"),
                                    "generate_during_eval": False, "generate_eval_prompts": 4,
                                    "generate_max_new_tokens": 64}), log=lambda *a: None)
    plain.train()
    for name in ("adapters.safetensors", "metrics.jsonl"):
        a, b = (out / name).read_bytes(), (tmp_path / "plain" / name).read_bytes()
        assert a == b or name == "metrics.jsonl" and _without_timing(a) == _without_timing(b), name

    with open(report([out])[0], newline="") as f:  # the random model's completions hold \r
        page = f.read()
    assert "<h2>Completions: run</h2>" in page and "<th>reference (step 4)</th><th>policy (step 4)</th>" in page
    assert all(f"<td>{html.escape(r['completion'])}</td>" in page for r in rows)


def test_a_resumed_run_writes_the_completions_of_an_uninterrupted_one(llama_dir, toy_data_dir, tmp_path):
    """Resumed from before an evaluation, the completions written after that checkpoint are dropped
    and made again (the reference's too: none is left), as the uninterrupted run wrote them."""
    def cfg(out, **kw):
        values = dict(model=str(llama_dir), data=str(toy_data_dir), output_dir=str(out), max_steps=6, batch_size=8,
                      learning_rate=1e-2, lr_scheduler_type="constant", logging_steps=3, eval_steps=3,
                      max_eval_batches=1, save_steps=2, progress_bar=False, seed=0, generate_during_eval=True,
                      generate_eval_prompts=2, generate_max_new_tokens=6)
        return DPOConfig(**{**values, **kw})

    DPOTrainer(cfg(tmp_path / "a"), log=lambda *a: None).train()
    first = DPOTrainer(cfg(tmp_path / "b"), log=lambda *a: None)
    interrupt_in_step(first, 4)  # completions at step 3 are written, then step-4 saved
    with pytest.raises(TrainingInterrupted):
        first.train()
    assert '"step": 3' in (tmp_path / "b" / "completions.jsonl").read_text()
    resumed = DPOTrainer(cfg(tmp_path / "b", resume_from_checkpoint=str(tmp_path / "b" / "checkpoints" / "step-2")),
                         log=lambda *a: None)
    resumed.train()
    a, b = ((tmp_path / d / "completions.jsonl").read_text() for d in "ab")
    assert a == b and a.count('"model": "reference"') == 2


@pytest.mark.parametrize("kw, match", [
    (dict(generate_during_eval=True), "generate_during_eval.*no effect without evaluation"),
    (dict(eval_steps=5, generate_eval_prompts=2), "generate_eval_prompts.*generate_during_eval: true"),
    (dict(eval_steps=5, generate_during_eval=True, generate_max_new_tokens=0), "generate_max_new_tokens must be >= 1"),
])
def test_generation_settings_that_cannot_act_are_refused(kw, match):
    with pytest.raises(ConfigError, match=match):
        DPOConfig(**kw)
