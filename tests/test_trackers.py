"""report_to: wandb / tensorboard callbacks get every logged record; a missing package is a clear error."""

import json
import sys
import types
from pathlib import Path

import pytest

from mlx_dpo import DPOConfig, DPOTrainer
from mlx_dpo.errors import ConfigError
from mlx_dpo.monitor.trackers import COMPLETION_COLUMNS, scalars

from test_faults import cli, snapshot

GENERATE = dict(generate_during_eval=True, generate_eval_prompts=2, generate_max_new_tokens=4)  # at the step-4 eval


def cfg_for(model_dir, data_dir, tmp_path, **kw):
    return DPOConfig(model=str(model_dir), data=str(data_dir), output_dir=str(tmp_path / "run"), max_steps=4,
                     batch_size=4, logging_steps=2, eval_steps=4, max_eval_batches=1, progress_bar=False,
                     cache_dir=str(tmp_path / "cache"), **kw)


def written_completions(run_dir) -> list:
    """completions.jsonl (the metrics file's writer, not a tracker) as table rows."""
    rows = [json.loads(line) for line in (run_dir / "completions.jsonl").read_text().splitlines()]
    return [[r[k] for k in COMPLETION_COLUMNS] for r in rows]


def fake_modules(monkeypatch):
    calls = []

    class Run:
        def log(self, values, step):
            calls.append(("wandb.log", step, values))

        def finish(self):
            calls.append(("wandb.finish",))

    wandb = types.ModuleType("wandb")
    wandb.init = lambda **kw: calls.append(("wandb.init", kw["project"], kw["config"]["beta"])) or Run()
    wandb.Table = lambda columns, data: ("table", tuple(columns), len(data))

    class Writer:
        def __init__(self, log_dir):
            calls.append(("tb.open", log_dir))

        def add_scalar(self, key, value, step):
            calls.append(("tb.scalar", key, step))

        def add_text(self, key, text, step):
            calls.append(("tb.text", key, step, text))

        def flush(self):
            pass

        def close(self):
            calls.append(("tb.close",))

    tbx = types.ModuleType("tensorboardX")
    tbx.SummaryWriter = Writer
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    monkeypatch.setitem(sys.modules, "tensorboardX", tbx)
    monkeypatch.setenv("WANDB_API_KEY", "fake-key-for-the-fake-module")
    return calls


def test_trackers_get_every_record_at_its_step(llama_dir, toy_data_dir, tmp_path, monkeypatch):
    calls = fake_modules(monkeypatch)
    trainer = DPOTrainer(cfg_for(llama_dir, toy_data_dir, tmp_path, report_to=["wandb", "tensorboard"]),
                         log=lambda *a: None)
    result = trainer.train()
    assert calls[0] == ("wandb.init", "mlx-dpo", 0.1)
    logged = [c for c in calls if c[0] == "wandb.log"]
    assert [c[1] for c in logged] == [r["step"] for r in result.history] == [2, 4]
    assert logged[1][2]["eval/loss"] == result.history[1]["eval_loss"]
    assert logged[0][2]["train/loss"] == result.history[0]["loss"]
    assert ("tb.scalar", "train/rewards/margins", 2) in calls and ("tb.scalar", "eval/loss", 4) in calls
    assert calls[-1] in (("wandb.finish",), ("tb.close",)) and ("tb.open", str(tmp_path / "run" / "runs")) in calls


def test_a_missing_tracker_package_is_a_config_error_before_loading(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import fails
    with pytest.raises(ConfigError, match=r"report_to: wandb needs the wandb package \(pip install wandb\)"):
        DPOTrainer(DPOConfig(model="/nonexistent", output_dir=str(tmp_path / "run"), report_to="wandb"))
    with pytest.raises(ConfigError, match="report_to must be one of none, wandb, tensorboard, mlflow, trackio"):
        DPOConfig(report_to="comet_ml")


def test_wandb_without_a_key_is_refused_before_loading(tmp_path, monkeypatch):
    fake_modules(monkeypatch)
    monkeypatch.delenv("WANDB_API_KEY")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.delenv("NETRC", raising=False)
    with pytest.raises(ConfigError, match=r"report_to: wandb has no API key \(run `wandb login`"):
        DPOTrainer(DPOConfig(model="/nonexistent", output_dir=str(tmp_path / "run"), report_to="wandb"))
    monkeypatch.setenv("WANDB_MODE", "offline")  # needs no key; the model is loaded next (and missing here)
    with pytest.raises(ConfigError, match="/nonexistent"):
        DPOTrainer(DPOConfig(model="/nonexistent", output_dir=str(tmp_path / "run"), report_to="wandb"))


def test_a_tracker_directory_that_cannot_be_written_is_refused_before_overwrite(llama_dir, toy_data_dir, tmp_path,
                                                                                monkeypatch):
    """--overwrite removes the old run only once every check has passed: a file where tensorboard
    writes its directory refuses the run, and the old run stays whole."""
    fake_modules(monkeypatch)
    trainer = DPOTrainer(cfg_for(llama_dir, toy_data_dir, tmp_path), log=lambda *a: None)
    trainer.train()
    run = tmp_path / "run"
    (run / "runs").write_text("a file, not tensorboard's directory\n")
    before = snapshot(run)
    result = cli("train", "--model", llama_dir, "--data", toy_data_dir, "--output-dir", run, "--max-steps", 2,
                 "--batch-size", 2, "--no-progress-bar", "--report-to", "tensorboard", "--overwrite")
    assert result.exit_code == 2, result.output
    assert f"report_to: tensorboard writes to {run / 'runs'}, which is not a directory" in result.output
    assert snapshot(run) == before


def test_scalars_use_transformers_names():
    assert scalars({"step": 3, "loss": 0.5, "eval_loss": 0.6, "warnings": ["x"], "epoch": 1}) == {
        "train/loss": 0.5, "eval/loss": 0.6, "train/epoch": 1.0}


def test_mlflow_logs_the_config_and_every_record_to_a_local_store(llama_dir, toy_data_dir, tmp_path, monkeypatch):
    """A real MLflow (when installed): the run in OUTPUT_DIR/mlflow.db holds the config and each
    record's values at its step, and is marked finished; the completions are a table artifact in
    OUTPUT_DIR/mlartifacts (none in the working directory)."""
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    result = DPOTrainer(cfg_for(llama_dir, toy_data_dir, tmp_path, report_to="mlflow", **GENERATE),
                        log=lambda *a: None).train()
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'run' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("mlx-dpo").experiment_id])
    assert run.info.run_name == "run" and run.info.status == "FINISHED" and run.data.params["beta"] == "0.1"
    losses = client.get_metric_history(run.info.run_id, "train/loss")
    assert [(m.step, m.value) for m in losses] == [(r["step"], pytest.approx(r["loss"])) for r in result.history]
    (eval_loss,) = client.get_metric_history(run.info.run_id, "eval/loss")
    assert (eval_loss.step, eval_loss.value) == (4, pytest.approx(result.history[-1]["eval_loss"]))
    assert [a.path for a in client.list_artifacts(run.info.run_id, "completions")] == ["completions/step-4.json"]
    table = json.loads(Path(client.download_artifacts(run.info.run_id, "completions/step-4.json", str(tmp_path)))
                       .read_text())
    assert table == {"columns": list(COMPLETION_COLUMNS), "data": written_completions(tmp_path / "run")}
    assert run.info.artifact_uri.startswith((tmp_path / "run" / "mlartifacts").as_uri())
    assert list((tmp_path / "cwd").iterdir()) == []


def test_mlflow_is_imported_only_when_asked(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import fails
    DPOConfig(report_to="wandb")  # never touches mlflow
    with pytest.raises(ConfigError, match=r"mlflow package \(pip install mlflow\)"):
        DPOTrainer(DPOConfig(report_to="mlflow", output_dir=str(tmp_path / "run")), log=lambda *a: None)


def test_trackers_get_the_completions_of_each_evaluation(llama_dir, toy_data_dir, tmp_path, monkeypatch):
    calls = fake_modules(monkeypatch)
    DPOTrainer(cfg_for(llama_dir, toy_data_dir, tmp_path, report_to=["wandb", "tensorboard"], **GENERATE),
               log=lambda *a: None).train()
    tables = [c for c in calls if c[0] == "wandb.log" and "completions" in c[2]]
    assert [(c[1], c[2]["completions"]) for c in tables] == [(4, ("table", ("step", "model", "prompt", "completion"), 4))]
    (text,) = [c for c in calls if c[0] == "tb.text"]
    assert text[1:3] == ("completions", 4) and text[3].count("| 4 | reference |") == 2
    assert text[3].count("| 4 | policy |") == 2


TRACKIO_RUN = """
import json, sys
from mlx_dpo import DPOConfig, DPOTrainer
from trackio.sqlite_storage import SQLiteStorage
model, data, out = sys.argv[1:4]
cfg = DPOConfig(model=model, data=data, output_dir=out, max_steps=4, batch_size=4, logging_steps=2, eval_steps=4,
                max_eval_batches=1, progress_bar=False, report_to="trackio", **json.loads(sys.argv[4]))
history = DPOTrainer(cfg, log=lambda *a: None).train().history
print(json.dumps({"history": history, "logs": SQLiteStorage.get_logs("mlx-dpo", "run")}))
"""


def test_trackio_logs_every_record_to_its_local_store(llama_dir, toy_data_dir, tmp_path):
    """A real trackio (when installed), in a process of its own (trackio reads TRACKIO_DIR when
    imported), its store in the test's TRACKIO_DIR: each record's values at its step, and the
    completions of the evaluation as a table at its step."""
    pytest.importorskip("trackio")
    import os
    import subprocess

    env = {**os.environ, "TRACKIO_DIR": str(tmp_path / "trackio"), "PYTHONPATH": os.pathsep.join(sys.path)}
    env.pop("TRACKIO_PROJECT", None)
    done = subprocess.run([sys.executable, "-c", TRACKIO_RUN, str(llama_dir), str(toy_data_dir), str(tmp_path / "run"),
                           json.dumps(GENERATE)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    history, logs = out["history"], [r for r in out["logs"] if "completions" not in r]
    (tables,) = [(r["step"], r["completions"]) for r in out["logs"] if "completions" in r]
    rows = [dict(zip(COMPLETION_COLUMNS, row)) for row in written_completions(tmp_path / "run")]
    assert tables == (4, {"_type": "trackio.table", "_value": rows})
    assert [(r["step"], r["train/loss"]) for r in logs] == [(r["step"], pytest.approx(r["loss"])) for r in history]
    assert logs[-1]["eval/loss"] == pytest.approx(history[-1]["eval_loss"])
    assert (tmp_path / "trackio" / "mlx-dpo.db").is_file()
