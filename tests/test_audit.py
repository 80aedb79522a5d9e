"""mlx-dpo audit and generate on one tiny trained toy run: deliberately flipped pairs rank
first; the reference (adapters off) and policy (adapters on) generations match mlx-lm's."""

import json

import pytest
from click.testing import CliRunner

from mlx_dpo.analysis.audit import audit
from mlx_dpo.errors import DataError, RunError
from mlx_dpo.model.trained import load_adapter_run
from mlx_dpo.cli.commands import main
from mlx_dpo.config.fields import DPOConfig
from mlx_dpo.generation.generate import generate, read_prompts
from mlx_dpo.model.toy import toy_pairs, write_jsonl
from mlx_dpo.train.trainer import DPOTrainer

FLIPPED = [5, 17]


@pytest.fixture(scope="module")
def run_dir(llama_dir, tmp_path_factory):
    """16 steps on 32 toy pairs (the chosen reply repeats the prompt), two of them flipped."""
    tmp = tmp_path_factory.mktemp("audit")
    rows = toy_pairs(32)
    for i in FLIPPED:
        rows[i] = {**rows[i], "chosen": rows[i]["rejected"], "rejected": rows[i]["chosen"]}
    write_jsonl(tmp / "pairs.jsonl", rows)
    cfg = DPOConfig(model=str(llama_dir), data=str(tmp / "pairs.jsonl"), output_dir=str(tmp / "run"), max_steps=16,
                    batch_size=4, learning_rate=3e-3, logging_steps=8, progress_bar=False, seed=0)
    DPOTrainer(cfg).train()
    return tmp / "run"


def test_flipped_pairs_rank_first(run_dir, tmp_path):
    result = audit(run_dir, top=4, output=tmp_path / "worst.jsonl")
    assert sorted(r["index"] for r in result["worst"][:2]) == FLIPPED
    lines = [json.loads(line) for line in (tmp_path / "worst.jsonl").read_text().splitlines()]
    assert len(lines) == 4 and lines == result["worst"]
    assert [r["margin"] for r in lines] == sorted(r["margin"] for r in lines) and lines[0]["margin"] < 0
    assert set(lines[0]) == {"index", "where", "margin", "prompt", "chosen", "rejected"}
    assert result["pairs"] == 32 and result["negative"] >= 2


def test_audit_cli_and_errors(run_dir, tmp_path):
    out = CliRunner().invoke(main, ["audit", str(run_dir), "--top", "2", "-o", str(tmp_path / "a.jsonl")])
    assert out.exit_code == 0, out.output
    assert "32 pairs" in out.output and len((tmp_path / "a.jsonl").read_text().splitlines()) == 2
    with pytest.raises(RunError, match="does not exist"):
        load_adapter_run(tmp_path / "missing")
    with pytest.raises(RunError, match="adapter_config.json is missing"):
        load_adapter_run(tmp_path)
    out = CliRunner().invoke(main, ["audit", str(run_dir), "--data", str(tmp_path / "nope.jsonl")])
    assert out.exit_code == 2 and "nope.jsonl" in out.output


PROMPTS = ["Repeat: blue black mango banana. Answer:", "Repeat: red fox. Answer:"]


def mlx_lm_text(model_dir, prompt, adapter_path=None):
    from mlx_lm import generate as mlx_generate
    from mlx_lm import load
    from mlx_lm.sample_utils import make_sampler

    model, tokenizer = load(str(model_dir), adapter_path=str(adapter_path) if adapter_path else None)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    return mlx_generate(model, tokenizer, ids, max_tokens=8, sampler=make_sampler(0.0))


def test_generate_matches_mlx_lm_with_and_without_adapters(run_dir, llama_dir):
    """The prompts go through the tokenizer's chat template (as mlx_lm.generate's CLI does)."""
    results = generate(run_dir, PROMPTS, max_tokens=8)
    assert [r["prompt"] for r in results] == PROMPTS
    for r in results:
        assert r["reference"]["text"] == mlx_lm_text(llama_dir, r["prompt"])
        assert r["policy"]["text"] == mlx_lm_text(llama_dir, r["prompt"], run_dir)
        assert 0 < r["policy"]["tokens"] <= 8 and 0 < r["reference"]["tokens"] <= 8
    assert any(r["policy"]["text"] != r["reference"]["text"] for r in results)


def test_generate_cli_prompts_file_and_errors(run_dir, tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    out = CliRunner().invoke(main, ["generate", str(run_dir), "--prompts", str(path), "--max-tokens", "4", "--json"])
    assert out.exit_code == 0, out.output
    assert [r["prompt"] for r in json.loads(out.output)] == PROMPTS
    out = CliRunner().invoke(main, ["generate", str(run_dir), "--prompt", "Hi", "--max-tokens", "3"])
    assert out.exit_code == 0 and "policy" in out.output and "reference" in out.output
    for args, message in (([str(run_dir), "--prompts", str(tmp_path / "none.txt")], "none.txt"),
                          ([str(run_dir)], "no prompts"),
                          ([str(tmp_path), "--prompt", "x"], "adapter_config.json is missing")):
        out = CliRunner().invoke(main, ["generate", *args])
        assert out.exit_code == 2 and message in out.output, out.output
    (tmp_path / "bad.jsonl").write_text('{"text": "no prompt"}\n')
    with pytest.raises(DataError, match="bad.jsonl:1"):
        read_prompts(tmp_path / "bad.jsonl")


def test_generate_wraps_prompts_in_the_runs_prompt_template(run_dir, llama_dir, monkeypatch):
    """A run trained with ``prompt_template``: its text (with special tokens), not the chat template,
    as mlx-lm's generate encodes a plain string prompt."""
    import dataclasses

    from mlx_lm import generate as mlx_generate
    from mlx_lm import load
    from mlx_lm.sample_utils import make_sampler

    from mlx_dpo.generation import generate as generate_module

    run = load_adapter_run(run_dir)
    run.cfg = dataclasses.replace(run.cfg, prompt_template="Q: {prompt}\nA:")
    monkeypatch.setattr(generate_module, "load_adapter_run", lambda path, trust_remote_code=False: run)
    results = generate(run_dir, PROMPTS, max_tokens=8)
    model, tokenizer = load(str(llama_dir), adapter_path=str(run_dir))
    for r in results:
        text = f"Q: {r['prompt']}\nA:"
        assert r["policy"]["text"] == mlx_generate(model, tokenizer, text, max_tokens=8, sampler=make_sampler(0.0))


def test_an_unpaired_run_ranks_rows_rewarded_against_their_label_first(llama_dir, tmp_path):
    """A KTO run on thumbs-up/down rows (the toy pairs' chosen replies labeled true, the rejected
    false) with two labels flipped: those two rows are among the first four of 64, each with its
    reward and label (the reward signed by the label is negative: the model, trained on 62
    consistent rows, disagrees)."""
    rows = []
    for pair in toy_pairs(32):
        rows += [{"prompt": pair["prompt"], "completion": pair["chosen"], "label": True},
                 {"prompt": pair["prompt"], "completion": pair["rejected"], "label": False}]
    flipped = [6, 41]
    for i in flipped:
        rows[i]["label"] = not rows[i]["label"]
    write_jsonl(tmp_path / "rows.jsonl", rows)
    cfg = DPOConfig(model=str(llama_dir), data=str(tmp_path / "rows.jsonl"), output_dir=str(tmp_path / "run"),
                    loss_type="kto", max_steps=24, batch_size=4, learning_rate=3e-3, logging_steps=8,
                    progress_bar=False, seed=0)
    DPOTrainer(cfg).train()
    result = audit(tmp_path / "run", top=4, output=tmp_path / "worst.jsonl")
    worst = result["worst"]
    assert result["unpaired"] and result["pairs"] == 64
    assert set(flipped) <= {r["index"] for r in worst}  # both among the 4 of 64 rated most against their label
    assert set(worst[0]) == {"index", "where", "signed_reward", "reward", "label", "prompt", "completion"}
    for r in worst:
        assert r["signed_reward"] == (r["reward"] if r["label"] else -r["reward"])
    assert worst[0]["signed_reward"] < 0 and worst[0]["label"] == rows[worst[0]["index"]]["label"]
    out = CliRunner().invoke(main, ["audit", str(tmp_path / "run"), "--top", "2", "-o", str(tmp_path / "a.jsonl")])
    assert out.exit_code == 0 and "64 rows" in out.output and "against their label" in out.output, out.output
