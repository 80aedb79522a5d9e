"""The run directory: checked before anything is loaded, prepared before the first step.

``check_output_dir`` refuses a run that would overwrite or restart another by surprise;
``check_resume`` finds the checkpoint to resume and compares its config with ours;
``prepare_output_dir`` creates the directory, removes a killed run's temporaries and,
on resume, the records and checkpoints newer than the resumed step.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from pathlib import Path
from typing import Callable, List, Optional, Tuple

from . import checkpoint
from ..config.fields import DPOConfig
from ..errors import ConfigError
from ..monitor.callbacks import COMPLETIONS_FILE
from ..util.io import atomic_write_text, link_refusal, open_no_follow, unwritable_ancestor

METRICS_FILE = "metrics.jsonl"
LOCK_FILE = ".mlx_dpo.lock"
COMPLETE_FILE = "run_complete.json"  # written last by a run that finished (mlx-dpo status reads it)


class RunLock:
    """An exclusive lock on a run directory, so two runs never write into one.

    ``fcntl.flock`` on ``OUTPUT_DIR/.mlx_dpo.lock``: the OS drops it when the holder exits,
    also on ``kill -9``, so a stale lock is simply taken over. The file holds the holder's
    pid, for the message."""

    def __init__(self, output_dir: Path):
        self.path = Path(output_dir) / LOCK_FILE
        self.fd: Optional[int] = None

    def check(self) -> None:
        """Refuse now if another process holds the lock (creates and writes nothing: ``mlx-dpo
        status`` and ``audit`` ask this of a run directory they only read)."""
        if self.path.is_file() and self.fd is None:
            os.close(self._lock())

    def acquire(self) -> None:
        if self.fd is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = self._lock()
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd

    def _lock(self) -> int:
        """The lock file, opened and locked (closing it releases the lock); refused if held."""
        fd = open_no_follow(self.path, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ConfigError(f"output_dir: {self.path.parent} is in use by another run (pid {holder}); wait for "
                              "it to finish, stop it, or choose another output_dir") from None
        return fd

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def check_output_dir(cfg: DPOConfig) -> Path:
    """The resolved ``output_dir``, after checking it may be written as ``cfg`` asks."""
    out = Path(cfg.output_dir).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir: {out} exists and is not a directory")
    for key in ("model", "data", "ref_adapter_path"):
        value = getattr(cfg, key)
        if value and Path(value).expanduser().exists() and Path(value).expanduser().resolve() == out:
            raise ConfigError(f"output_dir: {out} is the {key} directory; choose another output_dir")
    blocked = unwritable_ancestor(out)
    if blocked is not None:
        raise ConfigError(f"output_dir: {blocked} is not writable (choose another output_dir or fix its "
                          "permissions)")
    check_no_links(out)
    if cfg.overwrite_output_dir or cfg.resume_from_checkpoint:
        return out
    if (out / "adapters.safetensors").exists():
        raise ConfigError(f"output_dir: {out} already holds a finished run; pass --overwrite "
                          "(overwrite_output_dir: true) or choose another output_dir")
    last = checkpoint.latest_checkpoint(out)
    if last is not None:
        raise ConfigError(f"output_dir: {out} holds checkpoints of an unfinished run (latest: {last.name}); "
                          "pass --resume to continue it, --overwrite to start over, or choose another output_dir")
    return out


# What a run writes or removes in its directory (besides temporaries).
RUN_ENTRIES = (LOCK_FILE, METRICS_FILE, COMPLETIONS_FILE, COMPLETE_FILE, checkpoint.CHECKPOINTS,
               "adapters.safetensors", "adapter_config.json", "config.yaml")


def check_no_links(out: Path) -> None:
    """Refuse a run directory where a file or directory the run writes, appends to or prunes is a
    symbolic link (it would write or delete elsewhere): :data:`RUN_ENTRIES` and the checkpoints."""
    root = checkpoint.checkpoints_dir(out)
    entries = [out / name for name in RUN_ENTRIES]
    entries += list(root.iterdir()) if root.is_dir() and not root.is_symlink() else []
    for path in entries:
        if path.is_symlink():
            raise ConfigError(f"output_dir: {link_refusal(path)}")


def check_resume(cfg: DPOConfig, output_dir: Path, log: Callable = print, ranks: int = 1) -> Optional[Path]:
    """The checkpoint to resume from, after checking its config against ``cfg`` (before
    anything is loaded or written); ``None`` when not resuming. ``ranks``: data-parallel
    processes now (the checkpoint records its own)."""
    if not cfg.resume_from_checkpoint:
        return None
    path = checkpoint.resolve_resume(cfg.resume_from_checkpoint, output_dir)
    try:
        ranks_then = int(json.loads((path / "trainer_state.json").read_text()).get("world_size", 1))
    except (OSError, ValueError, AttributeError) as e:
        raise ConfigError(f"cannot resume from {path}: its trainer_state.json is unreadable ({e}); resume from an "
                          f"earlier checkpoint (resume_from_checkpoint: {path.parent}/step-N) or start over "
                          "(--overwrite)") from None
    errors, notes = checkpoint.config_differences(checkpoint.read_config(path), cfg, ranks_then, ranks)
    if errors:
        raise ConfigError(f"cannot resume from {path}: the config changes what the run depends on: "
                          + "; ".join(errors) + f". Use the checkpoint's values (see {path / 'config.yaml'}) "
                          "or start a new run (another output_dir, or --overwrite)")
    for note in notes:
        log(f"resume: changed {note}")
    return path


def prepare_output_dir(out: Path, step: int, resuming: bool, overwrite: bool, log: Callable = print) -> List[dict]:
    """Create ``out``, remove a killed run's temporaries; with ``overwrite`` clear the old run
    (only now, after config, model and data loaded fine); on resume keep the metric records
    up to ``step`` (returned) and drop newer checkpoints."""
    out.mkdir(parents=True, exist_ok=True)
    (out / COMPLETE_FILE).unlink(missing_ok=True)  # this run is not complete until it says so
    for p in clean_stale(out):
        log(f"removed stale temporary {p}")
    metrics_file = out / METRICS_FILE
    if not resuming:
        if overwrite:
            clear_run(out)
        os.close(open_no_follow(metrics_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC))
        (out / COMPLETIONS_FILE).unlink(missing_ok=True)
        return []
    for newer in checkpoint.list_checkpoints(out):
        if checkpoint.step_of(newer) > step:
            log(f"removing {newer} (newer than the resumed step {step})")
            checkpoint.remove_checkpoint(newer)
    truncate_metrics(out / COMPLETIONS_FILE, step)
    return truncate_metrics(metrics_file, step)


def mark_complete(out: Path, step: int, ranks: int) -> None:
    """The run finished: every step, the last checkpoint and the adapters are written."""
    atomic_write_text(out / COMPLETE_FILE, json.dumps({"step": step, "world_size": ranks}) + "\n")


def run_status(out: Path) -> Tuple[int, str]:
    """``(exit code, line)`` of ``mlx-dpo status``: 0 the run completed, 1 it is running or did not
    complete (a fault, a signal, a lost rank), 2 ``out`` is no run directory. ``mlx.launch`` exits 0
    whatever its ranks did; this is what a script checks after it."""
    if not out.is_dir() or not ((out / METRICS_FILE).is_file() or (out / "config.yaml").is_file()):
        return 2, f"{out} is not a run directory (no {METRICS_FILE} or config.yaml)"
    try:
        RunLock(out).check()
    except ConfigError as e:
        return 1, f"running: {e}"
    if (out / COMPLETE_FILE).is_file():
        step = json.loads((out / COMPLETE_FILE).read_text()).get("step")
        return 0, f"complete: {step} steps, adapters in {out}"
    last = checkpoint.latest_checkpoint(out)
    resume = f"the last checkpoint is {last} (resume with --resume)" if last else "it has no checkpoint"
    return 1, f"not complete: the run stopped before its end (see its output); {resume}"


def clean_stale(output_dir: Path) -> List[Path]:
    """Remove temporaries a killed process left behind (never a complete checkpoint):
    ``.NAME.*.tmp`` files/dirs, ``.NAME.deleting`` and ``.NAME.old`` dirs."""
    removed = []
    for folder in (Path(output_dir), checkpoint.checkpoints_dir(output_dir)):
        for p in folder.iterdir() if folder.is_dir() else []:
            if p.name.startswith(".") and (p.name.endswith((".tmp", ".deleting", ".old")) or ".tmp." in p.name):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
                removed.append(p)
    return removed


def clear_run(output_dir: Path) -> None:
    """``--overwrite``: remove the old run's checkpoints, adapters and metrics (nothing else)."""
    root = checkpoint.checkpoints_dir(output_dir)
    if root.is_dir():
        doomed = root.with_name(f".{checkpoint.CHECKPOINTS}.deleting")
        shutil.rmtree(doomed, ignore_errors=True)
        os.replace(root, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
    for name in ("adapters.safetensors", "adapter_config.json", METRICS_FILE, COMPLETIONS_FILE, COMPLETE_FILE):
        (Path(output_dir) / name).unlink(missing_ok=True)


def truncate_metrics(metrics_file: Path, step: int) -> List[dict]:
    """Keep the records with ``step <= step`` (a resumed run rewrites the rest); metrics.jsonl or
    completions.jsonl."""
    if not metrics_file.is_file():
        return []
    kept = []
    for line in metrics_file.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut short by a crash
        if isinstance(record, dict) and record.get("step", 0) <= step:
            kept.append(record)
    atomic_write_text(metrics_file, "".join(json.dumps(r) + "\n" for r in kept))
    return kept
