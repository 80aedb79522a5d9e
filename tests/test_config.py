"""Configuration: one dataclass, YAML < command line, aliases, errors that name the key."""

import pytest
from click.testing import CliRunner

from mlx_dpo.cli.commands import main
from mlx_dpo.config.fields import DPOConfig, resolve_config
from mlx_dpo.errors import ConfigError


@pytest.fixture
def captured_config(monkeypatch):
    """Replace the trainer so `mlx-dpo train` only records the resolved config."""
    seen = {}

    class FakeTrainer:
        def __init__(self, cfg):
            seen["cfg"] = cfg

        def train(self):
            raise SystemExit(0)

    monkeypatch.setattr("mlx_dpo.train.trainer.DPOTrainer", FakeTrainer)
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
    from mlx_dpo.train.trainer import DPOTrainer

    cfg = DPOConfig(model=str(llama_dir), data=str(toy_data_dir), output_dir=str(tmp_path), batch_size=64,
                    gradient_accumulation_steps=16, num_train_epochs=3, progress_bar=False)
    trainer = DPOTrainer(cfg, log=lambda *a: None)
    assert len(trainer.sampler) < 16 and trainer.total_steps == 3


def test_every_option_has_help_and_the_cli_shows_it():
    from dataclasses import fields

    from mlx_dpo.config.fields import ROLES

    help_text = " ".join(CliRunner().invoke(main, ["train", "--help"], terminal_width=200).output.split())
    for f in fields(DPOConfig):
        assert f.metadata["role"] in ROLES, f.name
        words = f.metadata["help"].split()
        assert len(words) >= 3, f"{f.name} has no help text"
        assert " ".join(words[:4]) in help_text, f.name
    assert "(config:" not in help_text


def test_key_lists_by_role():
    """Spot checks of what each role implies (the lists used on resume, by caches and cards)."""
    from mlx_dpo.config.fields import config_keys

    match, note, free = (set(config_keys(k)) for k in ("resume_match", "resume_note", "resume_free"))
    assert not (match & note or match & free or note & free)
    assert {"model", "lora_rank", "beta", "loss_type", "max_length", "batch_size", "seed"} <= match
    assert {"learning_rate", "compute_dtype", "gradient_checkpointing"} <= note
    assert {"output_dir", "max_steps", "logging_steps", "cache_dir"} <= free
    assert {"max_prompt_length", "columns", "seed"} <= set(config_keys("data_cache"))
    assert "beta" not in config_keys("ref_cache") and "beta" not in config_keys("data_cache")
    assert {"quantize", "compute_dtype", "ld_alpha", "prefix_sharing"} <= set(config_keys("ref_cache"))


@pytest.mark.parametrize("key", ["max_prompt_length", "truncation_mode", "prompt_template", "columns", "seed",
                                 "max_completion_length", "eval_split"])
def test_every_data_option_changes_the_tokenized_cache_key(key, tmp_path):
    """A data option left out of the cache key would serve stale tokens."""
    from mlx_dpo import data
    from mlx_dpo.model.toy import write_jsonl

    path = tmp_path / "d.jsonl"
    write_jsonl(path, [{"prompt": "p", "chosen": "a", "rejected": "b"}])
    plan = {"train": ([path], "train"), "eval": None}

    class Tok:
        chat_template, eos_token_id, bos_token_id = None, 2, 1

        def get_vocab(self):
            return {"a": 0}

    changed = {"max_prompt_length": 7, "truncation_mode": "keep_end", "prompt_template": "Q: {prompt}",
               "columns": {"prompt": "q"}, "seed": 1, "max_completion_length": 3, "eval_split": 0.5}[key]
    a = data.data_cache_key(plan, DPOConfig(), Tok())
    b = data.data_cache_key(plan, DPOConfig(**{key: changed}), Tok())
    assert a != b


def test_padding_free_against_prefix_sharing_false_is_refused_when_the_config_builds():
    """A DPOConfig that builds is never refused later: the layout contradiction is a config error."""
    with pytest.raises(ConfigError, match="cannot be combined with prefix_sharing: false"):
        DPOConfig(prefix_sharing=False, padding_free=True)
    assert DPOConfig(prefix_sharing=False).padding_free == "auto"  # auto then keeps the unshared layout
