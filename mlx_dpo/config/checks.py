"""Every check that can refuse a configuration: names out of their choices, numbers out of their
range, options that contradict each other. :meth:`DPOConfig.validate <mlx_dpo.config.fields.DPOConfig.validate>`
runs them all, so a DPOConfig that builds is never refused later (``cfg`` below is a DPOConfig)."""

from __future__ import annotations

import math
from dataclasses import fields
from pathlib import Path
from typing import Any, Optional

from ..errors import ConfigError
from .coerce import as_bool

# Each schedule and the lr_scheduler_kwargs it takes (transformers' names).
LR_SCHEDULERS = {"constant": (), "constant_with_warmup": (), "linear": (), "cosine": ("num_cycles",),
                 "cosine_with_min_lr": ("num_cycles", "min_lr", "min_lr_rate")}
# optim: transformers' names of ours, and the MLX optimizer class of each.
OPTIM_ALIASES = {"adamw_torch": "adamw", "adamw_torch_fused": "adamw", "adamw_hf": "adamw", "lion_32bit": "lion"}
OPTIMIZERS = {"adamw": "AdamW", "adafactor": "Adafactor", "lion": "Lion", "sgd": "SGD", "muon": "Muon"}
# Arguments of the MLX classes that other options set (optim_args may not).
OPTIM_SET_BY = {"learning_rate": "learning_rate", "weight_decay": "weight_decay", "betas": "adam_beta1/adam_beta2",
                "eps": "adam_epsilon", "bias_correction": "optim: adamw (always bias-corrected)"}
QUANT_BITS = (2, 3, 4, 5, 6, 8)


def check_choices(cfg) -> None:
    """Options that take one of a few names."""
    _check_choice("train_type", cfg.train_type, ("adapter", "full"))
    _check_choice("adapter", cfg.adapter, ("lora", "dora"))
    _check_choice("reference", cfg.reference, ("base", "adapter"))
    _check_choice("truncation_mode", cfg.truncation_mode, ("keep_end", "keep_start"))
    for name in cfg.trackers:
        _check_choice("report_to", name, ("none", "wandb", "tensorboard", "mlflow", "trackio"))
    if cfg.eval_strategy is not None:
        _check_choice("eval_strategy", cfg.eval_strategy, ("no", "steps", "epoch"))
    _check_choice("lr_scheduler_type", cfg.lr_scheduler_type, tuple(LR_SCHEDULERS))
    cfg.optim = OPTIM_ALIASES.get(cfg.optim, cfg.optim)
    _check_choice("optim", cfg.optim, tuple(OPTIMIZERS))
    _check_choice("compute_dtype", cfg.compute_dtype, ("auto", "float32", "bfloat16", "float16"))
    _check_choice("f_divergence_type", cfg.f_divergence_type, ("reverse_kl", "forward_kl", "js_divergence",
                                                              "alpha_divergence"))
    for name in ("prefix_sharing", "padding_free"):  # booleans too: the Python API and YAML's true/false
        setattr(cfg, name, str(getattr(cfg, name)).lower())
        _check_choice(name, getattr(cfg, name), ("auto", "true", "false"))


def check_ranges(cfg) -> None:
    """Numeric options out of their range."""
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{f.name} must be a finite number, got {value}")
    if cfg.max_steps == 0 or cfg.max_steps < -1:
        raise ConfigError(f"max_steps must be -1 (train num_train_epochs) or >= 1, got {cfg.max_steps}")
    for name in ("lora_rank", "batch_size", "gradient_accumulation_steps", "logging_steps",
                 "ref_model_sync_steps", "max_batch_shapes", "generate_eval_prompts", "generate_max_new_tokens"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    for name in ("eval_batch_size", "precompute_ref_batch_size", "max_prompt_length", "max_completion_length",
                 "save_total_limit", "early_stopping_patience"):
        if getattr(cfg, name) is not None and getattr(cfg, name) < 1:
            raise ConfigError(f"{name} must be >= 1 (or unset), got {getattr(cfg, name)}")
    if cfg.max_length is not None and cfg.max_length < 2:
        raise ConfigError(f"max_length must be >= 2 (a prompt token and a completion token), got {cfg.max_length}")
    for name in ("max_prompt_length", "max_completion_length"):
        limit = getattr(cfg, name)
        if limit is not None and cfg.max_length is not None and limit >= cfg.max_length:
            raise ConfigError(f"{name} {limit} has no effect with max_length {cfg.max_length} (a pair is cut to "
                              f"max_length first): set it below max_length, or leave it unset")
    for name in ("warmup_steps", "save_steps", "max_grad_norm", "weight_decay", "early_stopping_threshold"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"{name} must be >= 0, got {getattr(cfg, name)}")
    if cfg.eval_steps is not None and cfg.eval_steps < 0:
        raise ConfigError(f"eval_steps must be >= 0 (0 disables evaluation), got {cfg.eval_steps}")
    if cfg.num_layers == 0 or cfg.num_layers < -1:
        raise ConfigError(f"num_layers must be -1 (all blocks) or >= 1, got {cfg.num_layers}")
    if not 0.0 <= cfg.warmup_ratio <= 1.0:
        raise ConfigError(f"warmup_ratio must be in [0, 1], got {cfg.warmup_ratio}")
    if not 0.0 <= cfg.lora_dropout < 1.0:
        raise ConfigError(f"lora_dropout must be in [0, 1), got {cfg.lora_dropout}")
    if cfg.lora_alpha <= 0:
        raise ConfigError(f"lora_alpha must be > 0, got {cfg.lora_alpha}")
    if cfg.loraplus_lr_ratio is not None and cfg.loraplus_lr_ratio <= 0:
        raise ConfigError(f"loraplus_lr_ratio must be > 0, got {cfg.loraplus_lr_ratio}")
    if cfg.learning_rate <= 0:
        raise ConfigError(f"learning_rate must be > 0, got {cfg.learning_rate}")
    if not 0.0 <= cfg.eval_split < 1.0:
        raise ConfigError(f"eval_split must be in [0, 1), got {cfg.eval_split}")
    if not 0.0 <= cfg.label_smoothing <= 0.5:
        raise ConfigError(f"label_smoothing must be in [0, 0.5], got {cfg.label_smoothing}")


def quantize_options(quantize: Optional[dict]) -> Optional[dict]:
    """``quantize`` with its defaults filled in: ``{bits: 4, group_size: 64}``."""
    if quantize is None:
        return None
    if not isinstance(quantize, dict) or set(quantize) - {"bits", "group_size"}:
        raise ConfigError("quantize must be a mapping with keys bits (e.g. 4 or 8) and group_size (32|64|128)")
    bits = quantize.get("bits", 4)
    group = quantize.get("group_size", 64)
    if bits not in QUANT_BITS or group not in (32, 64, 128):
        raise ConfigError(f"quantize: bits must be one of {', '.join(map(str, QUANT_BITS))} (4 or 8 "
                          f"recommended) and group_size 32, 64 or 128, got {quantize}")
    return {"bits": bits, "group_size": group}


# Options that only act with another setting: (option, whether it acts, what it needs). A value
# other than the field's default where it cannot act is an error (the loss options' own table is
# ``LOSSES``' ``options``, checked with the loss).
APPLIES = (
    ("ref_model_mixup_alpha", lambda c: c.sync_ref_model, "sync_ref_model: true (TR-DPO)"),
    ("ref_model_sync_steps", lambda c: c.sync_ref_model, "sync_ref_model: true (TR-DPO)"),
    ("precompute_ref_batch_size", lambda c: c.precompute_ref_log_probs, "precompute_ref_log_probs: true"),
    ("loraplus_lr_ratio", lambda c: c.train_type == "adapter", "train_type: adapter (LoRA's B matrices)"),
    ("dpop_lambda", lambda c: "dpop" in c.loss_types, "loss_type: dpop"),
    ("generate_during_eval", lambda c: c.eval_mode != "no", "evaluation (eval_steps or eval_strategy)"),
    ("generate_eval_prompts", lambda c: c.generate_during_eval, "generate_during_eval: true"),
    ("generate_max_new_tokens", lambda c: c.generate_during_eval, "generate_during_eval: true"),
    ("early_stopping_threshold", lambda c: c.early_stopping_patience, "early_stopping_patience"),
    ("load_best_model_at_end", lambda c: c.eval_mode != "no", "evaluation (eval_steps or eval_strategy)"),
    ("early_stopping_patience", lambda c: c.eval_mode != "no", "evaluation (eval_steps or eval_strategy)"),
)


def check_applies(cfg) -> None:
    """An option set (to other than its default) where it cannot act is refused (:data:`APPLIES`)."""
    defaults = {f.name: f.default for f in fields(cfg)}
    for name, acts, needs in APPLIES:
        if getattr(cfg, name) != defaults[name] and not acts(cfg):
            raise ConfigError(f"{name}: {getattr(cfg, name)!r} has no effect without {needs}; set that too, or "
                              f"remove {name}")


def check_combinations(cfg) -> None:
    """Options that are fine alone but contradict each other (or are missing a partner)."""
    if cfg.eval_strategy == "no" and cfg.eval_steps:
        raise ConfigError(f"eval_steps is {cfg.eval_steps} but eval_strategy is 'no'; set eval_strategy: steps "
                          "(or remove eval_steps)")
    if cfg.reference == "adapter" and not cfg.ref_adapter_path:
        raise ConfigError("reference: adapter needs ref_adapter_path (an mlx-lm adapter directory)")
    if cfg.ref_adapter_path and cfg.reference != "adapter":
        raise ConfigError("ref_adapter_path is set but reference is 'base', so it would be ignored; "
                          "set reference: adapter (or remove ref_adapter_path)")
    if cfg.train_type == "full" and cfg.reference == "adapter":
        raise ConfigError("train_type: full has no adapters; reference: adapter needs train_type: adapter")
    if cfg.train_type == "full" and cfg.sync_ref_model:
        raise ConfigError("sync_ref_model (TR-DPO) mixes adapters; it needs train_type: adapter")
    check_layout(cfg.prefix_sharing, cfg.padding_free)
    if cfg.resume_from_checkpoint and cfg.overwrite_output_dir:
        raise ConfigError("resume_from_checkpoint and overwrite_output_dir contradict each other; choose one")
    if cfg.sync_ref_model and cfg.precompute_ref_log_probs:
        raise ConfigError("sync_ref_model (TR-DPO) updates the reference; it cannot be combined with precompute_ref_log_probs")
    if cfg.sync_ref_model and cfg.reference_free:
        raise ConfigError("sync_ref_model needs a reference; it cannot be combined with reference_free")
    if cfg.sync_ref_model and not 0.0 <= cfg.ref_model_mixup_alpha <= 1.0:
        raise ConfigError(f"ref_model_mixup_alpha must be in [0, 1], got {cfg.ref_model_mixup_alpha}")
    if cfg.loss_weights is not None and len(cfg.loss_weights) != len(cfg.loss_types):
        raise ConfigError(
            f"loss_weights has {len(cfg.loss_weights)} entries but loss_type has {len(cfg.loss_types)}"
        )
    if (cfg.warmup_steps or cfg.warmup_ratio) and cfg.lr_scheduler_type == "constant":
        raise ConfigError("warmup_steps/warmup_ratio have no effect with lr_scheduler_type 'constant' (as in "
                          "transformers); use constant_with_warmup, or remove the warmup")
    check_applies(cfg)
    check_optim_args(cfg.optim, cfg.optim_args or {})
    check_scheduler_kwargs(cfg.lr_scheduler_type, cfg.lr_scheduler_kwargs or {})
    if cfg.max_steps <= 0 and cfg.num_train_epochs <= 0:
        raise ConfigError("set max_steps > 0 or num_train_epochs > 0")


def check_optim_args(optim: str, args: dict) -> None:
    """``optim_args`` must be arguments of the optimizer's MLX class that no other option sets."""
    import inspect

    import mlx.optimizers

    accepted = set(inspect.signature(getattr(mlx.optimizers, OPTIMIZERS[optim])).parameters) - set(OPTIM_SET_BY)
    for key in args:
        if key in OPTIM_SET_BY:
            raise ConfigError(f"optim_args: {key} is set by {OPTIM_SET_BY[key]}, not optim_args")
        if key not in accepted:
            raise ConfigError(f"optim_args: optim {optim} (mlx.optimizers.{OPTIMIZERS[optim]}) takes "
                              f"{', '.join(sorted(accepted)) or 'no extra arguments'}; got {key!r}")


def check_scheduler_kwargs(kind: str, kwargs: dict) -> None:
    """``lr_scheduler_kwargs`` must be arguments of the schedule (:data:`LR_SCHEDULERS`)."""
    for key, value in kwargs.items():
        if key not in LR_SCHEDULERS[kind]:
            takes = ", ".join(LR_SCHEDULERS[kind]) or "no arguments"
            raise ConfigError(f"lr_scheduler_kwargs: lr_scheduler_type {kind} takes {takes}; got {key!r}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ConfigError(f"lr_scheduler_kwargs: {key} must be a number >= 0, got {value!r}")
    if kind == "cosine_with_min_lr" and len({"min_lr", "min_lr_rate"} & set(kwargs)) != 1:
        raise ConfigError("lr_scheduler_type cosine_with_min_lr needs one of min_lr and min_lr_rate in "
                          "lr_scheduler_kwargs (as transformers), e.g. {min_lr_rate: 0.1}")


def code_settings(values: dict) -> list:
    """The settings in ``values`` (config keys) that run Python from outside mlx-dpo: ``trust_remote_code``
    on (a model directory's code) and ``module:function`` losses."""
    found = []
    if as_bool("trust_remote_code", values.get("trust_remote_code", False)):
        found.append("trust_remote_code: true")
    losses = values.get("loss_type")
    for name in losses if isinstance(losses, (list, tuple)) else [losses]:
        if isinstance(name, str) and ":" in name:
            found.append(f"loss_type {name!r}")
    return found


def check_file_code(values: dict, source: str, allowed: bool) -> None:
    """A config file never allows code by itself (a run directory's ``config.yaml`` may have been
    planted): settings of :func:`code_settings` in ``values``, read from ``source``, need
    ``allowed`` -- ``--trust-remote-code`` on the command line, ``trust_remote_code=True`` in Python."""
    found = code_settings(values)
    if found and not allowed:
        raise ConfigError(f"{source}: {' and '.join(found)} would run Python code from outside mlx-dpo, and a "
                          "config file never allows that by itself: pass --trust-remote-code on the command line "
                          "(trust_remote_code=True in Python) if you trust it")


def check_layout(prefix_sharing: str, padding_free: str) -> None:
    """``padding_free: true`` shares each prompt: it contradicts ``prefix_sharing: false``."""
    if padding_free == "true" and prefix_sharing == "false":
        raise ConfigError("padding_free: true packs each prompt once with both of its completions, so it cannot "
                          "be combined with prefix_sharing: false (leave prefix_sharing at auto)")


def chat_template_text(value: Optional[str]) -> Optional[str]:
    """``chat_template`` as the template itself: the text of a Jinja file, or the value when it is
    template text already (it has ``{%`` or ``{{``)."""
    if not value or "{%" in value or "{{" in value:
        return value or None
    path = Path(value).expanduser()
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise ConfigError(f"chat_template: {value} {what}; expected a Jinja file (.jinja) or the template text")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"chat_template: cannot read {value} ({e})") from None


def _check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(map(str, choices))}; got {value!r}")
