"""What mlx-dpo knows about each mlx-lm architecture (by ``model_type``), in one table.

Adding an architecture is one entry here. An architecture not listed still trains and
exports to ``mlx``; it just takes the general (slower) paths.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional


@dataclass(frozen=True)
class Arch:
    # Blocks are ``layer(h, mask, cache)`` with the standard KV-cache interface (``offset`` +
    # ``update_and_fetch``) under ``model.model.{embed_tokens,layers,norm}``, with causal or
    # sliding-window attention (``forward/blocks.py``): prompts can be shared between the chosen
    # and rejected completions (``forward/prefix.py``), pairs packed (``forward/packed.py``).
    prefix_sharing: bool = False
    # ``Model.__call__`` is exactly ``head(model.model(x))``: only the scoring positions are
    # projected onto the vocabulary (``forward/logprobs.py``).
    plain_head: bool = False
    # mlx-lm's parameter names are transformers' (Hugging Face / PEFT export).
    hf_names: bool = False
    # Attention calls the model module's ``scaled_dot_product_attention``: it can run through
    # ``forward/cpu_math.py``.
    cpu_math: bool = False
    # The MLP's form, which ``forward/cpu_math.py`` rewrites: ``swiglu``
    # (``down_proj(silu(gate_proj(x)) * up_proj(x))``), ``fused_swiglu`` (Phi-3's ``gate_up_proj``)
    # or ``geglu`` (Gemma's ``gelu_approx`` gate).
    mlp: str = ""
    # ``model.model`` multiplies the embeddings by ``sqrt(hidden_size)`` (Gemma): ``float`` in the
    # hidden states' dtype (Gemma 2), ``bf16`` with the factor rounded to bfloat16 first (Gemma 3).
    embed_scale: str = ""
    # Attention takes boolean mask arrays only, never mlx-lm's ``"causal"``, and applies them to
    # grouped query heads (Gemma 2's soft-capped attention is written out).
    array_mask: bool = False


_STANDARD = dict(prefix_sharing=True, plain_head=True, hf_names=True, cpu_math=True, mlp="swiglu")

ARCHITECTURES = {
    "llama": Arch(**_STANDARD),
    "qwen2": Arch(**_STANDARD),
    "mistral": Arch(**_STANDARD),
    "qwen3": Arch(**_STANDARD),
    "phi3": Arch(prefix_sharing=True, plain_head=True, hf_names=True, cpu_math=True, mlp="fused_swiglu"),
    # Gemma 3's sliding-window layers get windowed masks (forward/blocks.layer_windows); its 262k
    # vocabulary: only scoring positions meet the head.
    "gemma3_text": Arch(prefix_sharing=True, plain_head=True, hf_names=True, cpu_math=True, mlp="geglu",
                        embed_scale="bf16"),
    # The head's soft-capping is in forward/logprobs.project; the attention's own, in mlx-lm's code.
    "gemma2": Arch(prefix_sharing=True, plain_head=True, hf_names=True, mlp="geglu", embed_scale="float",
                   array_mask=True),
    "olmo2": Arch(plain_head=True),
    "internlm3": Arch(plain_head=True),
}

FEATURES = tuple(f.name for f in fields(Arch))


def model_type(model) -> Optional[str]:
    """An mlx-lm model's ``model_type`` (``None`` if it has none)."""
    return getattr(model, "model_type", None)


def has_feature(model_type: Optional[str], feature: str) -> bool:
    """Whether architecture ``model_type`` has ``feature`` (a field of :class:`Arch`)."""
    if feature not in FEATURES:
        raise ValueError(f"unknown architecture feature {feature!r}; one of {', '.join(FEATURES)}")
    return getattr(ARCHITECTURES.get(model_type, Arch()), feature)


def with_feature(feature: str) -> list:
    """The architectures with ``feature``, in table order."""
    return [name for name in ARCHITECTURES if has_feature(name, feature)]


__all__ = ["Arch", "ARCHITECTURES", "model_type", "has_feature", "with_feature"]
