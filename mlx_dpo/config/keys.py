"""What every config key shares: the aliases (TRL / transformers / mlx-lm spellings), each
field's role and help (:func:`option`), the key lists derived from roles, and the mapping of
given keys to field names (:func:`canonical_keys`). :mod:`.fields` holds the fields themselves."""

from __future__ import annotations

import difflib
from dataclasses import field
from typing import Any, Callable, Optional

from ..errors import ConfigError

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
    "chat_template_path": "chat_template",
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


ROLES = ("model", "adapter", "reference", "data", "loss", "optim", "run")
# What a change of a key of each role means on --resume: "match" (refused), "note"
# (allowed and reported), "free" (allowed silently). A field may override it.
RESUME_BY_ROLE = {"model": "match", "adapter": "match", "reference": "match", "data": "match",
                  "loss": "match", "optim": "note", "run": "free"}
# Derived key lists a field can join beyond its role (``keys=...``):
#   data_cache  the tokenized-data cache key (every ``data`` key is in it)
#   ref_cache   the reference log-prob cache key (every ``model`` key is in it)
#   card        the model card's "Training configuration" table
KEY_LISTS = ("data_cache", "ref_cache", "card")


def option(default: Any = None, help: str = "", role: str = "run", *, resume: Optional[str] = None,
           keys: tuple = (), factory: Optional[Callable] = None):
    """A :class:`DPOConfig` field with its help text and role (see :func:`config_keys`)."""
    assert role in ROLES and resume in (None, "match", "note", "free") and set(keys) <= set(KEY_LISTS)
    metadata = {"help": help, "role": role, "resume": resume or RESUME_BY_ROLE[role], "keys": tuple(keys)}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def canonical_keys(values: dict, valid: set, source: str = "config") -> dict:
    """Map aliases to canonical names (``valid``: the config's field names); unknown keys raise,
    naming the closest key."""
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
