"""Training in a 16-bit compute dtype (a Mac's bfloat16 checkpoint) moves the weights as
float32 does: the trained weights are float32 master weights, the rest stays 16-bit."""

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_dpo import DPOConfig, DPOTrainer
from mlx_dpo.data import TokenizedPair
from mlx_dpo.model.loader import load_model, setup_trainable
from mlx_dpo.model.toy import build_toy_model

QUIET = dict(log=lambda *a: None)


@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory):
    """A bfloat16 checkpoint (as most Hub models are): float32 loads it exactly, so the
    float32 and bfloat16 runs start from the same weights."""
    return build_toy_model(tmp_path_factory.mktemp("bf16") / "model", arch="llama", dtype="bfloat16")


def random_pairs(n, vocab=200, seed=0):
    rng = np.random.default_rng(seed)
    draw = lambda lo, hi: [int(t) for t in rng.integers(4, vocab, rng.integers(lo, hi))]  # noqa: E731
    return [TokenizedPair([1] + draw(2, 9), draw(1, 7) + [2], draw(1, 7) + [2]) for _ in range(n)]


def cfg_for(model_dir, tmp_path, dtype, **kw):
    values = dict(model=str(model_dir), output_dir=str(tmp_path / f"run-{dtype}"), max_steps=3, batch_size=4,
                  logging_steps=1, eval_steps=0, progress_bar=False, seed=0, compute_dtype=dtype, num_layers=1)
    values.update(kw)
    return DPOConfig(**values)


def weight_deltas(model_dir, tmp_path, dtype, **kw):
    """Trained tensors' changes after 3 steps, and their dtypes before training."""
    cfg = cfg_for(model_dir, tmp_path, dtype, **kw)
    trainer = DPOTrainer(cfg, train_pairs=random_pairs(16), **QUIET)
    before = {k: np.array(v.astype(mx.float32)) for k, v in tree_flatten(trainer.model.trainable_parameters())}
    dtypes = {str(v.dtype) for _, v in tree_flatten(trainer.model.trainable_parameters())}
    trainer.train()
    after = {k: np.array(v.astype(mx.float32)) for k, v in tree_flatten(trainer.model.trainable_parameters())}
    return {k: (after[k] - before[k]).ravel() for k in before}, dtypes


@pytest.mark.parametrize("train_type, adapter, lr", [("full", "lora", 1e-6), ("adapter", "lora", 1e-4),
                                                     ("adapter", "dora", 1e-4)])
def test_bfloat16_training_moves_the_weights_as_float32_does(bf16_dir, tmp_path, train_type, adapter, lr):
    """AdamW normalises each step to ~lr per element whatever the gradient's precision, so
    with float32 master weights the bfloat16 run's deltas differ from float32's only where
    bfloat16 rounding (8 mantissa bits, ~0.4% per op) flips a near-zero gradient. Measured:
    full cosine >= 0.997; LoRA/DoRA >= 0.938 (``lora_a``: its gradient is 0 until ``lora_b``
    moves, so small and noisy); norm ratios within 1%. Updates lost to bfloat16 weights
    (``0.02 - 1e-6 == 0.02``) move 2% of the elements: cosine 0.13, norm ratio <= 0.17."""
    kw = dict(train_type=train_type, adapter=adapter, learning_rate=lr)
    ref, ref_dtypes = weight_deltas(bf16_dir, tmp_path, "float32", **kw)
    low, low_dtypes = weight_deltas(bf16_dir, tmp_path, "bfloat16", **kw)
    for name, d32 in ref.items():
        d16 = low[name]
        assert np.mean(d16 != 0) > 0.95, f"{name}: only {np.mean(d16 != 0):.1%} of the elements moved"
        cosine = d32 @ d16 / (np.linalg.norm(d32) * np.linalg.norm(d16))
        ratio = np.linalg.norm(d16) / np.linalg.norm(d32)
        assert cosine > 0.9 and 0.8 < ratio < 1.25, f"{name}: cosine {cosine:.3f}, norm ratio {ratio:.3f}"
    assert ref_dtypes == low_dtypes == {"mlx.core.float32"}  # master weights (and so AdamW moments)


def test_full_finetune_keeps_bfloat16_compute(bf16_dir):
    """Trained blocks hold float32 weights but cast them for the forward: activations stay
    bfloat16 (a float32 weight would promote the block to float32), the frozen blocks stay
    bfloat16, and the forward equals the plain bfloat16 block's."""
    cfg = DPOConfig(model=str(bf16_dir), compute_dtype="bfloat16", train_type="full", num_layers=1)
    model, _, _ = load_model(cfg)
    x = mx.random.normal((2, 5, model.args.hidden_size)).astype(mx.bfloat16)
    block = model.layers[-1]
    plain = block(x, None, None)
    setup_trainable(model, cfg, use_reference=True)
    assert {v.dtype for _, v in tree_flatten(block.parameters())} == {mx.float32}
    assert {v.dtype for _, v in tree_flatten(model.layers[0].parameters())} == {mx.bfloat16}
    out = block(x, None, None)
    assert out.dtype == mx.bfloat16
    assert mx.array_equal(out, plain)
    assert {v.dtype for _, v in tree_flatten(block.parameters())} == {mx.float32}  # masters restored
