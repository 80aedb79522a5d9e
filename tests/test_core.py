"""Core training path: log-probs, reference = adapters off, compiled step, optimizer, schedule."""

import json
import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_dpo.model.adapters import adapter_mode, add_adapters
from mlx_dpo.data.batching import BatchSampler, bucket_length, collate, eval_batches
from mlx_dpo.config.fields import DPOConfig
from mlx_dpo.data import TokenizedPair
from mlx_dpo.forward.logprobs import completion_logps
from helpers import sequence_logps_reference
from mlx_dpo.model.loader import load_model
from mlx_dpo.train.schedule import build_schedule
from mlx_dpo.train.trainer import DPOTrainer


def cfg_for(model_dir, data_dir, tmp_path, **kw):
    values = dict(model=str(model_dir), data=str(data_dir), output_dir=str(tmp_path / "run"), max_steps=6,
                  batch_size=4, learning_rate=3e-3, logging_steps=2, eval_steps=3, progress_bar=False, seed=0)
    values.update(kw)
    return DPOConfig(**values)


def random_pairs(rng, n, vocab, eos=2):
    pairs = []
    for _ in range(n):
        p = [1] + list(rng.integers(4, vocab, rng.integers(2, 9)))
        c = list(rng.integers(4, vocab, rng.integers(1, 7))) + [eos]
        r = list(rng.integers(4, vocab, rng.integers(1, 7))) + [eos]
        pairs.append(TokenizedPair([int(x) for x in p], [int(x) for x in c], [int(x) for x in r]))
    return pairs


@pytest.mark.parametrize("arch", ["llama_dir", "qwen2_dir"])
def test_completion_logps_match_loop(arch, request):
    """Summed completion log-probs of the padded (2B, L) batch == a per-sequence loop
    over full logits (token t scored by the logits at t - 1)."""
    model, tok, _ = load_model(DPOConfig(model=str(request.getfixturevalue(arch))))
    rng = np.random.default_rng(0)
    pairs = random_pairs(rng, 3, model.args.vocab_size)
    batch = collate(pairs, list(range(3)))
    out = completion_logps(model, {k: mx.array(v) for k, v in batch.arrays().items()})
    sums = np.array(out["token_logps"].sum(-1))
    rows = [(p.prompt, p.chosen) for p in pairs] + [(p.prompt, p.rejected) for p in pairs]
    expected = [sequence_logps_reference(model, a + b, len(a)) for a, b in rows]
    np.testing.assert_allclose(sums, expected, rtol=1e-6, atol=1e-5)  # measured: 2e-6 abs, 8e-8 rel
    # the mask counts exactly the completion tokens
    assert np.array(out["mask"].sum(-1)).tolist() == [len(b) for _, b in rows]
    # unchunked == chunked projection
    full = completion_logps(model, {k: mx.array(v) for k, v in batch.arrays().items()}, chunked=False)
    np.testing.assert_allclose(np.array(full["token_logps"]), np.array(out["token_logps"]), rtol=1e-6, atol=1e-6)


def test_chunked_logps_with_forced_small_chunks(llama_dir, monkeypatch):
    import mlx_dpo.forward.logprobs as lp

    model, _, _ = load_model(DPOConfig(model=str(llama_dir)))
    pairs = random_pairs(np.random.default_rng(1), 2, model.args.vocab_size)
    batch = {k: mx.array(v) for k, v in collate(pairs, [0, 1]).arrays().items()}

    def loss(m, chunked):
        return completion_logps(m, batch, chunked=chunked)["token_logps"].sum()

    cfg = DPOConfig(model=str(llama_dir))
    add_adapters(model, cfg)
    for layer in [m for _, m in model.named_modules() if hasattr(m, "lora_b")]:
        layer.lora_b = mx.random.normal(layer.lora_b.shape) * 0.1
    plain_val, plain_grad = nn.value_and_grad(model, lambda m: loss(m, False))(model)
    monkeypatch.setattr(lp, "MAX_LOGIT_ELEMENTS", 2 * 4 * model.args.vocab_size)  # 2 positions per chunk
    val, grad = nn.value_and_grad(model, lambda m: loss(m, True))(model)
    assert abs(val.item() - plain_val.item()) <= 1e-6 * abs(plain_val.item()), (val.item(), plain_val.item())
    for (k, a), (_, b) in zip(tree_flatten(grad), tree_flatten(plain_grad)):
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=0, atol=6e-6, err_msg=k)  # measured 6e-7


@pytest.mark.parametrize("names,want", [
    (["q_proj", "v_proj"], ["self_attn.q_proj", "self_attn.v_proj"]),
    (["self_attn.q_proj", "mlp.up_proj"], ["mlp.up_proj", "self_attn.q_proj"]),
    ("all-linear", ["mlp.down_proj", "mlp.gate_proj", "mlp.up_proj", "self_attn.k_proj", "self_attn.o_proj",
                    "self_attn.q_proj", "self_attn.v_proj"]),
])
def test_lora_target_modules_take_peft_names(llama_dir, names, want):
    model, _, _ = load_model(DPOConfig(model=str(llama_dir)))
    cfg = DPOConfig(model=str(llama_dir), lora_target_modules=names)
    add_adapters(model, cfg)
    adapted = sorted({k.split(".", 3)[3] for k, m in model.named_modules() if hasattr(m, "lora_b")})
    assert adapted == want  # keys are model.layers.<i>.<block key>
    assert sorted(cfg.target_modules) == want  # mlx-lm's keys from here on (adapter_config.json, config.yaml)


def test_reference_equals_base_model_before_and_after_training(llama_dir, toy_data_dir, tmp_path):
    """Reference log-probs (adapters switched off) equal the plain base model's exactly,
    and stay so while only adapter parameters change."""
    cfg = cfg_for(llama_dir, toy_data_dir, tmp_path, max_steps=5, eval_steps=0)
    trainer = DPOTrainer(cfg, log=lambda *a: None)
    base, _, _ = load_model(DPOConfig(model=str(llama_dir)))
    assert cfg.cpu_fast_math is False  # the default: MLX's kernels, as the loaded base (cpu_math on: test_cpu_math)
    assert not any(getattr(layer, "cpu_math", False) for layer in trainer.model.layers)
    batch = collate(trainer.train_pairs[:4], [0, 1, 2, 3])
    arrays = {k: mx.array(v) for k, v in batch.arrays().items()}
    expected = np.array(completion_logps(base, arrays)["token_logps"])

    def reference():
        with adapter_mode(trainer.model, "base"):
            return np.array(completion_logps(trainer.model, arrays)["token_logps"])

    def policy():
        return np.array(completion_logps(trainer.model, arrays)["token_logps"])

    frozen_before = {k: np.array(v) for k, v in tree_flatten(trainer.model.parameters()) if "lora" not in k}
    lora_before = {k: np.array(v) for k, v in tree_flatten(trainer.model.trainable_parameters())}
    assert np.array_equal(reference(), expected)
    trainer.train()
    assert np.array_equal(reference(), expected)
    assert not np.allclose(policy(), expected)  # the policy moved
    for k, v in tree_flatten(trainer.model.parameters()):
        if "lora" not in k:
            assert np.array_equal(np.array(v), frozen_before[k]), k
    changed = [k for k, v in tree_flatten(trainer.model.trainable_parameters())
               if not np.array_equal(np.array(v), lora_before[k])]
    assert changed and all(k.endswith(("lora_a", "lora_b")) for k in changed)


def test_step_loss_matches_independent_dpo(llama_dir, toy_data_dir, tmp_path):
    """The compiled step's loss on a batch == -log sigmoid(beta * margin) from
    independently computed policy and base log-probs."""
    cfg = cfg_for(llama_dir, toy_data_dir, tmp_path, beta=0.3)
    trainer = DPOTrainer(cfg, log=lambda *a: None)
    for layer in [m for _, m in trainer.model.named_modules() if hasattr(m, "lora_b")]:
        layer.lora_b = mx.random.normal(layer.lora_b.shape, key=mx.random.key(3)) * 0.2
    batch = collate(trainer.train_pairs[:4], [0, 1, 2, 3])
    loss, metrics, _, _, _ = trainer.grad_step(trainer.to_device(batch), trainer.loss_state)
    rows = [(p.prompt, p.chosen) for p in trainer.train_pairs[:4]] + [(p.prompt, p.rejected) for p in trainer.train_pairs[:4]]
    trainer.model.eval()
    pol = np.array([sequence_logps_reference(trainer.model, a + b, len(a)) for a, b in rows])
    with adapter_mode(trainer.model, "base"):
        ref = np.array([sequence_logps_reference(trainer.model, a + b, len(a)) for a, b in rows])
    margin = (pol[:4] - ref[:4]) - (pol[4:] - ref[4:])
    expected = np.mean(np.log1p(np.exp(-0.3 * margin)))
    assert abs(loss.item() - expected) < 3e-6, (loss.item(), expected)  # measured 3e-7
    acc = np.mean(0.3 * (pol[:4] - ref[:4]) > 0.3 * (pol[4:] - ref[4:]))
    assert abs(metrics["rewards/accuracies"].item() - acc) < 1e-6
    np.testing.assert_allclose(metrics["logps/chosen"].item(), pol[:4].mean(), rtol=1e-5)


def test_training_improves_heldout_accuracy_and_writes_outputs(llama_dir, toy_data_dir, tmp_path):
    cfg = cfg_for(llama_dir, toy_data_dir, tmp_path, max_steps=40, batch_size=8, eval_steps=40,
                  logging_steps=10, lr_scheduler_type="cosine", warmup_steps=4)
    trainer = DPOTrainer(cfg, log=lambda *a: None)
    start = trainer.evaluate()
    result = trainer.train()
    assert result.eval_metrics["eval_rewards/accuracies"] > max(0.7, start["eval_rewards/accuracies"] + 0.1)
    assert result.eval_metrics["eval_loss"] < start["eval_loss"]
    # compiled once per bucketed shape, not once per step
    it = iter(BatchSampler(trainer.train_pairs, cfg.batch_size, cfg.seed, shapes=trainer.shapes))
    shapes = {tuple(v.shape for v in trainer.collate(trainer.train_pairs, next(it)).arrays().values())
              for _ in range(cfg.max_steps)}
    assert trainer.trace_count == len(shapes) <= cfg.max_batch_shapes
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [10, 20, 30, 40]
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected", "learning_rate",
                "tokens_per_second", "peak_memory_gb", "grad_norm", "eval_rewards/accuracies"):
        assert key in lines[-1], key
    out = tmp_path / "run"
    assert (out / "adapters.safetensors").exists() and (out / "config.yaml").exists()
    assert DPOConfig.from_yaml(out / "config.yaml").beta == cfg.beta


def test_adapters_load_in_mlx_lm(llama_dir, toy_data_dir, tmp_path):
    """The output directory is an mlx-lm adapter: mlx_lm.load(adapter_path=...) gives the trained policy."""
    from mlx_lm import generate, load

    cfg = cfg_for(llama_dir, toy_data_dir, tmp_path, max_steps=4, learning_rate=2e-2)
    trainer = DPOTrainer(cfg, log=lambda *a: None)
    trainer.train()
    trainer.model.eval()
    model, tok = load(str(llama_dir), adapter_path=str(tmp_path / "run"))
    x = mx.array([[1, 40, 41, 42, 43, 44]])
    np.testing.assert_allclose(np.array(model(x)), np.array(trainer.model(x)), rtol=1e-6, atol=1e-6)  # measured 0
    # mlx-lm's (greedy) generate == a plain argmax loop over the trained policy
    prompt = "Repeat: apple cat. Answer:"
    ids = tok.encode(prompt)
    for _ in range(5):
        ids.append(int(mx.argmax(trainer.model(mx.array([ids]))[0, -1]).item()))
    # (mlx-lm's streaming detokenizer drops the leading space of the first generated word)
    assert generate(model, tok, prompt, max_tokens=5).lstrip() == tok.decode(ids[len(tok.encode(prompt)):]).lstrip()


def test_adamw_has_bias_correction(llama_dir, toy_data_dir, tmp_path):
    """First update of torch-style AdamW: p -= lr * g/|g| (bias-corrected), not lr*(1-b1)/sqrt(1-b2)."""
    cfg = cfg_for(llama_dir, toy_data_dir, tmp_path, lr_scheduler_type="constant", max_grad_norm=0.0,
                  learning_rate=1e-3)
    trainer = DPOTrainer(cfg, log=lambda *a: None)
    before = {k: np.array(v) for k, v in tree_flatten(trainer.model.trainable_parameters())}
    batch = collate(trainer.train_pairs[:4], [0, 1, 2, 3])
    _, _, _, grads, _ = trainer.grad_step(trainer.to_device(batch), trainer.loss_state)
    g = {k: np.array(v) for k, v in tree_flatten(grads)}
    trainer.apply_update(grads)
    for k, v in tree_flatten(trainer.model.trainable_parameters()):
        m, vv = 0.1 * g[k], 0.001 * g[k] ** 2
        expected = before[k] - 1e-3 * (m / 0.1) / (np.sqrt(vv / 0.001) + 1e-8)
        np.testing.assert_allclose(np.array(v), expected, atol=1e-7, err_msg=k)


@pytest.mark.parametrize("train_type", ["full", "adapter"])
def test_weight_decay_skips_biases_and_norms_as_transformers(llama_dir, toy_data_dir, tmp_path, train_type):
    """AdamW step with transformers' parameter groups: p (1 - lr wd) - lr m^/(sqrt(v^) + eps) for
    every parameter except biases and norm weights (get_decay_parameter_names), which skip the decay."""
    lr, wd = 1e-3, 0.1
    cfg = cfg_for(llama_dir, toy_data_dir, tmp_path, lr_scheduler_type="constant", max_grad_norm=0.0,
                  learning_rate=lr, weight_decay=wd, train_type=train_type, reference_free=True)  # no ref pass
    trainer = DPOTrainer(cfg, log=lambda *a: None)
    before = {k: np.array(v, np.float64) for k, v in tree_flatten(trainer.model.trainable_parameters())}
    no_decay = {k for k in before if "norm" in k.lower() or "bias" in k.lower()}
    assert (len(no_decay) > 0) == (train_type == "full") and len(no_decay) < len(before)
    batch = collate(trainer.train_pairs[:4], [0, 1, 2, 3])
    _, _, _, grads, _ = trainer.grad_step(trainer.to_device(batch), trainer.loss_state)
    g = {k: np.array(v, np.float64) for k, v in tree_flatten(grads)}
    trainer.apply_update(grads)
    for k, v in tree_flatten(trainer.model.trainable_parameters()):
        m, vv = 0.1 * g[k], 0.001 * g[k] ** 2
        decayed = before[k] * (1.0 if k in no_decay else 1 - lr * wd)
        expected = decayed - lr * (m / 0.1) / (np.sqrt(vv / 0.001) + 1e-8)
        np.testing.assert_allclose(np.array(v), expected, atol=2e-7, rtol=1e-6, err_msg=k)


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant", "constant_with_warmup"])
def test_schedule_matches_transformers_formulas(kind):
    total, warm, lr = 20, 5, 0.1
    sched = build_schedule(kind, lr, total, warm)
    for s in range(total):
        if kind == "constant":
            f = 1.0
        elif s < warm:
            f = s / warm
        elif kind == "linear":
            f = (total - s) / (total - warm)
        elif kind == "cosine":
            f = 0.5 * (1 + math.cos(math.pi * (s - warm) / (total - warm)))
        else:
            f = 1.0
        assert abs(sched(s).item() - lr * f) < 1e-7, (kind, s)


def test_batches_group_lengths_and_bucket_shapes():
    rng = np.random.default_rng(0)
    pairs = random_pairs(rng, 40, 100)
    sampler = BatchSampler(pairs, 4, seed=0)
    assert len(sampler) == 10
    seen = [i for _, group in zip(range(10), iter(sampler)) for i in group]
    assert sorted(seen) == list(range(40))  # one epoch covers every pair once
    assert bucket_length(1) == 32 and bucket_length(33) == 64 and bucket_length(129) == 160
    batch = collate(pairs[:4], [0, 1, 2, 3])
    assert batch.tokens.shape == (8, 32) and batch.targets.shape == (8, 16)  # sequences <= 15 tokens
    rows = [(p.prompt, p.chosen) for p in pairs[:4]] + [(p.prompt, p.rejected) for p in pairs[:4]]
    for i, (prompt, completion) in enumerate(rows):  # inputs = sequence minus its last token, then padding
        seq, k = prompt + completion, len(completion)
        assert batch.tokens[i].tolist() == seq[:-1] + [0] * (32 - len(seq) + 1)
        assert batch.targets[i, :k].tolist() == completion and batch.mask[i].tolist() == [1] * k + [0] * (16 - k)
        assert batch.positions[i, :k].tolist() == list(range(len(prompt) - 1, len(seq) - 1))
    assert batch.num_tokens == sum(len(a) + len(b) for a, b in rows)
    # a 40-token pair (39 inputs) lands in the 64 bucket, its 10-token completion in 16
    long = collate([TokenizedPair([1] * 30, [5] * 10, [6] * 3)], [0])
    assert long.tokens.shape == (2, 64) and long.targets.shape == (2, 16)


def test_gradient_accumulation_equals_big_batch(llama_dir, toy_data_dir, tmp_path):
    """2 x 2 accumulated micro-batches give the mean of the two micro-batch gradients."""
    cfg = cfg_for(llama_dir, toy_data_dir, tmp_path, batch_size=2)
    trainer = DPOTrainer(cfg, log=lambda *a: None)
    b1, b2 = collate(trainer.train_pairs[:2], [0, 1]), collate(trainer.train_pairs[2:4], [2, 3])
    g1 = trainer.grad_step(trainer.to_device(b1), trainer.loss_state)[3]
    g2 = trainer.grad_step(trainer.to_device(b2), trainer.loss_state)[3]
    cfg4 = cfg_for(llama_dir, toy_data_dir, tmp_path / "b", batch_size=4)
    t4 = DPOTrainer(cfg4, log=lambda *a: None)
    g4 = t4.grad_step(t4.to_device(collate(trainer.train_pairs[:4], [0, 1, 2, 3])), t4.loss_state)[3]
    for (k, a), (_, b), (_, c) in zip(tree_flatten(g1), tree_flatten(g2), tree_flatten(g4)):
        np.testing.assert_allclose((np.array(a) + np.array(b)) / 2, np.array(c), atol=1e-6, rtol=1e-4, err_msg=k)


@pytest.mark.parametrize("layout", ["unshared", "prefix", "packed"])
def test_collate_rejects_an_empty_prompt(layout):
    pairs = random_pairs(np.random.default_rng(0), 2, 100)
    pairs[1] = TokenizedPair([], pairs[1].chosen, pairs[1].rejected)
    with pytest.raises(ValueError, match=r"pairs \[7\] have an empty prompt"):
        collate(pairs, [6, 7], layout=layout)


def test_max_eval_batches_is_a_fixed_unbiased_subset():
    pairs = random_pairs(np.random.default_rng(0), 400, 100)
    lengths = np.array([p.length for p in pairs])
    groups = list(eval_batches(pairs, 8, max_batches=5))
    assert groups == list(eval_batches(pairs, 8, max_batches=5))  # the same subset on every call
    subset = [i for g in groups for i in g]
    assert len(groups) == 5 and all(len(g) == 8 for g in groups) and len(set(subset)) == 40
    assert [lengths[i] for i in subset] == sorted(lengths[subset])  # still grouped by length
    assert abs(lengths[subset].mean() - lengths.mean()) < 3 * lengths.std() / np.sqrt(40)  # within 3 standard errors
    assert lengths[subset].mean() > np.sort(lengths)[:40].mean() + lengths.std()  # not the shortest pairs
    everything = [i for g in eval_batches(pairs, 8) for i in g]
    assert sorted(everything) == list(range(400))


def test_base_dropout_is_disabled_and_lora_dropout_only_touches_the_policy(llama_dir):
    """TRL's disable_dropout for the base; LoRA dropout acts on the policy path only, so the
    reference (adapters off) stays deterministic in training mode."""
    from mlx_dpo.model.loader import disable_dropout

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)
            self.drop = nn.Dropout(0.5)

    block = Block()
    disable_dropout(block)
    assert isinstance(block.drop, nn.Identity)

    cfg = DPOConfig(model=str(llama_dir), lora_dropout=0.5)
    model, _, _ = load_model(cfg)
    add_adapters(model, cfg)
    for layer in [m for _, m in model.named_modules() if hasattr(m, "lora_b")]:
        layer.lora_b = mx.random.normal(layer.lora_b.shape) * 0.5
    model.train()
    x = mx.array([[1, 40, 41, 42, 43]])
    assert not np.allclose(np.array(model(x)), np.array(model(x)))  # dropout on the policy path
    with adapter_mode(model, "base"):
        first, second = np.array(model(x)), np.array(model(x))
    assert np.array_equal(first, second)
