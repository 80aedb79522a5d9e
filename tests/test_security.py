"""A run directory is data, not a trust boundary to cross (issue 32, security part).

- No code runs because a file says so: a config file's ``trust_remote_code: true`` or
  ``module:function`` loss needs ``--trust-remote-code`` on the command line; a run's own
  ``config.yaml`` never enables the model's code for ``export``/``generate``/``audit``/``sample``.
  A planted module writes a marker file when imported: the marker must not appear.
- No write through a symbolic link planted in a run directory (the lock, ``metrics.jsonl``,
  ``checkpoints/``): a refusal naming the path, and the link's target unchanged.
Every case goes through the CLI and checks the message, the exit code and that nothing changed.
"""

import os
import shutil

import pytest
import yaml

from mlx_dpo.errors import ConfigError
from mlx_dpo.monitor.callbacks import JSONLWriter

from test_faults import cli, run_dir, snapshot  # noqa: F401  (run_dir: a finished two-step run)

PLANTED = '''
import mlx.core as mx
from pathlib import Path

Path({marker!r}).write_text("imported")


def loss(c, r, rc, rr, beta=0.1, **kw):
    logits = beta * ((c - rc) - (r - rr))
    return -mx.log(mx.sigmoid(logits)), beta * (c - rc), beta * (r - rr)
'''


@pytest.fixture
def planted(tmp_path, monkeypatch):
    """An importable module ``planted_mod`` (on sys.path) that writes ``marker`` when imported."""
    marker = tmp_path / "marker"
    code = tmp_path / "code"
    code.mkdir()
    (code / "planted_mod.py").write_text(PLANTED.format(marker=str(marker)))
    monkeypatch.syspath_prepend(str(code))
    yield marker
    import sys

    sys.modules.pop("planted_mod", None)


def copy_run(run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(run, out)
    return out


def set_config(run, **values):
    path = run / "config.yaml"
    path.write_text(yaml.safe_dump({**yaml.safe_load(path.read_text()), **values}))


# --------------------------------------------------------------------------- code from a config file


def test_a_config_file_loss_import_needs_the_command_line_flag(planted, tmp_path, llama_dir, toy_data_dir):
    config = tmp_path / "planted.yaml"
    out = tmp_path / "out"
    config.write_text(yaml.safe_dump({"model": str(llama_dir), "data": str(toy_data_dir), "output_dir": str(out),
                                      "loss_type": "planted_mod:loss", "max_steps": 1, "batch_size": 2,
                                      "progress_bar": False, "eval_strategy": "no"}))
    result = cli("train", "--config", config)
    assert result.exit_code == 2, result.output
    assert "loss_type 'planted_mod:loss' would run Python code" in result.output
    assert "--trust-remote-code" in result.output
    assert not planted.exists() and not out.exists()

    result = cli("train", "--config", config, "--trust-remote-code")  # the user's own flag: imported, trains
    assert result.exit_code == 0, result.output
    assert planted.read_text() == "imported" and (out / "adapters.safetensors").is_file()


def test_the_printed_resume_command_imports_no_planted_loss(planted, run_dir, tmp_path):
    run = copy_run(run_dir, tmp_path)
    (run / "adapters.safetensors").unlink()  # as a run stopped after its step-2 checkpoint
    set_config(run, loss_type="planted_mod:loss", max_steps=4)
    before = snapshot(run)
    result = cli("train", "--config", run / "config.yaml", "--output-dir", run, "--resume")
    assert result.exit_code == 2, result.output
    assert f"{run / 'config.yaml'}: loss_type 'planted_mod:loss' would run Python code" in result.output
    assert not planted.exists() and snapshot(run) == before


@pytest.mark.parametrize("command", ["export", "generate", "audit", "sample"])
def test_a_run_config_never_enables_remote_code(command, run_dir, tmp_path):
    run = copy_run(run_dir, tmp_path)
    set_config(run, trust_remote_code=True)
    before = snapshot(run)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello\n")
    args = {"export": ["export", "--adapter-path", run, "--output", tmp_path / "exported"],
            "generate": ["generate", run, "--prompt", "hi", "--max-tokens", 2],
            "audit": ["audit", run],
            "sample": ["sample", "--adapter-path", run, "--prompts", prompts, "--judge", "shorter",
                       "--output", tmp_path / "pairs.jsonl", "--max-tokens", 2]}[command]
    result = cli(*args)
    assert result.exit_code == 2, result.output
    assert "trust_remote_code is on" in result.output and "pass --trust-remote-code" in result.output
    assert snapshot(run) == before
    assert not (tmp_path / "exported").exists() and not (tmp_path / "pairs.jsonl").exists()


def test_the_flag_lets_export_load_such_a_run(run_dir, tmp_path):
    run = copy_run(run_dir, tmp_path)
    set_config(run, trust_remote_code=True)
    result = cli("export", "--adapter-path", run, "--output", tmp_path / "exported", "--format", "mlx",
                 "--trust-remote-code")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "exported" / "config.json").is_file()


# --------------------------------------------------------------------------- links in a run directory


def _victim(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    return victim


@pytest.mark.parametrize("name", [".mlx_dpo.lock", "metrics.jsonl"])
def test_a_planted_file_link_is_refused(name, tmp_path, llama_dir, toy_data_dir):
    victim, out = _victim(tmp_path), tmp_path / "out"
    out.mkdir()
    os.symlink(victim, out / name)
    result = cli("train", "--model", llama_dir, "--data", toy_data_dir, "--output-dir", out, "--max-steps", 1,
                 "--batch-size", 2, "--no-progress-bar", "--eval-strategy", "no")
    assert result.exit_code == 2, result.output
    assert f"{out / name} is a symbolic link" in result.output
    assert victim.read_text() == "precious\n"
    assert sorted(p.name for p in out.iterdir()) == [name]


def test_a_planted_checkpoints_link_is_refused_on_resume_too(run_dir, tmp_path, llama_dir, toy_data_dir):
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(run_dir / "checkpoints", elsewhere)
    before = snapshot(elsewhere)
    run = copy_run(run_dir, tmp_path)
    shutil.rmtree(run / "checkpoints")
    os.symlink(elsewhere, run / "checkpoints")
    for extra in ([], ["--resume"], ["--overwrite"]):
        result = cli("train", "--model", llama_dir, "--data", toy_data_dir, "--output-dir", run, "--max-steps", 3,
                     "--save-steps", 1, "--batch-size", 4, "--no-progress-bar", "--eval-strategy", "no", *extra)
        assert result.exit_code == 2, (extra, result.output)
        assert f"{run / 'checkpoints'} is a symbolic link" in result.output
        assert snapshot(elsewhere) == before


def test_a_link_planted_while_running_is_not_written_through(tmp_path):
    """The check before the run is not the only guard: files the run appends to are opened
    with O_NOFOLLOW, so a link planted after the check is refused too."""
    victim = _victim(tmp_path)
    os.symlink(victim, tmp_path / "metrics.jsonl")
    with pytest.raises(ConfigError, match="metrics.jsonl is a symbolic link"):
        JSONLWriter(tmp_path / "metrics.jsonl").on_log(None, {"step": 1})
    assert victim.read_text() == "precious\n"
