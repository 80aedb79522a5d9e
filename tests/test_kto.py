"""Unpaired KTO (issue 30): the loss, its KL reference point and its metrics against a float64
numpy oracle written from TRL 1.16's ``KTOTrainer._compute_loss``; TRL's data preparation
(``unpair_preference_dataset``, ``add_kl_completion_ids``, the weight-ratio warning); bad input;
a run through the trainer."""

import json

import mlx.core as mx
import numpy as np
import pytest

from mlx_dpo.config.fields import DPOConfig
from mlx_dpo.data import TokenizedPair, tokenize_pairs, unpaired
from mlx_dpo.data.readers import read_file
from mlx_dpo.errors import ConfigError, DataError
from mlx_dpo.loss import kto, losses


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def oracle(logps, ref, kl_logps, ref_kl, labels, loss_type="kto", beta=0.1, dw=1.0, uw=1.0):
    """TRL 1.16's KTO loss and metrics in float64 (one process)."""
    kl = max(np.mean(kl_logps - ref_kl), 0.0) if loss_type == "kto" else 0.0
    r = logps - ref
    d = labels.astype(bool)
    if loss_type == "kto":
        des, und = 1 - _sigmoid(beta * (r[d] - kl)), 1 - _sigmoid(beta * (kl - r[~d]))
    else:
        des, und = 1 - _sigmoid(beta * r[d]), _sigmoid(beta * r[~d])
    loss = np.concatenate([dw * des, uw * und]).mean()
    metrics = {"kl": kl}
    if d.any():
        metrics.update({"rewards/chosen": beta * r[d].mean(), "logps/chosen": logps[d].mean()})
    if (~d).any():
        metrics.update({"rewards/rejected": beta * r[~d].mean(), "logps/rejected": logps[~d].mean()})
    if d.any() and (~d).any():
        metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return loss, metrics


def _batch(seed, B=6, T=5, kl_shift=0.0, labels=None):
    """Token log-probs (2B, T) with ragged masks: completions then KL completions."""
    rng = np.random.default_rng(seed)
    tl = -rng.uniform(0.1, 3.0, (2 * B, T))
    mask = (np.arange(T)[None] < rng.integers(1, T + 1, (2 * B, 1))).astype(np.float64)
    ref = (tl * mask).sum(-1) + rng.normal(0, 2.0, 2 * B)
    ref[B:] += kl_shift  # > 0: the reference likes the KL pairs more -> a negative KL estimate
    labels = rng.integers(0, 2, B).astype(np.float64) if labels is None else np.asarray(labels, np.float64)
    return tl * mask, mask, ref, labels  # token log-probs are 0 past a completion (forward/logprobs.py)


def _mlx_loss(tl, mask, ref, labels, cfg):
    policy = {"token_logps": mx.array(tl, dtype=mx.float32), "mask": mx.array(mask, dtype=mx.float32),
              "logits_sum": mx.zeros(tl.shape[0])}
    return losses.batch_loss(policy, {"sum": mx.array(ref, dtype=mx.float32)}, cfg, {},
                             labels=mx.array(labels, dtype=mx.float32))


CASES = [("kto", 1.0, 1.0, 0.0), ("kto", 1.33, 0.7, 0.0), ("kto", 1.0, 1.0, 3.0), ("kto", 1.0, 1.0, -3.0),
         ("apo_zero_unpaired", 1.0, 2.0, 0.0), ("apo_zero_unpaired", 0.5, 1.0, -3.0)]


@pytest.mark.parametrize("loss_type,dw,uw,kl_shift", CASES)
def test_loss_and_metrics_match_the_float64_oracle(loss_type, dw, uw, kl_shift):
    cfg = DPOConfig(loss_type=loss_type, beta=0.3, desirable_weight=dw, undesirable_weight=uw)
    for seed in range(4):
        tl, mask, ref, labels = _batch(seed, kl_shift=kl_shift)
        B = len(labels)
        logps = (tl * mask).sum(-1)
        want_loss, want = oracle(logps[:B], ref[:B], logps[B:], ref[B:], labels, loss_type, 0.3, dw, uw)
        n = 2 * B if loss_type == "kto" else B  # apo_zero_unpaired forwards no KL rows
        loss, metrics, _ = _mlx_loss(tl[:n], mask[:n], ref[:n], labels, cfg)
        assert loss.item() == pytest.approx(want_loss, rel=2e-6, abs=1e-7)
        for k, v in want.items():
            assert metrics[k].item() == pytest.approx(v, rel=2e-6, abs=1e-6), k


def test_a_negative_kl_estimate_is_clamped_to_zero():
    """kl_shift 3: the batch's KL estimate is about -3; TRL clamps it at 0 (the mutation 'no clamp' fails here)."""
    tl, mask, ref, labels = _batch(1, kl_shift=3.0)
    B = len(labels)
    logps = (tl * mask).sum(-1)
    assert np.mean(logps[B:] - ref[B:]) < -1.0
    _, metrics, _ = _mlx_loss(tl, mask, ref, labels, DPOConfig(loss_type="kto"))
    assert metrics["kl"].item() == 0.0


def test_gradients_match_finite_differences_and_the_kl_term_has_none():
    cfg = DPOConfig(loss_type="kto", beta=0.5, desirable_weight=1.5)
    tl, mask, ref, labels = _batch(2, kl_shift=-4.0)  # a positive KL estimate: the clamp is not active
    B = len(labels)

    def f(x):
        policy = {"token_logps": x, "mask": mx.array(mask, dtype=mx.float32), "logits_sum": mx.zeros(2 * B)}
        return losses.batch_loss(policy, {"sum": mx.array(ref, dtype=mx.float32)}, cfg, {},
                                 labels=mx.array(labels, dtype=mx.float32))[0]

    grad = np.array(mx.grad(f)(mx.array(tl, dtype=mx.float32)), dtype=np.float64)
    assert np.all(grad[B:] == 0.0)  # the KL reference point is detached (TRL's .detach())

    def g(x):  # the oracle as a function of the token log-probs, float64
        logps = (x * mask).sum(-1)
        return oracle(logps[:B], ref[:B], logps[B:], ref[B:], labels, "kto", 0.5, 1.5, 1.0)[0]

    eps, fd = 1e-6, np.zeros_like(tl)
    for i in range(B):  # the completion rows (the KL rows hold the detached term: d/dx = 0 by definition)
        for t in range(tl.shape[1]):
            up, down = tl.copy(), tl.copy()
            up[i, t] += eps
            down[i, t] -= eps
            fd[i, t] = (g(up) - g(down)) / (2 * eps)
    # (padding positions: the forward zeroes their log-probs before the sum, so only real tokens count)
    np.testing.assert_allclose((grad * mask)[:B], fd[:B], rtol=1e-4, atol=1e-7)


def test_a_batch_with_only_desirable_rows_has_no_rejected_metrics():
    tl, mask, ref, _ = _batch(3)
    labels = np.ones(6)
    loss, metrics, _ = _mlx_loss(tl, mask, ref, labels, DPOConfig(loss_type="kto"))
    want_loss, want = oracle((tl * mask).sum(-1)[:6], ref[:6], (tl * mask).sum(-1)[6:], ref[6:], labels)
    assert loss.item() == pytest.approx(want_loss, rel=2e-6)
    assert np.isnan(metrics["rewards/rejected"].item()) and np.isnan(metrics["rewards/margins"].item())
    assert metrics["rewards/chosen"].item() == pytest.approx(want["rewards/chosen"], rel=2e-6)


def test_unpairing_and_kl_completions_follow_trl():
    pairs = [TokenizedPair([1, i], [10 + i], [20 + i, 20 + i]) for i in range(3)]
    rows = unpaired.unpair(pairs)  # datasets.map(batched) over one block: the chosen rows, then the rejected
    assert [(r.chosen, r.label) for r in rows] == [([10], True), ([11], True), ([12], True),
                                                   ([20, 20], False), ([21, 21], False), ([22, 22], False)]
    kl = unpaired.with_kl_completions(rows, batch_size=4)
    # add_kl_completion_ids per batch of 4: [c[-1]] + c[:-1]
    assert [r.rejected for r in kl] == [[20, 20], [10], [11], [12], [22, 22], [21, 21]]
    assert [r.chosen for r in kl] == [r.chosen for r in rows] and kl[1].prompt == rows[1].prompt
    assert [r.rejected for r in unpaired.with_kl_completions(rows, 4, kl=False)] == [[]] * 6  # no KL rows
    cut = unpaired.with_kl_completions(rows, 4, max_length=3)  # prompt (2) + KL completion cut to 3 tokens
    assert cut[0].rejected == [20]


@pytest.mark.parametrize("n_des,n_und,dw,uw,warns", [
    (10, 10, 1.0, 1.0, False), (30, 10, 1.0, 1.0, True), (30, 10, 1.0, 2.5, False), (30, 10, 0.4, 1.0, False),
    (10, 30, 1.0, 1.0, True), (10, 30, 3.5, 1.0, False)])
def test_the_weight_ratio_warning_uses_trl_bounds(n_des, n_und, dw, uw, warns):
    # TRL: desirable_weight in [n_u*uw/n_d, 1.33 n_u*uw/n_d] or undesirable_weight in [n_d*dw/n_u/1.33, n_d*dw/n_u]
    rows = [TokenizedPair([1], [2], [2], True)] * n_des + [TokenizedPair([1], [3], [3], False)] * n_und
    found = unpaired.label_warnings(rows, DPOConfig(loss_type="kto", desirable_weight=dw, undesirable_weight=uw))
    assert any("recommended range" in w for w in found) == warns


def test_one_label_only_is_allowed_with_a_warning():
    rows = [TokenizedPair([1], [2], [2], True)] * 4
    found = unpaired.label_warnings(rows, DPOConfig(loss_type="kto"))
    assert "every training row is desirable (4 rows)" in found[0]


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_unpaired_rows_are_detected_standard_and_conversational(tmp_path, toy_tokenizer):
    std = _write(tmp_path / "std.jsonl", [{"prompt": "a b", "completion": " c d", "label": True},
                                          {"prompt": "a b", "completion": " e", "label": False}])
    rows, stats = tokenize_pairs(read_file(std), toy_tokenizer, DPOConfig())
    assert [r.label for r in rows] == [True, False] and rows[0].chosen == rows[0].rejected
    assert rows[0].chosen[-1] == toy_tokenizer.eos_token_id  # EOS added to string completions, as TRL
    chat = _write(tmp_path / "chat.jsonl", [{"prompt": [{"role": "user", "content": "hi"}],
                                             "completion": [{"role": "assistant", "content": "yo"}], "label": False}])
    rows, _ = tokenize_pairs(read_file(chat), toy_tokenizer, DPOConfig())
    assert rows[0].label is False and rows[0].chosen


@pytest.mark.parametrize("record,message", [
    ({"prompt": "a", "completion": " b", "label": "yes"}, "field 'label' must be true or false"),
    ({"prompt": "a", "completion": " b", "label": 1}, "field 'label' must be true or false"),
    ({"prompt": "a", "label": True}, "missing field 'completion'"),
])
def test_bad_unpaired_rows_name_the_file_and_line(tmp_path, toy_tokenizer, record, message):
    path = _write(tmp_path / "d.jsonl", [{"prompt": "a", "completion": " b", "label": True}, record])
    with pytest.raises(DataError) as e:
        tokenize_pairs(read_file(path), toy_tokenizer, DPOConfig())
    assert f"{path}:2: {message}" in str(e.value)


def test_a_paired_loss_refuses_unpaired_rows_naming_the_fix():
    rows = [TokenizedPair([1], [2], [2], True)]
    with pytest.raises(DataError, match="set loss_type: kto"):
        unpaired.check_paired(rows, DPOConfig(data="fb.jsonl"))


@pytest.mark.parametrize("overrides,message", [
    ({"loss_type": ["kto", "sigmoid"]}, "cannot be mixed"), ({"batch_size": 1}, "needs batch_size > 1"),
    ({"reference_free": True}, "reference_free"), ({"rpo_alpha": 1.0}, "rpo_alpha has no effect")])
def test_kto_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        losses.validate_loss_config(DPOConfig(**{"loss_type": "kto", **overrides}))
    assert kto.is_unpaired(DPOConfig(loss_type="apo_zero_unpaired"))


@pytest.fixture(scope="module")
def toy_tokenizer(llama_dir):
    from mlx_lm.utils import load_tokenizer

    return load_tokenizer(llama_dir)


# ---------------------------------------------------------------------------------------------
# Through the trainer, on the toy model
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def feedback_file(toy_data_dir, tmp_path_factory):
    """Unpaired rows from the toy pairs (``helpers.feedback_rows``): labels alternating in blocks of 3."""
    from helpers import feedback_rows

    return _write(tmp_path_factory.mktemp("fb") / "feedback.jsonl", feedback_rows(toy_data_dir))


def _trainer(llama_dir, feedback_file, tmp_path, log=lambda *a: None, **kw):
    from mlx_dpo.train.trainer import DPOTrainer

    values = dict(model=str(llama_dir), data=str(feedback_file), output_dir=str(tmp_path / "run"), max_steps=4,
                  batch_size=4, learning_rate=1e-2, logging_steps=2, eval_steps=0, progress_bar=False, seed=0,
                  loss_type="kto", cache_dir=str(tmp_path / "cache"))
    values.update(kw)
    return DPOTrainer(DPOConfig(**values), log=log)


def _row_logps(model, pair, completion, mode):
    from helpers import sequence_logps_reference
    from mlx_dpo.model.adapters import adapter_mode

    with adapter_mode(model, mode):
        return sequence_logps_reference(model, pair.prompt + completion, len(pair.prompt))


def _check_batch_against_the_oracle(trainer, indices, loss_type, dw=1.0):
    """One batch through the compiled eval step against the oracle fed with log-probs from a slow
    unbatched forward of each sequence (adapters on / off); the KL rows' only with kto."""
    rows = [trainer.train_pairs[i] for i in indices]
    loss, metrics = trainer.eval_step(trainer.to_device(trainer.collate(trainer.train_pairs, indices)), {})
    m = trainer.model
    pol, ref = (np.array([_row_logps(m, r, r.chosen, mode) for r in rows]) for mode in ("policy", "base"))
    kl_pol, kl_ref = ((np.array([_row_logps(m, r, r.rejected, mode) for r in rows]) for mode in ("policy", "base"))
                      if loss_type == "kto" else (None, None))
    labels = np.array([r.label for r in rows], dtype=float)
    want_loss, want = oracle(pol, ref, kl_pol, kl_ref, labels, loss_type, 0.1, dw, 1.0)
    assert loss.item() == pytest.approx(want_loss, rel=1e-5)
    for k, v in want.items():
        assert metrics[k].item() == pytest.approx(v, rel=1e-4, abs=1e-5), k


def test_a_trained_batch_matches_the_oracle_on_per_sequence_log_probs(llama_dir, feedback_file, tmp_path):
    """After training, one batch through the compiled eval step against the oracle."""
    trainer = _trainer(llama_dir, feedback_file, tmp_path, desirable_weight=1.2)
    result = trainer.train()
    first = result.history[0]
    assert {"loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected",
            "logits/chosen", "logits/rejected", "kl"} <= set(first)
    indices = [4, 5, 6, 7]  # a batch of both labels (rows 3-5 desirable... by the block-of-3 labels)
    rows = [trainer.train_pairs[i] for i in indices]
    assert rows[1].rejected == rows[0].chosen and rows[0].rejected == rows[3].chosen  # the KL rotation
    _check_batch_against_the_oracle(trainer, indices, "kto", dw=1.2)


@pytest.mark.parametrize("layout", ["unshared", "prefix", "packed"])
def test_apo_zero_unpaired_forwards_no_kl_rows(llama_dir, feedback_file, tmp_path, layout):
    """apo_zero_unpaired (TRL's calculate_KL False): a batch is its B rows only, in every layout and in
    the reference precompute, and its loss and metrics after training are the oracle's."""
    options = {"unshared": {"prefix_sharing": False, "padding_free": False}, "prefix": {"padding_free": False},
               "packed": {"padding_free": True}}[layout]
    trainer = _trainer(llama_dir, feedback_file, tmp_path, loss_type="apo_zero_unpaired",
                       precompute_ref_log_probs=True, **options)
    assert trainer.layout == layout
    trainer.train()
    indices = [4, 5, 6, 7]
    rows = [trainer.train_pairs[i] for i in indices]
    batch = trainer.collate(trainer.train_pairs, indices)
    arrays = batch.arrays()
    assert all(not r.rejected for r in rows) and not batch.two_rows
    assert arrays["targets"].shape[0] == arrays["mask"].shape[0] == 4  # 8 with a KL row per row
    assert batch.num_tokens == sum(len(r.prompt) + len(r.chosen) for r in rows)
    inputs = {"unshared": "tokens", "prefix": "completion", "packed": "positions"}[layout]
    assert arrays[inputs].shape[0] == 4
    if layout == "packed":  # each row: its prompt and completion, padding after
        assert set(np.unique(arrays["branch"])) == {0, 1, 3}
        assert (arrays["branch"] != 3).sum(1).tolist() == [len(r.prompt) + len(r.chosen) - 1 for r in rows]
    cache = trainer.ref_cache["train"]["sum"]  # the precompute forwarded no KL rows: their column is 0
    assert cache.shape == (48, 2) and not cache[:, 1].any()
    np.testing.assert_allclose(cache[indices, 0], [_row_logps(trainer.model, r, r.chosen, "base") for r in rows],
                               rtol=1e-5)
    _check_batch_against_the_oracle(trainer, indices, "apo_zero_unpaired")


def test_the_last_incomplete_batch_never_trains_as_for_pairs(llama_dir, feedback_file, tmp_path):
    """48 rows, batch_size 5, 2 epochs: 9 full batches of consecutive rows per epoch, the same each epoch,
    18 steps; rows 45-47 never train (TRL: a 10th batch of 3 rows, 20 steps), with a warning. The paired
    path drops its leftover too (full batches: bounded compiled shapes), different pairs each epoch."""
    lines = []
    trainer = _trainer(llama_dir, feedback_file, tmp_path, log=lines.append, batch_size=5, max_steps=-1,
                       num_train_epochs=2, logging_steps=6)
    consecutive = [list(range(i, i + 5)) for i in range(0, 45, 5)]
    assert trainer.sampler.epoch_batches(0) == trainer.sampler.epoch_batches(1) == consecutive
    assert trainer.total_steps == 18
    assert [r["step"] for r in trainer.train().history] == [6, 12, 18]
    assert any(line.startswith("warning: the last 3 of the 48 training rows never train") and "e.g. 45 or 50" in line
               for line in lines)
    assert unpaired.leftover_warning(48, 4) is None and "batch_size 4 x 2 ranks" in unpaired.leftover_warning(50, 4, 2)
    from mlx_dpo.data.batching import BatchSampler

    pairs = [TokenizedPair([1, 2], [3] * 4, [4] * 4) for _ in range(10)]
    paired = BatchSampler(pairs, 4, seed=0)
    dropped = [set(range(10)) - {i for b in paired.epoch_batches(e) for i in b} for e in range(4)]
    assert len(paired) == 2 and all(len(d) == 2 for d in dropped) and len(set.union(*dropped)) > 2


def test_precomputed_reference_covers_the_kl_pairs(llama_dir, feedback_file, tmp_path):
    live = _trainer(llama_dir, feedback_file, tmp_path / "a").train().history
    pre = _trainer(llama_dir, feedback_file, tmp_path / "b", precompute_ref_log_probs=True)
    history = pre.train().history
    assert pre.ref_cache["train"]["sum"].shape == (48, 2)  # (completion, KL completion) of every row
    for a, b in zip(live, history):
        for k in ("loss", "kl", "rewards/chosen", "rewards/rejected", "logps/chosen"):
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-5), k


def test_a_paired_loss_on_unpaired_data_is_refused_by_the_trainer(llama_dir, feedback_file, tmp_path):
    with pytest.raises(DataError, match="set loss_type: kto"):
        _trainer(llama_dir, feedback_file, tmp_path, loss_type="sigmoid")


def test_resume_mid_window_reproduces_an_uninterrupted_run(llama_dir, toy_data_dir, tmp_path):
    """Labels in blocks of 4 = one label per batch: a logged mean of rewards/chosen covers only the
    steps that had desirable rows. Interrupted at step 4 (inside the window of logging_steps 3), resumed:
    the same metrics.jsonl and adapters as a straight run (the window's per-metric counts are checkpointed)."""
    from mlx_dpo.errors import TrainingInterrupted
    from helpers import interrupt_in_step
    from test_checkpoint import metrics, weights

    records = [json.loads(line) for line in (toy_data_dir / "train.jsonl").read_text().splitlines()][:40]
    data = _write(tmp_path / "blocks.jsonl", [{"prompt": r["prompt"], "completion": r["chosen"],
                                               "label": (i // 4) % 3 == 0} for i, r in enumerate(records)])
    kw = dict(max_steps=9, save_steps=4, logging_steps=3, lr_scheduler_type="constant")
    straight = _trainer(llama_dir, data, tmp_path / "a", **kw).train()
    first = _trainer(llama_dir, data, tmp_path / "b", **kw)
    interrupt_in_step(first, 4)
    with pytest.raises(TrainingInterrupted):
        first.train()
    _trainer(llama_dir, data, tmp_path / "b", resume_from_checkpoint="latest", **kw).train()
    ma, mb = metrics(tmp_path / "a" / "run"), metrics(tmp_path / "b" / "run")
    assert [r["step"] for r in ma] == [r["step"] for r in straight.history] == [r["step"] for r in mb] == [3, 6, 9]
    # each window: 1 desirable batch and 2 undesirable ones; no batch has both labels, so no margin
    assert all("rewards/chosen" in r and "rewards/rejected" in r and "rewards/margins" not in r for r in ma)
    for ra, rb in zip(ma, mb):
        assert ra.keys() == rb.keys()
        for k in ra:
            assert rb[k] == pytest.approx(ra[k], abs=1e-6), (ra["step"], k)
    # TRL's log: the mean of the values appended in the window (steps without a value append none)
    steps = _trainer(llama_dir, data, tmp_path / "c", **{**kw, "logging_steps": 1}).train().history
    for r in ma:
        for k in ("rewards/chosen", "rewards/rejected", "kl", "loss"):
            values = [s[k] for s in steps if r["step"] - 3 < s["step"] <= r["step"] and k in s]
            assert r[k] == pytest.approx(sum(values) / len(values), rel=1e-6, abs=1e-7), (r["step"], k)
    wa, wb = (weights(tmp_path / x / "run" / "adapters.safetensors") for x in "ab")
    for k in wa:
        np.testing.assert_allclose(wa[k], wb[k], atol=1e-6, rtol=0)


def test_evaluation_takes_trls_sequential_batches(llama_dir, feedback_file, tmp_path):
    """Evaluation walks the eval rows in data order in batches of ``eval_batch_size`` (transformers'
    sequential evaluation loop, so each batch's KL reference point is over TRL's rows, not rows
    regrouped by length): ``eval_loss`` is the row-weighted mean of the oracle's batch losses over
    those batches (12 rows at 5 a batch: 5, 5, 2; KL pairs rotated within train batches of 4)."""
    trainer = _trainer(llama_dir, feedback_file, tmp_path, eval_data=str(feedback_file), eval_batch_size=5,
                       max_eval_batches=-1, desirable_weight=1.2)
    trainer.train()
    trainer.eval_pairs = trainer.eval_pairs[:12]
    metrics = trainer.evaluate()
    rows, m, want, weights = trainer.eval_pairs, trainer.model, [], []
    for start in range(0, 12, 5):
        batch = rows[start:start + 5]
        pol, ref, kl_pol, kl_ref = (np.array([_row_logps(m, r, getattr(r, side), mode) for r in batch])
                                    for side in ("chosen", "rejected") for mode in ("policy", "base"))
        loss, _ = oracle(pol, ref, kl_pol, kl_ref, np.array([r.label for r in batch], float), "kto", 0.1, 1.2, 1.0)
        want.append(loss), weights.append(len(batch))
    assert metrics["eval_loss"] == pytest.approx(np.average(want, weights=weights), rel=1e-5)


def test_loading_unpaired_rows_speaks_of_rows(llama_dir, toy_tokenizer, toy_data_dir, tmp_path):
    """The load summary and the duplicate warning of an unpaired file count rows (prompt, completion and
    label), with no chosen == rejected to skip (an unpaired row's completion stands in both fields)."""
    from helpers import feedback_rows
    from mlx_dpo.data import load_datasets

    rows = feedback_rows(toy_data_dir, 6)
    path = _write(tmp_path / "fb.jsonl", rows + rows[:2] + [{**rows[2], "label": not rows[2]["label"]}])
    lines = []
    train, _ = load_datasets(DPOConfig(model=str(llama_dir), data=str(path), loss_type="kto",
                                       cache_dir=str(tmp_path / "cache")), toy_tokenizer, log=lines.append)
    assert len(train) == 9 and lines[0] == "train: 9 rows (0 truncated, 0 dropped as too long)"
    assert lines[1] == ("warning: train: 2 exact-duplicate rows (the same prompt, completion and label as an earlier "
                        "row); they are kept and weigh more; remove them if that is not intended")
