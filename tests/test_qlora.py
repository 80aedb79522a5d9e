"""QLoRA: 4/8-bit bases (quantized at load or already quantized), LoRA and DoRA on top."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_dpo.model.adapters import adapter_mode
from mlx_dpo.data.batching import collate
from mlx_dpo.config.fields import DPOConfig
from mlx_dpo.errors import ConfigError
from mlx_dpo.forward.logprobs import completion_logps
from mlx_dpo.model.loader import load_model
from mlx_dpo.model.quant import base_linear
from mlx_dpo.train.trainer import DPOTrainer


@pytest.mark.parametrize("bits", [4, 8])
def test_cpu_dequantized_matmul_equals_quantized_kernel(bits):
    linear = nn.Linear(128, 64)
    q = nn.QuantizedLinear.from_linear(linear, group_size=32, bits=bits)
    x = mx.random.normal((3, 5, 128))
    np.testing.assert_allclose(np.array(base_linear(q, x)), np.array(q(x)), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("adapter", ["lora", "dora"])
def test_qlora_trains_adapters_only_and_reference_is_the_quantized_base(adapter, llama_dir, toy_data_dir, tmp_path):
    quantize = {"bits": 4, "group_size": 32}
    cfg = DPOConfig(model=str(llama_dir), data=str(toy_data_dir), output_dir=str(tmp_path / "run"), quantize=quantize,
                    adapter=adapter, max_steps=4, batch_size=4, learning_rate=1e-2, eval_steps=0, progress_bar=False)
    trainer = DPOTrainer(cfg, log=lambda *a: None)
    wrapped = [m.linear for _, m in trainer.model.named_modules() if hasattr(m, "lora_a")]
    assert wrapped and all(isinstance(m, nn.QuantizedLinear) for m in wrapped)
    base, _, _ = load_model(DPOConfig(model=str(llama_dir), quantize=quantize))
    arrays = {k: mx.array(v) for k, v in collate(trainer.train_pairs[:4], [0, 1, 2, 3]).arrays().items()}
    expected = np.array(completion_logps(base, arrays)["token_logps"])
    frozen = {k: np.array(v) for k, v in tree_flatten(trainer.model.parameters())
              if not k.endswith(("lora_a", "lora_b", ".m"))}
    trainer.train()
    with adapter_mode(trainer.model, "base"):
        # the plain base runs MLX's quantized kernel, ours de-quantizes on the CPU: float rounding only
        np.testing.assert_allclose(np.array(completion_logps(trainer.model, arrays)["token_logps"]), expected,
                                   atol=2e-5, rtol=1e-5)
    for k, v in tree_flatten(trainer.model.parameters()):
        if k in frozen:
            assert np.array_equal(np.array(v), frozen[k]), k
    assert not np.allclose(np.array(completion_logps(trainer.model, arrays)["token_logps"]), expected)


def test_already_quantized_model_loads_and_trains(llama_dir, toy_data_dir, tmp_path):
    from mlx_lm import convert, load

    mlx_dir = tmp_path / "mlx-4bit"
    convert(str(llama_dir), mlx_path=str(mlx_dir), quantize=True, q_group_size=32, q_bits=4)
    cfg = DPOConfig(model=str(mlx_dir), data=str(toy_data_dir), output_dir=str(tmp_path / "run"), max_steps=2,
                    batch_size=4, eval_steps=0, progress_bar=False)
    losses = []

    class Losses:
        def on_step_end(self, state, metrics):
            losses.append(metrics["loss"])

    trainer = DPOTrainer(cfg, log=lambda *a: None, callbacks=[Losses()])
    assert any(isinstance(m, nn.QuantizedLinear) for _, m in trainer.model.named_modules())
    assert np.isfinite(trainer.train().history[-1]["loss"])
    assert losses[0] == pytest.approx(np.log(2), abs=1e-6) and losses[1] != losses[0]  # policy = reference at step 1
    # the reference (adapters off) is the 4-bit checkpoint as mlx-lm loads it; the policy has moved
    plain, _ = load(str(mlx_dir))
    arrays = {k: mx.array(v) for k, v in collate(trainer.train_pairs[:4], [0, 1, 2, 3]).arrays().items()}
    expected = np.array(completion_logps(plain, arrays)["token_logps"])
    with adapter_mode(trainer.model, "base"):
        np.testing.assert_allclose(np.array(completion_logps(trainer.model, arrays)["token_logps"]), expected,
                                   atol=2e-5, rtol=1e-5)
    moved = np.abs(np.array(completion_logps(trainer.model, arrays)["token_logps"]) - expected).max()
    assert moved > 1e-6  # 2 steps at the default learning rate: small, but the policy moved
    with pytest.raises(ConfigError, match="already quantized"):
        load_model(DPOConfig(model=str(mlx_dir), quantize={"bits": 4}))
