"""Export formats: one table of writers (:data:`WRITERS`) and the writers themselves.

``hf``   de-quantize the base, merge the adapters (``fuse()``: ``W + scale B^T A^T``, DoRA:
         renormalised rows) in float32, cast, and write a ``transformers`` model directory.
``mlx``  the same merged model, re-quantized when the run quantized, in mlx-lm's format.
``peft`` the adapters alone as a PEFT LoRA/DoRA adapter for the float base model.
``gguf`` the merged model as one GGUF file (llama.cpp, Ollama, LM Studio), float or
         llama.cpp's Q8_0/Q4_0/Q4_1 and K mixes (Q4_K_M, Q5_K_M, Q6_K), or the source file's types
         (:mod:`mlx_dpo.export.gguf_export`).

Adding a format is one ``WRITERS`` entry and its writer function, here. A writer is
``write(run, out_dir, dtype, max_shard_bytes)``; ``run`` is a ``model.trained.TrainedRun``.
``model/loader.py`` (which pulls in mlx-lm) is imported on use, so the CLI reads the table quickly.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from ..model.architectures import with_feature
from .gguf_export import GGUF_DTYPES, GGUF_FILE, write_gguf_file
from ..util.io import atomic_write_text, save_safetensors
from .verify import load_gguf, load_mlx, load_peft, load_transformers
from ..errors import ExportError

log = logging.getLogger(__name__)

MAX_SHARD_BYTES = 5 * 10**9  # transformers' "5GB"
TOKENIZER_COPY_PATTERNS = (
    "tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt",
    "chat_template*", "*.tiktoken", "spiece.model", "*.py",
)


# --------------------------------------------------------------------------- merging


def merge_and_dequantize(model: nn.Module) -> None:
    """Fold the adapters into the weights and de-quantize everything, in float32, in place."""
    from mlx_lm.utils import dequantize_model

    from ..model.adapters import named_adapter_layers
    from ..model.loader import cast_floats

    fused = [(name, layer.fuse()) for name, layer in named_adapter_layers(model)]
    if fused:
        model.update_modules(tree_unflatten(fused))
    dequantize_model(model)
    cast_floats(model, mx.float32)
    mx.eval(model.parameters())


# --------------------------------------------------------------------------- files


def saved_tensor_names(model_dir: Path) -> set:
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
    known = saved_tensor_names(base_dir)
    unknown = sorted(n for n in names if n not in known)
    if known and unknown:
        raise ExportError(
            f"model type {model_type!r}: mlx-lm's parameter names differ from the base checkpoint's "
            f"(e.g. {unknown[:3]}); Hugging Face / PEFT export supports architectures whose mlx-lm "
            f"names match transformers' ({', '.join(with_feature('hf_names'))}, ...). Use --format mlx."
        )


def copy_model_files(run, out_dir: Path) -> None:
    """Copy the base's tokenizer files, custom code and ``generation_config.json``; the run's
    ``chat_template`` (when it set one) replaces the base's template."""
    for pattern in TOKENIZER_COPY_PATTERNS + ("generation_config.json",):
        for file in Path(run.base_path).glob(pattern):
            if file.is_file() and not (out_dir / file.name).exists():
                shutil.copyfile(file, out_dir / file.name)  # the umask's mode, not the source's
    if run.cfg.chat_template:
        write_chat_template(out_dir, run.cfg.chat_template)


def write_chat_template(out_dir: Path, template: str) -> None:
    """``template`` in ``tokenizer_config.json`` and in ``chat_template.jinja`` (transformers reads
    either); a ``chat_template.json`` (the older file) would hold the base's: it goes."""
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    atomic_write_text(config_path, json.dumps({**config, "chat_template": template}, indent=2, ensure_ascii=False))
    atomic_write_text(out_dir / "chat_template.jinja", template)
    (out_dir / "chat_template.json").unlink(missing_ok=True)


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
        save_safetensors(out_dir / name, shard, metadata={"format": "pt"})
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(v.nbytes for v in weights.values())},
            "weight_map": {k: name for name, shard in zip(names, shards) for k in sorted(shard)},
        }
        atomic_write_text(out_dir / "model.safetensors.index.json", json.dumps(index, indent=2))
    return names


def merged_hf_config(base_config: dict, dtype: str) -> dict:
    config = {k: v for k, v in base_config.items() if k not in ("quantization", "quantization_config")}
    config["torch_dtype"] = dtype
    config["dtype"] = dtype
    return config


def write_hf(run, out_dir: Path, dtype: str, max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """The merged float model in transformers' layout (sharded above ``max_shard_bytes``)."""
    merge_and_dequantize(run.model)
    weights = {k: v.astype(getattr(mx, dtype)) for k, v in tree_flatten(run.model.parameters())}
    check_names(weights, run.base_path, run.base_config.get("model_type"))
    if run.base_config.get("tie_word_embeddings"):
        weights.pop("lm_head.weight", None)
    save_sharded(weights, out_dir, max_shard_bytes)
    atomic_write_text(out_dir / "config.json", json.dumps(merged_hf_config(run.base_config, dtype), indent=2))
    copy_model_files(run, out_dir)


def write_mlx(run, out_dir: Path, dtype: str, max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """mlx-lm's format (its own sharding; ``max_shard_bytes`` is for ``hf``)."""
    from mlx_lm.utils import quantize_model, save_config, save_model

    from ..model.loader import cast_floats

    merge_and_dequantize(run.model)
    cast_floats(run.model, getattr(mx, dtype))
    config = merged_hf_config(run.base_config, dtype)
    q = run.quantization
    if q:
        run.model, config = quantize_model(run.model, config, q["group_size"], q["bits"], mode=q["mode"])
    save_model(out_dir, run.model)
    save_config(config, out_dir / "config.json")
    copy_model_files(run, out_dir)


def peft_weights(model: nn.Module, dtype: str) -> dict:
    """Every adapter's ``peft_tensors()`` under PEFT's ``base_model.model.<module>.`` names."""
    from ..model.adapters import named_adapter_layers

    weights = {
        f"base_model.model.{name}.{suffix}": tensor
        for name, layer in named_adapter_layers(model) for suffix, tensor in layer.peft_tensors().items()
    }
    return {k: mx.contiguous(v.astype(getattr(mx, dtype))) for k, v in weights.items()}


def peft_config(run) -> dict:
    from ..model.adapters import named_adapter_layers

    names = [name for name, _ in named_adapter_layers(run.model)]
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


def write_peft(run, out_dir: Path, dtype: str, max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """A PEFT adapter (one file; ``max_shard_bytes`` is for ``hf``)."""
    if run.fine_tune_type == "full":
        raise ExportError("--format peft needs LoRA/DoRA adapters; this run is a full fine-tune (use hf or mlx)")
    if run.quantization:
        log.warning("Note: these adapters were trained on a quantized base; applied to the float base "
                    "model with PEFT they are an approximation of the trained model.")
    weights = peft_weights(run.model, dtype)
    check_names({k[len("base_model.model."):].split(".lora_")[0] + ".weight" for k in weights},
                run.base_path, run.base_config.get("model_type"))
    save_safetensors(out_dir / "adapter_model.safetensors", weights, metadata={"format": "pt"})
    atomic_write_text(out_dir / "adapter_config.json", json.dumps(peft_config(run), indent=2))
    copy_model_files(run, out_dir)
    (out_dir / "generation_config.json").unlink(missing_ok=True)


def write_gguf(run, out_dir: Path, dtype: str, max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """One ``model.gguf`` (unsharded; ``max_shard_bytes`` is for ``hf``) and an Ollama ``Modelfile``."""
    from ..model.gguf import read_header, source_gguf
    from .gguf_export import gguf_tokenizer_fields, hf_tokenizer_fields

    merge_and_dequantize(run.model)
    weights = dict(tree_flatten(run.model.parameters()))
    source = source_gguf(run.base_path)
    vocab_size = run.base_config["vocab_size"]
    tokenizer = gguf_tokenizer_fields(source) if source else hf_tokenizer_fields(run.base_path, vocab_size)
    if run.cfg.chat_template:
        tokenizer["tokenizer.chat_template"] = run.cfg.chat_template
    header = read_header(source) if source else None
    # the source file's own name, which llama.cpp's loader also reads (e.g. Phi-3's token attributes)
    name = (header or {}).get("metadata", {}).get("general.name") or Path(run.base_model).name.removesuffix(".gguf")
    write_gguf_file(out_dir / GGUF_FILE, weights, run.base_config, dtype, tokenizer, name=f"{name}-dpo",
                    source=header)
    atomic_write_text(out_dir / "Modelfile", modelfile(tokenizer))


def modelfile(tokenizer_fields: dict) -> str:
    """Ollama's ``Modelfile``: the file, and the end-of-turn token as a stop. The chat template is
    the GGUF's ``tokenizer.chat_template``, which Ollama reads itself (a Go ``TEMPLATE`` here would
    be a second, hand-translated copy)."""
    def value(key):
        field = tokenizer_fields.get(key)
        return field[0] if isinstance(field, tuple) else field

    tokens, eos = value("tokenizer.ggml.tokens"), value("tokenizer.ggml.eos_token_id")
    stop = f"PARAMETER stop {json.dumps(tokens[eos])}\n" if tokens and eos is not None else ""
    return f"FROM ./{GGUF_FILE}\n{stop}"


# --------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Writer:
    """One export format."""

    write: Callable  # write(run, out_dir, dtype, max_shard_bytes)
    default_dtype: str
    library: str  # ``library_name`` on the model card
    summary: str  # ``--format`` help
    card_what: str  # the card's "exported as a ..."
    usage: tuple  # the card's usage code; ``{repo}`` is the model's name
    load: Callable  # load(output, base_path): the export as a model, for ``--verify``
    dtypes: tuple = ("float16", "bfloat16", "float32")  # --dtype choices
    requantizes: bool = False  # re-quantizes a quantized run (``--verify`` explains the error)
    adapter: bool = False  # an adapter for the base model (the card tags ``base_model:adapter:<base>``)
    usage_language: str = "python"  # the card's code block


WRITERS = {
    "hf": Writer(
        write_hf, default_dtype="float16", library="transformers", summary="merged transformers model",
        card_what="merged model (transformers format)", load=load_transformers,
        usage=("from transformers import AutoModelForCausalLM, AutoTokenizer", "",
               'model = AutoModelForCausalLM.from_pretrained("{repo}")',
               'tokenizer = AutoTokenizer.from_pretrained("{repo}")'),
    ),
    "mlx": Writer(
        write_mlx, default_dtype="float16", library="mlx", summary="merged mlx-lm model",
        card_what="merged model in MLX format", load=load_mlx, requantizes=True,
        usage=("from mlx_lm import load, generate", "", 'model, tokenizer = load("{repo}")',
               'print(generate(model, tokenizer, prompt="Hello", max_tokens=64))'),
    ),
    "peft": Writer(
        write_peft, default_dtype="float32", library="peft", summary="PEFT adapter",
        card_what="PEFT adapter", load=load_peft, adapter=True,
        usage=("from peft import AutoPeftModelForCausalLM", "from transformers import AutoTokenizer", "",
               'model = AutoPeftModelForCausalLM.from_pretrained("{repo}")',
               'tokenizer = AutoTokenizer.from_pretrained("{repo}")'),
    ),
    "gguf": Writer(
        write_gguf, default_dtype="float16", library="gguf", summary="merged GGUF file (llama.cpp, Ollama)",
        card_what="merged model as a GGUF file", load=load_gguf, dtypes=GGUF_DTYPES, usage_language="bash",
        usage=("# llama.cpp", 'llama-cli -m model.gguf -p "Hello"', "", "# Ollama (the Modelfile is included)",
               "ollama create my-model -f Modelfile && ollama run my-model"),
    ),
}
FORMATS = tuple(WRITERS)
DTYPES = tuple(dict.fromkeys(d for w in WRITERS.values() for d in w.dtypes))  # every --dtype choice


def formats_help() -> str:
    """``hf: merged transformers model; mlx: ...``."""
    return "; ".join(f"{name}: {w.summary}" for name, w in WRITERS.items()) + "."


def default_dtypes_help() -> str:
    """``default float16; float32 for peft``: the usual default, then the exceptions."""
    usual = Counter(w.default_dtype for w in WRITERS.values()).most_common(1)[0][0]
    others = {}
    for name, w in WRITERS.items():
        if w.default_dtype != usual:
            others.setdefault(w.default_dtype, []).append(name)
    return "; ".join([f"default {usual}"] + [f"{d} for {', '.join(names)}" for d, names in others.items()])


__all__ = ["Writer", "WRITERS", "FORMATS", "DTYPES", "ExportError", "merge_and_dequantize", "formats_help",
           "default_dtypes_help"]
