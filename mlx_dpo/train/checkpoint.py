"""Resumable training checkpoints, written atomically.

Layout of ``OUTPUT_DIR/checkpoints/``::

    step-N/
        adapters.safetensors     trainable parameters (mlx-lm format) + adapter_config.json
        reference.safetensors    frozen reference adapter copy (``ref_*``), when there is one
        optimizer.safetensors    AdamW moments, step count (= LR schedule position)
        state.safetensors        loss state (e.g. bco running mean), MLX and numpy RNG keys
        trainer_state.json       step, skipped steps, sampler position, logging window
        config.yaml              the resolved config
    latest                       text file: name of the newest complete checkpoint

A checkpoint is built in a temporary sibling directory, fsynced and renamed into
place; only then is ``latest`` replaced (atomically). A process killed at any
moment leaves every earlier checkpoint complete and ``latest`` never names a
partial one; leftovers (``.step-N.*.tmp``, ``.step-N.deleting``) are removed on the
next start. Only safetensors, JSON and YAML are ever read back (no pickle).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import mlx.core as mx
import numpy as np
import yaml
from mlx.utils import tree_flatten

from ..model.adapters import resolve_target_modules
from ..config.fields import DPOConfig, config_keys
from ..util.io import atomic_directory, atomic_write_text, fsync_dir, save_safetensors, write_failure
from .state import TrainState
from ..errors import CheckpointError, ConfigError

CHECKPOINTS = "checkpoints"
LATEST = "latest"
FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step-(\d+)$")
_FILES = ("adapters.safetensors", "optimizer.safetensors", "state.safetensors", "trainer_state.json", "config.yaml")

# ---------------------------------------------------------------------- locating
def checkpoints_dir(output_dir: Path) -> Path:
    return Path(output_dir) / CHECKPOINTS


def step_of(path: Path) -> int:
    match = _STEP_DIR.match(Path(path).name)
    return int(match.group(1)) if match else -1


def list_checkpoints(output_dir: Path) -> List[Path]:
    """Complete checkpoint directories (``step-N``), oldest first."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and step_of(p) >= 0), key=step_of)


def latest_checkpoint(output_dir: Path) -> Optional[Path]:
    """The checkpoint ``latest`` names; the newest ``step-N`` if the pointer is missing or stale."""
    root = checkpoints_dir(output_dir)
    try:
        name = (root / LATEST).read_text().strip()
    except OSError:
        name = ""
    if _STEP_DIR.match(name) and (root / name).is_dir():
        return root / name
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def resolve_resume(spec: str, output_dir: Path) -> Path:
    """``latest`` (in ``output_dir``), a run directory (its latest) or a ``step-N`` directory."""
    if spec in ("latest", "true", "True", "1"):
        path = latest_checkpoint(output_dir)
        if path is None:
            raise ConfigError(f"resume_from_checkpoint: no checkpoint in {checkpoints_dir(output_dir)} to resume "
                              "from; run without --resume to start a new run")
        return path
    path = Path(spec).expanduser().resolve()
    if path.is_dir() and step_of(path) < 0:
        found = latest_checkpoint(path) if (path / CHECKPOINTS).is_dir() else None
        if found is None:
            raise ConfigError(f"resume_from_checkpoint: {path} is neither a checkpoint (step-N) nor a run "
                              "directory with checkpoints")
        path = found
    if not path.is_dir():
        raise ConfigError(f"resume_from_checkpoint: {path} does not exist")
    missing = [f for f in _FILES if not (path / f).is_file()]
    if missing:
        raise ConfigError(f"resume_from_checkpoint: {path} is not a complete checkpoint (missing {', '.join(missing)})")
    return path


# ---------------------------------------------------------------------- config check
def config_differences(saved: dict, cfg: DPOConfig, ranks_then: int = 1,
                       ranks_now: int = 1) -> Tuple[List[str], List[str]]:
    """(errors, notes): changes to keys a resumed run must share with its checkpoint (the
    model, adapter shapes, reference, data and its order, the loss), and to the keys that
    may change but are reported (see :func:`fields.config_keys`). ``batch_size`` is per
    rank: what must match is ``batch_size x ranks`` (the global micro-batch), so a run may
    resume on another number of ranks."""
    try:
        old = DPOConfig.from_dict(saved, "checkpoint config.yaml")
    except ConfigError as e:
        raise ConfigError(f"cannot read the checkpoint's config: {e}") from None
    errors, notes = [], []
    must_match, free = set(config_keys("resume_match")), set(config_keys("resume_free"))
    for key, now in cfg.to_dict().items():
        then = getattr(old, key)
        if key == "lora_target_modules":
            then, now = sorted(old.target_modules), _target_modules(cfg, old.target_modules)
        if key == "batch_size" and (ranks_then, ranks_now) != (1, 1):
            if then * ranks_then != now * ranks_now:
                fit = f"batch_size {then * ranks_then // ranks_now}" if then * ranks_then % ranks_now == 0 else \
                    f"a number of ranks dividing {then * ranks_then}"
                errors.append(f"batch_size: the checkpoint's global micro-batch is {then} x {ranks_then} rank(s) = "
                              f"{then * ranks_then} pairs, now {now} x {ranks_now} = {now * ranks_now}; the same "
                              f"data order needs {fit}")
            elif then != now:
                notes.append(f"batch_size: checkpoint {then} x {ranks_then} ranks, now {now} x {ranks_now} ranks "
                             "(the same global batch)")
            continue
        if _same(then, now) or key in free:
            continue
        (errors if key in must_match else notes).append(f"{key}: checkpoint {then!r}, now {now!r}")
    return errors, notes


def _target_modules(cfg: DPOConfig, saved_keys) -> list:
    """``cfg``'s lora_target_modules resolved against a checkpoint's (already resolved) keys,
    as :func:`adapters.add_adapters` resolves them against the model (``q_proj`` is the
    checkpoint's ``self_attn.q_proj``); unresolvable names stay as given (and then differ)."""
    try:
        return sorted(resolve_target_modules(cfg.target_modules, list(saved_keys)))
    except ConfigError:
        return sorted(cfg.target_modules)


def _same(a, b) -> bool:
    if a == b:
        return True
    if isinstance(a, str) and isinstance(b, str):  # the same local path spelled differently
        pa, pb = Path(a).expanduser(), Path(b).expanduser()
        return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()
    return False


def recorded_config(cfg: DPOConfig) -> DPOConfig:
    """The config as saved with a run: the recipe, without this invocation's
    ``resume_from_checkpoint`` / ``overwrite_output_dir`` (reusing it never resumes or
    overwrites by surprise)."""
    return replace(cfg, resume_from_checkpoint=None, overwrite_output_dir=False)


def _write_arrays(path: Path, arrays: Dict[str, mx.array]) -> None:
    save_safetensors(path, arrays, metadata={"format": "mlx"})


def reference_params(model) -> Dict[str, mx.array]:
    """The frozen reference adapter copy (``ref_lora_a``, ``ref_lora_b``, ``ref_m``)."""
    return {k: v for k, v in tree_flatten(model.parameters()) if k.rsplit(".", 1)[-1].startswith("ref_")}


def save_checkpoint(output_dir: Path, state: TrainState, model, optimizer, cfg: DPOConfig,
                    adapter_config: dict) -> Path:
    """Write ``checkpoints/step-N`` atomically, point ``latest`` at it, prune old ones."""
    root = checkpoints_dir(output_dir)
    name = f"step-{state.step}"
    path = root / name
    if root.is_symlink():  # planted after the run started (rundir.check_no_links refused it before)
        raise CheckpointError(f"{root} is a symbolic link; a run never writes through links. The last good "
                              f"checkpoint is {latest_checkpoint(output_dir) or 'none'}")
    try:
        if not path.is_dir():  # an existing step-N already holds this state (e.g. resumed, then stopped)
            with atomic_directory(path) as tmp:
                _write_checkpoint(tmp, state, model, optimizer, cfg, adapter_config)
        atomic_write_text(root / LATEST, name + "\n")
    except OSError as e:
        last = latest_checkpoint(output_dir)
        raise CheckpointError(f"could not save checkpoint {path}: {write_failure(e)}, then resume with --resume. "
                              f"No partial checkpoint was left; the last good one is {last or 'none'}.") from e
    best = best_checkpoint(output_dir, state) if cfg.load_best_model_at_end else None
    prune(output_dir, cfg.save_total_limit, keep=(path, best))
    return path


def best_checkpoint(output_dir: Path, state: TrainState) -> Optional[Path]:
    """The checkpoint of the best evaluation so far (``state.best``), if it was saved."""
    if state.best.step is None:
        return None
    path = checkpoints_dir(output_dir) / f"step-{state.best.step}"
    return path if path.is_dir() else None


def load_adapters(model, path: Path) -> None:
    """Load the trainable parameters saved in checkpoint ``path`` into ``model``."""
    adapters = mx.load(str(Path(path) / "adapters.safetensors"))
    _check_same("adapters", path, adapters, dict(tree_flatten(model.trainable_parameters())))
    model.load_weights(list(adapters.items()), strict=False)
    mx.eval(model.parameters())


def save_adapters(directory: Path, model, cfg: DPOConfig, adapter_config: dict) -> None:
    """The trained parameters in mlx-lm's format (``adapters.safetensors`` +
    ``adapter_config.json``) and the run's ``config.yaml``, each file replaced atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / ".adapters.safetensors.tmp.safetensors"
    try:
        _write_arrays(tmp, dict(tree_flatten(model.trainable_parameters())))
        tmp.replace(directory / "adapters.safetensors")
    finally:
        tmp.unlink(missing_ok=True)
    atomic_write_text(directory / "adapter_config.json", json.dumps(adapter_config, indent=2))
    recorded_config(cfg).save(directory / "config.yaml")


def _write_checkpoint(tmp: Path, state: TrainState, model, optimizer, cfg: DPOConfig, adapter_config: dict) -> None:
    save_adapters(tmp, model, cfg, adapter_config)
    ref = reference_params(model)
    if ref:
        _write_arrays(tmp / "reference.safetensors", ref)
    _write_arrays(tmp / "optimizer.safetensors", dict(tree_flatten(optimizer.state)))
    np_state = np.random.get_state()
    extra = {f"loss_state.{k}": v for k, v in state.loss_state.items()}
    extra["rng.mlx"] = mx.random.state[0]
    extra["rng.numpy"] = mx.array(np_state[1].astype(np.uint32))
    _write_arrays(tmp / "state.safetensors", extra)
    meta = {"format": FORMAT_VERSION, **state.to_json(), "optimizer_step": int(optimizer.step.item()),
            "numpy_rng": [int(np_state[2]), int(np_state[3]), float(np_state[4])]}
    atomic_write_text(tmp / "trainer_state.json", json.dumps(meta, indent=2))


def prune(output_dir: Path, limit: Optional[int], keep: Sequence[Optional[Path]] = ()) -> None:
    """Keep the newest ``limit`` checkpoints (and those in ``keep``: the one just written, the
    best); delete the rest atomically (rename to ``.step-N.deleting`` first, so no half-deleted
    ``step-N`` is ever visible)."""
    if not limit or limit < 1:
        return
    found = list_checkpoints(output_dir)
    kept = {Path(p).resolve() for p in keep if p is not None}
    for old in found[: max(0, len(found) - limit)]:
        if old.resolve() not in kept:
            remove_checkpoint(old)


def remove_checkpoint(path: Path) -> None:
    doomed = path.with_name(f".{path.name}.deleting")
    os.replace(path, doomed)
    fsync_dir(path.parent)
    shutil.rmtree(doomed, ignore_errors=True)


# ---------------------------------------------------------------------- loading
@dataclass
class Checkpoint:
    path: Path
    state: dict
    config: dict
    adapters: Dict[str, mx.array]
    reference: Dict[str, mx.array]
    optimizer: Dict[str, mx.array]
    extra: Dict[str, mx.array]

    @property
    def step(self) -> int:
        return int(self.state["step"])


def read_config(path: Path) -> dict:
    values = yaml.safe_load((Path(path) / "config.yaml").read_text())
    if not isinstance(values, dict):
        raise CheckpointError(f"{path}/config.yaml is not a mapping")
    return values


def load_checkpoint(path: Path) -> Checkpoint:
    """Read a checkpoint (safetensors, JSON and YAML only)."""
    path = Path(path)
    missing = [f for f in _FILES if not (path / f).is_file()]
    if missing:
        raise CheckpointError(f"{path} is not a complete checkpoint (missing {', '.join(missing)})")
    try:
        state = json.loads((path / "trainer_state.json").read_text())
        if state.get("format") != FORMAT_VERSION:
            raise CheckpointError(f"{path}: unsupported checkpoint format {state.get('format')!r}")
        ref_file = path / "reference.safetensors"
        return Checkpoint(path, state, read_config(path), mx.load(str(path / "adapters.safetensors")),
                          mx.load(str(ref_file)) if ref_file.is_file() else {},
                          mx.load(str(path / "optimizer.safetensors")), mx.load(str(path / "state.safetensors")))
    except (OSError, ValueError, RuntimeError, yaml.YAMLError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(e).__name__}: {e})") from e


def _check_same(what: str, path: Path, loaded: Dict[str, mx.array], expected: Dict[str, mx.array]) -> None:
    if set(loaded) != set(expected):
        extra, lost = sorted(set(loaded) - set(expected)), sorted(set(expected) - set(loaded))
        raise CheckpointError(f"{path}: {what} do not match the model (unexpected: {extra[:3]}, missing: {lost[:3]})")
    for k, v in loaded.items():
        if v.shape != expected[k].shape:
            raise CheckpointError(f"{path}: {what} {k} has shape {v.shape}, the model has {expected[k].shape}")


def _set_leaves(tree, values: Dict[str, mx.array], prefix: str = "") -> None:
    """Replace the leaves of a nested dict/list in place, keeping every container object
    (the compiled step captured them by reference)."""
    for k, v in list(tree.items() if isinstance(tree, dict) else enumerate(tree)):
        if isinstance(v, (dict, list)):
            _set_leaves(v, values, f"{prefix}{k}.")
        else:
            tree[k] = values[f"{prefix}{k}"]


def restore(ckpt: Checkpoint, state: TrainState, model, optimizer) -> TrainState:
    """Load a checkpoint into a freshly built model and optimizer (same config, data and
    model; their containers are updated in place, as the compiled step captured them) and
    the global RNGs; returns ``state`` advanced to the checkpoint."""
    saved, path = ckpt.state, ckpt.path
    if saved.get("num_batches") != state.num_batches or saved.get("data_fingerprint") != state.data_fingerprint:
        raise ConfigError(f"cannot resume from {path}: the training data differs from the checkpoint's "
                          f"({state.num_batches} batches now, {saved.get('num_batches')} then)")
    _check_same("adapters", path, ckpt.adapters, dict(tree_flatten(model.trainable_parameters())))
    _check_same("reference adapters", path, ckpt.reference, reference_params(model))
    model.load_weights(list(ckpt.adapters.items()) + list(ckpt.reference.items()), strict=False)
    _check_same("optimizer state", path, ckpt.optimizer, dict(tree_flatten(optimizer.state)))
    _set_leaves(optimizer.state, ckpt.optimizer)
    loss_state = {k.split(".", 1)[1]: v for k, v in ckpt.extra.items() if k.startswith("loss_state.")}
    _check_same("loss state", path, loss_state, state.loss_state)
    hi, lo = (int(x) for x in ckpt.extra["rng.mlx"].tolist())
    mx.random.seed((hi << 32) | lo)  # key(seed) == [seed >> 32, seed & 0xffffffff]: restores the key exactly
    pos, has_gauss, cached = saved["numpy_rng"]
    np.random.set_state(("MT19937", np.array(ckpt.extra["rng.numpy"]).astype(np.uint32), pos, has_gauss, cached))
    restored = replace(state, loss_state=loss_state, log_history=list(state.log_history))
    restored.load_json(saved)
    mx.eval(model.parameters(), optimizer.state, restored.loss_state)
    return restored
