"""The adapters' own maths: ``fuse()`` and ``peft_tensors()`` against the un-merged layer."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_dpo.model.adapters import SwitchableDoRALinear, SwitchableLoRALinear
from mlx_dpo.model.quant import dense_weight

IN, OUT, RANK, SCALE = 64, 48, 4, 2.0


def adapter(cls, quantized: bool, bias: bool):
    """A switchable adapter on a random (optionally 4-bit) base whose ``B`` (and DoRA ``m``)
    are random, so the adapter changes the output."""
    mx.random.seed(0)
    base = nn.Linear(IN, OUT, bias=bias)
    if quantized:
        base = nn.QuantizedLinear.from_linear(base, group_size=32, bits=4)
    layer = cls.from_base(base, r=RANK, scale=SCALE)
    layer.lora_b = mx.random.normal(layer.lora_b.shape) * 0.1
    if cls is SwitchableDoRALinear:
        layer.m = layer.m * (1 + 0.3 * mx.random.uniform(shape=layer.m.shape))
    return layer


CASES = [(cls, q, b) for cls in (SwitchableLoRALinear, SwitchableDoRALinear) for q in (False, True) for b in (False, True)]


@pytest.mark.parametrize("cls,quantized,bias", CASES)
def test_fuse_equals_the_unmerged_layer(cls, quantized, bias):
    layer = adapter(cls, quantized, bias)
    x = mx.random.normal((3, 5, IN))
    fused = layer.fuse()
    assert type(fused) is nn.Linear and fused.weight.dtype == mx.float32 and ("bias" in fused) == bias
    assert fused.weight.shape == (OUT, IN)
    layer.mode = "policy"
    expected, got = np.array(layer(x)), np.array(fused(x))
    assert np.abs(expected - np.array(layer.linear(x))).max() > 1e-2  # the adapter matters
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cls", [SwitchableLoRALinear, SwitchableDoRALinear])
def test_peft_tensors_follow_the_peft_layout(cls):
    layer = adapter(cls, quantized=False, bias=False)
    tensors = layer.peft_tensors()
    dora = cls is SwitchableDoRALinear
    assert set(tensors) == {"lora_A.weight", "lora_B.weight"} | ({"lora_magnitude_vector"} if dora else set())
    a, b = np.array(tensors["lora_A.weight"]), np.array(tensors["lora_B.weight"])
    assert a.shape == (RANK, IN) and b.shape == (OUT, RANK)
    # PEFT's merge, W + scale * B @ A, is the un-normalised fused weight
    merged = np.array(dense_weight(layer.linear)) + SCALE * b @ a
    if dora:
        m = np.array(tensors["lora_magnitude_vector"])
        assert m.shape == (OUT,)
        merged = (m / np.linalg.norm(merged, axis=1))[:, None] * merged
    np.testing.assert_allclose(np.array(layer.fuse().weight), merged, atol=1e-5, rtol=1e-5)


# ---- lora_target_modules: mlx-lm keys, PEFT's suffix names, all-linear ----------------------

BLOCK = ["mlp.down_proj", "mlp.gate_proj", "mlp.up_proj", "self_attn.k_proj", "self_attn.o_proj",
         "self_attn.q_proj", "self_attn.v_proj"]


def test_target_modules_match_as_peft():
    """PEFT: a module matches a name equal to its key or ending in '.' + name; all-linear is all."""
    from mlx_dpo.model.adapters import resolve_target_modules
    from mlx_dpo.errors import ConfigError

    assert resolve_target_modules(["q_proj", "v_proj"], BLOCK) == ["self_attn.q_proj", "self_attn.v_proj"]
    assert resolve_target_modules(["self_attn.q_proj", "up_proj"], BLOCK) == ["mlp.up_proj", "self_attn.q_proj"]
    assert resolve_target_modules(["self_attn.q_proj", "self_attn.k_proj"], BLOCK) == ["self_attn.k_proj",
                                                                                       "self_attn.q_proj"]
    assert resolve_target_modules("all-linear", BLOCK) == BLOCK
    assert resolve_target_modules(["all-linear"], BLOCK) == BLOCK
    for bad in (["proj"], ["c_attn"], ["q_proj", "attn.q"]):  # 'proj' is no whole name part
        with pytest.raises(ConfigError, match="available"):
            resolve_target_modules(bad, BLOCK)


def test_resume_accepts_suffix_names_for_the_saved_keys():
    from mlx_dpo.train.checkpoint import config_differences
    from mlx_dpo.config.fields import DPOConfig

    saved = DPOConfig(lora_target_modules=["self_attn.q_proj", "self_attn.v_proj"]).to_dict()
    assert config_differences(saved, DPOConfig(lora_target_modules=["q_proj", "v_proj"]))[0] == []
    errors = config_differences(saved, DPOConfig(lora_target_modules=["q_proj"]))[0]
    assert any("lora_target_modules" in e for e in errors)
