"""Best checkpoint and early stopping (transformers' metric_for_best_model, greater_is_better,
load_best_model_at_end, early_stopping_patience/threshold) on a toy run whose eval loss turns up
(an over-high learning rate); the expected stop and best are computed here from the logged eval losses."""

import json

import mlx.core as mx
import numpy as np
import pytest

from mlx_dpo import DPOConfig, DPOTrainer
from mlx_dpo.errors import ConfigError, TrainingInterrupted
from mlx_dpo.train import checkpoint
from helpers import interrupt_in_step


def config(model_dir, data_dir, out, **kw):
    values = dict(model=str(model_dir), data=str(data_dir), output_dir=str(out), max_steps=16, batch_size=8,
                  learning_rate=1e-2, lr_scheduler_type="constant", logging_steps=1, eval_steps=1,
                  max_eval_batches=2, save_steps=0, progress_bar=False, seed=0)
    values.update(kw)
    return DPOConfig(**values)


def eval_losses(out) -> list:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]


def expected_stop(losses, patience, threshold=0.0):
    """transformers' rule, from the logged values: ``(best step, best loss, step the run stops at or None)``."""
    best_step, best, bad = None, None, 0
    for step, loss in losses:
        enough = best is None or best - loss > threshold
        if best is None or loss < best:
            best_step, best = step, loss
        bad = 0 if enough else bad + 1
        if bad >= patience:
            return best_step, best, step
    return best_step, best, None


def weights(path):
    return {k: np.array(v) for k, v in mx.load(str(path)).items()}


def test_load_best_model_at_end_and_early_stopping(llama_dir, toy_data_dir, tmp_path):
    out, lines = tmp_path / "run", []
    cfg = config(llama_dir, toy_data_dir, out, load_best_model_at_end=True, early_stopping_patience=2,
                 save_total_limit=1)
    result = DPOTrainer(cfg, log=lines.append).train()
    losses = eval_losses(out)
    best_step, best, stop = expected_stop(losses, patience=2)
    assert stop is not None and stop < cfg.max_steps, losses  # the loss turned up: the run stopped early
    assert best_step < stop and result.step == stop and losses[-1][0] == stop
    assert any(line.startswith("early stopping: eval_loss has not improved") and f"after step {stop}" in line
               for line in lines)
    # the adapters written are the best step's; its checkpoint survived save_total_limit 1
    assert [p.name for p in checkpoint.list_checkpoints(out)] == [f"step-{best_step}", f"step-{stop}"]
    written = weights(out / "adapters.safetensors")
    for k, v in weights(out / "checkpoints" / f"step-{best_step}" / "adapters.safetensors").items():
        np.testing.assert_array_equal(written[k], v)
    last = weights(out / "checkpoints" / f"step-{stop}" / "adapters.safetensors")
    assert any(not np.array_equal(written[k], last[k]) for k in last)
    # their eval loss, measured again by a fresh trainer, is the logged best
    fresh = DPOTrainer(config(llama_dir, toy_data_dir, tmp_path / "check"), log=lambda *a: None)
    checkpoint.load_adapters(fresh.model, out)
    assert fresh.evaluate()["eval_loss"] == pytest.approx(best, abs=1e-6)
    assert result.history[-1]["best_step"] == best_step and result.history[-1]["best_metric"] == best


def test_early_stopping_resumes_with_its_best_so_far(llama_dir, toy_data_dir, tmp_path):
    """Stopped by SIGINT between the best evaluation and the early stop, a resumed run stops at the
    same step as an uninterrupted one (its best and its count came back with the checkpoint)."""
    kw = dict(early_stopping_patience=3, early_stopping_threshold=0.005, save_steps=1)
    straight = DPOTrainer(config(llama_dir, toy_data_dir, tmp_path / "a", **kw), log=lambda *a: None).train()
    losses = eval_losses(tmp_path / "a")
    _, _, stop = expected_stop(losses, patience=3, threshold=0.005)
    assert stop is not None and straight.step == stop
    assert expected_stop(losses, patience=3)[2] != stop  # the threshold decides where it stops
    best_step = expected_stop(losses[:stop - 2], patience=3, threshold=0.005)[0]  # at the interruption

    out = tmp_path / "b"
    first = DPOTrainer(config(llama_dir, toy_data_dir, out, **kw), log=lambda *a: None)
    interrupt_in_step(first, stop - 2)
    with pytest.raises(TrainingInterrupted):
        first.train()
    resumed = DPOTrainer(config(llama_dir, toy_data_dir, out, resume_from_checkpoint="latest", **kw),
                         log=lambda *a: None)
    assert resumed.step == stop - 2 and resumed.state.best.step == best_step
    assert resumed.state.best.evals_without_improvement >= 1
    assert resumed.train().step == stop
    assert eval_losses(out) == eval_losses(tmp_path / "a")


def test_greater_is_better_follows_the_metric_name():
    assert not DPOConfig().best_is_greater and DPOConfig().best_metric_key == "eval_loss"
    cfg = DPOConfig(metric_for_best_model="rewards/accuracies")
    assert cfg.best_metric_key == "eval_rewards/accuracies" and cfg.best_is_greater
    assert not DPOConfig(metric_for_best_model="rewards/accuracies", greater_is_better=False).best_is_greater


@pytest.mark.parametrize("kw, match", [
    (dict(load_best_model_at_end=True), "load_best_model_at_end.*no effect without evaluation"),
    (dict(early_stopping_patience=3), "early_stopping_patience.*no effect without evaluation"),
    (dict(eval_steps=5, early_stopping_threshold=0.1), "early_stopping_threshold.*early_stopping_patience"),
    (dict(eval_steps=5, early_stopping_patience=0), "early_stopping_patience must be >= 1"),
])
def test_settings_that_cannot_act_are_refused(kw, match):
    with pytest.raises(ConfigError, match=match):
        DPOConfig(**kw)


def test_an_unknown_metric_names_the_metrics_there_are(llama_dir, toy_data_dir, tmp_path):
    cfg = config(llama_dir, toy_data_dir, tmp_path / "run", max_steps=2, metric_for_best_model="eval_accuracy")
    with pytest.raises(ConfigError, match="no eval_accuracy; it has .*eval_loss.*eval_rewards/accuracies"):
        DPOTrainer(cfg, log=lambda *a: None).train()
