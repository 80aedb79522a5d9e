"""mlx-dpo lint: each planted problem is found with its exact count; clean data reports
nothing and exits 0; data with no usable pair exits 1."""

import json

import pytest
from click.testing import CliRunner

from mlx_dpo.cli.commands import main
from mlx_dpo.config.fields import DPOConfig
from mlx_dpo.analysis.lint import length_bias, lint, load_tokenizer
from mlx_dpo.model.toy import toy_pairs, write_jsonl

LONG = "Repeat: the cat sat on the mat. Answer:"  # 21 tokens: 11 left at max_length 32
SAME = " one two three four five six seven eight nine ten eleven twelve"


def planted() -> list:
    rows = toy_pairs(10)
    rows += [dict(rows[0]), dict(rows[1])]  # 2 duplicates
    rows += [{"prompt": "Say hi.", "chosen": "  ", "rejected": " hi."},  # 2 empty
             {"prompt": "Say hi.", "chosen": " hi.", "rejected": ""}]
    rows += [{"prompt": "Say yes.", "chosen": " yes.", "rejected": " yes."}]  # identical
    rows += [{"prompt": LONG, "chosen": SAME + " cat.", "rejected": SAME + " dog."}]  # identical after truncation
    rows += [{"prompt": LONG, "chosen": " the cat sat on the mat and" * 3, "rejected": " no."}]  # truncated
    rows += [{"prompt": LONG * 4, "chosen": " cat.", "rejected": " dog."}]  # dropped: prompt fills max_length
    rows += [{"prompt": "Repeat: red fox.", "chosen": " Repeat: red fox. red fox.", "rejected": " owl."}]  # echo
    rows += [{"prompt": "Name a colour. Answer: ", "chosen": "blue.", "rejected": "seven."}]  # boundary
    return rows


@pytest.fixture(scope="module")
def tokenizer(llama_dir):
    return load_tokenizer(DPOConfig(model=str(llama_dir)))


def run_lint(tmp_path, rows, tokenizer, **kw):
    path = tmp_path / "pairs.jsonl"
    write_jsonl(path, rows)
    return lint(DPOConfig(data=str(path), **kw), tokenizer)


def test_each_planted_problem_is_counted(tmp_path, tokenizer):
    result = run_lint(tmp_path, planted(), tokenizer, max_length=32)
    counts = {name: c["count"] for name, c in result["checks"].items() if "count" in c}
    assert counts == {"empty": 2, "duplicates": 2, "identical": 2, "prompt_echo": 1, "truncation": 2, "boundary": 1,
                      "split": 0}
    trunc = result["checks"]["truncation"]
    assert trunc["dropped"] == 1
    prompt = len(tokenizer.encode(LONG))
    lost = 0
    for text in (SAME + " cat.", SAME + " dog.", " the cat sat on the mat and" * 3, " no."):
        n = len(tokenizer.encode(LONG + text)) - prompt + 1  # + EOS
        lost += max(0, n - (32 - prompt))
    assert trunc["tokens_lost"] == lost
    assert result["pairs"] == len(planted()) and result["usable"] == len(planted()) - 2 - 2 - 1
    first = result["checks"]["duplicates"]["examples"][0]
    assert "pairs.jsonl:11" in first and first.endswith("same as " + first.replace(":11", ":1").split(":")[0] + ":1")
    assert not result["fatal"] and len(result["problems"]) == 6


def test_clean_data_reports_nothing(tmp_path, tokenizer):
    result = run_lint(tmp_path, toy_pairs(12), tokenizer)
    assert result["problems"] == [] and not result["fatal"]
    assert all(c["count"] == 0 for c in result["checks"].values() if "count" in c)


def test_length_bias():
    assert length_bias([(10, 5)] * 8 + [(5, 10)] * 2) == {"mean_ratio": 1.5, "chosen_longer": 0.8, "biased": True}
    assert length_bias([(5, 5), (6, 4), (4, 6)])["biased"] is False
    assert length_bias([(2, 9)] * 3)["biased"] is True  # DPO would learn to write shorter


def test_cli_text_json_and_exit_codes(tmp_path, llama_dir):
    clean, bad = tmp_path / "clean.jsonl", tmp_path / "bad.jsonl"
    write_jsonl(clean, [{**p, "chosen": p["chosen"] + " and more words here."} for p in toy_pairs(6)])
    write_jsonl(bad, [{"prompt": "Say yes.", "chosen": " yes.", "rejected": " yes."}] * 3)
    out = CliRunner().invoke(main, ["lint", "--data", str(clean), "--model", str(llama_dir)])
    assert out.exit_code == 1, out.output  # a problem found: exit 1, as linters do
    assert "6 pairs, 6 usable" in out.output and "DPO will learn to write longer" in out.output
    out = CliRunner().invoke(main, ["lint", "--data", str(clean), "--model", str(llama_dir), "--exit-zero"])
    assert out.exit_code == 0 and "DPO will learn to write longer" in out.output, out.output
    out = CliRunner().invoke(main, ["lint", "--data", str(bad), "--json", "--model", str(llama_dir), "--exit-zero"])
    assert out.exit_code == 1  # no usable pair: 1 even with --exit-zero
    result = json.loads(out.output)
    assert result["fatal"] and result["checks"]["identical"]["count"] == 3 and result["checks"]["duplicates"]["count"] == 2
    out = CliRunner().invoke(main, ["lint", "--data", str(tmp_path / "missing.jsonl")])
    assert out.exit_code == 2 and "missing.jsonl" in out.output


def test_problems_name_the_biased_side_and_the_limits_that_cut(tmp_path, llama_dir):
    """Chosen shorter in 5 of 6 pairs: "the shorter one in 83%"; truncation names max_completion_length."""
    path = tmp_path / "short.jsonl"
    rows = [{**p, "rejected": p["chosen"] + " and more words here."} for p in toy_pairs(6)]
    rows[0] = {**rows[0], "chosen": rows[0]["rejected"] + " yes", "rejected": rows[0]["chosen"]}
    write_jsonl(path, rows)
    out = CliRunner().invoke(main, ["lint", "--data", str(path), "--model", str(llama_dir)])
    assert "the chosen completion is the shorter one in 83% of pairs" in out.output, out.output
    out = CliRunner().invoke(main, ["lint", "--data", str(path), "--model", str(llama_dir),
                                    "--max-completion-length", "3"])
    assert "completion tokens at max_length 1024, max_completion_length 3;" in out.output, out.output
