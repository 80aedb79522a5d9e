"""Model loading (mlx-lm, optional quantization) and the setup of what trains.

Adapters live in :mod:`mlx_dpo.model.adapters`, weight helpers in :mod:`mlx_dpo.model.quant`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from .adapters import add_adapters, add_reference_copy, check_reference_adapter, last_blocks, load_adapter_weights
from ..config.fields import DPOConfig
from ..errors import ConfigError
from ..util import hubnet
from .gguf import gguf_model_dir
from ..util.io import safetensors_problem
from .quant import expand_on_cpu, on_cpu


# --------------------------------------------------------------------------- loading


# What a model snapshot needs (mlx-lm's own list): configs, weights, tokenizer files, custom code.
MODEL_FILES = ["*.json", "model*.safetensors", "*.py", "tokenizer.model", "*.tiktoken", "tiktoken.model", "*.txt",
               "*.jsonl", "*.jinja"]


def resolve_model_path(model: str, revision: Optional[str] = None) -> Path:
    """A local directory, ``toy:<arch>`` (built locally), ``demo:smollm2`` (:mod:`mlx_dpo.model.demo`), a Hub
    id downloaded with ``huggingface_hub`` into the normal HF cache, or a GGUF file: ``path/to/model.gguf`` or
    ``org/name/file.gguf`` on the Hub (just that file is fetched), converted once into an MLX
    model directory (:func:`mlx_dpo.model.gguf.gguf_model_dir`)."""
    if model.startswith("toy:"):
        from .toy import resolve_toy_model

        return resolve_toy_model(model)
    if model == "demo:smollm2":
        from .demo import smollm2_gguf

        return gguf_model_dir(smollm2_gguf())
    path = Path(model).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return gguf_model_dir(path)
    if path.exists():
        if not (path / "config.json").is_file():
            raise ConfigError(f"model: {path} has no config.json (expected a Hugging Face or MLX model directory, "
                              "or a .gguf file)")
        return path
    hub_gguf = model.lower().endswith(".gguf") and model.count("/") >= 2
    if not (model.count("/") == 1 or hub_gguf) or model.startswith((".", "/", "~")):
        raise ConfigError(f"model: {model!r} is neither an existing directory or .gguf file nor a Hub id (org/name, "
                          "or org/name/file.gguf)")
    repo, filename = ("/".join(model.split("/")[:2]), "/".join(model.split("/")[2:])) if hub_gguf else (model, None)
    try:
        snapshot = hubnet.fetch(repo, "model", revision, [filename] if filename else MODEL_FILES)
    except Exception as e:  # network, auth, offline without a cached copy, unknown repo
        raise ConfigError(f"model: {model!r} is no local path, and fetching it from the Hugging Face Hub failed "
                          f"({type(e).__name__}: {e}). Check the id, or use a local directory (with "
                          "HF_HUB_OFFLINE=1 nothing is fetched)") from None
    if filename is None:
        return snapshot
    if not (snapshot / filename).is_file():
        raise ConfigError(f"model: the Hub repository {repo!r} has no file {filename!r}")
    return gguf_model_dir(snapshot / filename)


TOKENIZER_MODEL_FILES = ("tokenizer.json", "tokenizer.model", "tiktoken.model", "vocab.json", "vocab.txt")
# mlx_lm/models/*.py modules that are building blocks, not architectures
MODEL_HELPERS = {"activations", "base", "bitlinear_layers", "cache", "gated_delta", "mla", "pipeline", "rope_utils",
                 "ssm", "switch_layers"}


def supported_architectures() -> list:
    """mlx-lm's architectures: the module names of ``mlx_lm/models/*.py``."""
    import mlx_lm.models

    names = {p.stem for p in Path(mlx_lm.models.__file__).parent.glob("*.py")}
    return sorted((n for n in names if not n.startswith("_") and n not in MODEL_HELPERS), key=str.lower)


def read_model_config(path: Path) -> dict:
    """``config.json`` of the model directory ``path``, refused unless it is a JSON object with a ``model_type``."""
    file = path / "config.json"
    try:
        config = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"model: {file} is not valid JSON ({e})") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise ConfigError(f"model: {file} has no model_type (expected a Hugging Face or MLX model config)")
    return config


def check_model_dir(path: Path) -> None:
    """Refuse a model directory that cannot load, naming the file: bad ``config.json``,
    broken ``model*.safetensors``, no tokenizer files."""
    read_model_config(path)
    weights = sorted(path.glob("model*.safetensors"))
    if not weights:
        raise ConfigError(f"model: {path} has no model*.safetensors weights")
    for file in weights:
        problem = safetensors_problem(file)
        if problem:
            raise ConfigError(f"model: {file} {problem}")
    if not any((path / name).is_file() for name in TOKENIZER_MODEL_FILES) and not any(path.glob("*.tiktoken")):
        raise ConfigError(f"model: {path} has no tokenizer files (expected one of {', '.join(TOKENIZER_MODEL_FILES)})")


def _load(path: Path, trust_remote_code: bool):
    """mlx-lm's model and tokenizer loaders, their errors turned into one line naming ``path``."""
    from mlx_lm.utils import load_model as mlx_load_model

    check_model_dir(path)
    try:
        model, model_config = mlx_load_model(path, trust_remote_code=trust_remote_code)
    except ValueError as e:
        if "not supported" in str(e):
            raise ConfigError(f"model: {path / 'config.json'}: model_type {read_model_config(path)['model_type']!r} "
                              f"is not an mlx-lm architecture; supported: {', '.join(supported_architectures())}"
                              ) from None
        raise ConfigError(f"model: {path}: the weights do not fit its config.json ({e})") from None
    return model, model_config, load_tokenizer(path, trust_remote_code, model_config.get("eos_token_id"))


def load_tokenizer(path: Path, trust_remote_code: bool = False, eos_token_ids=None):
    """mlx-lm's tokenizer of the model in ``path``, its errors turned into one line naming ``path``."""
    from mlx_lm.utils import load_tokenizer as mlx_load_tokenizer

    try:
        return mlx_load_tokenizer(path, {"trust_remote_code": True} if trust_remote_code else None,
                                  eos_token_ids=eos_token_ids)
    except Exception as e:  # transformers raises many types for broken tokenizer files
        raise ConfigError(f"model: cannot load the tokenizer in {path} ({type(e).__name__}: "
                          f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})") from None


def use_chat_template(tokenizer, cfg: DPOConfig):
    """``tokenizer`` rendering with ``cfg.chat_template`` (the text: :func:`.checks.chat_template_text`)
    where it is set, instead of its own template (and of a template mlx-lm implements in Python)."""
    if cfg.chat_template and tokenizer is not None:
        tokenizer.chat_template = cfg.chat_template
        if hasattr(tokenizer, "_chat_template"):  # mlx-lm's TokenizerWrapper
            tokenizer._chat_template = None
            tokenizer.has_chat_template = True
    return tokenizer


def compute_dtype(cfg: DPOConfig) -> Optional[mx.Dtype]:
    if cfg.compute_dtype != "auto":
        return getattr(mx, cfg.compute_dtype)
    return mx.float32 if on_cpu() else None  # bf16/fp16 matmul are slow on the CPU backend


def load_model(cfg: DPOConfig) -> Tuple[nn.Module, object, Path]:
    """Load model + tokenizer (mlx-lm), then :func:`prepare_model`.

    Returns ``(model, tokenizer, model_path)``; no adapters are attached yet.
    """
    path = resolve_model_path(cfg.model, cfg.revision)
    model, model_config, tokenizer = _load(path, cfg.trust_remote_code)
    return prepare_model(model, cfg, model_config, str(path)), use_chat_template(tokenizer, cfg), path


def model_for_training(cfg: DPOConfig, model: Optional[nn.Module], tokenizer, train_pairs,
                       log: Callable[[str], None]) -> Tuple[nn.Module, object, Optional[Path]]:
    """``cfg.model`` loaded (:func:`load_model`), or the passed ``model`` prepared the same way:
    ``(model, tokenizer, model_path)``; ``model_path`` is ``None`` when a passed model comes with
    the default ``cfg.model`` (the base is unknown)."""
    if model is None:
        return load_model(cfg)
    if tokenizer is None and train_pairs is None:
        raise ConfigError("DPOTrainer(model=...) needs tokenizer= too (to tokenize the data), or "
                          "train_pairs= with the pairs already tokenized")
    model_path = Path(cfg.model)
    if cfg.model == DPOConfig.__dataclass_fields__["model"].default:
        log("note: DPOTrainer(model=...) with the default cfg.model: the saved adapter_config.json "
            "cannot name the base model; set DPOConfig(model=...) to its directory or Hub id so "
            "export and mlx_lm can find it (or pass --model to mlx-dpo export)")
        model_path = None
    return prepare_model(model, cfg), use_chat_template(tokenizer, cfg), model_path


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in model.named_modules())


def _quantized_as(model: nn.Module, quantize: dict) -> bool:
    """Every quantized layer of ``model`` has ``quantize``'s bits and group size (and there is one)."""
    layers = [m for _, m in model.named_modules() if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))]
    return bool(layers) and all((m.bits, m.group_size) == (quantize["bits"], quantize["group_size"]) for m in layers)


def prepare_model(model: nn.Module, cfg: DPOConfig, model_config: Optional[dict] = None,
                  source: str = "the model passed to DPOTrainer") -> nn.Module:
    """Cast the floats to the compute dtype, quantize (``cfg.quantize``), disable dropout and
    freeze: the same for a model loaded from ``cfg.model`` and one passed in."""
    from mlx_lm.utils import quantize_model

    dtype = compute_dtype(cfg)
    if dtype is not None:
        cast_floats(model, dtype)
    if cfg.quantize is not None and not _quantized_as(model, cfg.quantize):  # (load_model(cfg) passed back in)
        if "quantization" in (model_config or {}) or is_quantized(model):
            raise ConfigError(
                f"model: {source} is already quantized; remove the quantize option: its stored quantization is "
                "what trains, and re-quantizing a quantized model damages it (measured on SmolLM2-135M Q4_1 -> "
                "4-bit group 64: on 20 held-out prompts 4-gram repetition 0.07 -> 0.33, answers ending on EOS "
                "8 -> 1)")
        model, _ = quantize_model(model, dict(model_config or {}), cfg.quantize["group_size"], cfg.quantize["bits"])
    expand_on_cpu(model)  # MLX's CPU quantized matmul is slow: de-quantize per call there
    disable_dropout(model)
    model.freeze()
    mx.eval(model.parameters())
    return model


def dequantize_for_inference(model: nn.Module) -> None:
    """On the CPU backend, replace quantized layers by float32 ones, once, for generation and
    scoring (same weights; a decode step would otherwise de-quantize every weight per token).
    Training keeps them quantized; on Metal nothing changes."""
    from mlx_lm.utils import dequantize_model

    if on_cpu() and is_quantized(model):
        dequantize_model(model)
        cast_floats(model, mx.float32)
        mx.eval(model.parameters())


def cast_floats(model: nn.Module, dtype: mx.Dtype) -> None:
    params = [
        (k, v.astype(dtype)) for k, v in tree_flatten(model.parameters())
        if mx.issubdtype(v.dtype, mx.floating) and v.dtype != dtype
    ]
    if params:
        model.load_weights(params, strict=False)


def disable_dropout(model: nn.Module) -> None:
    """TRL's ``disable_dropout``: the base model's dropout is off during DPO."""
    found = [(name, nn.Identity()) for name, m in model.named_modules() if isinstance(m, nn.Dropout)]
    if found:
        model.update_modules(tree_unflatten(found))


# --------------------------------------------------------------------------- what trains


def setup_full_finetune(model: nn.Module, cfg: DPOConfig) -> int:
    """Full fine-tuning of the last ``num_layers`` blocks (everything else frozen), their
    weights held in float32 (``hold_master_weights``)."""
    blocks = last_blocks(model, cfg.num_layers)
    model.freeze()
    for block in blocks:
        if any(isinstance(m, nn.QuantizedLinear) for _, m in block.named_modules()):
            raise ConfigError("train_type: full needs a non-quantized model (remove quantize)")
        hold_master_weights(block)
        block.unfreeze()
    return len(blocks)


def hold_master_weights(block: nn.Module) -> None:
    """Mixed precision for a trained block: its 16-bit weights become float32 master
    weights (so AdamW's moments and updates are float32: in bfloat16 ``0.02 - 1e-6 ==
    0.02``), cast back to their dtype for each call, so the block computes in the compute
    dtype (a float32 weight would promote its activations to float32)."""
    low = {k: v.dtype for k, v in tree_flatten(block.parameters()) if v.dtype in (mx.bfloat16, mx.float16)}
    if not low:
        return
    block.load_weights([(k, v.astype(mx.float32)) for k, v in tree_flatten(block.parameters()) if k in low],
                       strict=False)
    fn = type(block).__call__

    def cast_call(self, *args, **kwargs):
        masters = self.parameters()
        self.update(tree_unflatten([(k, v.astype(low[k])) for k, v in tree_flatten(masters) if k in low]))
        try:
            return fn(self, *args, **kwargs)
        finally:
            self.update(masters)

    block.__class__ = type(type(block).__name__ + "MasterWeights", (type(block),), {"__call__": cast_call})


def count_parameters(model: nn.Module) -> Tuple[int, int]:
    """(total parameters as if de-quantized, trainable parameters): a quantized linear or
    embedding layer counts ``packed uint32 words * 32 / bits`` weights."""
    quantized = (nn.QuantizedLinear, nn.QuantizedEmbedding)
    total = sum(m.weight.size * 32 // m.bits for _, m in model.named_modules() if isinstance(m, quantized))
    total += sum(v.size for k, v in tree_flatten(model.parameters())
                 if v.dtype != mx.uint32 and not k.endswith((".scales", ".biases")) and ".ref_" not in k)
    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    return total, trainable


# --------------------------------------------------------------------------- model surgery


def setup_trainable(model: nn.Module, cfg: DPOConfig, use_reference: bool) -> int:
    """Make the parts ``cfg`` trains trainable: adapters (starting from ``ref_adapter_path``
    with ``reference: adapter``, plus a frozen reference copy when one is needed) or the
    last blocks (full fine-tuning); checkpoint the blocks if asked. Returns the number
    of trained blocks."""
    if cfg.train_type == "full":
        num_layers = setup_full_finetune(model, cfg)
    else:
        num_layers = add_adapters(model, cfg)
        if cfg.reference == "adapter":
            check_reference_adapter(cfg, num_layers)
            load_adapter_weights(model, Path(cfg.ref_adapter_path))  # the policy starts as a copy
        if (cfg.reference == "adapter" and use_reference) or cfg.sync_ref_model:
            add_reference_copy(model)
    if cfg.gradient_checkpointing:
        for block in model.layers:
            recompute_block_in_backward(block)
    return num_layers


def recompute_block_in_backward(block: nn.Module) -> None:
    """Recompute a transformer block's activations in the backward pass (mlx-lm's
    ``grad_checkpoint``, per instance)."""
    fn = type(block).__call__

    def checkpointed(self, *args, **kwargs):
        def inner(params, *a, **k):
            self.update(params)
            return fn(self, *a, **k)

        return mx.checkpoint(inner)(self.trainable_parameters(), *args, **kwargs)

    block.__class__ = type(type(block).__name__ + "Checkpointed", (type(block),),
                           {"__call__": checkpointed, "plain_call": fn})


__all__ = [
    "resolve_model_path", "check_model_dir", "supported_architectures", "compute_dtype", "load_model",
    "load_tokenizer", "use_chat_template", "prepare_model", "is_quantized", "cast_floats",
    "dequantize_for_inference",
    "disable_dropout", "setup_full_finetune", "hold_master_weights", "count_parameters", "setup_trainable",
    "recompute_block_in_backward",
]
