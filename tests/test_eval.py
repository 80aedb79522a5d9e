"""When evaluation runs: TRL's eval_strategy (no / steps / epoch), then also at the last step."""

import json

import pytest

from mlx_dpo import DPOConfig, DPOTrainer
from mlx_dpo.errors import ConfigError


def run(model_dir, data_dir, tmp_path, **kw):
    values = dict(model=str(model_dir), data=str(data_dir), output_dir=str(tmp_path / "run"), batch_size=16,
                  logging_steps=1, progress_bar=False, max_eval_batches=1, cache_dir=str(tmp_path / "cache"))
    values.update(kw)
    lines = []
    DPOTrainer(DPOConfig(**values), log=lines.append).train()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in records if "eval_loss" in r], lines


def test_no_evaluation_unless_asked(llama_dir, toy_data_dir, tmp_path):
    """TRL's default: eval data alone does not make the run evaluate."""
    steps, lines = run(llama_dir, toy_data_dir, tmp_path, max_steps=4)
    assert steps == [] and not any(line.startswith("evaluation:") for line in lines)


def test_eval_steps_alone_means_steps(llama_dir, toy_data_dir, tmp_path):
    steps, lines = run(llama_dir, toy_data_dir, tmp_path, max_steps=5, eval_steps=2)
    assert steps == [2, 4, 5]  # every 2 steps, and the last
    assert sum(line.startswith("evaluation: 16 pairs in ") for line in lines) == 3  # max_eval_batches 1 x 16


def test_epoch_strategy(llama_dir, toy_data_dir, tmp_path):
    """256 training pairs in batches of 16 = 16 steps per epoch (conftest's toy data)."""
    steps, _ = run(llama_dir, toy_data_dir, tmp_path, max_steps=40, eval_strategy="epoch", logging_steps=10)
    assert steps == [16, 32, 40]


def test_eval_steps_with_strategy_no_is_an_error():
    with pytest.raises(ConfigError, match="eval_steps is 5 but eval_strategy is 'no'"):
        DPOConfig(eval_strategy="no", eval_steps=5)
    with pytest.raises(ConfigError, match="eval_strategy must be one of no, steps, epoch"):
        DPOConfig(eval_strategy="step")
