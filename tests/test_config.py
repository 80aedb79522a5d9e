"""Configuration: one dataclass, YAML < command line, aliases, errors that name the key."""

import pytest
from click.testing import CliRunner

from mlx_dpo.cli import main
from mlx_dpo.config import ConfigError, DPOConfig, resolve_config


@pytest.fixture
def captured_config(monkeypatch):
    """Replace the trainer so `mlx-dpo train` only records the resolved config."""
    seen = {}

    class FakeTrainer:
        def __init__(self, cfg):
            seen["cfg"] = cfg

        def train(self):
            raise SystemExit(0)

    monkeypatch.setattr("mlx_dpo.trainer.DPOTrainer", FakeTrainer)
    return seen


def test_yaml_then_overrides_then_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("beta: 0.3\nper_device_train_batch_size: 2\nloss_type: ipo\nquantize: {bits: 8}\n")
    cfg = resolve_config(path, beta="0.5")
    assert cfg.beta == 0.5 and cfg.batch_size == 2 and cfg.loss_type == "ipo"
    assert cfg.quantize == {"bits": 8, "group_size": 64}
    assert cfg.learning_rate == DPOConfig().learning_rate  # untouched default


@pytest.mark.parametrize("text, message", [
    ("learnig_rate: 1e-5\n", "unknown config key 'learnig_rate'; did you mean 'learning_rate'"),
    ("beta: abc\n", "beta must be a number"),
    ("max_steps: 1.5\n", "max_steps must be an integer"),
    ("loss_type: sigmoid\nloss_weights: [1, 2]\n", "loss_weights has 2 entries"),
    ("lr_scheduler_type: cosin\n", "lr_scheduler_type must be one of"),
    ("quantize: {bits: 3, group_size: 100}\n", "quantize"),
    ("reference: adapter\n", "ref_adapter_path"),
    ("beta: [1\n", "c.yaml:2: invalid YAML"),
])
def test_bad_yaml_names_the_problem(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        resolve_config(path)
    assert message in str(e.value)


def test_alias_given_twice_is_an_error():
    with pytest.raises(ConfigError, match="given twice"):
        DPOConfig.from_dict({"batch_size": 2, "per_device_train_batch_size": 4})


def test_cli_overrides_yaml_and_rejects_unknown_options(tmp_path, captured_config):
    path = tmp_path / "c.yaml"
    path.write_text("beta: 0.3\nmax_steps: 5\n")
    seen = captured_config
    runner = CliRunner()
    result = runner.invoke(main, ["train", "--config", str(path), "--beta", "0.2", "--per-device-train-batch-size",
                                  "3", "--no-progress-bar", "--loss-type", "[sigmoid, bco_pair]"])
    assert result.exit_code == 0, result.output
    cfg = seen["cfg"]
    assert (cfg.beta, cfg.max_steps, cfg.batch_size, cfg.progress_bar) == (0.2, 5, 3, False)
    assert cfg.loss_type == ["sigmoid", "bco_pair"]
    result = runner.invoke(main, ["train", "--bta", "0.2"])
    assert result.exit_code != 0 and "--beta" in result.output
    path.write_text("bta: 0.3\n")
    result = runner.invoke(main, ["train", "--config", str(path)])
    assert result.exit_code == 2 and "did you mean 'beta'" in result.output


def test_every_field_is_a_cli_option():
    from dataclasses import fields

    help_text = CliRunner().invoke(main, ["train", "--help"], terminal_width=200).output
    for f in fields(DPOConfig):
        assert f"--{f.name.replace('_', '-')}" in help_text, f.name


@pytest.mark.parametrize("values, message", [
    ({"ref_adapter_path": "/tmp/x"}, "ref_adapter_path is set but reference is 'base'"),
    ({"train_type": "full", "reference": "adapter", "ref_adapter_path": "/x"}, "train_type: full has no adapters"),
    ({"train_type": "full", "sync_ref_model": True}, "needs train_type: adapter"),
    ({"resume_from_checkpoint": "latest", "overwrite_output_dir": True}, "contradict"),
    ({"ref_model_sync_steps": 0}, "ref_model_sync_steps must be >= 1"),
    ({"eval_batch_size": 0}, "eval_batch_size must be >= 1"),
    ({"num_layers": 0}, "num_layers must be -1"),
    ({"max_prompt_length": 0}, "max_prompt_length must be >= 1"),
    ({"warmup_ratio": 1.5}, "warmup_ratio must be in"),
    ({"quantize": {"bits": 7}}, "bits must be one of 2, 3, 4, 5, 6, 8"),
])
def test_conflicting_or_out_of_range_options_are_errors(values, message):
    with pytest.raises(ConfigError, match=message):
        DPOConfig(**values)


def test_bool_aliases_work_on_the_command_line(captured_config):
    seen = captured_config
    result = CliRunner().invoke(main, ["train", "--grad-checkpoint"])
    assert result.exit_code == 0, result.output
    assert seen["cfg"].gradient_checkpointing is True


def test_epochs_with_more_accumulation_than_batches_still_count_epochs(llama_dir, toy_data_dir, tmp_path):
    from mlx_dpo.trainer import DPOTrainer

    cfg = DPOConfig(model=str(llama_dir), data=str(toy_data_dir), output_dir=str(tmp_path), batch_size=64,
                    gradient_accumulation_steps=16, num_train_epochs=3, progress_bar=False)
    trainer = DPOTrainer(cfg, log=lambda *a: None)
    assert len(trainer.sampler) < 16 and trainer.total_steps == 3
