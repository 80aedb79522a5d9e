"""Every loss trains inside the compiled step, selected by config alone."""

import math
import sys
import textwrap

import mlx.core as mx
import numpy as np
import pytest
from test_losses import np_batch  # the float64 numpy losses, written from the papers / TRL

from mlx_dpo.data.batching import BatchSampler, collate
from mlx_dpo.config.fields import DPOConfig
from mlx_dpo.errors import ConfigError
from mlx_dpo.forward.logprobs import completion_logps
from mlx_dpo.loss.losses import LOSSES
from mlx_dpo.train.trainer import DPOTrainer

OPTIONS = {"robust": {"label_smoothing": 0.1}, "simpo": {"beta": 2.0}}


class StepMetrics:
    """Records every optimizer step's metrics (``on_step_end``)."""

    def __init__(self):
        self.steps = {}

    def on_step_end(self, state, metrics):
        self.steps[state.step] = dict(metrics)


def first_batch(trainer):
    """The first training batch, drawn from a fresh sampler with the run's seed."""
    indices = next(iter(BatchSampler(trainer.train_pairs, trainer.cfg.batch_size, trainer.cfg.seed,
                                     shapes=trainer.shapes)))
    return [trainer.train_pairs[i] for i in indices]


def expected_first_step(trainer):
    """Step 1 in numpy: at initialisation LoRA B = 0, so the policy's token log-probs are the
    base model's, and so are the reference's; the loss and metrics follow from the float64 formulas."""
    pairs = first_batch(trainer)
    arrays = {k: mx.array(v) for k, v in collate(pairs, list(range(len(pairs)))).arrays().items()}  # unshared layout
    out = completion_logps(trainer.model, arrays)
    tl = np.array(out["token_logps"]).astype(np.float64)
    mask = np.array(out["mask"]).astype(np.float64)
    return np_batch(trainer.cfg, tl, tl, mask, np.array(out["logits_sum"]), None)


def distinct_shapes(trainer, steps):
    it = iter(BatchSampler(trainer.train_pairs, trainer.cfg.batch_size, trainer.cfg.seed, shapes=trainer.shapes))
    return {tuple(v.shape for v in trainer.collate(trainer.train_pairs, next(it)).arrays().values())
            for _ in range(steps)}


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_each_loss_trains_without_nan(loss, llama_dir, toy_data_dir, tmp_path):
    cfg = DPOConfig(model=str(llama_dir), data=str(toy_data_dir), output_dir=str(tmp_path / "run"), loss_type=loss,
                    max_steps=4, batch_size=4, learning_rate=1e-2, logging_steps=2, eval_steps=4, max_eval_batches=2,
                    progress_bar=False, **OPTIONS.get(loss, {}))
    steps = StepMetrics()
    trainer = DPOTrainer(cfg, log=lambda *a: None, callbacks=[steps])
    want_loss, want_metrics = expected_first_step(trainer)
    result = trainer.train()
    last = result.history[-1]
    assert all(math.isfinite(v) for v in last.values() if isinstance(v, float)), last
    assert trainer.trace_count == len(distinct_shapes(trainer, cfg.max_steps))
    # the configured loss ran inside the compiled step: step 1 equals the numpy formula
    got = steps.steps[1]
    np.testing.assert_allclose(got["loss"], want_loss, rtol=1e-5, atol=1e-6)
    for k, v in want_metrics.items():
        np.testing.assert_allclose(got[k], v, rtol=1e-5, atol=1e-6, err_msg=k)
    assert sorted(steps.steps) == [1, 2, 3, 4]


def test_loss_mixture_and_custom_loss_from_config(llama_dir, toy_data_dir, tmp_path, monkeypatch):
    module = tmp_path / "my_losses.py"
    module.write_text(textwrap.dedent("""
        import mlx.core as mx
        def margin_loss(c, r, rc, rr, beta=0.1, **kw):
            chosen, rejected = beta * (c - rc), beta * (r - rr)
            return mx.maximum(0.0, 1.0 - (chosen - rejected)), chosen, rejected
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    # step 1 has policy == reference: every margin is 0, so the loss is a number known in closed form:
    # 0.8 * ln 2 (sigmoid) + 0.2 * 2 ln 2 (bco_pair, running mean 0); max(0, 1 - 0) = 1 (the custom hinge)
    cases = ((["sigmoid", "bco_pair"], [0.8, 0.2], 0.8 * math.log(2) + 0.2 * 2 * math.log(2)),
             ("my_losses:margin_loss", None, 1.0))
    for loss_type, weights, step1 in cases:
        cfg = DPOConfig(model=str(llama_dir), data=str(toy_data_dir), output_dir=str(tmp_path / "run"),
                        overwrite_output_dir=True, loss_type=loss_type, loss_weights=weights, max_steps=2,
                        batch_size=4, learning_rate=1e-2, eval_steps=0, progress_bar=False)
        steps = StepMetrics()
        trainer = DPOTrainer(cfg, log=lambda *a: None, callbacks=[steps])
        result = trainer.train()
        assert np.isfinite(result.history[-1]["loss"])
        assert steps.steps[1]["loss"] == pytest.approx(step1, abs=1e-6), loss_type
        assert abs(steps.steps[2]["loss"] - step1) > 1e-4  # and it trained
    sys.modules.pop("my_losses", None)


def test_options_a_loss_cannot_use_fail_at_config_time(llama_dir, toy_data_dir, tmp_path):
    with pytest.raises(ConfigError, match="label_smoothing"):
        DPOTrainer(DPOConfig(model=str(llama_dir), data=str(toy_data_dir), output_dir=str(tmp_path), loss_type="hinge",
                             label_smoothing=0.1), log=lambda *a: None)
    with pytest.raises(ConfigError, match="sigmoid"):
        DPOTrainer(DPOConfig(model=str(llama_dir), data=str(toy_data_dir), output_dir=str(tmp_path),
                             loss_type="sigmod"), log=lambda *a: None)
