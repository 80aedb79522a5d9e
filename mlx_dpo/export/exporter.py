"""Export a training run in one of the formats of ``writers.WRITERS`` (merged Hugging Face
model, merged MLX model, PEFT adapter), with the run's record and a model card.

Every format is written atomically: a failed export leaves no directory behind.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Optional, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..model.adapters import add_adapters, load_adapter_weights, read_adapter_config
from ..config.fields import ConfigError, DPOConfig
from .writers import DTYPES, FORMATS, MAX_SHARD_BYTES, WRITERS, ExportError
from .hub import EXPORT_INFO, RUN_CONFIG, write_model_card
from ..util.io import atomic_directory, atomic_write_text, safetensors_problem
from ..model.loader import load_model
from .verify import reference_outputs, verify_export

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- the run


class Run:
    """A training run loaded for export: the MLX model with its adapters applied."""

    def __init__(self, adapter_path: Union[str, Path], model: Optional[str] = None):
        self.path = Path(adapter_path)
        if not self.path.is_dir():
            raise ExportError(f"adapter path {self.path} is not a directory")
        check_run_files(self.path)
        self.adapter_config = read_adapter_config(self.path)
        self.cfg = run_config(self.path, self.adapter_config, model)
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
        raise ExportError(f"{run_dir}: no adapters yet (no adapters.safetensors and adapter_config.json){hint}")
    for file in (config, weights):
        if not file.is_file():
            raise ExportError(f"{run_dir}: {file.name} is missing (the directory holds only half of a run's adapters)")
    problem = safetensors_problem(weights)
    if problem:
        raise ExportError(f"{weights} {problem}")


def load_full_weights(model: nn.Module, run_dir: Path) -> None:
    """Load a full fine-tune's ``adapters.safetensors`` (trained blocks, mlx-lm names) into
    ``model``, refusing tensors the model lacks or whose shape differs."""
    params = dict(tree_flatten(model.parameters()))
    weights = mx.load(str(run_dir / "adapters.safetensors"))
    for name, w in weights.items():
        if name not in params:
            raise ExportError(f"{run_dir}: tensor {name} is not a parameter of the base model "
                              "(was the run trained on another model? check --model and num_layers)")
        if params[name].shape != w.shape:
            raise ExportError(f"{run_dir}: {name} has shape {tuple(w.shape)}, the base model's has "
                              f"{tuple(params[name].shape)} (was the run trained on another model? check --model)")
    model.load_weights([(k, w.astype(params[k].dtype)) for k, w in weights.items()], strict=False)


def run_config(run_dir: Path, adapter_cfg: dict, model: Optional[str] = None) -> DPOConfig:
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
    if (run_dir / "config.yaml").is_file():
        return DPOConfig.from_yaml(run_dir / "config.yaml", overrides)
    base = model or adapter_cfg.get("model") or adapter_cfg.get("base_model")
    if not base:
        raise ExportError(f"{run_dir}: no config.yaml and no base model in adapter_config.json; pass --model")
    return DPOConfig.from_dict({**overrides, "model": base})


def final_metrics(run_dir: Path) -> dict:
    """The last training record and the last evaluation record of ``metrics.jsonl``."""
    path = Path(run_dir) / "metrics.jsonl"
    train, evaluation = {}, {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if any(k.startswith("eval_") for k in record):
                evaluation = {k: v for k, v in record.items() if k.startswith("eval_") or k == "step"}
            if any(not k.startswith("eval_") and k != "step" for k in record):
                train = {k: v for k, v in record.items() if not k.startswith("eval_")}
    return {"train": train, "eval": evaluation}


def write_run_info(run: Run, out_dir: Path, fmt: str, dtype: str) -> None:
    """Record where the export came from, so ``upload`` can write a model card."""
    info = {
        "format": fmt,
        "dtype": dtype,
        "base_model": run.base_model,
        "run_dir": str(run.path.resolve()),
        "fine_tune_type": run.fine_tune_type,
        "lora_rank": run.cfg.lora_rank,
        "lora_alpha": run.cfg.lora_scale * run.cfg.lora_rank,
        "lora_target_modules": list(run.cfg.target_modules),
        "num_layers": run.adapter_config.get("num_layers"),
        "quantize": run.quantization,
        "data": run.cfg.data,
        "final_metrics": final_metrics(run.path),
    }
    atomic_write_text(out_dir / EXPORT_INFO, json.dumps(info, indent=2))
    if (run.path / "config.yaml").is_file():
        shutil.copyfile(run.path / "config.yaml", out_dir / RUN_CONFIG)


# --------------------------------------------------------------------------- the API


def export(
    adapter_path: Union[str, Path],
    output: Union[str, Path],
    model: Optional[str] = None,
    format: str = "hf",
    dtype: Optional[str] = None,
    verify: bool = False,
    overwrite: bool = False,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> Path:
    """Export the run in ``adapter_path`` to ``output`` and return ``output``.

    ``model`` overrides the base model recorded in the run. ``dtype`` defaults to the
    format's ``default_dtype`` (float16 for ``hf``/``mlx``, float32 for ``peft``). ``verify``
    compares the exported model's logits with the MLX model's (needs transformers for
    ``hf``/``peft``) and logs them.
    """
    if format not in WRITERS:
        raise ExportError(f"format must be one of {', '.join(WRITERS)}; got {format!r}")
    writer = WRITERS[format]
    dtype = dtype or writer.default_dtype
    if dtype not in writer.dtypes:
        raise ExportError(f"--format {format}: dtype must be one of {', '.join(writer.dtypes)}; got {dtype!r}")
    output = Path(output)
    if output.exists() and not overwrite:
        raise ExportError(f"{output} already exists; pass --overwrite to replace it")
    if output.exists() and Path(adapter_path).resolve().is_relative_to(output.resolve()):
        raise ExportError(f"{output} holds the run {adapter_path} itself; --overwrite would replace the run, "
                          "choose another --output")
    try:
        run = Run(adapter_path, model)
    except ConfigError as e:
        raise ExportError(str(e)) from None
    reference = reference_outputs(run.model, run.tokenizer) if verify else None
    with atomic_directory(output, overwrite=overwrite) as tmp:
        writer.write(run, tmp, dtype, max_shard_bytes)
        write_run_info(run, tmp, format, dtype)
        write_model_card(tmp, location=str(output))
    log.info(f"Exported {format} model ({dtype}) to {output}")
    if verify:
        report = verify_export(output, writer.load, reference, run.tokenizer, run.base_path)
        if report is not None:
            requantized = (writer.requantizes and run.quantization) or dtype.startswith("q")  # gguf q8_0, ...
            log.info(
                f"verify: max |logit diff| = {report['max_abs_diff']:.3g} "
                f"({report['relative']:.3g} of the logit scale {report['logit_scale']:.3g}); "
                f"greedy generations {'agree' if report['greedy_match'] else 'DIFFER'}"
                + (" (quantizing the merged weights adds quantization error)" if requantized
                   else " (16-bit export: differences of ~1e-2 relative are expected)" if dtype != "float32" else "")
            )
    return output


__all__ = ["export", "ExportError", "Run", "verify_export", "WRITERS", "FORMATS", "DTYPES"]
