"""The Python API as notebooks use it: evaluate before train, the mode after train, passed models."""

import json
import math

import mlx.core as mx
import numpy as np
import pytest

from mlx_dpo import DPOConfig, DPOTrainer
from mlx_dpo.errors import ConfigError
from mlx_dpo.model.loader import load_model

QUIET = dict(log=lambda *a: None)


def cfg_for(model_dir, data_dir, tmp_path, **kw):
    values = dict(model=str(model_dir), data=str(data_dir), output_dir=str(tmp_path / "run"), max_steps=3,
                  batch_size=4, learning_rate=3e-3, logging_steps=1, eval_steps=0, progress_bar=False, seed=0,
                  max_eval_batches=2, cache_dir=str(tmp_path / "cache"))
    values.update(kw)
    return DPOConfig(**values)


@pytest.mark.parametrize("precompute", [False, True])
def test_evaluate_before_train(llama_dir, toy_data_dir, tmp_path, precompute):
    """At initialisation the policy equals the reference (LoRA B = 0): every pair's DPO loss
    is ln 2 and every reward 0, with a live or a precomputed reference."""
    trainer = DPOTrainer(cfg_for(llama_dir, toy_data_dir, tmp_path, precompute_ref_log_probs=precompute), **QUIET)
    metrics = trainer.evaluate()
    assert metrics["eval_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert abs(metrics["eval_rewards/margins"]) < 1e-6
    assert ("eval" in trainer.ref_cache) == precompute
    trainer.train()  # and training still works after it
    assert trainer.step == 3


def test_the_model_is_back_in_eval_mode_after_training(llama_dir, toy_data_dir, tmp_path):
    """lora_dropout is on while training only: after train() two forwards agree exactly."""
    trainer = DPOTrainer(cfg_for(llama_dir, toy_data_dir, tmp_path, lora_dropout=0.5), **QUIET)
    assert trainer.model.training is False  # mlx-lm loads in eval mode
    trainer.train()
    assert trainer.model.training is False
    x = mx.array([[1, 5, 9, 13, 17]])
    a, b = trainer.model(x), trainer.model(x)
    assert np.array_equal(np.array(a), np.array(b))
    trainer.model.train()
    assert not np.array_equal(np.array(trainer.model(x)), np.array(trainer.model(x)))  # dropout is live in train


def test_a_passed_model_needs_a_tokenizer_or_tokenized_pairs(llama_dir, toy_data_dir, tmp_path):
    cfg = cfg_for(llama_dir, toy_data_dir, tmp_path)
    model, _, _ = load_model(cfg)
    with pytest.raises(ConfigError, match="needs tokenizer="):
        DPOTrainer(cfg, model=model, **QUIET)


def test_a_passed_model_is_quantized_and_cast_like_a_loaded_one(llama_dir, toy_data_dir, tmp_path):
    """model= goes through the same preparation as cfg.model: quantize, compute dtype, frozen base."""
    import mlx.nn as nn
    from mlx_lm.utils import load as mlx_load

    raw, tok = mlx_load(str(llama_dir))  # as a notebook would load it: float, not quantized
    cfg = cfg_for(llama_dir, toy_data_dir, tmp_path, quantize={"bits": 4, "group_size": 32})
    trainer = DPOTrainer(cfg, model=raw, tokenizer=tok, **QUIET)
    loaded = DPOTrainer(cfg_for(llama_dir, toy_data_dir, tmp_path / "b", quantize={"bits": 4, "group_size": 32}),
                        **QUIET)
    kinds = lambda t: sorted({type(m).__name__ for _, m in t.model.named_modules()})  # noqa: E731
    assert kinds(trainer) == kinds(loaded) and any(isinstance(m, nn.QuantizedLinear)
                                                   for _, m in trainer.model.named_modules())
    assert trainer.num_parameters == loaded.num_parameters
    # a model from load_model(cfg) passed back with the same cfg is not quantized twice
    model, tok2, _ = load_model(cfg)
    DPOTrainer(cfg_for(llama_dir, toy_data_dir, tmp_path / "c", quantize={"bits": 4, "group_size": 32}),
               model=model, tokenizer=tok2, **QUIET)
    with pytest.raises(ConfigError, match="already quantized"):
        DPOTrainer(cfg_for(llama_dir, toy_data_dir, tmp_path / "d", quantize={"bits": 8, "group_size": 64}),
                   model=model, tokenizer=tok2, **QUIET)


def test_a_passed_model_without_cfg_model_does_not_name_the_toy_base(llama_dir, toy_data_dir, tmp_path):
    from mlx_lm.utils import load as mlx_load

    raw, tok = mlx_load(str(llama_dir))
    lines = []
    cfg = DPOConfig(data=str(toy_data_dir), output_dir=str(tmp_path / "run"), max_steps=1, batch_size=4,
                    progress_bar=False, eval_steps=0, cache_dir=str(tmp_path / "cache"))
    trainer = DPOTrainer(cfg, model=raw, tokenizer=tok, log=lines.append)
    assert any("cannot name the base model" in line for line in lines)
    trainer.train()
    saved = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    assert saved["model"] is None and saved["base_model"] is None
    named = DPOTrainer(DPOConfig(model=str(llama_dir), data=str(toy_data_dir), output_dir=str(tmp_path / "n"),
                                 max_steps=1, batch_size=4, progress_bar=False, eval_steps=0),
                       model=mlx_load(str(llama_dir))[0], tokenizer=tok, **QUIET)
    assert named.adapter_config()["model"] == str(llama_dir)


def test_hub_models_come_through_huggingface_hub(llama_dir, monkeypatch):
    """A Hub id is fetched with huggingface_hub's public snapshot_download (mlx-lm's file patterns);
    a failure names the id and the way out."""
    import mlx_dpo.model.loader as model_mod
    from mlx_dpo.util import hubnet

    calls = []

    def fake(**kwargs):
        calls.append(kwargs)
        return str(llama_dir)

    monkeypatch.setattr(hubnet, "snapshot_download", fake)
    assert model_mod.resolve_model_path("org/tiny", revision="v1") == llama_dir
    assert calls == [{"repo_id": "org/tiny", "repo_type": "model", "revision": "v1",
                      "allow_patterns": model_mod.MODEL_FILES}]
    assert "model*.safetensors" in model_mod.MODEL_FILES and "*.jinja" in model_mod.MODEL_FILES

    def offline(**kwargs):
        raise OSError("offline mode is enabled")

    monkeypatch.setattr(hubnet, "snapshot_download", offline)
    with pytest.raises(ConfigError, match=r"model: 'org/tiny' is no local path, and fetching it .* offline mode"):
        model_mod.resolve_model_path("org/tiny")
