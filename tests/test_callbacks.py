"""Callbacks are public API: events in order, live log_history, and the log= hook."""

import json

import numpy as np

from mlx_dpo import DPOConfig, DPOTrainer, TrainerCallback


def cfg_for(model_dir, data_dir, tmp_path, **kw):
    values = dict(model=str(model_dir), data=str(data_dir), output_dir=str(tmp_path / "run"), max_steps=6,
                  batch_size=4, learning_rate=3e-3, logging_steps=2, eval_steps=3, save_steps=4,
                  progress_bar=False, seed=0)
    values.update(kw)
    return DPOConfig(**values)


class Recorder(TrainerCallback):
    def __init__(self):
        self.events, self.records, self.history_lengths = [], [], []

    def on_train_begin(self, state):
        self.events.append(("begin", state.step, state.max_steps))

    def on_step_end(self, state, metrics):
        self.events.append(("step", state.step, metrics["loss"], metrics["grad_norm"]))

    def on_log(self, state, record):
        self.events.append(("log", state.step))
        self.records.append(record)
        self.history_lengths.append(len(state.log_history))
        assert state.log_history[-1] is record  # the history grows live, before the callbacks run

    def on_evaluate(self, state, metrics):
        self.events.append(("evaluate", state.step, sorted(metrics)))

    def on_save(self, state, path):
        self.events.append(("save", state.step, path.name, path.is_dir()))

    def on_train_end(self, state):
        self.events.append(("end", state.step))


def test_user_callbacks_see_every_event_in_order(llama_dir, toy_data_dir, tmp_path):
    rec, lines = Recorder(), []
    trainer = DPOTrainer(cfg_for(llama_dir, toy_data_dir, tmp_path), log=lines.append, callbacks=[rec])
    result = trainer.train()
    kinds = [e[0] for e in rec.events]
    assert rec.events[0] == ("begin", 0, 6) and rec.events[-1] == ("end", 6)
    assert [e[1] for e in rec.events if e[0] == "step"] == [1, 2, 3, 4, 5, 6]
    # logging_steps 2 -> records at 2, 4, 6; eval_steps 3 -> evaluations at 3 and 6 (3 is an eval-only record)
    assert [e[1] for e in rec.events if e[0] == "log"] == [2, 3, 4, 6]
    assert [e[1] for e in rec.events if e[0] == "evaluate"] == [3, 6]
    assert all("eval_loss" in e[2] for e in rec.events if e[0] == "evaluate")
    # save_steps 4 -> step-4, then the final step-6; each directory exists when on_save runs
    assert [e[1:] for e in rec.events if e[0] == "save"] == [(4, "step-4", True), (6, "step-6", True)]
    assert kinds.index("evaluate") < kinds.index("log", kinds.index("evaluate"))  # eval results are logged after
    assert rec.history_lengths == [1, 2, 3, 4] and trainer.state.log_history == result.history
    # the step's metrics are those the logged window averages
    losses = [e[2] for e in rec.events if e[0] == "step"]
    np.testing.assert_allclose(rec.records[0]["loss"], np.mean(losses[0:2]), rtol=1e-6)
    np.testing.assert_allclose(rec.records[2]["loss"], np.mean(losses[2:4]), rtol=1e-6)
    # ... but grad_norm is the logging step's own pre-clip norm, as transformers' Trainer logs it
    norms = [e[3] for e in rec.events if e[0] == "step"]
    assert [rec.records[i]["grad_norm"] for i in (0, 2, 3)] == [norms[1], norms[3], norms[5]]
    assert "grad_norm" not in rec.records[1]  # the eval-only record at step 3
    assert abs(np.mean(norms[0:2]) - norms[1]) > 1e-6 * norms[1]  # the window mean would differ
    # the metrics file holds the same records
    on_disk = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert on_disk == json.loads(json.dumps(rec.records))
    assert sum(line.startswith("step=") for line in lines) == 4


def test_log_hook_gets_metric_lines_with_the_progress_bar_on(llama_dir, toy_data_dir, tmp_path, capsys):
    lines = []
    DPOTrainer(cfg_for(llama_dir, toy_data_dir, tmp_path, progress_bar=True, max_steps=4, eval_steps=0),
               log=lines.append).train()
    metric_lines = [line for line in lines if line.startswith("step=")]
    assert [line.split()[0] for line in metric_lines] == ["step=2", "step=4"]
    assert all("loss=" in line and "learning_rate=" in line for line in metric_lines)
    assert "train: 100%" in capsys.readouterr().err  # the bar itself went to stderr


def test_a_callback_with_only_some_methods_is_fine(llama_dir, toy_data_dir, tmp_path):
    class OnlyLogs:
        def __init__(self):
            self.steps = []

        def on_log(self, state, record):
            self.steps.append(record["step"])

    cb = OnlyLogs()
    DPOTrainer(cfg_for(llama_dir, toy_data_dir, tmp_path, eval_steps=0), log=lambda *a: None, callbacks=[cb]).train()
    assert cb.steps == [2, 4, 6]
