"""Shared fixtures: tiny random-weight models and preference data built locally (no network)."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    """Keep tokenized-data and toy-model caches out of the user's home."""
    path = tmp_path_factory.mktemp("mlx_dpo_cache")
    old = os.environ.get("MLX_DPO_CACHE")
    os.environ["MLX_DPO_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("MLX_DPO_CACHE", None)
    else:
        os.environ["MLX_DPO_CACHE"] = old


def _build(tmp_path_factory, name, **kwargs):
    from mlx_dpo.model.toy import build_toy_model

    return build_toy_model(tmp_path_factory.mktemp(name) / "model", **kwargs)


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory):
    """Llama-shaped model, byte-level BPE tokenizer (tokenizer.json)."""
    return _build(tmp_path_factory, "llama", arch="llama")


@pytest.fixture(scope="session")
def qwen2_dir(tmp_path_factory):
    """Qwen2-shaped model (q/k/v biases, tied embeddings), BPE tokenizer."""
    return _build(tmp_path_factory, "qwen2", arch="qwen2")


@pytest.fixture(scope="session")
def llama_sp_dir(tmp_path_factory):
    """Llama-shaped model with a SentencePiece tokenizer.model."""
    return _build(tmp_path_factory, "llama_sp", arch="llama", tokenizer="sentencepiece")


@pytest.fixture(scope="session")
def toy_data_dir(tmp_path_factory):
    from mlx_dpo.model.toy import build_toy_dataset

    return build_toy_dataset(tmp_path_factory.mktemp("data") / "toy", n_train=256, n_valid=32)
