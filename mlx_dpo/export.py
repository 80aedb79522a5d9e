"""Export a training run: merged Hugging Face model, merged MLX model, or PEFT adapter.

``hf``   de-quantize the base, merge ``W + scale * B^T A^T`` (DoRA: renormalised rows)
         in float32, cast, and write a ``transformers`` model directory.
``mlx``  the same merged model, re-quantized when the run quantized, in mlx-lm's format.
``peft`` the adapters alone as a PEFT LoRA/DoRA adapter for the float base model.

Every format is written atomically: a failed export leaves no directory behind.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
from pathlib import Path
from typing import Optional, Union

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from .architectures import with_feature
from .config import ConfigError, DPOConfig
from .io import atomic_directory, atomic_write_text
from .model import (
    ADAPTER_CLASSES,
    add_adapters,
    cast_floats,
    load_adapter_weights,
    load_model,
    read_adapter_config,
)

FORMATS = ("hf", "mlx", "peft")
DTYPES = ("float16", "bfloat16", "float32")
MAX_SHARD_BYTES = 5 * 10**9  # transformers' "5GB"
TOKENIZER_FILES = (
    "tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt",
    "chat_template*", "*.tiktoken", "spiece.model", "*.py",
)
EXPORT_INFO = "mlx_dpo_export.json"
RUN_CONFIG = "mlx_dpo_config.yaml"
VERIFY_PROMPTS = (
    "Repeat: apple banana cherry. Answer:",
    "<|im_start|>user\nHello, who are you?<|im_end|>\n<|im_start|>assistant\n",
    "The quick brown fox jumps over the lazy dog because",
    "Repeat: red moon. Answer: red",
)


class ExportError(ValueError):
    """An export problem the user can fix."""


# --------------------------------------------------------------------------- the run


class Run:
    """A training run loaded for export: the MLX model with its adapters applied."""

    def __init__(self, adapter_path: Union[str, Path], model: Optional[str] = None):
        self.path = Path(adapter_path)
        if not self.path.is_dir():
            raise ExportError(f"adapter path {self.path} is not a directory")
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


# --------------------------------------------------------------------------- merging


def merge_and_dequantize(model: nn.Module) -> None:
    """Fold the adapters into the weights and de-quantize everything, in float32, in place."""
    from mlx_lm.utils import dequantize_model

    fused = [(name, m.fuse()) for name, m in model.named_modules() if isinstance(m, ADAPTER_CLASSES)]
    if fused:
        model.update_modules(tree_unflatten(fused))
    dequantize_model(model)
    cast_floats(model, mx.float32)
    mx.eval(model.parameters())


# --------------------------------------------------------------------------- files


def checkpoint_keys(model_dir: Path) -> set:
    """Tensor names in a model directory's safetensors files (headers only)."""
    keys = set()
    for file in Path(model_dir).glob("*.safetensors"):
        if not file.name.startswith("model"):
            continue
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            keys.update(k for k in json.loads(f.read(n)) if k != "__metadata__")
    quantized = {k.rsplit(".", 1)[0] for k in keys if k.endswith(".scales")}
    return {k for k in keys if not (k.endswith((".scales", ".biases")) and k.rsplit(".", 1)[0] in quantized)}


def check_names(names, base_dir: Path, model_type: str) -> None:
    """Refuse to write names the base checkpoint (transformers' names) does not have."""
    known = checkpoint_keys(base_dir)
    unknown = sorted(n for n in names if n not in known)
    if known and unknown:
        raise ExportError(
            f"model type {model_type!r}: mlx-lm's parameter names differ from the base checkpoint's "
            f"(e.g. {unknown[:3]}); Hugging Face / PEFT export supports architectures whose mlx-lm "
            f"names match transformers' ({', '.join(with_feature('hf_names'))}, ...). Use --format mlx."
        )


def copy_model_files(base_dir: Path, out_dir: Path) -> None:
    """Copy the base's tokenizer files, custom code and ``generation_config.json``."""
    for pattern in TOKENIZER_FILES + ("generation_config.json",):
        for file in Path(base_dir).glob(pattern):
            if file.is_file() and not (out_dir / file.name).exists():
                shutil.copy(file, out_dir / file.name)


def save_sharded(weights: dict, out_dir: Path, max_shard_bytes: int = MAX_SHARD_BYTES) -> list:
    """Write ``model.safetensors`` or ``model-0000i-of-0000n.safetensors`` + index (HF layout)."""
    shards, size = [], 0
    for name in sorted(weights):
        nbytes = weights[name].nbytes
        if not shards or size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = weights[name]
        size += nbytes
    if len(shards) == 1:
        names = ["model.safetensors"]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        mx.save_safetensors(str(out_dir / name), shard, metadata={"format": "pt"})
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(v.nbytes for v in weights.values())},
            "weight_map": {k: name for name, shard in zip(names, shards) for k in sorted(shard)},
        }
        atomic_write_text(out_dir / "model.safetensors.index.json", json.dumps(index, indent=2))
    return names


def hf_config(base_config: dict, dtype: str) -> dict:
    config = {k: v for k, v in base_config.items() if k not in ("quantization", "quantization_config")}
    config["torch_dtype"] = dtype
    config["dtype"] = dtype
    return config


def write_hf(run: Run, out_dir: Path, dtype: str, max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    merge_and_dequantize(run.model)
    weights = {k: v.astype(getattr(mx, dtype)) for k, v in tree_flatten(run.model.parameters())}
    check_names(weights, run.base_path, run.base_config.get("model_type"))
    if run.base_config.get("tie_word_embeddings"):
        weights.pop("lm_head.weight", None)
    save_sharded(weights, out_dir, max_shard_bytes)
    atomic_write_text(out_dir / "config.json", json.dumps(hf_config(run.base_config, dtype), indent=2))
    copy_model_files(run.base_path, out_dir)


def write_mlx(run: Run, out_dir: Path, dtype: str) -> None:
    from mlx_lm.utils import quantize_model, save_config, save_model

    merge_and_dequantize(run.model)
    cast_floats(run.model, getattr(mx, dtype))
    config = hf_config(run.base_config, dtype)
    q = run.quantization
    if q:
        run.model, config = quantize_model(run.model, config, q["group_size"], q["bits"], mode=q["mode"])
    save_model(out_dir, run.model)
    save_config(config, out_dir / "config.json")
    copy_model_files(run.base_path, out_dir)


def peft_weights(model: nn.Module, dtype: str) -> dict:
    """Every adapter's ``peft_tensors()`` under PEFT's ``base_model.model.<module>.`` names."""
    weights = {
        f"base_model.model.{name}.{suffix}": tensor
        for name, layer in model.named_modules() if isinstance(layer, ADAPTER_CLASSES)
        for suffix, tensor in layer.peft_tensors().items()
    }
    return {k: mx.contiguous(v.astype(getattr(mx, dtype))) for k, v in weights.items()}


def peft_config(run: Run) -> dict:
    names = [name for name, m in run.model.named_modules() if isinstance(m, ADAPTER_CLASSES)]
    layers = sorted({int(m.group(1)) for n in names if (m := re.search(r"\.layers\.(\d+)\.", n))})
    n_layers = len(run.model.layers)
    alpha = run.cfg.lora_scale * run.cfg.lora_rank
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": run.base_model,
        "revision": run.cfg.revision,
        "r": run.cfg.lora_rank,
        "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "lora_dropout": run.cfg.lora_dropout,
        "target_modules": sorted({k.rsplit(".", 1)[-1] for k in run.cfg.target_modules}),
        "layers_to_transform": layers if len(layers) < n_layers else None,
        "bias": "none",
        "use_dora": run.cfg.adapter == "dora",
        "use_rslora": False,
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
    }


def write_peft(run: Run, out_dir: Path, dtype: str) -> None:
    if run.fine_tune_type == "full":
        raise ExportError("--format peft needs LoRA/DoRA adapters; this run is a full fine-tune (use hf or mlx)")
    if run.quantization:
        print("Note: these adapters were trained on a quantized base; applied to the float base "
              "model with PEFT they are an approximation of the trained model.")
    weights = peft_weights(run.model, dtype)
    check_names({k[len("base_model.model."):].split(".lora_")[0] + ".weight" for k in weights},
                run.base_path, run.base_config.get("model_type"))
    mx.save_safetensors(str(out_dir / "adapter_model.safetensors"), weights, metadata={"format": "pt"})
    atomic_write_text(out_dir / "adapter_config.json", json.dumps(peft_config(run), indent=2))
    copy_model_files(run.base_path, out_dir)
    (out_dir / "generation_config.json").unlink(missing_ok=True)


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
        shutil.copy(run.path / "config.yaml", out_dir / RUN_CONFIG)


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

    ``model`` overrides the base model recorded in the run. ``dtype`` defaults to float16
    for ``hf``/``mlx`` and float32 for ``peft``. ``verify`` compares the exported model's
    logits with the MLX model's (needs transformers for ``hf``/``peft``) and prints them.
    """
    if format not in FORMATS:
        raise ExportError(f"format must be one of {', '.join(FORMATS)}; got {format!r}")
    dtype = dtype or ("float32" if format == "peft" else "float16")
    if dtype not in DTYPES:
        raise ExportError(f"dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    output = Path(output)
    if output.exists() and not overwrite:
        raise ExportError(f"{output} already exists; pass --overwrite to replace it")
    try:
        run = Run(adapter_path, model)
    except ConfigError as e:
        raise ExportError(str(e)) from None
    reference = reference_outputs(run.model, run.tokenizer) if verify else None
    with atomic_directory(output, overwrite=overwrite) as tmp:
        if format == "peft":
            write_peft(run, tmp, dtype)
        elif format == "mlx":
            write_mlx(run, tmp, dtype)
        else:
            write_hf(run, tmp, dtype, max_shard_bytes)
        write_run_info(run, tmp, format, dtype)
        from .hub import write_model_card

        write_model_card(tmp, location=str(output))
    print(f"Exported {format} model ({dtype}) to {output}")
    if verify:
        report = verify_export(output, format, reference, run.tokenizer, run.base_path)
        if report is not None:
            print(
                f"verify: max |logit diff| = {report['max_abs_diff']:.3g} "
                f"({report['relative']:.3g} of the logit scale {report['logit_scale']:.3g}); "
                f"greedy generations {'agree' if report['greedy_match'] else 'DIFFER'}"
                + (" (re-quantizing the merged weights adds quantization error)" if format == "mlx" and run.quantization
                   else " (16-bit export: differences of ~1e-2 relative are expected)" if dtype != "float32" else "")
            )
    return output


# --------------------------------------------------------------------------- verification


def prompt_batch(tokenizer, prompts=VERIFY_PROMPTS):
    """Right-padded token ids (numpy) and lengths for ``prompts``."""
    ids = [tokenizer.encode(p) for p in prompts]
    lengths = [len(x) for x in ids]
    batch = np.zeros((len(ids), max(lengths)), dtype=np.int64)
    for i, x in enumerate(ids):
        batch[i, : len(x)] = x
    return batch, lengths


def mlx_logits(model, batch: np.ndarray) -> np.ndarray:
    """Logits of right-padded ``batch`` (causal: padding does not affect earlier positions)."""
    out = model(mx.array(batch.astype(np.int32))).astype(mx.float32)
    return np.array(out)


def mlx_greedy(model, ids: list, n: int = 8) -> list:
    ids = list(ids)
    for _ in range(n):
        ids.append(int(mlx_logits(model, np.array([ids]))[0, -1].argmax()))
    return ids[-n:]


def torch_logits(model, batch: np.ndarray, lengths: list) -> np.ndarray:
    import torch

    mask = torch.tensor([[1] * n + [0] * (batch.shape[1] - n) for n in lengths])
    with torch.no_grad():
        out = model(input_ids=torch.tensor(batch), attention_mask=mask).logits
    return out.float().numpy()


def torch_greedy(model, ids: list, n: int = 8) -> list:
    ids = list(ids)
    for _ in range(n):
        ids.append(int(torch_logits(model, np.array([ids]), [len(ids)])[0, -1].argmax()))
    return ids[-n:]


def compare(reference: np.ndarray, other: np.ndarray, lengths: list) -> dict:
    """Max absolute logit difference over real (non-padding) positions."""
    diffs = [np.abs(reference[i, :n] - other[i, :n]).max() for i, n in enumerate(lengths)]
    scale = max(float(np.abs(reference[i, :n]).max()) for i, n in enumerate(lengths))
    return {"max_abs_diff": float(max(diffs)), "logit_scale": scale, "relative": float(max(diffs)) / scale}


def reference_outputs(model, tokenizer) -> dict:
    batch, lengths = prompt_batch(tokenizer)
    return {"logits": mlx_logits(model, batch), "greedy": mlx_greedy(model, batch[0, : lengths[0]].tolist())}


def load_exported(output: Path, format: str, base_path: Optional[Path] = None):
    """The exported model: ``mlx_lm.load`` for mlx, transformers (float32) for hf, PEFT on the base."""
    if format == "mlx":
        import mlx_lm

        return mlx_lm.load(str(output))[0]
    import torch
    from transformers import AutoModelForCausalLM

    if format == "hf":
        return AutoModelForCausalLM.from_pretrained(str(output), dtype=torch.float32).eval()
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(str(base_path), dtype=torch.float32)
    return PeftModel.from_pretrained(base, str(output)).eval()


def verify_export(output: Path, format: str, reference: dict, tokenizer, base_path: Path) -> Optional[dict]:
    """Compare the exported model's logits and greedy tokens with the MLX reference."""
    if format != "mlx":
        try:
            import torch  # noqa: F401
            import transformers  # noqa: F401

            if format == "peft":
                import peft  # noqa: F401
        except ImportError:
            print("verify: skipped (install torch and transformers" + (" and peft" if format == "peft" else "") + ")")
            return None
        if format == "peft" and "quantization" in json.loads((Path(base_path) / "config.json").read_text()):
            print("verify: skipped (the base is an MLX-quantized checkpoint transformers cannot load)")
            return None
    batch, lengths = prompt_batch(tokenizer)
    model = load_exported(output, format, base_path)
    if format == "mlx":
        logits, greedy = mlx_logits(model, batch), mlx_greedy(model, batch[0, : lengths[0]].tolist())
    else:
        logits, greedy = torch_logits(model, batch, lengths), torch_greedy(model, batch[0, : lengths[0]].tolist())
    report = compare(reference["logits"], logits, lengths)
    report["greedy_match"] = greedy == reference["greedy"]
    return report


__all__ = ["export", "ExportError", "Run", "merge_and_dequantize", "verify_export", "FORMATS", "DTYPES"]
