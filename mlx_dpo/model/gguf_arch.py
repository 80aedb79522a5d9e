"""The GGUF architectures mlx-dpo reads, as llama.cpp writes them: tensor names, hyper-parameters
and what each ``convert_hf_to_gguf.py`` model class changed, mapped to mlx-lm's model classes.

Adding an architecture is one :class:`GGUFArch` entry (and, if it needs one, a config hook).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

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


__all__ = ["TOP", "BLOCK", "HPARAMS", "GGUFArch", "GGUF_ARCHS"]
