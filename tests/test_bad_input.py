"""Bad input, second round (issue 32): each case through the CLI, with its message, its exit
code, and nothing written or changed where it should not be."""

import json

import numpy as np
import pytest
import yaml

from mlx_dpo.errors import JudgeError
from mlx_dpo.generation.judges import score
from mlx_dpo.train.rundir import RunLock

from test_faults import _disk_full, cli, run_dir, snapshot  # noqa: F401  (run_dir: a finished two-step run)


def test_sample_refuses_a_non_utf8_prompts_file_with_its_line(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"hello\nna\xefve\n")
    result = cli("sample", "--model", "toy:llama", "--prompts", prompts, "--judge", "shorter",
                 "--output", tmp_path / "pairs.jsonl")
    assert result.exit_code == 2, result.output
    assert f"{prompts}:2: invalid UTF-8 (invalid continuation byte at byte 8)" in result.output
    assert not (tmp_path / "pairs.jsonl").exists()


def test_sample_checks_its_output_before_sampling(tmp_path):
    prompts, blocker = tmp_path / "prompts.txt", tmp_path / "a-file"
    prompts.write_text("hello\n")
    blocker.write_text("not a directory\n")
    result = cli("sample", "--model", "toy:llama", "--prompts", prompts, "--judge", "shorter",
                 "--output", blocker / "pairs.jsonl")
    assert result.exit_code == 2, result.output
    assert f"{blocker} is not a writable directory (checked before sampling)" in result.output
    assert blocker.read_text() == "not a directory\n"


def test_a_judge_may_return_any_number_float_takes():
    assert score(lambda p, c: np.float32(1.5), "p", "c", "row 1") == 1.5
    assert score(lambda p, c: np.int64(3), "p", "c", "row 1") == 3.0
    for bad in (True, "1.5", float("nan"), None):
        with pytest.raises(JudgeError, match="row 1: the judge returned"):
            score(lambda p, c: bad, "p", "c", "row 1")


def test_report_names_the_line_of_a_broken_config(run_dir, tmp_path):  # noqa: F811
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text((run_dir / "metrics.jsonl").read_text())
    (run / "config.yaml").write_text("beta: 0.1\nloss_type: [sigmoid\n")
    result = cli("report", run, "--output", tmp_path / "report")
    assert result.exit_code == 2, result.output
    assert f"{run / 'config.yaml'}:3: not a readable YAML config" in result.output
    assert not (tmp_path / "report").exists()


def test_audit_refuses_a_run_that_is_still_training(run_dir):  # noqa: F811
    lock = RunLock(run_dir)
    lock.acquire()  # as the training process holds it
    try:
        before = snapshot(run_dir)
        result = cli("audit", run_dir)
    finally:
        lock.release()
    assert result.exit_code == 2, result.output
    assert "is in use by another run" in result.output and snapshot(run_dir) == before


def test_audit_without_a_config_needs_data(run_dir, tmp_path):  # noqa: F811
    run = tmp_path / "run"
    run.mkdir()
    for name in ("adapters.safetensors", "adapter_config.json"):
        (run / name).write_bytes((run_dir / name).read_bytes())
    config = json.loads((run / "adapter_config.json").read_text())
    config["model"] = yaml.safe_load((run_dir / "config.yaml").read_text())["model"]
    (run / "adapter_config.json").write_text(json.dumps(config))
    result = cli("audit", run)
    assert result.exit_code == 2, result.output
    assert f"{run} has no config.yaml naming its training data; pass --data FILE" in result.output
    assert sorted(p.name for p in run.iterdir()) == ["adapter_config.json", "adapters.safetensors"]


def test_a_mistyped_local_data_path_suggests_the_file_at_once(tmp_path, toy_data_dir):
    data = tmp_path / "mydata"
    data.mkdir()
    (data / "train.jsonl").write_text((toy_data_dir / "train.jsonl").read_text())
    result = cli("lint", "--data", data / "train.jsnl")
    assert result.exit_code == 2, result.output
    assert f"did you mean {data / 'train.jsonl'}?" in result.output
    assert "Hub" not in result.output


def test_a_file_size_limit_is_not_called_a_full_disk(llama_dir, toy_data_dir, tmp_path, monkeypatch):
    """A write that fails under a file-size limit (``ulimit -f``; MLX raises RuntimeError) names
    the limit and says to raise it, not to free space."""
    import shutil
    from collections import namedtuple

    from mlx_dpo.util import io

    _disk_full(monkeypatch)  # every safetensors write fails ...
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(1 << 40, 0, 1 << 39))  # ... with space left
    monkeypatch.setattr(io, "file_size_limit", lambda: 4096)  # and a 4 KB file-size limit
    out = tmp_path / "run"
    result = cli("train", "--model", llama_dir, "--data", toy_data_dir, "--output-dir", out, "--max-steps", 2,
                 "--save-steps", 2, "--batch-size", 4, "--no-progress-bar", "--cache-dir", tmp_path / "cache")
    assert result.exit_code == 1, result.output
    assert (f"could not save checkpoint {out / 'checkpoints' / 'step-2'}: a file reached the file-size limit "
            "(ulimit -f: 4096 bytes); raise the limit") in result.output
    assert "free space" not in result.output and "disk is full" not in result.output


@pytest.mark.parametrize("hosts, rank, message", [
    (None, "0", "MLX_HOSTFILE={hostfile}: cannot read it (No such file or directory)"),
    ("not json", "0", "MLX_HOSTFILE={hostfile}: not JSON"),
    ('{"hosts": 2}', "0", "expected a JSON list of hosts, each a list of \"host:port\" strings"),
    ('[["127.0.0.1:5000"], ["127.0.0.1:5001"]]', "2", "MLX_RANK=2: expected a rank from 0 to 1"),
])
def test_a_broken_launch_environment_is_named(hosts, rank, message, tmp_path, monkeypatch, llama_dir, toy_data_dir):
    from mlx_dpo.util import distributed

    hostfile = tmp_path / "hosts.json"
    if hosts is not None:
        hostfile.write_text(hosts)
    monkeypatch.setattr(distributed, "_WORLD", None)
    monkeypatch.setenv("MLX_HOSTFILE", str(hostfile))
    monkeypatch.setenv("MLX_RANK", rank)
    result = cli("train", "--model", llama_dir, "--data", toy_data_dir, "--output-dir", tmp_path / "run",
                 "--max-steps", 1, "--no-progress-bar")
    assert result.exit_code == 2, result.output
    assert message.format(hostfile=hostfile) in result.output
    assert not (tmp_path / "run").exists()


def test_a_rank_whose_peer_never_starts_stops_after_ddp_timeout(tmp_path, llama_dir, toy_data_dir):
    """Rank 0 of two, the other never started: MLX's ring backend would wait for ever; ddp_timeout
    covers the start-up too (hard timeout on the test itself)."""
    import os
    import subprocess
    import sys
    import time

    from helpers import write_local_hostfile

    hostfile = write_local_hostfile(tmp_path / "hosts.json", 2)
    env = dict(os.environ, MLX_RANK="0", MLX_HOSTFILE=str(hostfile))
    tic = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "mlx_dpo", "train", "--model", str(llama_dir), "--data",
                        str(toy_data_dir), "--output-dir", str(tmp_path / "run"), "--max-steps", "1",
                        "--no-progress-bar", "--ddp-timeout", "3"], env=env, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == -15, p.stdout + p.stderr  # ended by the watcher's SIGTERM (143 in a shell)
    assert "rank 0: the other ranks did not join within ddp_timeout (3 s)" in p.stderr
    assert time.monotonic() - tic < 60 and not (tmp_path / "run").exists()


def test_status_tells_a_complete_run_from_a_failed_one(run_dir, llama_dir, toy_data_dir, tmp_path,  # noqa: F811
                                                       monkeypatch):
    """mlx.launch exits 0 whatever its ranks did: `mlx-dpo status` is what a script checks."""
    result = cli("status", run_dir)
    assert result.exit_code == 0 and result.output.startswith("complete: 2 steps"), result.output
    lock = RunLock(run_dir)
    lock.acquire()
    try:
        result = cli("status", run_dir)
    finally:
        lock.release()
    assert result.exit_code == 1 and "running: " in result.output
    out = tmp_path / "failed"
    _disk_full(monkeypatch, after=3)  # step-2's checkpoint is written, then the disk is full
    result = cli("train", "--model", llama_dir, "--data", toy_data_dir, "--output-dir", out, "--max-steps", 4,
                 "--save-steps", 2, "--batch-size", 4, "--no-progress-bar", "--cache-dir", tmp_path / "cache")
    assert result.exit_code == 1, result.output
    result = cli("status", out)
    assert result.exit_code == 1, result.output
    assert f"not complete: the run stopped before its end (see its output); the last checkpoint is {out}" \
        in result.output and "step-2 (resume with --resume)" in result.output
    assert cli("status", tmp_path).exit_code == 2


def test_a_memory_limit_is_named_before_training_and_a_crash_past_it_says_where(tmp_path, llama_dir, toy_data_dir):
    """Past ``ulimit -v`` MLX's allocation fails with SIGSEGV, which no handler can explain when it
    comes: the run says so before training, and a crash prints Python's fault report, not nothing."""
    import subprocess
    import sys

    args = [sys.executable, "-m", "mlx_dpo", "train", "--model", str(llama_dir), "--data", str(toy_data_dir),
            "--output-dir", str(tmp_path / "run"), "--max-steps", "1", "--batch-size", "2", "--no-progress-bar",
            "--eval-strategy", "no", "--cache-dir", str(tmp_path / "cache")]
    limit = "import resource; resource.setrlimit(resource.RLIMIT_AS, ({0}, resource.RLIM_INFINITY)); "
    run = "import runpy, sys; sys.argv = {1!r}; runpy.run_module('mlx_dpo', run_name='__main__')"
    p = subprocess.run([sys.executable, "-c", (limit + run).format(64 << 30, ["mlx-dpo", *args[3:]])],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "warning: this process has a memory limit (ulimit -v/-d: 68.72 GB)" in p.stdout
    crash = ("import ctypes, sys; sys.argv = ['mlx-dpo', 'status', '/']; import mlx_dpo.cli.commands as c; "
             "c.main = lambda: ctypes.string_at(0); from mlx_dpo.entry import run; run()")  # a crash inside a command
    p = subprocess.run([sys.executable, "-c", crash], capture_output=True, text=True, timeout=60)
    assert p.returncode == -11 and "Fatal Python error: Segmentation fault" in p.stderr, p.stderr


@pytest.mark.parametrize("args, message", [
    (["generate", "{run}", "--prompt", "hi", "--max-tokens", "-1"], "Invalid value for '--max-tokens': -1 is not in the range x>=1"),
    (["generate", "{run}", "--prompt", "hi", "--temp", "-0.5"], "Invalid value for '--temp': -0.5 is not in the range x>=0.0"),
    (["audit", "{run}", "--top", "-5"], "Invalid value for '--top': -5 is not in the range x>=1"),
])
def test_third_round_out_of_range_numbers_are_refused(args, message, run_dir):  # noqa: F811
    """Found by the third round: generate --max-tokens -1 ended in mlx-lm's traceback, audit --top -5
    wrote every pair but five."""
    before = snapshot(run_dir)
    result = cli(*[a.format(run=run_dir) for a in args])
    assert result.exit_code == 2 and message in result.output, result.output
    assert snapshot(run_dir) == before


def test_third_round_a_key_given_twice_in_a_config_file_is_refused(tmp_path):
    """YAML keeps the last of two equal keys: a recipe that sets beta twice trained on one silently."""
    config = tmp_path / "dup.yaml"
    config.write_text("beta: 0.1\nloss_type: ipo\nbeta: 0.2\n")
    result = cli("plan", "--config", config, "--model", "toy:llama")
    assert result.exit_code == 2 and f"{config}:3: invalid YAML: key 'beta' is given twice" in result.output


def test_third_round_a_damaged_checkpoint_state_is_refused_on_resume(run_dir, tmp_path, llama_dir,  # noqa: F811
                                                                       toy_data_dir):
    """A trainer_state.json cut short ended --resume in a JSONDecodeError traceback."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    (run / "checkpoints" / "step-2" / "trainer_state.json").write_text("{bad")
    (run / "adapters.safetensors").unlink()
    before = snapshot(run)
    result = cli("train", "--model", llama_dir, "--data", toy_data_dir, "--output-dir", run, "--max-steps", 4,
                 "--batch-size", 4, "--no-progress-bar", "--eval-strategy", "no", "--resume")
    assert result.exit_code == 2, result.output
    assert f"cannot resume from {run / 'checkpoints' / 'step-2'}: its trainer_state.json is unreadable" in result.output
    assert snapshot(run) == before


def test_a_broken_run_config_is_named_once(run_dir, tmp_path):  # noqa: F811
    """Found checking as a user: a run's config.yaml with a YAML error was named twice
    ("run/config.yaml: run/config.yaml:3: ..."); a config error without a file still gets it."""
    import re
    import shutil

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    text = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(text + "beta: 0.5\n")
    result = cli("export", "--adapter-path", run, "--output", tmp_path / "out", "--format", "mlx")
    assert result.exit_code == 2, result.output
    assert f"error: {run / 'config.yaml'}:{text.count(chr(10)) + 1}: invalid YAML: key 'beta' is given twice" \
        in result.output
    (run / "config.yaml").write_text(re.sub(r"(?m)^learning_rate: .*$", "learning_rate: -1.0", text))
    result = cli("export", "--adapter-path", run, "--output", tmp_path / "out", "--format", "mlx")
    assert result.exit_code == 2, result.output
    assert f"error: {run / 'config.yaml'}: learning_rate must be > 0, got -1.0" in result.output
