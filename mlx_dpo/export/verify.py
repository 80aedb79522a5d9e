"""``export --verify``: the exported model's logits and greedy tokens against the MLX model's.

A format names its loader (``Writer.load`` in ``writers.py``); a loader whose
dependencies are missing raises :class:`VerifySkipped` and verification is skipped.
"""

from __future__ import annotations

import importlib
import json
import logging
from pathlib import Path
from typing import Callable, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from ..errors import VerifySkipped

log = logging.getLogger(__name__)

VERIFY_PROMPTS = (
    "Repeat: apple banana cherry. Answer:",
    "<|im_start|>user\nHello, who are you?<|im_end|>\n<|im_start|>assistant\n",
    "The quick brown fox jumps over the lazy dog because",
    "Repeat: red moon. Answer: red",
)


# --------------------------------------------------------------------------- logits


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


# --------------------------------------------------------------------------- loaders


def _require(*modules: str) -> None:
    try:
        for name in modules:
            importlib.import_module(name)
    except ImportError:
        raise VerifySkipped(f"install {' and '.join(modules)}") from None


def load_mlx(output: Path, base_path: Path):
    """The export loaded with ``mlx_lm.load``."""
    import mlx_lm

    return mlx_lm.load(str(output))[0]


def load_transformers(output: Path, base_path: Path):
    """The export loaded with transformers, in float32."""
    _require("torch", "transformers")
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(output), dtype=torch.float32).eval()


def load_peft(output: Path, base_path: Path):
    """The exported adapter applied with PEFT to the float32 base model."""
    _require("torch", "transformers", "peft")
    if "quantization" in json.loads((Path(base_path) / "config.json").read_text()):
        raise VerifySkipped("the base is an MLX-quantized checkpoint transformers cannot load")
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(base_path), dtype=torch.float32)
    return PeftModel.from_pretrained(base, str(output)).eval()


def load_gguf(output: Path, base_path: Path):
    """The exported ``model.gguf`` read back with mlx-dpo's GGUF loader (converted in a
    temporary directory, loaded with mlx-lm, fully evaluated before the directory goes), in
    float32 like the reference (float16 block scales would add their own rounding)."""
    import tempfile

    import mlx_lm

    from ..model.gguf import gguf_model_dir
    from ..model.loader import cast_floats

    with tempfile.TemporaryDirectory() as tmp:
        model = mlx_lm.load(str(gguf_model_dir(Path(output) / "model.gguf", cache_dir=tmp)))[0]
        cast_floats(model, mx.float32)
        mx.eval(model.parameters())
    return model


def verify_export(output: Path, load: Callable, reference: dict, tokenizer, base_path: Path) -> Optional[dict]:
    """Compare the logits and greedy tokens of the export (``load(output, base_path)``, an
    MLX or a torch model) with the MLX reference; ``None`` when skipped."""
    try:
        model = load(output, base_path)
    except VerifySkipped as e:
        log.warning(f"verify: skipped ({e})")
        return None
    batch, lengths = prompt_batch(tokenizer)
    prompt = batch[0, : lengths[0]].tolist()
    if isinstance(model, nn.Module):
        logits, greedy = mlx_logits(model, batch), mlx_greedy(model, prompt)
    else:
        logits, greedy = torch_logits(model, batch, lengths), torch_greedy(model, prompt)
    report = compare(reference["logits"], logits, lengths)
    report["greedy_match"] = greedy == reference["greedy"]
    return report


__all__ = ["verify_export", "reference_outputs", "prompt_batch", "mlx_logits", "mlx_greedy", "torch_logits",
           "torch_greedy", "compare", "load_gguf", "load_mlx", "load_transformers", "load_peft", "VerifySkipped"]
