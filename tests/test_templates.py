"""Chat templates as the models define them (issue 29): the ``chat_template`` override, real
templates (tests/fixtures/templates: Qwen3, Gemma 3, Phi-3.5, Llama 3.1, DeepSeek-R1-Distill),
TRL 1.16's prompt/completion split, and the rows no split can serve.

The oracle is transformers' own tokenizer (``AutoTokenizer``, not mlx-lm's wrapper) and
``apply_chat_template`` with TRL 1.16's ``DPOTrainer._prepare_dataset`` written out below."""

import json
from pathlib import Path

import pytest
import yaml

from mlx_dpo.analysis.lint import lint
from mlx_dpo.config.fields import DPOConfig
from mlx_dpo.data import load_datasets, tokenize_pairs
from mlx_dpo.errors import ConfigError, DataError
from mlx_dpo.model.loader import load_tokenizer, use_chat_template
from test_data import write_jsonl

TEMPLATES = Path(__file__).resolve().parent / "fixtures" / "templates"
QWEN3, GEMMA3, PHI3, LLAMA31, R1 = (TEMPLATES / name for name in (
    "Qwen-Qwen3-0.6B.jinja", "google-gemma-3-it.jinja", "microsoft-Phi-3.5-mini-instruct.jinja",
    "meta-llama-Llama-3.1-Instruct.jinja", "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.jinja"))
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}]


def user(text):
    return {"role": "user", "content": text}


def assistant(text, **extra):
    return {"role": "assistant", "content": text, **extra}


SINGLE = {"prompt": [user("What colour is the sky?")], "chosen": [assistant("Blue.")],
          "rejected": [assistant("Green, always.")]}
MULTI = {"prompt": [{"role": "system", "content": "Be brief."}, user("Hi"), assistant("Hello! How can I help?"),
                    user("Name a fruit.")],
         "chosen": [assistant("An apple.")], "rejected": [assistant("A carrot.")]}
REASONING = {"prompt": [user("2 + 2?")],
             "chosen": [assistant("4.", reasoning_content="Two and two make four.")],
             "rejected": [assistant("<think>\nGuess.\n</think>\n\n5.")]}


def trl_split(hf_tok, row, **kwargs):
    """TRL 1.16's ``DPOTrainer._prepare_dataset`` (``tokenize_fn``) for a conversational row: the
    prompt with ``add_generation_prompt=True`` and each prompt + completion through
    ``apply_chat_template(tokenize=True)`` with ``tools`` and ``chat_template_kwargs``; the completion
    starts after the tokens the prompt shares with both (``common_prefix_length``)."""
    def ids(messages, **extra):
        return list(hf_tok.apply_chat_template(messages, tokenize=True, return_dict=True, **extra, **kwargs)["input_ids"])

    def shared(a, b):
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        return n

    prompt = ids(row["prompt"], add_generation_prompt=True)
    full = [ids(row["prompt"] + row[name]) for name in ("chosen", "rejected")]
    n = min(shared(prompt, f) for f in full)
    return prompt[:n], full[0][n:], full[1][n:]


@pytest.fixture(scope="module")
def hf_tok(llama_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(llama_dir)


def ours(llama_dir, rows, template, **options):
    cfg = DPOConfig(chat_template=str(template), max_length=None, **options)
    tok = use_chat_template(load_tokenizer(Path(llama_dir)), cfg)
    pairs, _ = tokenize_pairs(rows, tok, cfg)
    return [(p.prompt, p.chosen, p.rejected) for p in pairs]


CASES = [  # (template, rows, chat_template_kwargs, tools)
    (QWEN3, [SINGLE, MULTI], {"enable_thinking": True}, None),
    (QWEN3, [SINGLE, MULTI, REASONING], {"enable_thinking": False}, None),
    (QWEN3, [REASONING], {"enable_thinking": True}, None),
    (QWEN3, [SINGLE, MULTI], {"enable_thinking": True}, TOOLS),
    (GEMMA3, [SINGLE, MULTI], None, None),
    (PHI3, [SINGLE, MULTI], None, None),
    (LLAMA31, [SINGLE, MULTI], None, None),
    (LLAMA31, [SINGLE, MULTI], None, TOOLS),
    (R1, [SINGLE, MULTI, REASONING], None, None),
]


@pytest.mark.parametrize("template, rows, kwargs, tools", CASES,
                         ids=[f"{c[0].stem}-{len(c[1])}rows-{c[2]}-{'tools' if c[3] else 'no tools'}" for c in CASES])
def test_real_templates_split_as_trl(llama_dir, hf_tok, template, rows, kwargs, tools):
    """Prompt and completion token ids of each row equal TRL 1.16's on transformers' rendering."""
    hf_tok.chat_template = template.read_text(encoding="utf-8")
    expected = [trl_split(hf_tok, row, tools=tools, **(kwargs or {})) for row in rows]
    assert ours(llama_dir, rows, template, chat_template_kwargs=kwargs, tools=tools) == expected


def test_thinking_templates_are_split_where_the_prompt_is_no_prefix(hf_tok):
    """The cases above include the ones this is about: Qwen3 with enable_thinking false and a
    reasoning reply, and DeepSeek-R1's '<think>' generation prompt, render the prompt alone as no
    prefix of the conversation (so TRL's split is what makes them train)."""
    for template, row, kwargs in ((QWEN3, REASONING, {"enable_thinking": False}), (R1, SINGLE, {})):
        hf_tok.chat_template = template.read_text(encoding="utf-8")
        prompt = hf_tok.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True, **kwargs)
        full = hf_tok.apply_chat_template(row["prompt"] + row["chosen"], tokenize=False, **kwargs)
        assert not full.startswith(prompt)


NO_REPLY = ("{% for m in messages %}{% if m['role'] == 'user' %}U: {{ m['content'] }}\n{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}A:{% endif %}")


def test_a_row_with_no_completion_token_is_refused_and_linted(llama_dir, tmp_path):
    """A template that drops the reply leaves nothing to train on: training names the file, the
    row and the override; lint reports the row with its file and line."""
    path = write_jsonl(tmp_path / "chat.jsonl", [SINGLE, SINGLE])
    cfg = DPOConfig(data=str(path), chat_template=NO_REPLY, cache_dir=str(tmp_path / "cache"))
    tok = load_tokenizer(Path(llama_dir))
    result = lint(cfg, tok)
    assert result["checks"]["split"]["count"] == 2 and result["checks"]["split"]["examples"][0].startswith(f"{path}:1:")
    assert result["fatal"] and any("cannot be split" in p for p in result["problems"])
    with pytest.raises(DataError, match=rf"{path}:1: cannot split .* set chat_template"):
        load_datasets(cfg, use_chat_template(tok, cfg))


def test_conversational_data_without_a_template_names_the_override(llama_dir):
    tok = load_tokenizer(Path(llama_dir))
    tok.chat_template = None
    with pytest.raises(DataError, match="record index 0: conversational data .* set chat_template"):
        tokenize_pairs([SINGLE], tok, DPOConfig())
    pairs, _ = tokenize_pairs([{"prompt": "Q: sky?", "chosen": " blue", "rejected": " green"}], tok, DPOConfig())
    assert len(pairs) == 1  # standard data needs no template


def test_chat_template_option(tmp_path):
    """A file is read into the text (TRL's chat_template_path is an alias); template text is kept; a
    bad path names the field and the path; a misspelt key names the closest one."""
    text = PHI3.read_text(encoding="utf-8")
    assert DPOConfig(chat_template=str(PHI3)).chat_template == text
    assert DPOConfig.from_dict({"chat_template_path": str(PHI3)}).chat_template == text
    assert DPOConfig(chat_template=NO_REPLY).chat_template == NO_REPLY
    for bad, what in ((tmp_path / "missing.jinja", "does not exist"), (tmp_path, "is a directory")):
        with pytest.raises(ConfigError, match=f"chat_template: {bad} {what}"):
            DPOConfig(chat_template=str(bad))
    with pytest.raises(ConfigError, match="unknown config key 'chat_template_pth'; did you mean 'chat_template_path'"):
        DPOConfig.from_dict({"chat_template_pth": "x"})


MARKED = ("{% for m in messages %}<{{ m['role'] }}>{% if enable_thinking is defined and not enable_thinking %}"
          "[no think]{% endif %}{{ m['content'] }}</s>{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")


def test_override_travels_with_the_run(llama_dir, tmp_path, monkeypatch):
    """Trained with chat_template and chat_template_kwargs: the data renders with them, the run's
    config.yaml records the text, generate/sample render with them, export writes the template where
    transformers reads it."""
    from transformers import AutoTokenizer

    from mlx_dpo.export.exporter import export
    from mlx_dpo.generation.generate import prompt_ids
    from mlx_dpo.generation import sample as sample_mod
    from mlx_dpo.generation.sample import load_sampler_model
    from mlx_dpo.train.trainer import train

    (tmp_path / "t.jinja").write_text(MARKED)
    data = write_jsonl(tmp_path / "data" / "train.jsonl", [SINGLE, MULTI] * 2)
    out = tmp_path / "run"
    train(DPOConfig(model=str(llama_dir), data=str(data), output_dir=str(out), max_steps=1, batch_size=2,
                    max_length=128, progress_bar=False, chat_template=str(tmp_path / "t.jinja"),
                    chat_template_kwargs={"enable_thinking": True}))  # mlx-lm's wrapper passes False here
    assert yaml.safe_load((out / "config.yaml").read_text())["chat_template"] == MARKED
    (tmp_path / "t.jinja").unlink()  # the run needs the file no more
    hf = AutoTokenizer.from_pretrained(llama_dir)
    hf.chat_template = MARKED
    expected = hf(hf.apply_chat_template([user("hi")], tokenize=False, add_generation_prompt=True,
                                         enable_thinking=True), add_special_tokens=False)["input_ids"]
    model, tokenizer, cfg = load_sampler_model(None, str(out))
    assert tokenizer.chat_template == MARKED and prompt_ids("hi", tokenizer, cfg, "p") == expected
    seen = []  # the prompt ids sample generates from
    monkeypatch.setattr(sample_mod, "generate_samples", lambda m, t, ids, k, *a: seen.extend(ids) or (
        [[[5], [6, 7]]], [[True, True]], type("S", (), {"wall_time": 1.0, "peak_memory": 0.0})()))
    sample_mod.sample_pairs(model, tokenizer, ["hi"], "longer", num_samples=2, cfg=cfg)
    assert seen == [expected]
    exported = export(out, tmp_path / "hf")
    assert json.loads((exported / "tokenizer_config.json").read_text())["chat_template"] == MARKED
    assert AutoTokenizer.from_pretrained(exported).chat_template == MARKED
