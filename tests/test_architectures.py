"""The architecture table gates prefix sharing, the plain-head fast path and the export hint."""

from types import SimpleNamespace

import pytest

from mlx_dpo.model import architectures
from mlx_dpo.model.architectures import Arch, has_feature, with_feature
from mlx_dpo.forward.logprobs import has_plain_head
from mlx_dpo.forward.prefix import supports_prefix_sharing


def fake_model(model_type):
    inner = SimpleNamespace(embed_tokens=None, norm=None, layers=[SimpleNamespace()])
    return SimpleNamespace(model_type=model_type, model=inner)


def test_known_and_unknown_architectures():
    assert with_feature("prefix_sharing") == ["llama", "qwen2", "mistral", "qwen3"]
    assert set(with_feature("plain_head")) == {"llama", "mistral", "qwen2", "qwen3", "phi3", "olmo2", "internlm3"}
    assert has_feature("phi3", "plain_head") and not has_feature("phi3", "prefix_sharing")
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
