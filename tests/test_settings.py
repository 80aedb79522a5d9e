"""Settings that would be silently wrong are errors naming the key, or one clear warning."""

import pytest

from mlx_dpo import DPOConfig, DPOTrainer
from mlx_dpo.config.fields import resolve_config
from mlx_dpo.errors import ConfigError, DataError
from mlx_dpo.train.preflight import warn_unused_settings
from mlx_dpo.model.toy import write_jsonl


def cfg_for(model_dir, data_dir, tmp_path, **kw):
    values = dict(model=str(model_dir), data=str(data_dir), output_dir=str(tmp_path / "run"), max_steps=2,
                  batch_size=4, progress_bar=False, eval_steps=0, cache_dir=str(tmp_path / "cache"))
    values.update(kw)
    return DPOConfig(**values)


@pytest.mark.parametrize("values, message", [
    ({"beta": float("nan")}, "beta must be a finite number, got nan"),
    ({"learning_rate": float("inf")}, "learning_rate must be a finite number, got inf"),
    ({"max_steps": -5}, r"max_steps must be -1 \(train num_train_epochs\) or >= 1, got -5"),
    ({"max_steps": 0}, "max_steps must be -1"),
])
def test_values_that_pass_types_but_make_no_run(values, message):
    with pytest.raises(ConfigError, match=message):
        DPOConfig(**values)


def test_an_empty_yaml_file_is_an_error(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing here\n")
    with pytest.raises(ConfigError, match="empty.yaml: the file is empty"):
        resolve_config(path)


def test_num_layers_larger_than_the_model(llama_dir, toy_data_dir, tmp_path):
    with pytest.raises(ConfigError, match="num_layers is 99 but the model has 2 transformer blocks"):
        DPOTrainer(cfg_for(llama_dir, toy_data_dir, tmp_path, num_layers=99), log=lambda *a: None)


def test_eval_split_that_leaves_no_training_data(llama_dir, tmp_path):
    path = tmp_path / "two.jsonl"
    write_jsonl(path, [{"prompt": "a b", "chosen": " c", "rejected": " d"},
                       {"prompt": "e f", "chosen": " g", "rejected": " h"}])
    with pytest.raises(DataError, match="eval_split 0.9 of 2 records holds out 2, leaving no training data"):
        DPOTrainer(cfg_for(llama_dir, path, tmp_path, eval_split=0.9, batch_size=1), log=lambda *a: None)


def test_every_pair_dropped_names_the_length_settings(llama_dir, toy_data_dir, tmp_path):
    fix = "set max_prompt_length below it, or truncation_mode: keep_end"
    with pytest.raises(DataError, match=f"every prompt fills max_length .4.*{fix}"):
        DPOTrainer(cfg_for(llama_dir, toy_data_dir, tmp_path, max_length=4), log=lambda *a: None)
    with pytest.raises(ConfigError, match="max_prompt_length 8 has no effect with max_length 4"):
        DPOConfig(max_length=4, max_prompt_length=8)  # a prompt cut to 8 tokens still fills 4: refused at once


def test_warnings_for_settings_that_do_nothing(llama_dir, toy_data_dir, tmp_path):
    lines = []
    DPOTrainer(cfg_for(llama_dir, toy_data_dir / "train.jsonl", tmp_path, eval_steps=5, warmup_steps=2,
                       truncation_mode="keep_end"), log=lines.append)
    assert any("eval_strategy is 'steps' but there is no eval data" in line for line in lines)
    assert any("warmup (2 steps) is not shorter than the run (2 steps)" in line for line in lines)
    assert any("note: truncation_mode keep_end cuts the prompt's start" in line for line in lines)
    quiet = []
    warn_unused_settings(DPOConfig(), True, 10, 0, quiet.append)
    assert quiet == []


def test_settings_without_effect_are_errors(llama_dir, toy_data_dir, tmp_path):
    """An option the chosen loss or schedule ignores is refused, before anything loads."""
    for option, needs in (({"ref_model_mixup_alpha": 0.5}, "sync_ref_model: true"),
                          ({"ref_model_sync_steps": 64}, "sync_ref_model: true"),
                          ({"precompute_ref_batch_size": 8}, "precompute_ref_log_probs: true")):
        name = next(iter(option))
        with pytest.raises(ConfigError, match=f"{name}: .* has no effect without {needs}"):
            DPOConfig(**option)
    DPOConfig(sync_ref_model=True, ref_model_mixup_alpha=0.5, ref_model_sync_steps=64)  # where they act
    DPOConfig(precompute_ref_log_probs=True, precompute_ref_batch_size=8)
    with pytest.raises(ConfigError, match="warmup_steps/warmup_ratio have no effect with lr_scheduler_type 'constant'"):
        DPOConfig(lr_scheduler_type="constant", warmup_ratio=0.1)
    DPOConfig(lr_scheduler_type="constant_with_warmup", warmup_ratio=0.1)  # applies there
    with pytest.raises(ConfigError, match="reference: adapter has no effect: loss_type simpo is reference-free"):
        DPOTrainer(cfg_for(llama_dir, toy_data_dir, tmp_path, loss_type="simpo", reference="adapter",
                           ref_adapter_path=str(tmp_path / "never-read")), log=lambda *a: None)
    with pytest.raises(ConfigError, match="precompute_ref_log_probs has no effect: loss_type orpo is reference-free"):
        DPOTrainer(cfg_for(llama_dir, toy_data_dir, tmp_path, loss_type="orpo", precompute_ref_log_probs=True),
                   log=lambda *a: None)
    with pytest.raises(ConfigError, match="reference: adapter has no effect: reference_free is set"):
        DPOTrainer(cfg_for(llama_dir, toy_data_dir, tmp_path, reference_free=True, reference="adapter",
                           ref_adapter_path=str(tmp_path / "never-read")), log=lambda *a: None)


def test_resume_with_max_steps_below_the_checkpoint(llama_dir, toy_data_dir, tmp_path):
    DPOTrainer(cfg_for(llama_dir, toy_data_dir, tmp_path, max_steps=3, save_steps=2), log=lambda *a: None).train()
    cfg = cfg_for(llama_dir, toy_data_dir, tmp_path, max_steps=1, resume_from_checkpoint="latest")
    with pytest.raises(ConfigError, match="max_steps is 1 but the checkpoint .* is at step 3; set max_steps >= 3"):
        DPOTrainer(cfg, log=lambda *a: None)
