"""Training configuration: one dataclass, the single source of defaults.

Keys are flat and follow TRL's ``DPOConfig`` / ``TrainingArguments`` names where
one exists, mlx-lm's names where TRL has none. The CLI and YAML loaders are thin
layers over :class:`DPOConfig`: ``defaults < YAML file < command line``.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Optional, Union

import yaml

# TRL / transformers spellings accepted as aliases of our keys.
ALIASES = {
    "per_device_train_batch_size": "batch_size",
    "train_batch_size": "batch_size",
    "per_device_eval_batch_size": "eval_batch_size",
    "model_name_or_path": "model",
    "dataset_name": "data",
    "dataset_config": "dataset_subset",
    "dataset_train_split": "dataset_split",
    "dataset_test_split": "eval_dataset_split",
    "iters": "max_steps",
    "adapter_path": "output_dir",
    "grad_checkpoint": "gradient_checkpointing",
    "fine_tune_type": "adapter",
    "lora_r": "lora_rank",
    "target_modules": "lora_target_modules",
    "lora_layers": "num_layers",
}

DEFAULT_LORA_TARGETS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)

LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine")
QUANT_BITS = (2, 3, 4, 5, 6, 8)


class ConfigError(ValueError):
    """A configuration problem the user can fix: says which key and why."""


@dataclass
class DPOConfig:
    # ---- model ---------------------------------------------------------------
    model: str = "toy:llama"
    """Local HF/MLX model directory, a Hub id, or ``toy:llama`` / ``toy:qwen2``
    (a tiny random-weight model built locally; works offline)."""
    revision: Optional[str] = None
    trust_remote_code: bool = False
    quantize: Optional[dict] = None
    """Quantize the base at load time: ``{bits: 4|8, group_size: 32|64|128}``."""
    compute_dtype: str = "auto"
    """Dtype of the non-quantized weights during training: ``auto`` (float32 on
    the CPU backend, the checkpoint's dtype on Metal), float32, bfloat16, float16."""

    # ---- adapters ------------------------------------------------------------
    train_type: str = "adapter"
    """``adapter`` (LoRA/DoRA on a frozen base) or ``full`` (train chosen layers)."""
    adapter: str = "lora"
    """``lora`` or ``dora``."""
    lora_rank: int = 8
    lora_alpha: float = 16.0
    """LoRA scale is ``lora_alpha / lora_rank`` (PEFT's convention)."""
    lora_dropout: float = 0.0
    lora_target_modules: Optional[list] = None
    """Module paths inside a transformer block; default: attention + MLP projections."""
    num_layers: int = -1
    """Number of (last) transformer blocks that get adapters; -1 = all."""
    gradient_checkpointing: bool = False

    # ---- reference model -----------------------------------------------------
    reference: str = "base"
    """``base`` (adapters off) or ``adapter`` (frozen copy of ``ref_adapter_path``)."""
    ref_adapter_path: Optional[str] = None
    reference_free: bool = False
    precompute_ref_log_probs: bool = False
    precompute_ref_batch_size: Optional[int] = None
    sync_ref_model: bool = False
    ref_model_mixup_alpha: float = 0.6
    ref_model_sync_steps: int = 512

    # ---- data ----------------------------------------------------------------
    data: str = "toy"
    """JSONL/JSON/Parquet file, an mlx-lm style directory, a Hub dataset id, or
    ``toy`` (a small synthetic preference set generated locally)."""
    eval_data: Optional[str] = None
    eval_split: float = 0.0
    dataset_subset: Optional[str] = None
    dataset_revision: Optional[str] = None
    """Branch, tag or commit of a Hub dataset (``revision`` is the model's)."""
    dataset_split: str = "train"
    eval_dataset_split: Optional[str] = None
    data_format: str = "auto"
    """``auto``, ``standard``, ``conversational`` or ``implicit``."""
    columns: Optional[dict] = None
    """Column mapping, e.g. ``{prompt: question, chosen: response_j, rejected: response_k}``."""
    prompt_template: Optional[str] = None
    system_prompt: Optional[str] = None
    tools: Optional[list] = None
    max_length: Optional[int] = 1024
    max_prompt_length: Optional[int] = 512
    max_completion_length: Optional[int] = None
    truncation_mode: str = "keep_end"
    cache_dir: Optional[str] = None
    """Where tokenized datasets and precomputed reference log-probs are cached
    (default ``~/.cache/mlx_dpo``)."""

    # ---- loss ----------------------------------------------------------------
    loss_type: Union[str, list] = "sigmoid"
    loss_weights: Optional[list] = None
    beta: float = 0.1
    label_smoothing: float = 0.0
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = 1.0
    discopop_tau: float = 0.05
    rpo_alpha: Optional[float] = None
    use_weighting: bool = False
    ld_alpha: Optional[float] = None
    simpo_gamma: float = 0.5
    cpo_alpha: float = 1.0

    # ---- optimisation --------------------------------------------------------
    learning_rate: float = 1e-6
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    lr_scheduler_type: str = "linear"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    batch_size: int = 4
    eval_batch_size: Optional[int] = None
    gradient_accumulation_steps: int = 1
    max_steps: int = -1
    num_train_epochs: float = 3.0
    seed: int = 42
    prefix_sharing: str = "auto"
    """``auto`` / ``true`` / ``false``: run each pair's prompt once."""
    skip_nonfinite_steps: bool = False

    # ---- logging, eval, checkpoints -------------------------------------------
    output_dir: str = "runs/dpo"
    overwrite_output_dir: bool = False
    logging_steps: int = 10
    eval_steps: Optional[int] = None
    """Evaluate every N steps (default: ``logging_steps``); 0 disables."""
    max_eval_batches: int = -1
    save_steps: int = 500
    save_total_limit: Optional[int] = None
    resume_from_checkpoint: Optional[str] = None
    progress_bar: bool = True

    # ------------------------------------------------------------------------
    def __post_init__(self):
        self.validate()

    @property
    def lora_scale(self) -> float:
        return self.lora_alpha / self.lora_rank

    @property
    def target_modules(self) -> tuple:
        return tuple(self.lora_target_modules or DEFAULT_LORA_TARGETS)

    @property
    def loss_types(self) -> list:
        return list(self.loss_type) if isinstance(self.loss_type, (list, tuple)) else [self.loss_type]

    def validate(self) -> None:
        _coerce_types(self)
        _check_choice("train_type", self.train_type, ("adapter", "full"))
        _check_choice("adapter", self.adapter, ("lora", "dora"))
        _check_choice("reference", self.reference, ("base", "adapter"))
        _check_choice("data_format", self.data_format, ("auto", "standard", "conversational", "implicit"))
        _check_choice("truncation_mode", self.truncation_mode, ("keep_end", "keep_start"))
        _check_choice("lr_scheduler_type", self.lr_scheduler_type, LR_SCHEDULERS)
        _check_choice("compute_dtype", self.compute_dtype, ("auto", "float32", "bfloat16", "float16"))
        _check_choice("f_divergence_type", self.f_divergence_type, ("reverse_kl", "js_divergence", "alpha_divergence"))
        self.prefix_sharing = str(self.prefix_sharing).lower()
        _check_choice("prefix_sharing", self.prefix_sharing, ("auto", "true", "false"))
        for name in ("lora_rank", "batch_size", "gradient_accumulation_steps", "logging_steps",
                     "ref_model_sync_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_batch_size", "precompute_ref_batch_size", "max_prompt_length", "max_completion_length",
                     "save_total_limit"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1 (or unset), got {getattr(self, name)}")
        if self.max_length is not None and self.max_length < 2:
            raise ConfigError(f"max_length must be >= 2 (a prompt token and a completion token), got {self.max_length}")
        for name in ("warmup_steps", "save_steps", "max_grad_norm", "weight_decay"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.eval_steps is not None and self.eval_steps < 0:
            raise ConfigError(f"eval_steps must be >= 0 (0 disables evaluation), got {self.eval_steps}")
        if self.num_layers == 0 or self.num_layers < -1:
            raise ConfigError(f"num_layers must be -1 (all blocks) or >= 1, got {self.num_layers}")
        if not 0.0 <= self.warmup_ratio <= 1.0:
            raise ConfigError(f"warmup_ratio must be in [0, 1], got {self.warmup_ratio}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.lora_alpha <= 0:
            raise ConfigError(f"lora_alpha must be > 0, got {self.lora_alpha}")
        if self.learning_rate <= 0:
            raise ConfigError(f"learning_rate must be > 0, got {self.learning_rate}")
        if not 0.0 <= self.eval_split < 1.0:
            raise ConfigError(f"eval_split must be in [0, 1), got {self.eval_split}")
        if not 0.0 <= self.label_smoothing <= 0.5:
            raise ConfigError(f"label_smoothing must be in [0, 0.5], got {self.label_smoothing}")
        if self.quantize is not None:
            if not isinstance(self.quantize, dict) or set(self.quantize) - {"bits", "group_size"}:
                raise ConfigError("quantize must be a mapping with keys bits (e.g. 4 or 8) and group_size (32|64|128)")
            bits = self.quantize.get("bits", 4)
            group = self.quantize.get("group_size", 64)
            if bits not in QUANT_BITS or group not in (32, 64, 128):
                raise ConfigError(f"quantize: bits must be one of {', '.join(map(str, QUANT_BITS))} (4 or 8 "
                                  f"recommended) and group_size 32, 64 or 128, got {self.quantize}")
            self.quantize = {"bits": bits, "group_size": group}
        if self.reference == "adapter" and not self.ref_adapter_path:
            raise ConfigError("reference: adapter needs ref_adapter_path (an mlx-lm adapter directory)")
        if self.ref_adapter_path and self.reference != "adapter":
            raise ConfigError("ref_adapter_path is set but reference is 'base', so it would be ignored; "
                              "set reference: adapter (or remove ref_adapter_path)")
        if self.train_type == "full" and self.reference == "adapter":
            raise ConfigError("train_type: full has no adapters; reference: adapter needs train_type: adapter")
        if self.train_type == "full" and self.sync_ref_model:
            raise ConfigError("sync_ref_model (TR-DPO) mixes adapters; it needs train_type: adapter")
        if self.resume_from_checkpoint and self.overwrite_output_dir:
            raise ConfigError("resume_from_checkpoint and overwrite_output_dir contradict each other; choose one")
        if self.sync_ref_model and self.precompute_ref_log_probs:
            raise ConfigError("sync_ref_model (TR-DPO) updates the reference; it cannot be combined with precompute_ref_log_probs")
        if self.sync_ref_model and self.reference_free:
            raise ConfigError("sync_ref_model needs a reference; it cannot be combined with reference_free")
        if self.sync_ref_model and not 0.0 <= self.ref_model_mixup_alpha <= 1.0:
            raise ConfigError(f"ref_model_mixup_alpha must be in [0, 1], got {self.ref_model_mixup_alpha}")
        if self.loss_weights is not None and len(self.loss_weights) != len(self.loss_types):
            raise ConfigError(
                f"loss_weights has {len(self.loss_weights)} entries but loss_type has {len(self.loss_types)}"
            )
        if self.max_steps <= 0 and self.num_train_epochs <= 0:
            raise ConfigError("set max_steps > 0 or num_train_epochs > 0")

    # ---- (de)serialisation ---------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: Union[str, Path]) -> None:
        from .io import atomic_write_text

        atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def from_dict(cls, values: dict, source: str = "config") -> "DPOConfig":
        return cls(**normalize_keys(values, source))

    @classmethod
    def from_yaml(cls, path: Union[str, Path], overrides: Optional[dict] = None) -> "DPOConfig":
        values = load_yaml(path)
        values = {**normalize_keys(values, str(path)), **normalize_keys(overrides or {}, "command line")}
        return cls(**values)


def config_field_names() -> list:
    return [f.name for f in fields(DPOConfig)]


def normalize_keys(values: dict, source: str = "config") -> dict:
    """Map aliases to canonical names; unknown keys raise, naming the closest key."""
    valid = set(config_field_names())
    out = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        name = ALIASES.get(name, name)
        if name not in valid:
            close = difflib.get_close_matches(name, sorted(valid | set(ALIASES)), n=1, cutoff=0.5)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"{source}: unknown config key '{key}'{hint}")
        if name in out:
            raise ConfigError(f"{source}: '{key}' given twice (as '{name}' and an alias)")
        out[name] = value
    return out


def load_yaml(path: Union[str, Path]) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{where}: invalid YAML: {getattr(e, 'problem', e)}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys, got {type(values).__name__}")
    return values


def _check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(map(str, choices))}; got {value!r}")


def _coerce_types(cfg: DPOConfig) -> None:
    """Coerce strings from the command line (``--beta 0.2``) to the field's type."""
    hints = typing.get_type_hints(DPOConfig)
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if value is None:
            continue
        setattr(cfg, f.name, _coerce(f.name, value, hints[f.name]))


def _coerce(name: str, value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if origin is Union:
        if isinstance(value, str) and list in [typing.get_origin(a) or a for a in args]:
            return _parse_structured(name, value, keep_string=str in args)
        for arg in args:
            try:
                return _coerce(name, value, arg)
            except ConfigError:
                continue
        raise ConfigError(f"{name}: cannot interpret {value!r}")
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    if hint in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{name} must be a number, got {value!r}")
        try:
            number = hint(value) if hint is float else int(float(value))
        except (TypeError, ValueError):
            raise ConfigError(f"{name} must be {'an integer' if hint is int else 'a number'}, got {value!r}") from None
        if hint is int and float(value) != number:
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        return number
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name} must be a string, got {value!r}")
        return value
    if hint in (dict, list):
        if isinstance(value, str):
            value = _parse_structured(name, value)
        if not isinstance(value, hint):
            raise ConfigError(f"{name} must be a {'mapping' if hint is dict else 'list'}, got {value!r}")
        return value
    return value


def _parse_structured(name: str, value: str, keep_string: bool = False) -> Any:
    """Parse ``'[a, b]'`` or ``'{bits: 4}'`` given on the command line (YAML flow syntax)."""
    text = value.strip()
    if keep_string and not text.startswith(("[", "{")):
        return value
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        raise ConfigError(f"{name}: cannot parse {value!r} (use YAML, e.g. [a, b] or {{bits: 4}})") from None


def resolve_config(config: Optional[Union[str, Path]] = None, **overrides) -> DPOConfig:
    """Defaults < YAML file < keyword overrides (the Python API and the CLI use this)."""
    if config is None:
        return DPOConfig.from_dict(overrides, "arguments")
    return DPOConfig.from_yaml(config, overrides)


def dumps(cfg: DPOConfig) -> str:
    return json.dumps(cfg.to_dict(), indent=2, sort_keys=True)
