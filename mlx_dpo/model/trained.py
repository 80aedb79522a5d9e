"""A finished training run, loaded back: its config, its model with the adapters applied.

``export``, ``generate``, ``audit`` and ``sample --adapter-path`` all start here. What a run
directory holds is data, never code: its ``config.yaml`` is read for the model and adapter
settings, but its ``trust_remote_code`` is not obeyed (only the command's own
``--trust-remote-code`` flag allows a model's Python), and custom losses (``module:function``)
are never imported here (only ``train`` imports a loss, from the user's own config).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..config.fields import DPOConfig
from ..errors import ConfigError, RunError
from ..util.io import safetensors_problem
from .adapters import add_adapters, load_adapter_weights, read_adapter_config
from .loader import dequantize_for_inference, load_model


class TrainedRun:
    """A finished training run (or an mlx-lm adapter directory) loaded: the MLX model with its
    adapters applied (a full fine-tune's trained blocks loaded), its config and tokenizer."""

    def __init__(self, adapter_path: Union[str, Path], model: Optional[str] = None, trust_remote_code: bool = False):
        self.path = Path(adapter_path)
        if not self.path.is_dir():
            raise RunError(f"adapter path {self.path} is not a directory")
        check_run_files(self.path)
        self.adapter_config = read_adapter_config(self.path)
        self.cfg = read_run_config(self.path, self.adapter_config, model, trust_remote_code)
        self.fine_tune_type = self.adapter_config.get("fine_tune_type", "lora")
        self.model, self.tokenizer, self.base_path = load_model(self.cfg)
        with open(self.base_path / "config.json") as f:
            self.base_config = json.load(f)
        if self.fine_tune_type == "full":
            load_full_weights(self.model, self.path)
        else:
            add_adapters(self.model, self.cfg)
            load_adapter_weights(self.model, self.path)
        mx.eval(self.model.parameters())

    @property
    def base_model(self) -> str:
        """The base model as a Hub id where it is one, else its local path."""
        model = self.cfg.model
        if model.startswith("toy:") or Path(model).expanduser().exists():
            return str(Path(self.base_path).resolve())
        return model

    @property
    def quantization(self) -> Optional[dict]:
        """``{bits, group_size, mode}`` of the base the adapters were trained on, if quantized."""
        if self.cfg.quantize:
            return {**self.cfg.quantize, "mode": "affine"}
        q = self.base_config.get("quantization")
        if q:
            return {"bits": q["bits"], "group_size": q["group_size"], "mode": q.get("mode", "affine")}
        return None


def check_run_files(run_dir: Path) -> None:
    """A run directory holds adapters.safetensors (readable) and adapter_config.json; one with
    neither points at the checkpoints that can be exported."""
    config, weights = run_dir / "adapter_config.json", run_dir / "adapters.safetensors"
    if not config.is_file() and not weights.is_file():
        steps = sorted(run_dir.glob("checkpoints/step-*/adapters.safetensors"), key=lambda p: int(p.parent.name[5:]))
        hint = (f"; a checkpoint can be exported: --adapter-path {steps[-1].parent}" if steps
                else " (expected a training run directory or an mlx-lm adapter directory)")
        raise RunError(f"{run_dir}: no adapters yet (no adapters.safetensors and adapter_config.json){hint}")
    for file in (config, weights):
        if not file.is_file():
            raise RunError(f"{run_dir}: {file.name} is missing (the directory holds only half of a run's adapters)")
    problem = safetensors_problem(weights)
    if problem:
        raise RunError(f"{weights} {problem}")


def load_full_weights(model: nn.Module, run_dir: Path) -> None:
    """Load a full fine-tune's ``adapters.safetensors`` (trained blocks, mlx-lm names) into
    ``model``, refusing tensors the model lacks or whose shape differs."""
    params = dict(tree_flatten(model.parameters()))
    weights = mx.load(str(run_dir / "adapters.safetensors"))
    for name, w in weights.items():
        if name not in params:
            raise RunError(f"{run_dir}: tensor {name} is not a parameter of the base model "
                           "(was the run trained on another model? check --model and num_layers)")
        if params[name].shape != w.shape:
            raise RunError(f"{run_dir}: {name} has shape {tuple(w.shape)}, the base model's has "
                           f"{tuple(params[name].shape)} (was the run trained on another model? check --model)")
    model.load_weights([(k, w.astype(params[k].dtype)) for k, w in weights.items()], strict=False)


def read_run_config(run_dir: Path, adapter_cfg: dict, model: Optional[str] = None,
                    trust_remote_code: bool = False) -> DPOConfig:
    """The run's :class:`DPOConfig` (``config.yaml`` when present), with the adapter shape
    taken from ``adapter_config.json`` (it describes the saved weights)."""
    ftype = adapter_cfg.get("fine_tune_type", "lora")
    lora = adapter_cfg.get("lora_parameters", {})
    overrides = {"num_layers": adapter_cfg.get("num_layers", -1)}
    if ftype == "full":
        overrides["train_type"] = "full"
    else:
        rank = lora.get("rank", 8)
        overrides.update(
            train_type="adapter",
            adapter=ftype,
            lora_rank=rank,
            lora_alpha=lora.get("scale", 2.0) * rank,
            lora_dropout=lora.get("dropout", 0.0),
        )
        if lora.get("keys"):
            overrides["lora_target_modules"] = list(lora["keys"])
    if model:
        overrides["model"] = model
    if trust_remote_code:  # the command's own flag; the run's recorded value is only checked below
        overrides["trust_remote_code"] = True
    path = run_dir / "config.yaml"
    if path.is_file():
        try:
            cfg = DPOConfig.from_yaml(path, overrides, refuse_code=False)  # loading imports no loss
        except ConfigError as e:  # name the file, once (a YAML error names it already)
            raise RunError(str(e) if str(e).startswith(str(path)) else f"{path}: {e}") from None
        if cfg.trust_remote_code and not trust_remote_code:
            raise RunError(f"{path}: trust_remote_code is on, and loading this model runs Python from its "
                           "directory. A run's config.yaml never enables code by itself: pass "
                           "--trust-remote-code if you trust the model")
        return cfg
    base = model or adapter_cfg.get("model") or adapter_cfg.get("base_model")
    if not base:
        raise RunError(f"{run_dir}: no config.yaml and no base model in adapter_config.json; pass --model")
    return DPOConfig.from_dict({**overrides, "model": base})


def load_adapter_run(run_dir: Union[str, Path], model: Optional[str] = None,
                     trust_remote_code: bool = False) -> TrainedRun:
    """A run with LoRA/DoRA adapters (policy: adapters on, reference: adapters off), ready for
    inference; ``model`` is the same base elsewhere. A full fine-tune is refused: it has no
    adapters to switch off."""
    path = Path(run_dir)
    if not path.is_dir():
        raise RunError(f"run directory {path} does not exist")
    for name in ("adapter_config.json", "adapters.safetensors"):
        if not (path / name).is_file():
            raise RunError(f"{path / name} is missing (is {path} a finished training run?)")
    run = TrainedRun(path, model, trust_remote_code)
    if run.fine_tune_type == "full":
        raise RunError(f"{path} is a full fine-tune: it has no adapters to switch off for the reference")
    dequantize_for_inference(run.model)
    return run
