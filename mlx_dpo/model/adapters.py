"""Switchable LoRA/DoRA adapters and their mlx-lm adapter files.

The reference model is the *same* module with its adapters switched off
(``adapter_mode(model, "base")``) or switched to a frozen reference copy
(``"reference"``): there is never a second copy of the base weights.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Iterator

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.tuner.dora import DoRALinear
from mlx_lm.tuner.lora import LoRALinear

from ..config.fields import DEFAULT_LORA_TARGETS, DPOConfig
from ..errors import ConfigError
from .quant import base_linear, dense_weight

MODES = ("policy", "base", "reference")


class _Switchable:
    """``mode``: ``policy`` (the trainable adapter), ``base`` (adapter off) or
    ``reference`` (the frozen ``ref_*`` copy).

    mlx-lm layout: ``lora_a`` (in, r), ``lora_b`` (r, out), base ``W`` (out, in).
    """

    mode = "policy"

    @classmethod
    def from_base(cls, linear, r=8, dropout=0.0, scale=20.0):
        layer = super().from_base(linear, r=r, dropout=dropout, scale=scale)  # mlx-lm's constructor
        layer.__class__ = cls
        return layer

    def _rescale(self, w: mx.array) -> mx.array:
        """The merged weight's final form (LoRA: unchanged)."""
        return w

    def fuse(self) -> nn.Linear:
        """A float32 ``nn.Linear`` equal to the policy adapter (no dropout):
        ``W' = W + scale B^T A^T`` (DoRA then rescales its rows, see ``_rescale``)."""
        a, b = self.lora_a.astype(mx.float32), self.lora_b.astype(mx.float32)
        w = self._rescale(dense_weight(self.linear) + self.scale * (b.T @ a.T))
        has_bias = "bias" in self.linear
        out = nn.Linear(w.shape[1], w.shape[0], bias=has_bias)
        out.weight = w
        if has_bias:
            out.bias = self.linear.bias.astype(mx.float32)
        return out

    def peft_tensors(self) -> dict:
        """PEFT's tensors by name suffix: ``lora_A.weight`` (r, in) = ``lora_a^T``,
        ``lora_B.weight`` (out, r) = ``lora_b^T``."""
        return {"lora_A.weight": self.lora_a.T, "lora_B.weight": self.lora_b.T}


class SwitchableLoRALinear(_Switchable, LoRALinear):
    """mlx-lm's ``LoRALinear`` (same parameter names and file format) whose adapter
    can be switched off (``mode = "base"``) or switched to a frozen reference copy
    (``mode = "reference"``, using ``ref_lora_a`` / ``ref_lora_b``).

    ``y = W x + scale * B A dropout(x)`` (Hu et al. 2021, arXiv:2106.09685).
    """

    def __call__(self, x):
        y = base_linear(self.linear, x)
        if self.mode == "base":
            return y
        if self.mode == "reference":
            a, b = self.ref_lora_a, self.ref_lora_b
        else:
            a, b, x = self.lora_a, self.lora_b, self.dropout(x)
        return y + (self.scale * ((x @ a) @ b)).astype(x.dtype)


class SwitchableDoRALinear(_Switchable, DoRALinear):
    """mlx-lm's ``DoRALinear`` with the same switch (Liu et al. 2024, arXiv:2402.09353):
    ``y = m * (W + scale B A) x / ||W + scale B A||_row``."""

    def __call__(self, x):
        if self.mode == "base":
            return base_linear(self.linear, x)
        if self.mode == "reference":
            a, b, m = self.ref_lora_a, self.ref_lora_b, self.ref_m
        else:
            a, b, m = self.lora_a, self.lora_b, self.m
        w = self._dequantized_weight()
        z = ((self.dropout(x) if self.mode == "policy" else x) @ a) @ b
        out = x @ w.T + (self.scale * z).astype(x.dtype)
        denom = mx.stop_gradient(mx.linalg.norm(w + (self.scale * b.T) @ a.T, axis=1))
        out = (m / denom).astype(x.dtype) * out
        return out + self.linear.bias if "bias" in self.linear else out

    def _rescale(self, w: mx.array) -> mx.array:
        """DoRA's rows: ``m * W' / ||W'||_row`` (float32)."""
        return (self.m.astype(mx.float32) / mx.linalg.norm(w, axis=1))[:, None] * w

    def peft_tensors(self) -> dict:
        """LoRA's tensors plus ``lora_magnitude_vector`` (out,) = ``m``."""
        return {**super().peft_tensors(), "lora_magnitude_vector": self.m}


ADAPTER_CLASSES = (SwitchableLoRALinear, SwitchableDoRALinear)


# --------------------------------------------------------------------------- finding and switching


def named_adapter_layers(model: nn.Module) -> list:
    """``(name, layer)`` of every switchable LoRA/DoRA layer."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, ADAPTER_CLASSES)]


def adapter_layers(model: nn.Module) -> list:
    return [m for _, m in named_adapter_layers(model)]


@contextlib.contextmanager
def adapter_mode(model: nn.Module, mode: str) -> Iterator[None]:
    """Temporarily run ``model`` as ``policy``, ``base`` (adapters off) or ``reference``.

    Inside ``mx.compile`` the mode is read at trace time, so a compiled step can run
    the policy and the reference in one graph.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}")
    layers = adapter_layers(model)
    previous = [layer.mode for layer in layers]
    for layer in layers:
        layer.mode = mode
    try:
        yield
    finally:
        for layer, old in zip(layers, previous):
            layer.mode = old


def reference_mode(model: nn.Module) -> str:
    """``reference`` when the adapters carry a frozen reference copy, else ``base``."""
    return "reference" if any("ref_lora_a" in layer for layer in adapter_layers(model)) else "base"


# --------------------------------------------------------------------------- attaching


def last_blocks(model: nn.Module, num_layers: int) -> list:
    """The last ``num_layers`` transformer blocks (all of them for -1)."""
    blocks = model.layers
    if num_layers > len(blocks):
        raise ConfigError(f"num_layers is {num_layers} but the model has {len(blocks)} transformer blocks; "
                          f"use -1 (all) or at most {len(blocks)}")
    n = len(blocks) if num_layers < 0 else num_layers
    return blocks[len(blocks) - n:]


def linear_keys(block: nn.Module) -> list:
    return sorted(k for k, m in block.named_modules() if isinstance(m, (nn.Linear, nn.QuantizedLinear)))


ALL_LINEAR = "all-linear"


def resolve_target_modules(names, available) -> list:
    """The block keys in ``available`` (mlx-lm's, e.g. ``self_attn.q_proj``) that
    ``lora_target_modules`` names, matched as PEFT matches ``target_modules``: a key matches a
    name equal to it or ending in ``"." + name`` (``q_proj``); ``all-linear`` is every linear
    of the block (the output head is outside the blocks, so excluded as in PEFT). In
    ``available``'s order; a name that matches nothing is a :class:`ConfigError`."""
    names = [names] if isinstance(names, str) else list(names)
    if ALL_LINEAR in names:
        return list(available)
    matches = lambda key, name: key == name or key.endswith("." + name)  # noqa: E731
    missing = [n for n in names if not any(matches(k, n) for k in available)]
    if missing:
        raise ConfigError(f"lora_target_modules: {missing} match no linear layer of the model's blocks; "
                          f"available: {list(available)} (full keys or their last parts, or {ALL_LINEAR})")
    return [k for k in available if any(matches(k, n) for n in names)]


def add_adapters(model: nn.Module, cfg: DPOConfig) -> int:
    """Attach switchable LoRA/DoRA layers to ``cfg.target_modules`` of the last
    ``cfg.num_layers`` blocks (resolved by :func:`resolve_target_modules`; PEFT-style names
    are written back to ``cfg.lora_target_modules`` as mlx-lm's keys, which
    adapter_config.json, config.yaml and checkpoints then hold). The default (attention and MLP
    projections) is every linear layer where a model fuses them (Phi-3's ``qkv_proj``,
    ``gate_up_proj``). Returns the number of adapted blocks."""
    available = linear_keys(model.layers[0])
    names = cfg.target_modules
    if cfg.lora_target_modules is None and not set(DEFAULT_LORA_TARGETS) <= set(available):
        names = ALL_LINEAR
    resolved = resolve_target_modules(names, available)
    if set(resolved) != set(cfg.target_modules):
        cfg.lora_target_modules = resolved
    keys = set(resolved)
    cls = SwitchableDoRALinear if cfg.adapter == "dora" else SwitchableLoRALinear
    blocks = last_blocks(model, cfg.num_layers)
    for block in blocks:
        layers = [
            (k, cls.from_base(m, r=cfg.lora_rank, dropout=cfg.lora_dropout, scale=cfg.lora_scale))
            for k, m in block.named_modules() if k in keys
        ]
        block.update_modules(tree_unflatten(layers))
    model.freeze()
    for layer in adapter_layers(model):
        layer.unfreeze(keys=["lora_a", "lora_b", "m"], recurse=False, strict=False)
    return len(blocks)


def add_reference_copy(model: nn.Module) -> None:
    """Give every adapter a frozen ``ref_*`` copy of its current weights."""
    for layer in adapter_layers(model):
        layer.ref_lora_a = mx.array(layer.lora_a)
        layer.ref_lora_b = mx.array(layer.lora_b)
        if isinstance(layer, SwitchableDoRALinear):
            layer.ref_m = mx.array(layer.m)
        layer.freeze(keys=[k for k in ("ref_lora_a", "ref_lora_b", "ref_m") if k in layer], recurse=False)


def sync_reference(model: nn.Module, alpha: float) -> None:
    """TR-DPO (Gorbatovski et al. 2024, arXiv:2404.09656) soft update of the reference
    adapter: ``ref <- alpha * policy + (1 - alpha) * ref``."""
    for layer in adapter_layers(model):
        layer.ref_lora_a = alpha * layer.lora_a + (1 - alpha) * layer.ref_lora_a
        layer.ref_lora_b = alpha * layer.lora_b + (1 - alpha) * layer.ref_lora_b
        if "ref_m" in layer:
            layer.ref_m = alpha * layer.m + (1 - alpha) * layer.ref_m
        mx.eval(layer.ref_lora_a, layer.ref_lora_b)


# --------------------------------------------------------------------------- adapter files


def adapter_config(cfg: DPOConfig, num_layers: int, base_model: str) -> dict:
    """mlx-lm's ``adapter_config.json`` so ``mlx_lm.generate --adapter-path`` works."""
    return {
        "fine_tune_type": "full" if cfg.train_type == "full" else cfg.adapter,
        "num_layers": num_layers,
        "lora_parameters": {
            "rank": cfg.lora_rank,
            "scale": cfg.lora_scale,
            "dropout": cfg.lora_dropout,
            "keys": list(cfg.target_modules),
        },
        "model": base_model,
        "base_model": base_model,
        "lora_alpha": cfg.lora_alpha,
        "trainer": "mlx-dpo",
    }


def read_adapter_config(adapter_dir: Path) -> dict:
    path = Path(adapter_dir) / "adapter_config.json"
    if not path.is_file():
        raise ConfigError(f"{adapter_dir}: no adapter_config.json (expected an mlx-lm adapter directory)")
    try:
        config = json.loads(path.read_text())
    except ValueError as e:
        raise ConfigError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path} is not an mlx-lm adapter config (expected a JSON object)")
    return config


def load_adapter_weights(model: nn.Module, adapter_dir: Path, into: str = "policy") -> None:
    """Load ``adapters.safetensors`` into the policy adapter (``lora_a``...) or into the
    frozen reference copy (``ref_lora_a``...)."""
    weights = mx.load(str(Path(adapter_dir) / "adapters.safetensors"))
    params = dict(tree_flatten(model.parameters()))
    renamed = []
    for name, w in weights.items():
        prefix, leaf = name.rsplit(".", 1)
        target = name if into == "policy" else f"{prefix}.ref_{leaf}"
        if target not in params:
            raise ConfigError(f"{adapter_dir}: tensor {name} does not match this model's adapters "
                              f"(check lora_rank, lora_target_modules, num_layers against its adapter_config.json)")
        if params[target].shape != w.shape:
            raise ConfigError(f"{adapter_dir}: {name} has shape {tuple(w.shape)}, expected {tuple(params[target].shape)}")
        renamed.append((target, w.astype(params[target].dtype)))
    model.load_weights(renamed, strict=False)


def check_reference_adapter(cfg: DPOConfig, num_layers: int) -> None:
    """``ref_adapter_path``'s adapter_config.json must describe the adapters ``cfg`` builds."""
    ref = read_adapter_config(Path(cfg.ref_adapter_path))
    params = ref.get("lora_parameters", {})
    ours = {"rank": cfg.lora_rank, "keys": list(cfg.target_modules), "num_layers": num_layers,
            "fine_tune_type": cfg.adapter}
    theirs = {"rank": params.get("rank"), "keys": params.get("keys") or list(cfg.target_modules),
              "num_layers": ref.get("num_layers") if ref.get("num_layers", -1) >= 0 else num_layers,
              "fine_tune_type": ref.get("fine_tune_type", "lora")}
    diff = [f"{k}: reference adapter has {theirs[k]}, config has {ours[k]}"
            for k in ours if theirs[k] != ours[k] and not (k == "keys" and set(theirs[k]) == set(ours[k]))]
    if diff:
        raise ConfigError(f"ref_adapter_path {cfg.ref_adapter_path} does not match the adapter config: "
                          + "; ".join(diff))
    if abs(params.get("scale", cfg.lora_scale) - cfg.lora_scale) > 1e-6:
        raise ConfigError(f"ref_adapter_path: its LoRA scale {params.get('scale')} differs from "
                          f"lora_alpha / lora_rank = {cfg.lora_scale}")


__all__ = [
    "MODES", "ADAPTER_CLASSES", "SwitchableLoRALinear", "SwitchableDoRALinear", "named_adapter_layers",
    "adapter_layers", "adapter_mode", "reference_mode", "last_blocks", "linear_keys", "ALL_LINEAR",
    "resolve_target_modules", "add_adapters",
    "add_reference_copy", "sync_reference", "adapter_config", "read_adapter_config", "load_adapter_weights",
    "check_reference_adapter",
]
