"""Performance contracts that can be asserted exactly: no retracing beyond the length
buckets, gradient checkpointing changes no gradient, planning/MFU arithmetic."""

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_dpo.batching import BatchSampler, collate
from mlx_dpo.config import DPOConfig
from mlx_dpo.data import TokenizedPair
from mlx_dpo.model import load_model
from mlx_dpo.perf import Throughput, compute_parameters, flops_per_token, static_memory_estimate
from mlx_dpo.trainer import DPOTrainer


def varied_pairs(n, vocab, seed=0):
    """Prompt and completion lengths spread over several buckets."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        ids = lambda k: [int(x) for x in rng.integers(4, vocab, k)]  # noqa: E731
        out.append(TokenizedPair([1] + ids(rng.integers(1, 40)), ids(rng.integers(1, 40)) + [2],
                                 ids(rng.integers(1, 40)) + [2]))
    return out


def test_traces_equal_distinct_bucketed_shapes(llama_dir, tmp_path):
    """One trace per distinct padded shape over a run, with and without prefix sharing."""
    for setting in ("true", "false"):
        cfg = DPOConfig(model=str(llama_dir), output_dir=str(tmp_path / setting), batch_size=2, max_steps=16,
                        eval_steps=0, save_steps=0, logging_steps=100, progress_bar=False, seed=0,
                        prefix_sharing=setting)
        model, tok, _ = load_model(cfg)
        pairs = varied_pairs(32, model.args.vocab_size)
        trainer = DPOTrainer(cfg, model, tok, pairs, [], log=lambda *a: None)
        sampler = BatchSampler(pairs, 2, cfg.seed)
        it = iter(sampler)
        shapes = set()
        for _ in range(cfg.max_steps):
            batch = collate([pairs[i] for i in next(it)], [], prefix=setting == "true")
            shapes.add(tuple(v.shape for v in batch.arrays().values()))
        trainer.train()
        assert 1 < len(shapes) < cfg.max_steps  # lengths vary, buckets collapse them
        assert trainer.trace_count == len(shapes)


def test_gradient_checkpointing_same_gradients(llama_dir, toy_data_dir, tmp_path):
    grads = []
    for ckpt in (False, True):
        cfg = DPOConfig(model=str(llama_dir), data=str(toy_data_dir), output_dir=str(tmp_path / str(ckpt)),
                        batch_size=4, max_steps=2, progress_bar=False, seed=0, gradient_checkpointing=ckpt,
                        prefix_sharing="false")
        trainer = DPOTrainer(cfg, log=lambda *a: None)
        for layer in [m for _, m in trainer.model.named_modules() if hasattr(m, "lora_b")]:
            layer.lora_b = mx.random.normal(layer.lora_b.shape, key=mx.random.key(3)) * 0.05
        batch = trainer.to_device(trainer.collate(trainer.train_pairs, [0, 1, 2, 3]))
        loss, _, _, g, _ = trainer.grad_step(batch, trainer.loss_state)
        grads.append((loss.item(), dict(tree_flatten(g))))
    (l1, g1), (l2, g2) = grads
    assert abs(l1 - l2) < 1e-6
    for k in g1:
        np.testing.assert_allclose(np.array(g2[k]), np.array(g1[k]), atol=1e-6, rtol=1e-5, err_msg=k)


def test_flops_and_static_estimate(llama_dir):
    model, _, _ = load_model(DPOConfig(model=str(llama_dir)))
    a = model.args
    per_layer = (a.hidden_size * (a.num_attention_heads + 2 * a.num_key_value_heads) * a.head_dim
                 + a.num_attention_heads * a.head_dim * a.hidden_size + 3 * a.hidden_size * a.intermediate_size
                 + 2 * a.hidden_size)
    expected = a.num_hidden_layers * per_layer + a.hidden_size + a.vocab_size * a.hidden_size  # + final norm + head
    assert compute_parameters(model) == expected
    assert flops_per_token(model, True) == 6 * expected and flops_per_token(model, False) == 4 * expected
    small, big = (static_memory_estimate(model, b, 128)["total"] for b in (2, 4))
    shared = static_memory_estimate(model, 4, 128, prompt_len=64)["total"]
    ckpt = static_memory_estimate(model, 4, 128, gradient_checkpointing=True)["total"]
    assert small < big and shared < big and ckpt < big


def test_throughput_skips_warmup():
    t = Throughput(warmup=2)
    for tokens, seconds in [(100, 50.0), (100, 20.0), (100, 1.0), (300, 1.0)]:
        t.add(tokens, seconds)
    assert t.tokens_per_second == 200.0


def test_plan_leaves_the_config_alone_and_times_training_mode(llama_dir, toy_data_dir, tmp_path, monkeypatch):
    """``plan`` works on a copy of the config, and times the step with dropout on (train mode)."""
    import mlx_dpo.plan as plan_module

    cfg = DPOConfig(model=str(llama_dir), data=str(toy_data_dir), output_dir=str(tmp_path / "run"), batch_size=2,
                    max_steps=2, progress_bar=False, lora_dropout=0.1)
    seen, timed = [], plan_module._timed_steps

    def spy(trainer, *args, **kwargs):
        step = trainer.grad_step
        trainer.grad_step = lambda *a: (seen.append(trainer.model.training), step(*a))[1]
        return timed(trainer, *args, **kwargs)

    class Clock:  # every perf_counter() call advances 0.25 s: each timed step takes 0.25 s
        now = 0.0

        @classmethod
        def perf_counter(cls):
            cls.now += 0.25
            return cls.now

    monkeypatch.setattr(plan_module, "_timed_steps", spy)
    monkeypatch.setattr(plan_module, "gemm_peak_gflops", lambda: 100.0)
    monkeypatch.setattr(plan_module, "time", Clock)
    result = plan_module.plan(cfg, steps=1, log=lambda *a: None)
    # the step is timed on the 2 longest pairs: tokens = sum of both sequences of each pair
    _, tok, _ = load_model(cfg)
    from mlx_dpo.data import load_datasets

    pairs, _ = load_datasets(cfg, tok, log=lambda *a: None)
    longest = sorted(pairs, key=lambda p: p.length)[-2:]
    tokens = sum(2 * len(p.prompt) + len(p.chosen) + len(p.rejected) for p in longest)
    assert result["tokens_per_second"] == tokens / 0.25
    assert result["mfu"] == pytest.approx(tokens / 0.25 * result["flops_per_token"] / 100e9, rel=1e-12)
    assert cfg.output_dir == str(tmp_path / "run") and cfg.overwrite_output_dir is False
    assert seen and all(seen)
