"""Tiny models, tokenizers and preference data built locally: the offline default.

``toy:llama`` / ``toy:qwen2`` as ``model`` and ``toy`` as ``data`` make
``mlx-dpo train`` work on a fresh machine with no network. The model has random
weights in Hugging Face format (``config.json`` + ``model.safetensors`` +
tokenizer files), so it also exercises the real loading and export code.

The synthetic preference task: a prompt lists a few fruit and colour words; the
chosen reply repeats them, the rejected reply lists animals and weather words. A
LoRA learns this within a hundred steps, so held-out reward accuracy shows whether
training works.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Optional, Union

import numpy as np

from ..errors import ConfigError
from ..util.io import atomic_directory, atomic_write_text
from ..util.paths import cache_root

WORDS = (
    "apple banana cherry grape lemon mango olive peach pear plum "
    "red blue green black white amber coral ivory olive pink "
    "cat dog fox owl bee cow yak elk emu ant "
    "sun moon star rain snow wind fog sky sea hill"
).split()
WORDS = list(dict.fromkeys(WORDS))
PROMPT_WORDS, OTHER_WORDS = WORDS[:19], WORDS[19:]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

ARCHS = {
    "llama": dict(
        architectures=["LlamaForCausalLM"],
        model_type="llama",
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=False,
        rope_theta=10000.0,
    ),
    "qwen2": dict(
        architectures=["Qwen2ForCausalLM"],
        model_type="qwen2",
        hidden_act="silu",
        tie_word_embeddings=True,
        rope_theta=1000000.0,
        use_sliding_window=False,
    ),
}

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]


def toy_corpus(n: int = 2000, seed: int = 0) -> list:
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        words = rng.sample(WORDS, rng.randint(2, 8))
        lines.append("Repeat: " + " ".join(words) + ". Answer: " + " ".join(words) + ".")
        lines.append("user\nassistant\nsystem\n" + " ".join(rng.sample(WORDS, 4)))
    return lines


def build_bpe_tokenizer(out_dir: Union[str, Path], vocab_size: int = 512) -> None:
    """Train a byte-level BPE tokenizer with ``tokenizers`` and save it in HF format."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    out_dir = Path(out_dir)
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(toy_corpus(), trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    tok.save(str(out_dir / "tokenizer.json"))
    _write_tokenizer_config(out_dir, "PreTrainedTokenizerFast", add_bos=True)


def build_sentencepiece_tokenizer(out_dir: Union[str, Path], vocab_size: int = 400, dummy_prefix: bool = True) -> None:
    """Train a SentencePiece (``tokenizer.model``) tokenizer, Llama-style (``dummy_prefix``: a
    ``▁`` before the text, as Llama's; Gemma's has none)."""
    import sentencepiece as spm

    out_dir = Path(out_dir)
    corpus = out_dir / ".corpus.txt"
    corpus.write_text("\n".join(toy_corpus()))
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(out_dir / "tokenizer"),
        vocab_size=vocab_size,
        model_type="bpe",
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        user_defined_symbols=["<|im_start|>", "<|im_end|>"],
        byte_fallback=True,
        normalization_rule_name="identity",  # as Llama's: text as written, spaces kept
        remove_extra_whitespaces=False,
        add_dummy_prefix=dummy_prefix,
        minloglevel=2,
    )
    corpus.unlink()
    (out_dir / "tokenizer.vocab").unlink(missing_ok=True)
    _write_tokenizer_config(out_dir, "LlamaTokenizer", add_bos=True)


def _write_tokenizer_config(out_dir: Path, cls: str, add_bos: bool) -> None:
    config = {
        "tokenizer_class": cls,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<pad>",
        "add_bos_token": add_bos,
        "add_eos_token": False,
        "model_max_length": 4096,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
    }
    atomic_write_text(out_dir / "tokenizer_config.json", json.dumps(config, indent=2))
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    atomic_write_text(out_dir / "special_tokens_map.json", json.dumps(special, indent=2))


def build_toy_model(
    out_dir: Union[str, Path],
    arch: str = "llama",
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    vocab_size: Optional[int] = None,
    tokenizer: str = "bpe",
    seed: int = 0,
    dtype: str = "float32",
) -> Path:
    """Write a random-weight ``arch`` model in Hugging Face format to ``out_dir``.

    ``tokenizer`` is ``bpe`` (``tokenizer.json``) or ``sentencepiece`` (``tokenizer.model``).
    The vocabulary is the tokenizer's, padded up to ``vocab_size`` if given.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown toy architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    import mlx.core as mx

    out_dir = Path(out_dir)
    with atomic_directory(out_dir, overwrite=True) as tmp:
        n_tok = build_tokenizer(tmp, tokenizer)
        config = toy_config(arch, hidden_size, num_layers, num_heads, num_kv_heads, intermediate_size,
                            max(vocab_size or 0, n_tok), dtype)
        atomic_write_text(tmp / "config.json", json.dumps(config, indent=2))
        atomic_write_text(
            tmp / "generation_config.json",
            json.dumps({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3}, indent=2),
        )
        weights = toy_weights(config, seed)
        mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "pt"})
    return out_dir


def build_tokenizer(out_dir: Path, tokenizer: str) -> int:
    """Write a ``bpe`` or ``sentencepiece`` tokenizer to ``out_dir``; returns its vocabulary size."""
    if tokenizer == "bpe":
        build_bpe_tokenizer(out_dir)
        return len(json.loads((out_dir / "tokenizer.json").read_text())["model"]["vocab"])
    if tokenizer == "sentencepiece":
        build_sentencepiece_tokenizer(out_dir)
        import sentencepiece as spm

        return spm.SentencePieceProcessor(model_file=str(out_dir / "tokenizer.model")).vocab_size()
    raise ValueError(f"tokenizer must be 'bpe' or 'sentencepiece', got {tokenizer!r}")


def toy_config(arch: str, hidden_size: int, num_layers: int, num_heads: int, num_kv_heads: int,
               intermediate_size: int, vocab_size: int, dtype: str) -> dict:
    """The Hugging Face ``config.json`` of a toy ``arch`` model."""
    return dict(
        ARCHS[arch],
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_attention_heads=num_heads,
        num_hidden_layers=num_layers,
        num_key_value_heads=num_kv_heads,
        head_dim=hidden_size // num_heads,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        vocab_size=vocab_size,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        torch_dtype=dtype,
        initializer_range=0.02,
    )


def toy_weights(config: dict, seed: int = 0) -> dict:
    """Random weights for ``config`` in Hugging Face names: linear weights (and qwen2's
    q/k/v biases) ~ N(0, 0.02^2), norms 1, in ``config["torch_dtype"]``."""
    import mlx.core as mx

    dtype = getattr(mx, config["torch_dtype"])
    rng = np.random.default_rng(seed)

    def w(*shape, std=0.02):
        return mx.array(rng.normal(0.0, std, size=shape).astype(np.float32)).astype(dtype)

    hidden, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    q = config["num_attention_heads"] * config["head_dim"]
    kv = config["num_key_value_heads"] * config["head_dim"]
    weights = {"model.embed_tokens.weight": w(vocab, hidden), "model.norm.weight": mx.ones(hidden)}
    if not config["tie_word_embeddings"]:
        weights["lm_head.weight"] = w(vocab, hidden)
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        weights.update(
            {
                p + "self_attn.q_proj.weight": w(q, hidden),
                p + "self_attn.k_proj.weight": w(kv, hidden),
                p + "self_attn.v_proj.weight": w(kv, hidden),
                p + "self_attn.o_proj.weight": w(hidden, q),
                p + "mlp.gate_proj.weight": w(inter, hidden),
                p + "mlp.up_proj.weight": w(inter, hidden),
                p + "mlp.down_proj.weight": w(hidden, inter),
                p + "input_layernorm.weight": mx.ones(hidden),
                p + "post_attention_layernorm.weight": mx.ones(hidden),
            }
        )
        if config["model_type"] == "qwen2":
            weights[p + "self_attn.q_proj.bias"] = w(q)
            weights[p + "self_attn.k_proj.bias"] = w(kv)
            weights[p + "self_attn.v_proj.bias"] = w(kv)
    return {k: v.astype(dtype) for k, v in weights.items()}


def toy_pairs(n: int, seed: int = 0) -> list:
    """Synthetic preference pairs: the chosen reply repeats the prompt's words."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        k = rng.randint(2, 5)
        words = rng.sample(PROMPT_WORDS, k)
        others = rng.sample(OTHER_WORDS, k)
        pairs.append(
            {
                "prompt": "Repeat: " + " ".join(words) + ". Answer:",
                "chosen": " " + " ".join(words) + ".",
                "rejected": " " + " ".join(others) + ".",
            }
        )
    return pairs


def write_jsonl(path: Union[str, Path], records: list) -> None:
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))


def build_toy_dataset(out_dir: Union[str, Path], n_train: int = 512, n_valid: int = 64, seed: int = 0) -> Path:
    """Write ``train.jsonl`` and ``valid.jsonl`` (mlx-lm layout) with disjoint pairs."""
    out_dir = Path(out_dir)
    pairs = toy_pairs(n_train + n_valid, seed)
    with atomic_directory(out_dir, overwrite=True) as tmp:
        write_jsonl(tmp / "train.jsonl", pairs[:n_train])
        write_jsonl(tmp / "valid.jsonl", pairs[n_train:])
    return out_dir


def resolve_toy_model(spec: str) -> Path:
    """``toy:llama`` -> a cached local model directory, built on first use."""
    arch = spec.split(":", 1)[1] or "llama"
    if arch not in ARCHS:
        raise ConfigError(f"model: {spec!r} is no toy model; choose one of {', '.join('toy:' + a for a in ARCHS)}")
    path = cache_root() / "toy" / f"model-{arch}-v1"
    if not (path / "model.safetensors").exists():
        build_toy_model(path, arch=arch)
    return path


def resolve_toy_data() -> Path:
    path = cache_root() / "toy" / "data-v2"
    if not (path / "valid.jsonl").exists():
        build_toy_dataset(path)
    return path
