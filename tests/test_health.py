"""Health warnings: each one provoked by synthetic records, rate limiting, and one real run
whose warning reaches metrics.jsonl; eval_on_start's step-0 record (and not again on resume)."""

import json
import math

from mlx_dpo import DPOConfig, DPOTrainer
from mlx_dpo.monitor.health import LN2, HealthMonitor

HEALTHY = {"loss": 0.5, "rewards/chosen": 0.1, "rewards/margins": 1.0, "rewards/accuracies": 0.8,
           "grad_norm": 1.0}


def feed(monitor, records):
    """Log ``records`` (steps 10, 20, ...) through ``monitor``; the records as written."""
    out = []
    for i, r in enumerate(records, 1):
        record = {"step": 10 * i, **r}
        monitor.on_log(None, record)
        out.append(record)
    return out


def kinds(records):
    return [sorted(r.get("warnings", {})) for r in records]


def test_healthy_records_give_no_warning():
    lines = []
    records = feed(HealthMonitor(lines.append), [HEALTHY] * 30 + [{"eval_rewards/accuracies": 0.75}])
    assert lines == [] and all("warnings" not in r for r in records)


def test_chosen_below_reference_after_patience_steps():
    lines = []
    records = feed(HealthMonitor(lines.append, patience=3), [{**HEALTHY, "rewards/chosen": -0.2}] * 3)
    assert kinds(records) == [[], [], ["chosen_below_reference"]]
    assert len(lines) == 1 and "rpo_alpha" in lines[0] and lines[0].startswith("warning: step 30:")


def test_a_positive_step_resets_the_chosen_streak():
    below, above = {**HEALTHY, "rewards/chosen": -0.2}, HEALTHY
    records = feed(HealthMonitor(lambda m: None, patience=3), [below, below, above, below, below])
    assert all(k == [] for k in kinds(records))


def test_overfitting_when_eval_accuracy_lags():
    train = {**HEALTHY, "rewards/accuracies": 1.0}
    records = feed(HealthMonitor(lambda m: None), [train, {"eval_rewards/accuracies": 0.6}])
    assert kinds(records) == [[], ["overfitting"]]
    close = feed(HealthMonitor(lambda m: None), [train, {"eval_rewards/accuracies": 0.85}])
    assert kinds(close) == [[], []]


def test_the_step0_baseline_is_not_overfitting():
    monitor = HealthMonitor(lambda m: None)
    monitor.on_log(None, {"step": 0, "eval_rewards/accuracies": 0.0})  # ties at step 0: accuracy 0
    assert kinds(feed(monitor, [{**HEALTHY, "rewards/accuracies": 1.0}])) == [[]]


def test_loss_at_ln2_only_after_warmup():
    stuck = {**HEALTHY, "loss": LN2 + 1e-4}
    records = feed(HealthMonitor(lambda m: None, warmup_steps=20, patience=3), [stuck] * 5)
    # steps 10 and 20 are in the warmup; 30, 40, 50 are three in a row after it
    assert kinds(records) == [[], [], [], [], ["loss_at_ln2"]]
    assert "learning_rate" in records[-1]["warnings"]["loss_at_ln2"]


def test_margins_exploding():
    records = feed(HealthMonitor(lambda m: None), [HEALTHY, {**HEALTHY, "rewards/margins": 25.0}])
    assert kinds(records) == [[], ["margins_exploding"]]


def test_grad_norm_spike_against_the_running_median():
    records = feed(HealthMonitor(lambda m: None), [HEALTHY] * 5 + [{**HEALTHY, "grad_norm": 11.0}])
    assert kinds(records)[-1] == ["grad_norm_spike"]
    few = feed(HealthMonitor(lambda m: None), [HEALTHY] * 2 + [{**HEALTHY, "grad_norm": 50.0}])
    assert kinds(few)[-1] == []  # fewer than 5 values: no median to trust yet


def test_each_kind_is_rate_limited():
    lines = []
    records = feed(HealthMonitor(lines.append, every=10), [{**HEALTHY, "rewards/margins": 30.0}] * 25)
    warned = [i for i, r in enumerate(records) if r.get("warnings")]
    assert warned == [0, 10, 20] and len(lines) == 3


def cfg_for(model_dir, data_dir, out, **kw):
    values = dict(model=str(model_dir), data=str(data_dir), output_dir=str(out), batch_size=4, logging_steps=1,
                  eval_steps=0, save_steps=2, max_eval_batches=2, progress_bar=False, seed=0)
    return DPOConfig(**{**values, **kw})


def read_metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_stuck_run_writes_the_warning_and_the_baseline_to_metrics(llama_dir, toy_data_dir, tmp_path):
    """learning_rate 1e-9: the adapters stay ~0, the loss stays at ln 2."""
    out, lines = tmp_path / "run", []
    cfg = cfg_for(llama_dir, toy_data_dir, out, max_steps=4, learning_rate=1e-9, eval_on_start=True)
    DPOTrainer(cfg, log=lines.append).train()
    records = read_metrics(out)
    assert records[0]["step"] == 0 and "eval_loss" in records[0] and "loss" not in records[0]
    assert math.isclose(records[0]["eval_loss"], LN2, abs_tol=1e-4)  # the untrained baseline
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4]
    assert "loss_at_ln2" in records[3].get("warnings", {}), records  # 3 logging steps in a row
    assert any("[loss_at_ln2]" in line for line in lines)


def test_eval_on_start_not_again_on_resume_and_health_warnings_off(llama_dir, toy_data_dir, tmp_path):
    out = tmp_path / "run"
    kw = dict(learning_rate=1e-9, eval_on_start=True, health_warnings=False)
    DPOTrainer(cfg_for(llama_dir, toy_data_dir, out, max_steps=2, **kw), log=lambda m: None).train()
    DPOTrainer(cfg_for(llama_dir, toy_data_dir, out, max_steps=4, resume_from_checkpoint="latest", **kw),
               log=lambda m: None).train()
    records = read_metrics(out)
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4]
    assert all("warnings" not in r for r in records)


def test_a_resumed_run_warns_as_the_run_straight_through(llama_dir, toy_data_dir, tmp_path):
    kw = dict(learning_rate=1e-9, max_steps=6)
    DPOTrainer(cfg_for(llama_dir, toy_data_dir, tmp_path / "straight", **kw), log=lambda m: None).train()
    split = tmp_path / "split"
    DPOTrainer(cfg_for(llama_dir, toy_data_dir, split, **{**kw, "max_steps": 2}), log=lambda m: None).train()
    DPOTrainer(cfg_for(llama_dir, toy_data_dir, split, resume_from_checkpoint="latest", **kw),
               log=lambda m: None).train()
    warnings = [[r.get("warnings") for r in read_metrics(out)] for out in (tmp_path / "straight", split)]
    assert warnings[0] == warnings[1] and warnings[0][2] is not None  # loss_at_ln2 at step 3, after the resume
