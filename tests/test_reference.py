"""Reference-model strategies: base, frozen SFT adapter, precomputed, TR-DPO, reference-free, full FT."""

import json
import math

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from mlx.utils import tree_flatten

from mlx_dpo.model.adapters import adapter_config, adapter_layers, add_adapters
from mlx_dpo.data.batching import BatchSampler, collate
from mlx_dpo.cli.commands import main
from mlx_dpo.config.fields import DPOConfig
from mlx_dpo.errors import ConfigError
from mlx_dpo.forward.logprobs import completion_logps
from mlx_dpo.model.loader import load_model
from mlx_dpo.train.steps import reference_logps
from mlx_dpo.train.trainer import DPOTrainer

QUIET = dict(log=lambda *a: None)
# summed completion log-probs (~ -45) from two float32 code paths
SUM_RTOL, SUM_ATOL = 1e-6, 1e-5  # measured: <= 4e-6 abs, 9e-8 rel


def trainer_reference_logps(trainer, arrays):
    """The reference log-probs ``trainer``'s step uses for ``arrays`` (None without a reference)."""
    return reference_logps(trainer.model, arrays, trainer.cfg, trainer.reductions, trainer.reference_source)


def cfg_for(model_dir, data_dir, tmp_path, **kw):
    values = dict(model=str(model_dir), data=str(data_dir), output_dir=str(tmp_path / "run"), max_steps=4,
                  batch_size=4, learning_rate=1e-2, logging_steps=2, eval_steps=0, progress_bar=False, seed=0)
    values.update(kw)
    return DPOConfig(**values)


@pytest.fixture(scope="module")
def sft_adapter(llama_dir, tmp_path_factory):
    """An mlx-lm adapter directory with non-zero LoRA weights (stands in for an SFT run)."""
    cfg = DPOConfig(model=str(llama_dir))
    model, _, _ = load_model(cfg)
    n = add_adapters(model, cfg)
    for i, layer in enumerate(adapter_layers(model)):
        layer.lora_b = mx.random.normal(layer.lora_b.shape, key=mx.random.key(i)) * 0.3
    out = tmp_path_factory.mktemp("sft")
    mx.save_safetensors(str(out / "adapters.safetensors"), dict(tree_flatten(model.trainable_parameters())))
    (out / "adapter_config.json").write_text(json.dumps(adapter_config(cfg, n, str(llama_dir))))
    return out


def batch_arrays(trainer, n=4):
    batch = collate(trainer.train_pairs[:n], list(range(n)))
    return batch, {k: mx.array(v) for k, v in batch.arrays().items()}


def trainer_reference_sums(trainer, arrays):
    return np.array(trainer_reference_logps(trainer, arrays)["sum"])


def perturb_policy(trainer, seed=7, scale=0.2):
    """Give the policy non-zero LoRA B (as a resumed or trained run has): policy != reference,
    so a reference pass that ran the policy by mistake gives different numbers."""
    for i, layer in enumerate(adapter_layers(trainer.model)):
        layer.lora_b = mx.random.normal(layer.lora_b.shape, key=mx.random.key(seed + i)) * scale


def policy_sums(trainer, arrays):
    return np.array(completion_logps(trainer.model, arrays)["token_logps"].sum(-1))


def distinct_step_shapes(trainer, steps):
    """The padded shapes of the first ``steps`` training batches, from a fresh sampler with the
    run's seed (what mx.compile traces once each)."""
    it = iter(BatchSampler(trainer.train_pairs, trainer.cfg.batch_size, trainer.cfg.seed, shapes=trainer.shapes))
    shapes = set()
    for _ in range(steps):
        batch = trainer.collate(trainer.train_pairs, next(it))
        shapes.add(tuple(v.shape for v in batch.arrays().values()))
    return shapes


def reference_batches(trainer, batch_size):
    """Batches one reference pass over the train and eval pairs runs."""
    return sum(math.ceil(len(p) / batch_size) for p in (trainer.train_pairs, trainer.eval_pairs) if p)


def independent_sums(model_dir, arrays, adapter_path=None):
    from mlx_lm import load

    model, _ = load(str(model_dir), adapter_path=str(adapter_path) if adapter_path else None)
    return np.array(completion_logps(model, arrays)["token_logps"].sum(-1))


def test_adapter_reference_equals_separately_loaded_sft(llama_dir, toy_data_dir, tmp_path, sft_adapter):
    cfg = cfg_for(llama_dir, toy_data_dir, tmp_path, reference="adapter", ref_adapter_path=str(sft_adapter))
    trainer = DPOTrainer(cfg, **QUIET)
    _, arrays = batch_arrays(trainer)
    expected = independent_sums(llama_dir, arrays, sft_adapter)
    base = independent_sums(llama_dir, arrays)
    assert not np.allclose(expected, base, atol=1e-3)  # the SFT adapter matters
    np.testing.assert_allclose(trainer_reference_sums(trainer, arrays), expected, rtol=SUM_RTOL, atol=SUM_ATOL)
    # the policy starts as a copy of the SFT adapter
    np.testing.assert_allclose(np.array(completion_logps(trainer.model, arrays)["token_logps"].sum(-1)), expected, rtol=SUM_RTOL, atol=SUM_ATOL)
    trainer.train()
    np.testing.assert_allclose(trainer_reference_sums(trainer, arrays), expected, rtol=SUM_RTOL, atol=SUM_ATOL)
    policy = np.array(completion_logps(trainer.model, arrays)["token_logps"].sum(-1))
    assert np.abs(policy - expected).max() > 1e-3  # only the policy copy trained


def test_ref_adapter_shape_mismatch_is_named(llama_dir, toy_data_dir, tmp_path, sft_adapter):
    cfg = cfg_for(llama_dir, toy_data_dir, tmp_path, reference="adapter", ref_adapter_path=str(sft_adapter),
                  lora_rank=4, lora_alpha=8)
    with pytest.raises(ConfigError, match="rank: reference adapter has 8, config has 4"):
        DPOTrainer(cfg, **QUIET)


def test_precomputed_reference_is_cached_and_matches(llama_dir, toy_data_dir, tmp_path, monkeypatch):
    import mlx_dpo.train.precompute as precompute

    cache = str(tmp_path / "cache")  # its own: another test's cache of the same key would hide the first pass
    cfg = cfg_for(llama_dir, toy_data_dir, tmp_path, precompute_ref_log_probs=True, precompute_ref_batch_size=16,
                  eval_steps=2, cache_dir=cache)
    first = DPOTrainer(cfg, **QUIET)
    batch, arrays = batch_arrays(first)
    expected = independent_sums(llama_dir, arrays)
    perturb_policy(first)  # the pass must run the reference even when the policy has moved (a resumed run)
    assert np.abs(policy_sums(first, arrays) - expected).min() > 1e-2
    first.train()
    assert first.reference_forwards == reference_batches(first, 16) == 16 + 2  # 256 train + 32 eval pairs
    cached = first.ref_cache["train"]["sum"][:4]
    np.testing.assert_allclose(cached[:, 0], expected[:4], rtol=SUM_RTOL, atol=SUM_ATOL)
    np.testing.assert_allclose(cached[:, 1], expected[4:], rtol=SUM_RTOL, atol=SUM_ATOL)
    assert "eval" in first.ref_cache
    # the step uses the cached values, not a reference forward
    assert np.array_equal(np.array(trainer_reference_logps(first, first.to_device(batch))["sum"]),
                          np.concatenate([cached[:, 0], cached[:, 1]]).astype(np.float32))

    # second run, same key: the file is reused and no reference forward runs
    calls = []
    monkeypatch.setattr(precompute, "compute_reference_logps", lambda *a, **k: calls.append(1))
    second = DPOTrainer(cfg_for(llama_dir, toy_data_dir, tmp_path / "2", precompute_ref_log_probs=True,
                                precompute_ref_batch_size=16, eval_steps=2, cache_dir=cache), **QUIET)
    second.train()
    assert calls == [] and second.reference_forwards == 0
    assert second.trace_count == len(distinct_step_shapes(second, cfg.max_steps))


def test_precomputed_and_live_reference_give_the_same_loss(llama_dir, toy_data_dir, tmp_path):
    """After some training steps (policy != reference), a reference precomputed from the trained
    policy's model gives the live reference's loss and gradients (two code paths: the live
    reference forward inside the compiled step vs the precompute pass + cache lookup)."""
    live = DPOTrainer(cfg_for(llama_dir, toy_data_dir, tmp_path / "a", max_steps=2), **QUIET)
    live.train()
    pre = DPOTrainer(cfg_for(llama_dir, toy_data_dir, tmp_path / "b", precompute_ref_log_probs=True), **QUIET)
    pre.model.update(live.model.trainable_parameters())  # the trained policy
    pre.precompute_reference()
    batch = collate(live.train_pairs[:4], [0, 1, 2, 3])
    a, _, _, ga, _ = live.grad_step(live.to_device(batch), live.loss_state)
    b, _, _, gb, _ = pre.grad_step(pre.to_device(batch), pre.loss_state)
    assert abs(a.item() - math.log(2)) > 1e-2  # the policy moved: a policy-as-reference loss would be ln 2
    assert abs(a.item() - b.item()) < 1e-6
    for (k, x), (_, y) in zip(tree_flatten(ga), tree_flatten(gb)):
        np.testing.assert_allclose(np.array(y), np.array(x), rtol=1e-4, atol=1e-6, err_msg=k)


def test_tr_dpo_follows_the_mixing_rule(llama_dir, toy_data_dir, tmp_path):
    cfg = cfg_for(llama_dir, toy_data_dir, tmp_path, sync_ref_model=True, ref_model_mixup_alpha=0.25,
                  ref_model_sync_steps=2, max_steps=2)
    trainer = DPOTrainer(cfg, **QUIET)
    layers = adapter_layers(trainer.model)
    ref_before = [(np.array(l.ref_lora_a), np.array(l.ref_lora_b)) for l in layers]
    assert all(np.all(b == 0) for _, b in ref_before)  # starts as the base (zero adapter)
    _, arrays = batch_arrays(trainer)
    with_base = independent_sums(llama_dir, arrays)
    np.testing.assert_allclose(trainer_reference_sums(trainer, arrays), with_base, rtol=SUM_RTOL, atol=SUM_ATOL)
    trainer.train()
    for l, (a0, b0) in zip(layers, ref_before):
        np.testing.assert_allclose(np.array(l.ref_lora_a), 0.25 * np.array(l.lora_a) + 0.75 * a0, atol=1e-7)
        np.testing.assert_allclose(np.array(l.ref_lora_b), 0.25 * np.array(l.lora_b) + 0.75 * b0, atol=1e-7)
    assert not np.allclose(trainer_reference_sums(trainer, arrays), with_base, atol=1e-5)


def test_tr_dpo_with_precompute_is_rejected(llama_dir, toy_data_dir, tmp_path):
    with pytest.raises(ConfigError, match="sync_ref_model"):
        cfg_for(llama_dir, toy_data_dir, tmp_path, sync_ref_model=True, precompute_ref_log_probs=True)


def test_reference_free_skips_the_reference(llama_dir, toy_data_dir, tmp_path):
    for kw in (dict(reference_free=True), dict(loss_type="simpo", beta=2.0)):
        trainer = DPOTrainer(cfg_for(llama_dir, toy_data_dir, tmp_path / kw.get("loss_type", "rf"), **kw), **QUIET)
        _, arrays = batch_arrays(trainer)
        assert trainer_reference_logps(trainer, arrays) is None
        assert not trainer.precompute
        result = trainer.train()
        assert trainer.reference_forwards == 0 and trainer.reference_source is None
        # no reference term: every logged reward is exactly beta * the policy's log-prob
        for record in result.history:
            for side in ("chosen", "rejected"):
                np.testing.assert_allclose(record[f"rewards/{side}"], trainer.cfg.beta * record[f"logps/{side}"],
                                           rtol=1e-6, err_msg=side)


def test_full_finetune_uses_precomputed_initial_reference(llama_dir, toy_data_dir, tmp_path):
    cfg = cfg_for(llama_dir, toy_data_dir, tmp_path, train_type="full", num_layers=1, learning_rate=1e-4)
    trainer = DPOTrainer(cfg, **QUIET)
    assert trainer.precompute
    _, arrays = batch_arrays(trainer)
    expected = independent_sums(llama_dir, arrays)
    frozen = {k: np.array(v) for k, v in tree_flatten(trainer.model.parameters()) if "layers.1." not in k}
    before = {k: np.array(v) for k, v in tree_flatten(trainer.model.trainable_parameters())}
    trainer.train()
    cached = trainer.ref_cache["train"]["sum"][:4]
    np.testing.assert_allclose(np.concatenate([cached[:, 0], cached[:, 1]]), expected, rtol=SUM_RTOL, atol=SUM_ATOL)
    changed = [k for k, v in tree_flatten(trainer.model.parameters())
               if k in frozen and not np.array_equal(np.array(v), frozen[k])]
    assert changed == []  # only the last block trained
    trained = [k for k, v in tree_flatten(trainer.model.trainable_parameters())]
    assert trained and all("layers.1." in k for k in trained)
    moved = [k for k, v in tree_flatten(trainer.model.trainable_parameters()) if not np.array_equal(np.array(v), before[k])]
    assert sorted(moved) == sorted(trained)  # every trained tensor moved
    # the step's reference is still the initial model's, while the policy has moved
    policy = policy_sums(trainer, arrays)
    assert np.abs(policy - expected).max() > 1e-3


@pytest.mark.parametrize("args,source", [
    ([], "base"),
    (["--reference", "adapter", "--ref-adapter-path", "SFT"], "reference"),
    (["--precompute-ref-log-probs"], "precomputed"),
    (["--sync-ref-model", "--ref-model-sync-steps", "1"], "reference"),
    (["--reference-free"], "none"),
])
def test_each_strategy_trains_from_the_cli(llama_dir, toy_data_dir, tmp_path, sft_adapter, args, source):
    args = [str(sft_adapter) if a == "SFT" else a for a in args]
    out = tmp_path / "cli"
    result = CliRunner().invoke(main, ["train", "--model", str(llama_dir), "--data", str(toy_data_dir),
                                       "--output-dir", str(out), "--max-steps", "3", "--batch-size", "4",
                                       "--no-progress-bar", "--eval-steps", "3", "--logging-steps", "1", *args])
    assert result.exit_code == 0, result.output
    assert f"reference {source}\n" in result.output  # the flag selected the strategy
    assert (out / "adapters.safetensors").exists()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3] and "eval_rewards/accuracies" in records[-1]
    first = records[0]
    if source == "none":  # rewards are beta * log-probs; the loss is -log sigmoid of their difference
        np.testing.assert_allclose(first["rewards/chosen"], 0.1 * first["logps/chosen"], rtol=1e-6)
        assert abs(first["loss"] - math.log(2)) > 1e-3
    else:  # step 1: the policy starts as the reference, so every margin is 0 and the loss ln 2
        assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
        assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert all(np.isfinite(r["loss"]) for r in records)


def test_reference_cache_follows_the_weights_in_memory(llama_dir, toy_data_dir, tmp_path):
    """A model passed to DPOTrainer is keyed by its weights, not by cfg.model's files."""
    kw = dict(precompute_ref_log_probs=True, max_steps=1)
    loaded = DPOTrainer(cfg_for(llama_dir, toy_data_dir, tmp_path / "a", **kw), **QUIET)
    loaded.precompute_reference()
    same, tok, _ = load_model(loaded.cfg)
    same = DPOTrainer(cfg_for(llama_dir, toy_data_dir, tmp_path / "b", **kw), model=same, tokenizer=tok, **QUIET)
    same.precompute_reference()
    assert same.reference_forwards == 0  # identical weights: the cache is reused
    changed, tok, _ = load_model(loaded.cfg)
    changed.model.norm.weight = changed.model.norm.weight * 2
    changed = DPOTrainer(cfg_for(llama_dir, toy_data_dir, tmp_path / "c", **kw), model=changed, tokenizer=tok, **QUIET)
    changed.precompute_reference()
    assert changed.reference_forwards == reference_batches(changed, 4)
    assert not np.allclose(changed.ref_cache["train"]["sum"], loaded.ref_cache["train"]["sum"], atol=1e-3)


def key(trainer):
    from mlx_dpo.train.precompute import reference_cache_key

    return reference_cache_key(trainer.model, trainer.train_pairs, trainer.cfg, trainer.model_path, trainer.reductions)


def test_reference_cache_key_uses_the_resolved_compute_dtype(llama_dir, toy_data_dir, tmp_path):
    from mlx_dpo.model.loader import compute_dtype

    auto = cfg_for(llama_dir, toy_data_dir, tmp_path / "auto", precompute_ref_log_probs=True)
    resolved = compute_dtype(auto)
    if resolved is None:
        pytest.skip("compute_dtype auto keeps the checkpoint's dtype on this device")
    explicit = cfg_for(llama_dir, toy_data_dir, tmp_path / "explicit", precompute_ref_log_probs=True,
                       compute_dtype=str(resolved).rsplit(".", 1)[-1])
    a, b = DPOTrainer(auto, **QUIET), DPOTrainer(explicit, **QUIET)
    assert key(a) == key(b)
    other = DPOTrainer(cfg_for(llama_dir, toy_data_dir, tmp_path / "bf16", precompute_ref_log_probs=True,
                               compute_dtype="bfloat16"), **QUIET)
    assert key(other) != key(a)


def test_corrupt_reference_cache_is_recomputed(llama_dir, toy_data_dir, tmp_path):
    from mlx_dpo.train.precompute import cache_file

    messages = []
    cfg = cfg_for(llama_dir, toy_data_dir, tmp_path / "a", precompute_ref_log_probs=True)
    first = DPOTrainer(cfg, **QUIET)
    first.precompute_reference()
    path = cache_file(first.cfg, key(first))
    path.write_bytes(b"PK\x03\x04 truncated")
    second = DPOTrainer(cfg_for(llama_dir, toy_data_dir, tmp_path / "b", precompute_ref_log_probs=True),
                        log=messages.append)
    second.precompute_reference()
    assert second.reference_forwards > 0 and any("unreadable" in m for m in messages)
    assert second.reference_forwards == math.ceil(len(second.train_pairs) / 4)  # the train file only; eval's was good
    # the same pass over the same weights: bit-identical values, in memory and in the rewritten file
    np.testing.assert_array_equal(second.ref_cache["train"]["sum"], first.ref_cache["train"]["sum"])
    with np.load(path) as f:  # overwritten with a good file
        np.testing.assert_array_equal(f["sum"], first.ref_cache["train"]["sum"])
