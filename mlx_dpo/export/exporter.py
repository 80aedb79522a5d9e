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

from ..errors import ConfigError, ExportError
from .writers import DTYPES, FORMATS, MAX_SHARD_BYTES, WRITERS
from .hub import EXPORT_INFO, RUN_CONFIG, write_model_card
from ..util.io import atomic_directory, atomic_write_text
from ..model.trained import TrainedRun
from ..train.rundir import METRICS_FILE
from .verify import reference_outputs, verify_export

log = logging.getLogger(__name__)


def final_metrics(run_dir: Path) -> dict:
    """The last training record and the last evaluation record of ``metrics.jsonl``."""
    path = Path(run_dir) / METRICS_FILE
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


def write_run_info(run: TrainedRun, out_dir: Path, fmt: str, dtype: str) -> None:
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
    trust_remote_code: bool = False,
) -> Path:
    """Export the run in ``adapter_path`` to ``output`` and return ``output``.

    ``model`` overrides the base model recorded in the run. ``dtype`` defaults to the
    format's ``default_dtype`` (float16 for ``hf``/``mlx``, float32 for ``peft``). ``verify``
    compares the exported model's logits with the MLX model's (needs transformers for
    ``hf``/``peft``) and logs them. ``trust_remote_code``: the command's own flag (a run's
    config never allows a model's Python by itself: :mod:`mlx_dpo.model.trained`).
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
        run = TrainedRun(adapter_path, model, trust_remote_code)
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
            requantized = (writer.requantizes and run.quantization) or dtype.startswith("q") or dtype == "source"
            log.info(
                f"verify: max |logit diff| = {report['max_abs_diff']:.3g} "
                f"({report['relative']:.3g} of the logit scale {report['logit_scale']:.3g}); "
                f"greedy generations {'agree' if report['greedy_match'] else 'DIFFER'}"
                + (" (quantizing the merged weights adds quantization error)" if requantized
                   else " (16-bit export: differences of ~1e-2 relative are expected)" if dtype != "float32" else "")
            )
    return output


__all__ = ["export", "verify_export", "WRITERS", "FORMATS", "DTYPES"]
