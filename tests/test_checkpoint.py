"""Training that survives: exact resume, atomic checkpoints, signals, NaN/OOM/disk-full faults."""

import errno
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

from mlx_dpo.train import checkpoint, stopping
from mlx_dpo.errors import CheckpointError, ConfigError, NonFiniteError, TrainingError, TrainingInterrupted
from mlx_dpo.cli.commands import main
from mlx_dpo.config.fields import DPOConfig
from mlx_dpo.train.trainer import DPOTrainer
from helpers import inject, interrupt_in_step

QUIET = dict(log=lambda *a: None)
TIMING = ("tokens_per_second", "peak_memory_gb", "compiled_shapes", "compile_seconds", "train_runtime")  # per process


def cfg_for(model_dir, data_dir, out, **kw):
    values = dict(model=str(model_dir), data=str(data_dir), output_dir=str(out), max_steps=6, batch_size=4,
                  learning_rate=3e-3, logging_steps=2, eval_steps=0, save_steps=2, progress_bar=False, seed=0)
    values.update(kw)
    return DPOConfig(**values)


def metrics(out):
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING and not k.startswith("time/")}
            for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def weights(path):
    return {k: np.array(v) for k, v in mx.load(str(path)).items()}


def test_resume_reproduces_an_uninterrupted_run(llama_dir, toy_data_dir, tmp_path):
    """20 steps straight == 10 steps, SIGINT (checkpoint), resume, 10 more: same adapters,
    reference copy (TR-DPO), optimizer, bco running mean and metrics.jsonl."""
    kw = dict(max_steps=20, save_steps=5, save_total_limit=2, logging_steps=3, eval_steps=5, loss_type="bco_pair",
              sync_ref_model=True, ref_model_sync_steps=3, lora_dropout=0.1, lr_scheduler_type="cosine",
              warmup_steps=3)
    straight = DPOTrainer(cfg_for(llama_dir, toy_data_dir, tmp_path / "a", **kw), **QUIET)
    result = straight.train()

    out = tmp_path / "b"
    first = DPOTrainer(cfg_for(llama_dir, toy_data_dir, out, **kw), **QUIET)
    interrupt_in_step(first, 10)
    with pytest.raises(TrainingInterrupted) as info:
        first.train()
    assert info.value.exit_code == 130 and "--resume" in str(info.value) and "step 10" in str(info.value)
    assert checkpoint.latest_checkpoint(out).name == "step-10"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored
    with pytest.raises(ConfigError, match="--resume"):  # an unfinished run is not silently restarted
        DPOTrainer(cfg_for(llama_dir, toy_data_dir, out, **kw), **QUIET)

    resumed = DPOTrainer(cfg_for(llama_dir, toy_data_dir, out, resume_from_checkpoint="latest", **kw), **QUIET)
    assert resumed.step == 10
    again = resumed.train()

    a, b = tmp_path / "a", out
    for name in ("adapters.safetensors", "checkpoints/step-20/reference.safetensors",
                 "checkpoints/step-20/optimizer.safetensors", "checkpoints/step-20/state.safetensors"):
        wa, wb = weights(a / name), weights(b / name)
        assert wa.keys() == wb.keys()
        for k in wa:
            np.testing.assert_allclose(wa[k], wb[k], atol=1e-6, rtol=0, err_msg=f"{name}: {k}")
    ma, mb = metrics(a), metrics(b)
    assert [r["step"] for r in mb] == [r["step"] for r in ma] == [3, 5, 6, 9, 10, 12, 15, 18, 20]
    for ra, rb in zip(ma, mb):
        assert ra.keys() == rb.keys()
        for k in ra:
            assert abs(ra[k] - rb[k]) <= 1e-6, (ra["step"], k, ra[k], rb[k])
    assert again.eval_metrics == result.eval_metrics
    # save_total_limit keeps the newest two; latest names the last; state is complete
    assert [p.name for p in checkpoint.list_checkpoints(b)] == ["step-15", "step-20"]
    ckpt = checkpoint.load_checkpoint(checkpoint.latest_checkpoint(b))
    assert ckpt.state["step"] == 20 and ckpt.state["optimizer_step"] == 20 and ckpt.optimizer["step"].item() == 20
    assert ckpt.state["sampler"]["seed"] == 0 and "loss_state.bco_running_mean" in ckpt.extra
    saved = DPOConfig.from_yaml(ckpt.path / "config.yaml")
    assert saved.loss_type == "bco_pair" and saved.resume_from_checkpoint is None  # reusing it never auto-resumes
    assert json.loads((ckpt.path / "adapter_config.json").read_text())["lora_parameters"]["rank"] == 8


def test_resume_rejects_config_changes_that_matter(llama_dir, toy_data_dir, tmp_path):
    out = tmp_path / "run"
    DPOTrainer(cfg_for(llama_dir, toy_data_dir, out, max_steps=2), **QUIET).train()
    with pytest.raises(ConfigError) as info:
        DPOTrainer(cfg_for(llama_dir, toy_data_dir, out, max_steps=2, resume_from_checkpoint="latest",
                           lora_rank=4, beta=0.2, batch_size=8), **QUIET)
    for key in ("lora_rank", "beta", "batch_size"):
        assert key in str(info.value)
    assert "max_steps" not in str(info.value)
    # harmless changes are fine: more steps, other logging/saving, a path to the run or to step-N
    for spec in ("latest", str(out), str(out / "checkpoints" / "step-2")):
        t = DPOTrainer(cfg_for(llama_dir, toy_data_dir, out, max_steps=4, logging_steps=1, save_steps=3,
                               save_total_limit=1, resume_from_checkpoint=spec), **QUIET)
        assert t.step == 2
    with pytest.raises(ConfigError, match="does not exist"):
        DPOTrainer(cfg_for(llama_dir, toy_data_dir, out, resume_from_checkpoint=str(tmp_path / "nope")), **QUIET)
    # resuming a finished run with the same max_steps is a no-op
    before = metrics(out)
    assert DPOTrainer(cfg_for(llama_dir, toy_data_dir, out, max_steps=2, resume_from_checkpoint="latest"),
                      **QUIET).train().step == 2
    assert metrics(out) == before


def test_finished_run_needs_overwrite_which_clears_only_after_validation(llama_dir, toy_data_dir, tmp_path):
    out = tmp_path / "run"
    DPOTrainer(cfg_for(llama_dir, toy_data_dir, out, max_steps=2), **QUIET).train()
    with pytest.raises(ConfigError, match="--overwrite"):
        DPOTrainer(cfg_for(llama_dir, toy_data_dir, out), **QUIET)
    with pytest.raises(ConfigError, match="is the model directory"):
        DPOTrainer(cfg_for(llama_dir, toy_data_dir, llama_dir, overwrite_output_dir=True), **QUIET)
    with pytest.raises(Exception):  # bad data: nothing of the old run is touched
        DPOTrainer(cfg_for(llama_dir, tmp_path / "missing.jsonl", out, overwrite_output_dir=True), **QUIET)
    assert (out / "adapters.safetensors").exists() and checkpoint.latest_checkpoint(out).name == "step-2"
    (out / "checkpoints" / ".step-9.abc.tmp").mkdir()  # a killed run's leftover
    t = DPOTrainer(cfg_for(llama_dir, toy_data_dir, out, max_steps=3, save_steps=0, overwrite_output_dir=True),
                   **QUIET)
    t.train()
    assert [p.name for p in checkpoint.list_checkpoints(out)] == ["step-3"]
    assert not (out / "checkpoints" / ".step-9.abc.tmp").exists()
    assert [r["step"] for r in metrics(out)] == [2, 3]


@pytest.mark.parametrize("where", ["loss", "gradient norm"])
def test_nonfinite_stops_keeping_the_last_checkpoint(llama_dir, toy_data_dir, tmp_path, where):
    out = tmp_path / "run"
    t = DPOTrainer(cfg_for(llama_dir, toy_data_dir, out), **QUIET)
    if where == "loss":
        inject(t, 4, lambda o: (o[0] * float("nan"),) + tuple(o[1:]))
    else:
        inject(t, 4, lambda o: tuple(o[:4]) + (o[4] * float("inf"),))
    with pytest.raises(NonFiniteError) as info:
        t.train()
    msg = str(info.value)
    assert "step 4" in msg and f"non-finite {where}" in msg and "learning_rate" in msg and "step-2" in msg
    assert checkpoint.latest_checkpoint(out).name == "step-2" and not (out / "adapters.safetensors").exists()
    checkpoint.load_checkpoint(out / "checkpoints" / "step-2")


def test_nonfinite_steps_can_be_skipped_and_are_counted(llama_dir, toy_data_dir, tmp_path):
    out = tmp_path / "run"
    t = DPOTrainer(cfg_for(llama_dir, toy_data_dir, out, skip_nonfinite_steps=True), **QUIET)
    inject(t, 3, lambda o: (o[0] * float("nan"),) + tuple(o[1:]))
    result = t.train()
    assert result.step == 6 and t.state.skipped_steps == 1 and t.optimizer.step.item() == 6  # the bad step is retried
    assert [(r["step"], r["skipped_steps"]) for r in metrics(out)] == [(2, 0), (4, 1), (6, 1)]
    assert checkpoint.load_checkpoint(out / "checkpoints" / "step-6").state["skipped_steps"] == 1


def test_out_of_memory_is_explained(llama_dir, toy_data_dir, tmp_path):
    out = tmp_path / "run"
    t = DPOTrainer(cfg_for(llama_dir, toy_data_dir, out), **QUIET)

    def oom(o):
        raise RuntimeError("[malloc] Unable to allocate 68719476736 bytes.")

    inject(t, 5, oom)
    with pytest.raises(TrainingError, match="step 5: out of memory.*gradient_checkpointing.*step-4"):
        t.train()
    assert checkpoint.latest_checkpoint(out).name == "step-4"


def test_disk_full_while_saving_leaves_no_partial_checkpoint(llama_dir, toy_data_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    t = DPOTrainer(cfg_for(llama_dir, toy_data_dir, out), **QUIET)
    write = checkpoint._write_arrays

    def full_disk(path, arrays):
        if t.step == 4 and path.name == "optimizer.safetensors":
            write(path, arrays)  # leave a real partial file behind in the temp dir
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        write(path, arrays)

    monkeypatch.setattr(checkpoint, "_write_arrays", full_disk)
    with pytest.raises(CheckpointError, match="disk is full.*last good one is .*step-2"):
        t.train()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step-2"]
    monkeypatch.setattr(checkpoint, "_write_arrays", write)
    resumed = DPOTrainer(cfg_for(llama_dir, toy_data_dir, out, resume_from_checkpoint="latest"), **QUIET)
    assert resumed.step == 2 and resumed.train().step == 6


def test_second_signal_stops_at_once():
    with stopping.StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
        assert stop.signum == signal.SIGTERM
        with pytest.raises(TrainingInterrupted) as info:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
    assert info.value.exit_code == 130
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


# A stand-in trainer (no mlx-lm import: starts in well under a second) whose every saved
# value equals its step, so a checkpoint mixing two saves is detected.
CHILD = """
import sys
from pathlib import Path
import mlx.core as mx, mlx.nn as nn, mlx.optimizers as optim
from mlx_dpo.train import checkpoint
from mlx_dpo.train.rundir import clean_stale
from mlx_dpo.data.cache import data_fingerprint
from mlx_dpo.loss import losses
from mlx_dpo.config.fields import DPOConfig
from mlx_dpo.data import TokenizedPair
from mlx_dpo.train.state import TrainState

out = Path(sys.argv[1])
cfg = DPOConfig(output_dir=str(out), save_total_limit=3, loss_type="bco_pair")
model = nn.Sequential(nn.Linear(512, 512), nn.Linear(512, 512))
optimizer = optim.AdamW(learning_rate=1e-3)
optimizer.init(model.trainable_parameters())
pairs = [TokenizedPair([1, i], [2], [3]) for i in range(8)]
state = TrainState(max_steps=10 ** 9, num_batches=2, data_fingerprint=data_fingerprint(pairs),
                   loss_state=losses.init_loss_state(cfg))
if sys.argv[2]:
    state = checkpoint.restore(checkpoint.load_checkpoint(checkpoint.latest_checkpoint(out)), state, model, optimizer)
clean_stale(out)
print("ready", state.step, flush=True)
while True:
    state.step += 1
    model.update(nn.utils.tree_map(lambda p: mx.full(p.shape, float(state.step)), model.parameters()))
    state.loss_state = {k: mx.array(float(state.step)) for k in state.loss_state}
    state.window.tokens = state.step
    checkpoint.save_checkpoint(out, state, model, optimizer, cfg, {"step": state.step})
"""


def check_consistent(path):
    ckpt = checkpoint.load_checkpoint(path)
    step = checkpoint.step_of(path)
    assert ckpt.step == step and ckpt.state["log"]["tokens"] == step
    assert all((np.array(v) == step).all() for v in ckpt.adapters.values())
    assert all(v.item() == step for v in (ckpt.extra[k] for k in ckpt.extra if k.startswith("loss_state.")))
    assert json.loads((path / "adapter_config.json").read_text()) == {"step": step}


def test_kill_9_while_saving_never_breaks_a_checkpoint(tmp_path):
    """SIGKILL at random moments while checkpoints are written and pruned: every step-N
    left is complete and consistent, ``latest`` names one, and the next start resumes from it."""
    out = tmp_path / "run"
    rng = random.Random(0)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    steps, left = [], 0
    for i in range(12):
        resume = "latest" if checkpoint.list_checkpoints(out) else ""
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(out), resume], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, env=env)
        line = child.stdout.readline()
        assert line.startswith("ready"), child.stderr.read()
        steps.append(int(line.split()[1]))
        time.sleep(rng.uniform(0.0, 0.5))
        child.kill()
        child.wait()
        child.stdout.close()
        child.stderr.close()
        latest = checkpoint.latest_checkpoint(out)
        pointer = (out / "checkpoints" / "latest").read_text().strip()
        assert latest is not None and (out / "checkpoints" / pointer).is_dir(), pointer
        for path in checkpoint.list_checkpoints(out):
            check_consistent(path)
        left += any(p.name.startswith(".") for p in (out / "checkpoints").iterdir())
    assert steps == sorted(steps) and steps[-1] > 10  # each start resumed where the last left off
    print(f"resumed at steps {steps}; {left} kills left temporaries behind (removed on the next start)")


def test_cli_sigterm_saves_and_resume_finishes(llama_dir, toy_data_dir, tmp_path):
    out = tmp_path / "run"
    args = [sys.executable, "-m", "mlx_dpo", "train", "--model", str(llama_dir), "--data", str(toy_data_dir),
            "--output-dir", str(out), "--batch-size", "4", "--no-progress-bar", "--logging-steps", "1",
            "--eval-steps", "0"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    child = subprocess.Popen(args + ["--max-steps", "100000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=env)
    logged = []
    for line in child.stdout:
        if line.startswith("step="):  # the first step is done
            logged.append(line)
            break
    child.send_signal(signal.SIGTERM)
    rest = child.stdout.read()  # the same reader: lines it buffered past "step=1" are not lost
    err = child.stderr.read()
    child.wait(timeout=60)
    assert child.returncode == 143, err
    assert "--resume" in err and "SIGTERM" in err
    logged += [line for line in rest.splitlines() if line.startswith("step=")]
    finished = [int(line.split()[0].split("=")[1]) for line in logged]
    assert finished == list(range(1, len(finished) + 1))
    step = checkpoint.load_checkpoint(checkpoint.latest_checkpoint(out)).step
    assert step == finished[-1]  # the checkpoint holds the last step the child finished (and logged)
    assert [r["step"] for r in metrics(out)] == finished
    done = CliRunner().invoke(main, args[3:] + ["--max-steps", str(step + 2), "--resume"])
    assert done.exit_code == 0, done.output
    assert f"resumed from {out / 'checkpoints' / f'step-{step}'}" in done.output
    assert [r["step"] for r in metrics(out)] == list(range(1, step + 3))


def test_no_pickle_and_no_remote_code_by_default():
    package = Path(checkpoint.__file__).parent
    for path in package.glob("*.py"):
        text = path.read_text()
        assert not re.search(r"import pickle|allow_pickle\s*=\s*True|torch\.load\(|np\.load\([^)]*pickle=True",
                             text), path
    assert DPOConfig().trust_remote_code is False
