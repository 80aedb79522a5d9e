"""The GGUF architectures mlx-dpo reads, as llama.cpp writes them: tensor names, hyper-parameters
and what each ``convert_hf_to_gguf.py`` model class changed, mapped to mlx-lm's model classes.

Adding an architecture is one :class:`GGUFArch` entry (and, if it needs one, a config hook).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
# llama.cpp's block tensors -> transformers' (= mlx-lm's) names, as most architectures use them
BLOCK = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
         "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
         "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
QK_NORMS = {"attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
# Gemma 2/3 norm around both attention and MLP: llama.cpp's ffn_norm is the pre-MLP norm there
GEMMA_NORMS = {"ffn_norm": "pre_feedforward_layernorm", "post_attention_norm": "post_attention_layernorm",
               "post_ffw_norm": "post_feedforward_layernorm"}
# ``{arch}.*`` GGUF hyper-parameters as Hugging Face config keys (read by model/gguf.py, written by
# export/gguf_export.py): (GGUF key, config key, type, default when missing; None: required)
HPARAMS = (("embedding_length", "hidden_size", int, None), ("block_count", "num_hidden_layers", int, None),
           ("feed_forward_length", "intermediate_size", int, None),
           ("attention.head_count", "num_attention_heads", int, None),
           ("attention.layer_norm_rms_epsilon", "rms_norm_eps", float, 1e-6),
           ("rope.freq_base", "rope_theta", float, 10000.0), ("context_length", "max_position_embeddings", int, 4096))
# Phi-3's fused projections (mlx-lm's phi3 keeps them fused too)
PHI3_BLOCK = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_qkv": "self_attn.qkv_proj",
              "attn_output": "self_attn.o_proj", "ffn_up": "mlp.gate_up_proj", "ffn_down": "mlp.down_proj"}
GEMMA3_SLIDING_PATTERN = 6  # every 6th layer global: llama.cpp's set_swa_pattern(6), transformers' default
GEMMA3_LOCAL_ROPE_BASE = 10000.0  # llama.cpp's rope_freq_base_train_swa for gemma3, transformers' default


def _attention_scalar(config: dict, layers_27b: int) -> int:
    """Gemma's attention scale as llama.cpp sets it: 1/sqrt(head_dim), hidden/heads for the 27B."""
    if config["num_hidden_layers"] == layers_27b:
        return config["hidden_size"] // config["num_attention_heads"]
    return config["head_dim"]


def _gemma3(meta: dict, config: dict) -> dict:
    """Gemma 3's settings llama.cpp fixes rather than stores: the sliding-window pattern, the local
    rope base, and the attention scale (the 27B has 62 layers)."""
    return {"sliding_window": int(meta.get("gemma3.attention.sliding_window", 512)),
            "sliding_window_pattern": GEMMA3_SLIDING_PATTERN, "rope_local_base_freq": GEMMA3_LOCAL_ROPE_BASE,
            "query_pre_attn_scalar": _attention_scalar(config, 62), "hidden_activation": "gelu_pytorch_tanh"}


def _gemma2(meta: dict, config: dict) -> dict:
    """Gemma 2's logit soft-capping (stored, llama.cpp's defaults 50 and 30) and attention scale
    (the 27B has 46 layers). mlx-lm's gemma2 has no sliding window: it computes transformers'
    Gemma 2 for sequences up to the window (4096), which DPO pairs rarely pass."""
    return {"attn_logit_softcapping": float(meta.get("gemma2.attn_logit_softcapping", 50.0)),
            "final_logit_softcapping": float(meta.get("gemma2.final_logit_softcapping", 30.0)),
            "sliding_window": int(meta.get("gemma2.attention.sliding_window", 4096)),
            "query_pre_attn_scalar": _attention_scalar(config, 46), "hidden_activation": "gelu_pytorch_tanh"}


def _phi3(meta: dict, config: dict) -> dict:
    """Phi-3's rotary share (Phi-4-mini rotates 3/4 of each head) and its trained context."""
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    rotary = int(meta.get("phi3.rope.dimension_count", head_dim))
    return {"partial_rotary_factor": rotary / head_dim,
            "original_max_position_embeddings": config["max_position_embeddings"]}


@dataclass(frozen=True)
class GGUFArch:
    model_type: str  # mlx-lm's (and transformers') model_type
    hf_class: str
    block: dict = field(default_factory=lambda: BLOCK)
    biased: tuple = ()  # block tensors that carry a ``.bias``
    rope_permuted: bool = False  # q/k rows permuted for llama.cpp's rope (convert_hf_to_gguf.py's LlamaModel)
    norm_plus_one: bool = False  # norm weights stored as 1 + w (Gemma: transformers applies x * (1 + w))
    hidden_act: str = "silu"
    extra_config: Optional[Callable[[dict, dict], dict]] = None


GGUF_ARCHS = {
    "llama": GGUFArch("llama", "LlamaForCausalLM", rope_permuted=True),
    "qwen2": GGUFArch("qwen2", "Qwen2ForCausalLM", biased=("attn_q", "attn_k", "attn_v")),
    "qwen3": GGUFArch("qwen3", "Qwen3ForCausalLM", block={**BLOCK, **QK_NORMS}),
    "gemma3": GGUFArch("gemma3_text", "Gemma3ForCausalLM", block={**BLOCK, **GEMMA_NORMS, **QK_NORMS},
                       norm_plus_one=True, hidden_act="gelu_pytorch_tanh", extra_config=_gemma3),
    "phi3": GGUFArch("phi3", "Phi3ForCausalLM", block=PHI3_BLOCK, extra_config=_phi3),
    "gemma2": GGUFArch("gemma2", "Gemma2ForCausalLM", block={**BLOCK, **GEMMA_NORMS}, norm_plus_one=True,
                       hidden_act="gelu_pytorch_tanh", extra_config=_gemma2),
}


# --------------------------------------------------------------------------- rope scaling

LINEAR_ROPE = ("llama", "qwen2", "qwen3", "gemma3")  # mlx-lm classes taking a linear rope_scaling (Gemma 3 4B+)
# Llama 3.1/3.2's rope: llama.cpp stores the per-frequency factors (rope_freqs.weight), not these
LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def llama3_rope_factors(theta: float, head_dim: int, factor: float, low_freq_factor: float,
                        high_freq_factor: float, original_max_position_embeddings: int) -> np.ndarray:
    """The ``rope_freqs.weight`` llama.cpp's ``convert_hf_to_gguf.py`` writes for a ``llama3`` rope."""
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    low, high = original_max_position_embeddings / low_freq_factor, original_max_position_embeddings / high_freq_factor
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        smooth = (original_max_position_embeddings / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        out.append(1.0 if wavelen < high else factor if wavelen > low else 1 / ((1 - smooth) / factor + smooth))
    return np.array(out, np.float32)


def rope_scaling(meta: dict, arch: str, config: dict, factors: Optional[np.ndarray]) -> Optional[dict]:
    """The Hugging Face ``rope_scaling`` of a GGUF file: ``linear`` from its metadata, ``llama3`` from
    its ``rope_freqs`` (``factors``: matched against Llama 3.1/3.2's parameters); ``ValueError``
    naming what is not supported."""
    kind = meta.get(f"{arch}.rope.scaling.type", "none")
    if factors is not None:
        params = {**LLAMA3_ROPE, "factor": float(factors.max())}
        expected = llama3_rope_factors(config["rope_theta"], config["head_dim"], **params)
        if arch != "llama" or expected.shape != factors.shape or not np.allclose(expected, factors, rtol=1e-5):
            raise ValueError("its rope_freqs are not Llama 3.1/3.2's llama3 rope (factor, low/high frequency factors "
                             "1 and 4, 8192 original positions)")
        return {"rope_type": "llama3", **params}
    if kind == "none":
        return None
    if kind == "linear" and arch in LINEAR_ROPE:
        return {"rope_type": "linear", "type": "linear", "factor": float(meta[f"{arch}.rope.scaling.factor"])}
    raise ValueError(f"rope scaling {kind!r} is not supported for {arch} files (linear is, for "
                     f"{', '.join(LINEAR_ROPE)}; and Llama 3's rope_freqs)")


__all__ = ["TOP", "BLOCK", "HPARAMS", "GGUFArch", "GGUF_ARCHS", "llama3_rope_factors", "rope_scaling"]
