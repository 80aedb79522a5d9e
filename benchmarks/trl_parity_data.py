"""The records of the TRL parity harness (``trl_parity.py``) and their tokenization by both sides:
the pairs trained on, TRL 1.16's tokenization of string and chat pairs and of real chat templates,
its truncation (issues 16 and 29)."""

from __future__ import annotations

import json
from pathlib import Path

PAIRS = [
    {"prompt": "Repeat: cat dog. Answer:", "chosen": " cat dog.", "rejected": " sun moon."},
    {"prompt": "Repeat: red blue green. Answer:", "chosen": " red blue green.", "rejected": " one two."},
    {"prompt": "Repeat: tree. Answer:", "chosen": " tree.", "rejected": " car bus train boat."},
    {"prompt": "Repeat: sky sea sand sun. Answer:", "chosen": " sky sea sand sun.", "rejected": " no."},
]
# Tokenization only (TRL's prompt_ids / chosen_ids / rejected_ids are recorded): BOS on a
# string prompt, a chat-template pair, a boundary merge ("Answer: " + "blue").
TOKENIZE_ONLY = [
    {"prompt": "Question: why? Answer:", "chosen": " because.", "rejected": " no idea at all."},
    {"prompt": [{"role": "user", "content": "What color is the sky?"}],
     "chosen": [{"role": "assistant", "content": "It is blue."}],
     "rejected": [{"role": "assistant", "content": "Green."}]},
    {"prompt": "Answer: ", "chosen": "blue.", "rejected": "red."},
]
# Real chat templates (tests/fixtures/templates) on conversational rows with TRL 1.16's per-row
# ``chat_template_kwargs`` and ``tools``: (template file, row). TRL splits at the common tokens of the
# prompt (with the generation prompt) and each whole conversation, as thinking templates need.
TEMPLATES_DIR = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "templates"
_WEATHER = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                              "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                             "required": ["city"]}}}]
_ASK = [{"role": "user", "content": "What is 2 + 2?"}]
_MULTI = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"},
          {"role": "assistant", "content": "Hello.", "reasoning_content": "Greet back."},
          {"role": "user", "content": "Capital of France?"}]
TEMPLATE_RECORDS = [
    ("Qwen-Qwen3-0.6B.jinja", {"prompt": _ASK, "chosen": [{"role": "assistant", "content": "4."}],
                               "rejected": [{"role": "assistant", "content": "5."}],
                               "chat_template_kwargs": {"enable_thinking": False}}),
    ("Qwen-Qwen3-0.6B.jinja", {"prompt": _ASK, "chosen": [{"role": "assistant", "content": "4.",
                                                          "reasoning_content": "Two and two."}],
                               "rejected": [{"role": "assistant", "content": "5."}],
                               "chat_template_kwargs": {"enable_thinking": True}}),
    ("Qwen-Qwen3-0.6B.jinja", {"prompt": _MULTI, "chosen": [{"role": "assistant", "content": "Paris."}],
                               "rejected": [{"role": "assistant", "content": "Lyon."}], "tools": _WEATHER}),
    ("google-gemma-3-it.jinja", {"prompt": _MULTI, "chosen": [{"role": "assistant", "content": "Paris."}],
                                 "rejected": [{"role": "assistant", "content": "Lyon."}]}),
    ("microsoft-Phi-3.5-mini-instruct.jinja", {"prompt": _MULTI[1:], "chosen": [{"role": "assistant", "content": "Paris."}],
                                               "rejected": [{"role": "assistant", "content": "Lyon."}]}),
    ("meta-llama-Llama-3.1-Instruct.jinja", {"prompt": _ASK, "chosen": [{"role": "assistant", "content": "4."}],
                                             "rejected": [{"role": "assistant", "content": "5."}], "tools": _WEATHER}),
    ("deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.jinja", {"prompt": _ASK,
                                                        "chosen": [{"role": "assistant", "content": "4."}],
                                                        "rejected": [{"role": "assistant", "content": "5."}]}),
]
# Truncation (TRL's dataset filter + collator at max_length TRUNCATE_AT): a long prompt, a long completion.
TRUNCATE = PAIRS + [
    {"prompt": "Repeat: " + "cat dog " * 8 + "Answer:", "chosen": " cat dog.", "rejected": " sun."},
    {"prompt": "Say:", "chosen": " cat dog sun" * 2, "rejected": " no."},
]
TRUNCATE_AT = 14


# --------------------------------------------------------------------------- mlx-dpo


def mlx_tokenize(model_dir: Path, records: list) -> list:
    from mlx_lm.utils import load_tokenizer

    from mlx_dpo import DPOConfig
    from mlx_dpo.data import tokenize_pairs

    pairs, _ = tokenize_pairs([dict(r) for r in records], load_tokenizer(model_dir), DPOConfig())
    return [{"prompt_ids": p.prompt, "chosen_ids": p.chosen, "rejected_ids": p.rejected} for p in pairs]


def mlx_tokenize_templates(model_dir: Path, records: list) -> list:
    """Our tokenization of each template record, the template given as the ``chat_template`` option."""
    from mlx_lm.utils import load_tokenizer

    from mlx_dpo import DPOConfig
    from mlx_dpo.data import tokenize_pairs
    from mlx_dpo.model.loader import use_chat_template

    out = []
    for template, row in records:
        cfg = DPOConfig(chat_template=str(TEMPLATES_DIR / template))
        pairs, _ = tokenize_pairs([dict(row)], use_chat_template(load_tokenizer(model_dir), cfg), cfg)
        out.append({"prompt_ids": pairs[0].prompt, "chosen_ids": pairs[0].chosen, "rejected_ids": pairs[0].rejected})
    return out


# --------------------------------------------------------------------------- TRL 1.16


def trl_tokenize(model_dir: Path, work: Path) -> list:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    out = []
    for record in TOKENIZE_ONLY:  # one trainer each: TRL wants one format per dataset
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        args = DPOConfig(output_dir=str(work / "tok"), report_to=[], use_cpu=True)
        trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list([record]),
                             processing_class=AutoTokenizer.from_pretrained(model_dir))
        row = trainer.train_dataset[0]
        out.append({k: list(row[k]) for k in ("prompt_ids", "chosen_ids", "rejected_ids")})
    return out


def trl_tokenize_templates(model_dir: Path, work: Path) -> list:
    """TRL 1.16's prompt_ids / chosen_ids / rejected_ids of each template record (tools as TRL's JSON string)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    out = []
    for template, row in TEMPLATE_RECORDS:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        tokenizer.chat_template = (TEMPLATES_DIR / template).read_text()
        record = {**row, **({"tools": json.dumps(row["tools"])} if "tools" in row else {})}
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        args = DPOConfig(output_dir=str(work / "tpl"), report_to=[], use_cpu=True)
        trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list([record]),
                             processing_class=tokenizer)
        done = trainer.train_dataset[0]
        out.append({k: list(done[k]) for k in ("prompt_ids", "chosen_ids", "rejected_ids")})
    return out


def trl_truncate(model_dir: Path, work: Path, mode: str) -> list:
    """Per kept pair, TRL's truncated ``[prompt + chosen, prompt + rejected]`` and their completion masks."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    args = DPOConfig(output_dir=str(work / "trunc"), report_to=[], use_cpu=True, max_length=TRUNCATE_AT,
                     truncation_mode=mode)
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(TRUNCATE),
                         processing_class=AutoTokenizer.from_pretrained(model_dir))
    out = []
    for row in trainer.train_dataset:
        batch = trainer.data_collator([{k: row[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}])
        keep = batch["attention_mask"].bool()
        out.append({"ids": [batch["input_ids"][i][keep[i]].tolist() for i in (0, 1)],
                    "completion_mask": [batch["completion_mask"][i][keep[i]].tolist() for i in (0, 1)]})
    return out


def mlx_truncate(model_dir: Path, mode: str) -> list:
    """:func:`trl_truncate`'s rows from mlx-dpo's tokenized pairs."""
    from mlx_lm.utils import load_tokenizer

    from mlx_dpo import DPOConfig
    from mlx_dpo.data import tokenize_pairs

    cfg = DPOConfig(max_length=TRUNCATE_AT, truncation_mode=mode)
    pairs, _ = tokenize_pairs([dict(r) for r in TRUNCATE], load_tokenizer(model_dir), cfg)
    return [{"ids": [p.prompt + p.chosen, p.prompt + p.rejected],
             "completion_mask": [[0] * len(p.prompt) + [1] * len(c) for c in (p.chosen, p.rejected)]} for p in pairs]
