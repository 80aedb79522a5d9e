"""Broken inputs and faults (issue 17): one line naming the file and what is wrong, no
traceback, and nothing changed or half-written."""

import json
import re
import shutil

import pytest
from click.testing import CliRunner

from mlx_dpo.cli.commands import main


def snapshot(path):
    """Every file under ``path`` (hidden ones too) with its bytes: to assert nothing changed."""
    if not path.exists():
        return None
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def cli(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output, result.output
    return result


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, llama_dir, toy_data_dir):
    """A finished two-step LoRA run (with checkpoints/step-2)."""
    out = tmp_path_factory.mktemp("faults") / "run"
    result = cli("train", "--model", llama_dir, "--data", toy_data_dir, "--output-dir", out, "--max-steps", 2,
                 "--save-steps", 2, "--batch-size", 4, "--no-progress-bar", "--eval-strategy", "no")
    assert result.exit_code == 0, result.output
    return out


# --------------------------------------------------------------------------- broken model directories


def _truncate(d):
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])


def _arch(d):
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, "model_type": "llamma"}))


def _no_tokenizer(d):
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (d / name).unlink()


BROKEN_MODELS = {
    "truncated weights": (_truncate, "model.safetensors is truncated"),
    "garbage weights": (lambda d: (d / "model.safetensors").write_bytes(b"garbage" * 50),
                        "model.safetensors is not a safetensors file"),
    "config not JSON": (lambda d: (d / "config.json").write_text('{"model_type": "llama",'),
                        "config.json is not valid JSON"),
    "unknown architecture": (_arch, "model_type 'llamma' is not an mlx-lm architecture; supported: .*llama, "),
    "no tokenizer": (_no_tokenizer, "has no tokenizer files"),
}


@pytest.fixture(params=list(BROKEN_MODELS))
def broken_model(request, llama_dir, tmp_path):
    breaks, message = BROKEN_MODELS[request.param]
    model = tmp_path / "model"
    shutil.copytree(llama_dir, model)
    breaks(model)
    return model, message


def test_a_broken_model_directory_is_one_line_for_train_and_plan(broken_model, toy_data_dir, tmp_path):
    model, message = broken_model
    before = snapshot(model)
    for command in ("train", "plan"):
        result = cli(command, "--model", model, "--data", toy_data_dir, "--output-dir", tmp_path / "out")
        assert result.exit_code == 2, result.output
        assert result.output.startswith(f"error: model: {model}")
        assert len(result.output.strip().splitlines()) == 1, result.output
        assert re.search(message, result.output), result.output
        assert not (tmp_path / "out").exists()
    assert snapshot(model) == before


def test_a_broken_model_directory_is_one_line_for_export(broken_model, run_dir, tmp_path):
    model, message = broken_model
    before = snapshot(run_dir)
    result = cli("export", "--adapter-path", run_dir, "--model", model, "-o", tmp_path / "export")
    assert result.exit_code == 2, result.output
    assert re.search(message, result.output), result.output
    assert not (tmp_path / "export").exists() and snapshot(run_dir) == before
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temporary directory left


def test_an_unknown_toy_model_names_the_toy_models(toy_data_dir, tmp_path):
    result = cli("train", "--model", "toy:nope", "--data", toy_data_dir, "--output-dir", tmp_path / "out")
    assert result.exit_code == 2
    assert "error: model: 'toy:nope' is no toy model; choose one of toy:llama, toy:qwen2" in result.output
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- broken run directories for export


def _run_copy(run_dir, tmp_path, breaks):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    breaks(run)
    return run


def _no_adapters(run):
    (run / "adapters.safetensors").unlink()
    (run / "adapter_config.json").unlink()


BROKEN_RUNS = {
    "corrupt adapters": (lambda r: (r / "adapters.safetensors").write_bytes(b"\x10" * 300),
                         "adapters.safetensors is not a safetensors file"),
    "truncated adapters": (lambda r: (r / "adapters.safetensors").write_bytes(
        (r / "adapters.safetensors").read_bytes()[:-100]), "adapters.safetensors is truncated"),
    "garbage adapter_config": (lambda r: (r / "adapter_config.json").write_text("not json{"),
                               "adapter_config.json is not valid JSON"),
    "no adapters yet": (_no_adapters, "no adapters yet .*a checkpoint can be exported: --adapter-path "
                        ".*checkpoints/step-2"),
}


@pytest.mark.parametrize("case", list(BROKEN_RUNS))
def test_a_broken_run_directory_is_one_line_for_export(case, run_dir, tmp_path):
    breaks, message = BROKEN_RUNS[case]
    run = _run_copy(run_dir, tmp_path, breaks)
    before = snapshot(run)
    result = cli("export", "--adapter-path", run, "-o", tmp_path / "export")
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ") and len(result.output.strip().splitlines()) == 1, result.output
    assert re.search(message, result.output), result.output
    assert not (tmp_path / "export").exists() and snapshot(run) == before


def test_a_checkpoint_directory_exports(run_dir, tmp_path):
    result = cli("export", "--adapter-path", run_dir / "checkpoints" / "step-2", "-o", tmp_path / "export",
                 "--format", "peft")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "export" / "adapter_model.safetensors").is_file()


def _disk_full(monkeypatch, after: int = 0):
    """A full disk as MLX reports it: ``save_safetensors`` raises RuntimeError (measured by
    writing to /dev/full), with no free space left. ``after``: that many writes succeed first."""
    import shutil

    import mlx.core as mx

    real, calls = mx.save_safetensors, []

    def full(path, *args, **kwargs):
        calls.append(path)
        if len(calls) <= after:
            return real(path, *args, **kwargs)
        open(path, "wb").write(b"half")
        raise RuntimeError("[write] Unable to write 8 bytes to file.")

    usage = shutil.disk_usage
    monkeypatch.setattr(mx, "save_safetensors", full)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(p)._replace(free=0) if calls[after:] else usage(p))


@pytest.mark.parametrize("overwrite", [False, True])
def test_disk_full_during_export_leaves_nothing_and_keeps_the_old_export(overwrite, run_dir, tmp_path, monkeypatch):
    out = tmp_path / "export"
    if overwrite:
        assert cli("export", "--adapter-path", run_dir, "-o", out).exit_code == 0
    before, run_before = snapshot(out), snapshot(run_dir)
    _disk_full(monkeypatch)
    result = cli("export", "--adapter-path", run_dir, "-o", out, *(["--overwrite"] if overwrite else []))
    assert result.exit_code == 1, result.output
    kept = "the old export is kept" if overwrite else "nothing was written"
    assert f"error: export to {out} failed: [Errno 28] No space left on device while writing " in result.output
    assert f"({kept})" in result.output and "Traceback" not in result.output
    assert snapshot(out) == before and snapshot(run_dir) == run_before
    assert sorted(p.name for p in tmp_path.iterdir()) == (["export"] if overwrite else [])


def test_an_overwrite_whose_final_rename_fails_keeps_the_old_export(run_dir, tmp_path, monkeypatch):
    import os

    out = tmp_path / "export"
    assert cli("export", "--adapter-path", run_dir, "-o", out, "--format", "peft").exit_code == 0
    before, replace = snapshot(out), os.replace

    def failing(src, dst):
        if str(src).endswith(".tmp") and os.path.isdir(src):
            raise OSError(5, "Input/output error")
        replace(src, dst)

    monkeypatch.setattr(os, "replace", failing)
    result = cli("export", "--adapter-path", run_dir, "-o", out, "--format", "peft", "--overwrite")
    assert result.exit_code == 1 and "the old export is kept" in result.output, result.output
    assert snapshot(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_an_overwrite_cannot_replace_the_run_itself(run_dir, tmp_path):
    run = _run_copy(run_dir, tmp_path, lambda r: None)
    before = snapshot(run)
    result = cli("export", "--adapter-path", run, "-o", run, "--overwrite")
    assert result.exit_code == 2 and "holds the run" in result.output and "choose another --output" in result.output
    assert snapshot(run) == before


# --------------------------------------------------------------------------- text edge cases


def _train_on(rows, llama_dir, tmp_path, name="data.jsonl"):
    data = tmp_path / name
    data.write_text("".join(rows))
    before = data.read_bytes()
    result = cli("train", "--model", llama_dir, "--data", data, "--output-dir", tmp_path / "out", "--max-steps", 1,
                 "--batch-size", 2, "--no-progress-bar", "--cache-dir", tmp_path / "cache")
    assert data.read_bytes() == before
    return data, result


GOOD = '{"prompt": "Repeat: red", "chosen": " red", "rejected": " cat"}\n'


def test_a_lone_surrogate_names_the_file_line_and_field(llama_dir, tmp_path):
    data, result = _train_on([GOOD, '{"prompt": "Repeat: red", "chosen": " red \\ud83d", "rejected": " cat"}\n'],
                             llama_dir, tmp_path)
    assert result.exit_code == 2, result.output
    assert f"error: {data}:2: field 'chosen' has a lone UTF-16 surrogate '\\ud83d' at character 5" in result.output
    assert not (tmp_path / "out").exists()


def test_a_lone_surrogate_in_a_message(llama_dir, tmp_path):
    row = {"prompt": [{"role": "user", "content": "hi \ud83d"}], "chosen": [{"role": "assistant", "content": "a"}],
           "rejected": [{"role": "assistant", "content": "b"}]}
    data, result = _train_on([json.dumps(row) + "\n"], llama_dir, tmp_path)
    assert result.exit_code == 2, result.output
    assert f"{data}:1: field 'prompt' message 0 'content' has a lone UTF-16 surrogate" in result.output


def test_an_unknown_role_names_the_role_line_and_valid_roles(llama_dir, tmp_path):
    good = {"prompt": [{"role": "user", "content": "Repeat: red"}], "chosen": [{"role": "assistant", "content": "red"}],
            "rejected": [{"role": "assistant", "content": "cat"}]}
    bad = {**good, "chosen": [{"role": "assistent", "content": "red"}]}
    data, result = _train_on([json.dumps(good) + "\n", json.dumps(bad) + "\n"], llama_dir, tmp_path)
    assert result.exit_code == 2, result.output
    assert (f"error: {data}:2: field 'chosen' message 0 has role 'assistent'; valid roles: system, user, assistant, "
            "tool") in result.output
    assert "chat template" not in result.output and not (tmp_path / "out").exists()


def test_exact_duplicate_pairs_are_one_warning_with_their_count(llama_dir, tmp_path):
    other = '{"prompt": "Repeat: blue", "chosen": " blue", "rejected": " dog"}\n'
    _, result = _train_on([GOOD, other, GOOD, GOOD, other], llama_dir, tmp_path)
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if "exact-duplicate" in line]
    assert warnings == ["warning: train: 3 exact-duplicate pairs (the same prompt, chosen and rejected as an earlier "
                        "pair); they are kept and weigh more; remove them if that is not intended"], result.output


# --------------------------------------------------------------------------- Ctrl-C twice


def test_ctrl_c_twice_exits_quietly_with_130(llama_dir, tmp_path):
    """The second Ctrl-C lands while the first one's checkpoint is saved or the process exits."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out, data = tmp_path / "run", tmp_path / "data.jsonl"
    data.write_text(GOOD * 4)
    child = subprocess.Popen(
        [sys.executable, "-m", "mlx_dpo", "train", "--model", str(llama_dir), "--data", str(data),
         "--output-dir", str(out), "--max-steps", "100000", "--batch-size", "2", "--no-progress-bar",
         "--logging-steps", "1", "--save-steps", "100000"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        seen, deadline = b"", time.monotonic() + 60
        while b"step=" not in seen and time.monotonic() < deadline:
            seen += os.read(child.stdout.fileno(), 4096) or b""
        child.send_signal(signal.SIGINT)
        time.sleep(0.05)
        child.send_signal(signal.SIGINT)
        rest, _ = child.communicate(timeout=60)
    finally:
        child.kill()
    output = (seen + rest).decode()
    assert child.returncode == 130, output
    assert "Traceback" not in output and "Exception ignored" not in output, output
    assert "SIGINT" in output
    # the checkpoint of the first Ctrl-C is complete or absent (when the second one came first)
    assert not list(out.glob("checkpoints/.*")), list(out.glob("checkpoints/.*"))
    assert all((step / "adapters.safetensors").is_file() for step in out.glob("checkpoints/step-*"))


# --------------------------------------------------------------------------- file modes


@pytest.fixture
def user_umask(request):
    import os

    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def modes(path):
    return {str(p.relative_to(path)): p.stat().st_mode & 0o777 for p in [path, *path.rglob("*")]}


@pytest.mark.parametrize("user_umask", [0o022, 0o077], indirect=True)
def test_runs_and_exports_follow_the_umask(user_umask, llama_dir, toy_data_dir, tmp_path):
    run, export = tmp_path / "run", tmp_path / "export"
    assert cli("train", "--model", llama_dir, "--data", toy_data_dir, "--output-dir", run, "--max-steps", 1,
               "--batch-size", 4, "--no-progress-bar").exit_code == 0
    assert cli("export", "--adapter-path", run, "-o", export).exit_code == 0
    found = {**{f"run/{k}": v for k, v in modes(run).items()}, **{f"export/{k}": v for k, v in modes(export).items()}}
    for name, mode in found.items():
        is_dir = (tmp_path / name).is_dir()
        assert mode == (0o777 if is_dir else 0o666) & ~user_umask, f"{name}: {oct(mode)}"
    assert {"run/config.yaml", "run/adapter_config.json", "export/README.md", "export/config.json",
            "export/model.safetensors", "run/checkpoints/step-1/trainer_state.json"} <= set(found)


def test_disk_full_during_training_is_one_line_and_keeps_the_last_checkpoint(llama_dir, toy_data_dir, tmp_path,
                                                                              monkeypatch):
    """The first checkpoint (step 2) is written; the disk is full at the next: exit 1, one line
    naming the checkpoint and saying the disk is full; step-2 stays complete."""
    from mlx_dpo.train import checkpoint

    out = tmp_path / "run"
    _disk_full(monkeypatch, after=3)  # a checkpoint writes adapters, optimizer and state: step-2 completes
    args = ["train", "--model", str(llama_dir), "--data", str(toy_data_dir), "--output-dir", str(out),
            "--max-steps", "6", "--save-steps", "2", "--batch-size", "4", "--no-progress-bar",
            "--cache-dir", str(tmp_path / "cache")]
    result = cli(*args)
    assert result.exit_code == 1, result.output
    assert "the disk is full" in result.output and "Traceback" not in result.output
    assert f"could not save checkpoint {out / 'checkpoints' / 'step-4'}: the disk is full" in result.output
    assert checkpoint.latest_checkpoint(out).name == "step-2"
    assert checkpoint.load_checkpoint(out / "checkpoints" / "step-2").step == 2
    assert [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith(".step-4")] == []
