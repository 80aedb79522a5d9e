"""The tokenizer of a GGUF file, rebuilt from its metadata (vocabulary, merges, scores, token
types, special tokens, chat template) by transformers' GGUF tokenizer conversion, with llama.cpp's
pre-tokenization where transformers' differs (SmolLM's digits, SentencePiece's spaces)."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ConfigError
from ..util.io import atomic_write_text

# tokenizer.ggml.pre types whose llama.cpp split transformers does not reproduce
SMOLLM_PRE = ("smollm",)  # llama.cpp: digits split one by one ("\p{N}"), then the GPT-2 regex

# The vocabulary arrays a tokenizer is rebuilt from, read in full (read_header counts other arrays).
TOKENIZER_ARRAYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.scores",
                    "tokenizer.ggml.token_type")
SPECIAL_TOKENS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "unk_token": "unknown_token_id",
                  "pad_token": "padding_token_id"}


def gguf_tokenizer(meta: dict):
    """A fast tokenizer rebuilt from GGUF metadata ``meta`` (its vocabulary arrays read in full:
    :data:`TOKENIZER_ARRAYS`) by transformers' GGUF tokenizer
    conversion (BPE or Unigram from the vocabulary, merges, scores and token types), fed by this
    module's reader: transformers' own GGUF reader imports torch, which ``pip install mlx-dpo`` lacks."""
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer

    grouped = {group: {name: meta[f"tokenizer.{key}"] for key, name in renames.items() if f"tokenizer.{key}" in meta}
               for group, renames in GGUF_TOKENIZER_MAPPING.items()}
    tokenizer, config = grouped["tokenizer"], grouped["tokenizer_config"]
    if tokenizer.get("tokenizer_type") == "llama":  # llama.cpp adds BOS to a sentencepiece vocabulary by default
        config.setdefault("add_bos_token", True)
    for name, key in SPECIAL_TOKENS.items():
        token_id = meta.get(f"tokenizer.ggml.{key}")
        config[name] = tokenizer["tokens"][token_id] if token_id is not None else None
    backend, extra = convert_gguf_tokenizer(meta["general.architecture"], tokenizer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, **config, **extra)


def sentencepiece_spaces(backend, space_prefix: bool) -> None:
    """Spaces as llama.cpp's SentencePiece tokenizer writes them: each space a ``▁``, and with
    ``add_space_prefix`` (Llama's default; Gemma's files say false) one ``▁`` before the text and
    before the text after each special token. transformers' Metaspace adds none where the text
    starts with a space, so ``"  hi"`` lost a ``▁`` (and a space on the way back)."""
    from tokenizers import decoders, normalizers

    spaces = [normalizers.Replace(" ", "▁")]
    backend.normalizer = normalizers.Sequence(([normalizers.Prepend("▁")] if space_prefix else []) + spaces)
    backend.pre_tokenizer = None
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
                                        + ([decoders.Strip(" ", 1, 0)] if space_prefix else []))


def write_tokenizer(meta: dict, out: Path, path: Path) -> None:
    """``tokenizer.json`` + ``tokenizer_config.json`` (with the chat template, special tokens,
    ``add_bos_token``) rebuilt from the GGUF metadata (:func:`gguf_tokenizer`)."""
    from tokenizers import pre_tokenizers

    try:
        tokenizer = gguf_tokenizer(meta)
    except Exception as e:  # transformers raises many types for metadata it cannot convert
        raise ConfigError(f"model: cannot rebuild the tokenizer of {path} from its GGUF metadata "
                          f"({type(e).__name__}: {e})") from None
    if meta.get("tokenizer.ggml.pre") in SMOLLM_PRE:  # as SmolLM's own tokenizer.json
        tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    if meta.get("tokenizer.ggml.model") == "llama":
        sentencepiece_spaces(tokenizer.backend_tokenizer, bool(meta.get("tokenizer.ggml.add_space_prefix", True)))
    tokenizer.save_pretrained(str(out))
    config = json.loads((out / "tokenizer_config.json").read_text())
    for key in ("is_local", "local_files_only", "backend", "name_or_path"):
        config.pop(key, None)
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config["add_bos_token"] = bool(meta.get("tokenizer.ggml.add_bos_token", getattr(tokenizer, "add_bos_token", False)))
    config["add_eos_token"] = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    if tokenizer.chat_template:
        config["chat_template"] = tokenizer.chat_template
        (out / "chat_template.jinja").unlink(missing_ok=True)  # one copy, where every transformers reads it
    atomic_write_text(out / "tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False))


__all__ = ["gguf_tokenizer", "sentencepiece_spaces", "write_tokenizer"]
