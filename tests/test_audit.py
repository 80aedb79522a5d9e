"""mlx-dpo audit and generate on one tiny trained toy run: deliberately flipped pairs rank
first; the reference (adapters off) and policy (adapters on) generations match mlx-lm's."""

import json

import pytest
from click.testing import CliRunner

from mlx_dpo.audit import AuditError, audit, load_run
from mlx_dpo.cli import main
from mlx_dpo.config import DPOConfig
from mlx_dpo.toy import toy_pairs, write_jsonl
from mlx_dpo.trainer import DPOTrainer

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
    with pytest.raises(AuditError, match="does not exist"):
        load_run(tmp_path / "missing")
    with pytest.raises(AuditError, match="adapter_config.json is missing"):
        load_run(tmp_path)
    out = CliRunner().invoke(main, ["audit", str(run_dir), "--data", str(tmp_path / "nope.jsonl")])
    assert out.exit_code == 2 and "nope.jsonl" in out.output
