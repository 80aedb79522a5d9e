"""Block-causal attention (``forward/blocks.py``): queries in chunks give the log-probs and gradients
of mlx-lm's own one-pass forward, in every batch layout, on sequences long enough to chunk."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_dpo.model.adapters import add_adapters
from mlx_dpo.data.batching import collate
from mlx_dpo.forward.blocks import CHUNK_TOKENS, chunk_bounds
from mlx_dpo.config.fields import DPOConfig
from mlx_dpo.data import TokenizedPair
from mlx_dpo.forward.logprobs import completion_logps
from mlx_dpo.model.loader import recompute_block_in_backward, load_model
from mlx_dpo.forward.packed import enable_position_rope
from helpers import tiny_mlx_lm


def test_chunk_bounds():
    assert chunk_bounds(1) == [0, 1] and chunk_bounds(CHUNK_TOKENS) == [0, CHUNK_TOKENS]
    assert chunk_bounds(300) == [0, 100, 200, 300]
    assert len(chunk_bounds(100_000)) == 9  # at most 8 chunks


def long_pairs(vocab, seed=0):
    """Prompts of 40-170 tokens, completions of 20-260: widths of 200-560 positions, 2-5 chunks."""
    rng = np.random.default_rng(seed)
    ids = lambda n: [int(x) for x in rng.integers(4, vocab, n)]  # noqa: E731
    return [TokenizedPair([1] + ids(p), ids(c) + [2], ids(r) + [2])
            for p, c, r in ((170, 260, 30), (40, 20, 200), (90, 150, 140))]


def oracle(model, pairs):
    """Summed completion log-probs (chosen rows, then rejected) from ``model(tokens)``: full
    logits of each sequence alone, mlx-lm's own forward (one pass, no chunks)."""
    out = []
    for side in ("chosen", "rejected"):
        for p in pairs:
            seq = p.prompt + getattr(p, side)
            logits = model(mx.array([seq[:-1]]))[0].astype(mx.float32)
            logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            targets = mx.array(seq[len(p.prompt):])
            out.append(mx.take_along_axis(logp[len(p.prompt) - 1:], targets[:, None], axis=-1).sum())
    return mx.stack(out)


NEW_ARCHS = ("gemma3_text", "gemma2", "phi3")  # built straight from mlx-lm's classes (helpers.tiny_mlx_lm)
WINDOW = 48  # Gemma 3's sliding window here: shorter than every sequence of long_pairs


def adapted(model_dir, checkpointing=False):
    """A model with random LoRA B matrices: a toy model directory, or one of :data:`NEW_ARCHS`
    (their default targets: Phi-3's fused projections, Gemma's attention and MLP)."""
    if str(model_dir) in NEW_ARCHS:
        model, cfg = tiny_mlx_lm(str(model_dir), window=WINDOW, scale=1.0), DPOConfig(model="tiny")
    else:
        cfg = DPOConfig(model=str(model_dir), lora_target_modules=["self_attn.q_proj", "self_attn.v_proj", "mlp.up_proj"])
        model, _, _ = load_model(cfg)
    add_adapters(model, cfg)
    for layer in [m for _, m in model.named_modules() if hasattr(m, "lora_b")]:
        layer.lora_b = mx.random.normal(layer.lora_b.shape, key=mx.random.key(3)) * 0.1
    enable_position_rope(model)
    if checkpointing:
        for block in model.layers:
            recompute_block_in_backward(block)
    return model


def weights_of(n):
    return mx.array(np.linspace(1.0, 2.0, n), dtype=mx.float32)  # a different weight per sequence


def model_source(arch, request):
    """A toy model fixture's directory (``*_dir``), or the name of one of :data:`NEW_ARCHS`."""
    return request.getfixturevalue(arch) if arch.endswith("_dir") else arch


@pytest.mark.parametrize("layout", ["unshared", "prefix", "packed"])
@pytest.mark.parametrize("arch, checkpointing", [("llama_dir", False), ("qwen2_dir", False), ("llama_dir", True),
                                                 ("gemma3_text", False), ("gemma3_text", True), ("gemma2", False),
                                                 ("phi3", False)])
def test_chunked_layouts_equal_mlx_lm_forward(arch, checkpointing, layout, request):
    """Gemma 3's sliding windows (48 positions, every other layer) are mlx-lm's own masks in the
    oracle; Gemma 2 scores grouped heads with its soft-capped attention; Phi-3 has fused projections."""
    model = adapted(model_source(arch, request), checkpointing)
    pairs = long_pairs(model.args.vocab_size)
    batch = collate(pairs, [0, 1, 2], layout=layout)
    widths = [batch.prompt.shape[1], batch.completion.shape[1]] if layout == "prefix" else [batch.tokens.shape[1]]
    assert min(len(chunk_bounds(w)) - 1 for w in widths) >= 2  # every pass runs in several chunks
    arrays = {k: mx.array(v) for k, v in batch.arrays().items()}
    w = weights_of(6)

    def ours(m):
        return (completion_logps(m, arrays)["token_logps"].sum(axis=-1) * w).sum()

    def theirs(m):
        return (oracle(m, pairs) * w).sum()

    value, grads = nn.value_and_grad(model, ours)(model)
    expected, expected_grads = nn.value_and_grad(model, theirs)(model)
    sums = np.array(completion_logps(model, arrays)["token_logps"].sum(axis=-1))
    np.testing.assert_allclose(sums, np.array(oracle(model, pairs)), rtol=2e-5, atol=2e-3)
    assert abs(value.item() - expected.item()) < 1e-5 * abs(expected.item())
    ga, gb = dict(tree_flatten(grads)), dict(tree_flatten(expected_grads))
    assert ga.keys() == gb.keys() and len(ga) > 0
    for k in gb:
        scale = float(mx.abs(gb[k]).max())
        assert scale > 1e-4, k  # not trivially zero
        np.testing.assert_allclose(np.array(ga[k]), np.array(gb[k]), atol=2e-4 * scale, rtol=1e-3, err_msg=k)
