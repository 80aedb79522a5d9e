"""Every shipped data format trains end to end through `mlx-dpo train`; bad data writes nothing."""

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from mlx_dpo.cli.commands import main

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "data"


@pytest.mark.parametrize("name, extra", [
    ("standard.jsonl", []),
    ("conversational.jsonl", []),
    ("implicit.jsonl", []),
    ("implicit_conversational.jsonl", []),
    ("stackexchange.jsonl", ["--columns", "{prompt: question, chosen: response_j, rejected: response_k}",
                             "--prompt-template", "Question: {prompt}\n\nAnswer: "]),
])
def test_example_format_trains_from_the_cli(name, extra, llama_dir, tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["train", "--model", str(llama_dir), "--data", str(EXAMPLES / name),
                                       "--eval-split", "0.25", "--output-dir", str(out), "--max-steps", "2",
                                       "--batch-size", "2", "--eval-steps", "2", "--no-progress-bar", *extra])
    assert result.exit_code == 0, result.output
    # each example file holds 12 pairs: eval_split 0.25 holds out 3, all usable
    assert "train: 9 pairs (0 truncated" in result.output and "eval: 3 pairs" in result.output
    assert "training: 2 steps, 9 pairs" in result.output
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["step"] == 2 and "eval_loss" in record


def test_bad_data_fails_before_writing_anything(llama_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": 3, "rejected": "c"}\n')
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["train", "--model", str(llama_dir), "--data", str(bad),
                                       "--output-dir", str(out), "--max-steps", "2", "--no-progress-bar"])
    assert result.exit_code == 2
    assert "bad.jsonl:2" in result.output and "chosen" in result.output
    assert not out.exists()


@pytest.mark.parametrize("name, option, message", [
    ("standard.jsonl", ["--system-prompt", "Be brief."], "system_prompt applies to conversational data"),
    ("conversational.jsonl", ["--prompt-template", "Q: {prompt}"], "prompt_template applies to plain-string data"),
])
def test_options_the_data_cannot_use_are_errors(name, option, message, llama_dir, tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["train", "--model", str(llama_dir), "--data", str(EXAMPLES / name),
                                       "--output-dir", str(out), "--max-steps", "1", "--batch-size", "2",
                                       "--no-progress-bar", *option])
    assert result.exit_code == 2 and message in result.output
    assert not out.exists()
