"""The architecture table gates prefix sharing, the plain-head fast path and the export hint."""

from types import SimpleNamespace

import pytest

from mlx_dpo.model import architectures
from mlx_dpo.model.architectures import Arch, has_feature, with_feature
from mlx_dpo.forward.logprobs import has_plain_head
from mlx_dpo.forward.prefix import supports_prefix_sharing
from helpers import tiny_mlx_lm


def fake_model(model_type):
    inner = SimpleNamespace(embed_tokens=None, norm=None, layers=[SimpleNamespace()])
    return SimpleNamespace(model_type=model_type, model=inner)


def test_known_and_unknown_architectures():
    assert with_feature("prefix_sharing") == ["llama", "qwen2", "mistral", "qwen3", "phi3", "gemma3_text", "gemma2"]
    assert with_feature("cpu_math") == ["llama", "qwen2", "mistral", "qwen3", "phi3", "gemma3_text"]
    assert [has_feature(a, "mlp") for a in ("llama", "phi3", "gemma3_text", "gemma2", "olmo2")] == \
        ["swiglu", "fused_swiglu", "geglu", "geglu", ""]
    assert set(with_feature("plain_head")) == {"llama", "mistral", "qwen2", "qwen3", "phi3", "gemma3_text", "gemma2",
                                               "olmo2", "internlm3"}
    assert has_feature("olmo2", "plain_head") and not has_feature("olmo2", "prefix_sharing")
    assert not has_feature("gpt2", "plain_head") and not has_feature(None, "hf_names")
    with pytest.raises(ValueError, match="prefix_sharing"):
        has_feature("llama", "flash")


def test_one_entry_adds_an_architecture(monkeypatch):
    assert not supports_prefix_sharing(fake_model("newarch")) and not has_plain_head(fake_model("newarch"))
    monkeypatch.setitem(architectures.ARCHITECTURES, "newarch", Arch(prefix_sharing=True, plain_head=True))
    assert supports_prefix_sharing(fake_model("newarch")) and has_plain_head(fake_model("newarch"))
    sliding = fake_model("newarch")
    sliding.model.layers[0].use_sliding = True
    assert not supports_prefix_sharing(sliding)


@pytest.mark.parametrize("model_type", ["gemma3_text", "gemma2", "phi3"])
def test_plain_head_log_probs_equal_the_models_own_logits(model_type):
    """The plain-head path (only the scoring positions meet the head, in chunks) gives the
    log-probs of mlx-lm's own forward pass, taken in float64 (log-softmax of its full logits)."""
    import mlx.core as mx
    import numpy as np

    from mlx_dpo.forward.logprobs import completion_logps

    model = tiny_mlx_lm(model_type)
    assert has_plain_head(model)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 101, (2, 12)).astype(np.int32)
    positions = np.tile(np.arange(5, 11, dtype=np.int32), (2, 1))  # the last 6 tokens, scored
    targets = np.take_along_axis(tokens, positions + 1, axis=1)
    mask = np.ones_like(targets, np.float32)
    batch = {"tokens": mx.array(tokens), "positions": mx.array(positions), "targets": mx.array(targets),
             "mask": mx.array(mask)}
    ours = np.array(completion_logps(model, batch, chunked=True)["token_logps"])
    logits = np.array(model(mx.array(tokens))).astype(np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    expected = np.take_along_axis(np.take_along_axis(logp, positions[..., None], axis=1), targets[..., None],
                                  axis=2)[..., 0]
    assert np.abs(expected).max() > 1.0
    np.testing.assert_allclose(ours, expected, atol=1e-5, rtol=0)
