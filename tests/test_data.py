"""Preference data: sources, formats, tokenization at the prompt boundary, caching, errors."""

import gzip
import json
import shutil
from pathlib import Path

import pytest

from mlx_dpo import data as data_mod
from mlx_dpo.util import hubnet
from mlx_dpo.config.fields import DPOConfig
from mlx_dpo.data import formats, extract_prompt, load_datasets, parse_split, tokenize_pairs
from mlx_dpo.errors import DataError

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "data"
STACKEXCHANGE = dict(
    columns={"prompt": "question", "chosen": "response_j", "rejected": "response_k"},
    prompt_template="Question: {prompt}\n\nAnswer: ",
)
PAIR = {"prompt": "Repeat: cat dog. Answer:", "chosen": " cat dog.", "rejected": " sun moon."}


@pytest.fixture(scope="module")
def bpe_tok(llama_dir):
    from mlx_lm.utils import load_tokenizer

    return load_tokenizer(llama_dir)


@pytest.fixture(scope="module")
def sp_tok(llama_sp_dir):
    from mlx_lm.utils import load_tokenizer

    return load_tokenizer(llama_sp_dir)


@pytest.fixture(params=["bpe", "sentencepiece"])
def tok(request, bpe_tok, sp_tok):
    return bpe_tok if request.param == "bpe" else sp_tok


def write_jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def load(tokenizer, tmp_path, **kwargs):
    """load_datasets with a private cache; returns (train, eval, log lines)."""
    lines = []
    cfg = DPOConfig(cache_dir=str(tmp_path / "cache"), **kwargs)
    train, evals = load_datasets(cfg, tokenizer, log=lines.append)
    return train, evals, lines


def text(tokenizer, ids):
    return tokenizer.decode(ids)


# ---------------------------------------------------------------------------
# Every example file, both tokenizers
# ---------------------------------------------------------------------------

EXAMPLE_CONFIGS = {
    "standard.jsonl": {},
    "conversational.jsonl": {},
    "implicit.jsonl": {},
    "implicit_conversational.jsonl": {},
    "stackexchange.jsonl": STACKEXCHANGE,
}


@pytest.mark.parametrize("name", sorted(EXAMPLE_CONFIGS))
def test_example_files_load(tok, tmp_path, name):
    train, evals, lines = load(tok, tmp_path, data=str(EXAMPLES / name), eval_split=0.25, **EXAMPLE_CONFIGS[name])
    assert len(train) == 9 and len(evals) == 3
    for pair in train + evals:
        assert pair.prompt and pair.chosen and pair.rejected
        if "conversational" in name:  # the template ends the turn; no EOS added (TRL 1.16)
            assert text(tok, pair.chosen).endswith("<|im_end|>\n") and text(tok, pair.rejected).endswith("<|im_end|>\n")
        else:
            assert pair.chosen[-1] == tok.eos_token_id and pair.rejected[-1] == tok.eos_token_id
        assert pair.chosen != pair.rejected
    assert lines[0].startswith("train: 9 pairs (0 truncated")


def test_example_prompts_and_completions(bpe_tok, tmp_path):
    (first, *_), _, _ = load(bpe_tok, tmp_path, data=str(EXAMPLES / "implicit.jsonl"))
    assert text(bpe_tok, first.prompt) == "<s>\n\nHuman: What color is the sky on a clear day?\n\nAssistant: The sky is"
    assert text(bpe_tok, first.chosen) == " blue on a clear day.</s>"
    (first, *_), _, _ = load(bpe_tok, tmp_path, data=str(EXAMPLES / "implicit_conversational.jsonl"))
    assert text(bpe_tok, first.prompt) == "<|im_start|>user\nWhat color is the sky on a clear day?<|im_end|>\n<|im_start|>assistant\n"
    assert text(bpe_tok, first.chosen) == "The sky is blue on a clear day.<|im_end|>\n"


# ---------------------------------------------------------------------------
# Formats
# ---------------------------------------------------------------------------


def test_standard_and_column_mapped_give_identical_ids(tok, tmp_path):
    source = [json.loads(line) for line in (EXAMPLES / "stackexchange.jsonl").read_text().splitlines()]
    standard = [
        {"prompt": f"Question: {r['question']}\n\nAnswer: ", "chosen": r["response_j"], "rejected": r["response_k"]}
        for r in source
    ]
    a, _, _ = load(tok, tmp_path, data=str(write_jsonl(tmp_path / "standard.jsonl", standard)))
    b, _, _ = load(tok, tmp_path, data=str(EXAMPLES / "stackexchange.jsonl"), **STACKEXCHANGE)
    assert a == b and len(a) == len(source)


def test_conversational_rendering_by_hand(tok, tmp_path):
    record = {
        "prompt": [{"role": "user", "content": "What color is the sky?"}],
        "chosen": [{"role": "assistant", "content": "It is blue."}],
        "rejected": [{"role": "assistant", "content": "It is green."}],
    }
    [pair], _, _ = load(tok, tmp_path, data=str(write_jsonl(tmp_path / "c.jsonl", [record])))
    prompt = "<|im_start|>user\nWhat color is the sky?<|im_end|>\n<|im_start|>assistant\n"
    chosen = "It is blue.<|im_end|>\n"
    prompt_ids = tok.encode(prompt, add_special_tokens=False)  # the template has no BOS: none added
    assert pair.prompt == prompt_ids
    # the template ends the turn; no EOS is appended (TRL 1.16)
    assert pair.chosen == tok.encode(prompt + chosen, add_special_tokens=False)[len(prompt_ids):]


def _custom_template_tokenizer(llama_dir, tmp_path, template):
    from mlx_lm.utils import load_tokenizer

    out = tmp_path / "tok"
    out.mkdir()
    for f in Path(llama_dir).iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "config", "generation")):
            shutil.copy(f, out / f.name)
    config = json.loads((out / "tokenizer_config.json").read_text())
    config["chat_template"] = template
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return load_tokenizer(out)


EOS_TEMPLATE = (
    "{% if tools %}TOOLS: {{ tools | map(attribute='name') | join(',') }}\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_conversational_system_prompt_tools_and_eos_in_template(llama_dir, tmp_path):
    tok = _custom_template_tokenizer(llama_dir, tmp_path, EOS_TEMPLATE)
    record = {
        "prompt": [{"role": "user", "content": "hi"}],
        "chosen": [{"role": "assistant", "content": "hello"}],
        "rejected": [{"role": "assistant", "content": "go away"}],
    }
    path = write_jsonl(tmp_path / "c.jsonl", [record])
    [pair], _, _ = load(tok, tmp_path, data=str(path), system_prompt="Be kind.", tools=[{"name": "search"}])
    assert tok.decode(pair.prompt) == "TOOLS: search\n<|im_start|>system\nBe kind.</s>\n<|im_start|>user\nhi</s>\n<|im_start|>assistant\n"
    # the template ends the turn with EOS (then a newline): no second EOS is appended
    assert tok.decode(pair.chosen) == "hello</s>\n"
    assert pair.chosen.count(tok.eos_token_id) == 1
    # a prompt that already has a system message keeps it
    record["prompt"] = [{"role": "system", "content": "Be brief."}] + record["prompt"]
    [pair], _, _ = load(tok, tmp_path, data=str(write_jsonl(tmp_path / "d.jsonl", [record])), system_prompt="Be kind.")
    assert "Be brief." in tok.decode(pair.prompt) and "Be kind." not in tok.decode(pair.prompt)


THINK_TEMPLATE = (  # a template variable that changes the rendering (Qwen3's split of an empty think block: issue 29)
    "{% if enable_thinking is defined and not enable_thinking %}/no_think\n{% endif %}"
    "{% if tools %}TOOLS: {{ tools | map(attribute='name') | join(',') }}\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_chat_template_kwargs_per_run_and_per_row_as_transformers_renders_them(llama_dir, tmp_path):
    """TRL's ``chat_template_kwargs`` (per run, and a column per row on top) and per-row ``tools``
    reach the template: the prompt equals transformers' ``apply_chat_template`` with the same
    arguments. A string row with those columns is an error (they would be ignored)."""
    tok = _custom_template_tokenizer(llama_dir, tmp_path, THINK_TEMPLATE)
    user = [{"role": "user", "content": "hi"}]
    row = {"prompt": user, "chosen": [{"role": "assistant", "content": "hello"}],
           "rejected": [{"role": "assistant", "content": "go away"}]}
    rows = [row, {**row, "chat_template_kwargs": {"enable_thinking": False}, "tools": [{"name": "calc"}]}]
    path = write_jsonl(tmp_path / "k.jsonl", rows)
    # enable_thinking: true differs from the default mlx-lm's wrapper passes (False for this tokenizer)
    pairs, _, _ = load(tok, tmp_path, data=str(path), chat_template_kwargs={"enable_thinking": True},
                       tools=[{"name": "search"}])
    expected = [tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True, enable_thinking=True,
                                        tools=[{"name": "search"}]),
                tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True, enable_thinking=False,
                                        tools=[{"name": "calc"}])]
    assert "/no_think" not in expected[0] and "/no_think" in expected[1] and "calc" in expected[1]
    assert [tok.decode(p.prompt) for p in pairs] == expected
    strings = write_jsonl(tmp_path / "s.jsonl", [{"prompt": "hi", "chosen": " a", "rejected": " b",
                                                   "chat_template_kwargs": {"enable_thinking": False}}])
    with pytest.raises(DataError, match="s.jsonl:1: field 'chat_template_kwargs' applies to conversational rows"):
        load(tok, tmp_path, data=str(strings))


def test_extract_prompt_follows_trl():
    chosen = "\n\nHuman: Hi?\n\nAssistant: Hello there."
    rejected = "\n\nHuman: Hi?\n\nAssistant: Go away."
    # the space before the first difference stays with the completions
    assert extract_prompt(chosen, rejected) == ("\n\nHuman: Hi?\n\nAssistant:", " Hello there.", " Go away.")
    assert extract_prompt("The sky is blue.", "The sky is green.") == ("The sky is", " blue.", " green.")
    assert extract_prompt("abc", "abd") == ("ab", "c", "d")
    user = {"role": "user", "content": "Hi?"}
    good, bad = {"role": "assistant", "content": "Hello."}, {"role": "assistant", "content": "No."}
    assert extract_prompt([user, good], [user, bad]) == ([user], [good], [bad])


def test_implicit_pairs_without_a_prompt_are_skipped(bpe_tok, tmp_path):
    user = {"role": "user", "content": "Hi?"}
    records = [
        {"chosen": "Hello there.", "rejected": "Hello there. And more."},  # chosen is a prefix of rejected
        {"chosen": [user], "rejected": [{"role": "user", "content": "Yo"}]},  # no shared message
        {"chosen": "Q: x A: yes", "rejected": "Q: x A: no"},
    ]
    path = write_jsonl(tmp_path / "i.jsonl", records[:1] + records[2:])
    train, _, lines = load(bpe_tok, tmp_path, data=str(path))
    assert len(train) == 1 and "1 skipped with no prompt" in lines[0]
    path = write_jsonl(tmp_path / "j.jsonl", [records[1], {"chosen": [user, {"role": "assistant", "content": "a"}], "rejected": [user, {"role": "assistant", "content": "b"}]}])
    train, _, lines = load(bpe_tok, tmp_path, data=str(path))
    assert len(train) == 1 and "1 skipped with no prompt" in lines[0]


def test_forced_format(bpe_tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "ignored", "chosen": "Q: a A: yes", "rejected": "Q: a A: no"}])
    [pair], _, _ = load(bpe_tok, tmp_path, data=str(path), data_format="implicit")
    assert bpe_tok.decode(pair.prompt) == "<s>Q: a A:"
    with pytest.raises(DataError, match=r"d.jsonl:1: field 'prompt' must be a list of messages, got str"):
        load(bpe_tok, tmp_path, data=str(path), data_format="conversational")


class Ranked(formats.Format):
    """A made-up format: a prompt and scored responses; the best and the worst make the pair."""

    name = "ranked"

    @classmethod
    def detect(cls, record):
        return {"prompt", "responses", "scores"} <= set(record)

    @classmethod
    def normalize(cls, row, mapping, cfg):
        ranked = [r for _, r in sorted(zip(row.record["scores"], row.record["responses"]))]
        if ranked[0] == ranked[-1]:
            return "identical"
        return formats.Standard.example(row.record["prompt"], ranked[-1], ranked[0], cfg)


def test_a_new_format_is_one_class_in_the_registry(bpe_tok, tmp_path, monkeypatch):
    monkeypatch.setattr(formats, "FORMATS", [*formats.FORMATS, Ranked])
    ranked = {"prompt": PAIR["prompt"], "responses": [" sun moon.", " cat dog.", " cat."], "scores": [0.1, 0.9, 0.5]}
    tie = dict(ranked, responses=[" cat."] * 3)
    pairs, stats = tokenize_pairs([ranked, tie], bpe_tok, DPOConfig())
    assert pairs == tokenize_pairs([PAIR], bpe_tok, DPOConfig())[0]
    assert (stats["kept"], stats["dropped_identical"]) == (1, 1)
    path = write_jsonl(tmp_path / "ranked.jsonl", [ranked] * 3)  # detected per file, as the built-in formats
    train, _, _ = load(bpe_tok, tmp_path, data=str(path), prompt_template="Q: {prompt}")
    assert len(train) == 3 and bpe_tok.decode(train[0].prompt) == "<s>Q: " + PAIR["prompt"]


def test_data_format_choices_are_the_registry(bpe_tok, tmp_path, monkeypatch):
    """data_format accepts auto and the registered formats' names, and a new one once registered."""
    from mlx_dpo.errors import ConfigError

    with pytest.raises(ConfigError, match="data_format must be one of auto, standard, conversational, unpaired, implicit; "
                                          "got 'ranked'"):
        load(bpe_tok, tmp_path, data_format="ranked")
    monkeypatch.setattr(formats, "FORMATS", [*formats.FORMATS, Ranked])
    ranked = {"prompt": PAIR["prompt"], "responses": [" sun moon.", " cat dog."], "scores": [0.1, 0.9]}
    path = write_jsonl(tmp_path / "forced.jsonl", [ranked] * 2)
    train, _, _ = load(bpe_tok, tmp_path, data=str(path), data_format="ranked")
    assert len(train) == 2


# ---------------------------------------------------------------------------
# Tokenization at the prompt/completion boundary, truncation
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prompt,chosen,rejected",
    [
        ("Answer:", " blue.", " green."),  # no merge: completion tokens are the tail of encode(prompt + chosen)
        ("Answer: ", "blue.", "green."),  # the trailing space merges with the completion's first word
        ("Answer:", "blue", "red"),  # SentencePiece: no leading-space marker in the middle of text
        ("x\n", "blue", "red"),
    ],
)
def test_prompt_boundary(tok, prompt, chosen, rejected):
    """As TRL 1.16: each joined sequence is the encoding of the whole text (+ EOS); the prompt is
    the tokens it shares with both, so a token merged across the join goes to the completions."""
    [pair], _ = tokenize_pairs([{"prompt": prompt, "chosen": chosen, "rejected": rejected}], tok, DPOConfig())
    prompt_ids = tok.encode(prompt)
    assert pair.prompt == prompt_ids[: len(pair.prompt)]
    merges = False
    for completion, ids in ((chosen, pair.chosen), (rejected, pair.rejected)):
        full = tok.encode(prompt + completion)
        assert pair.prompt + ids == full + [tok.eos_token_id]
        merges |= full[: len(prompt_ids)] != prompt_ids
    assert len(pair.prompt) == len(prompt_ids) - merges  # a merge takes the prompt's last token
    assert merges == (prompt == "Answer: ")


def _joined(tok, record):
    """TRL 1.16's untruncated rows: encode(prompt), encode(prompt + completion) + EOS (no boundary merge here)."""
    prompt = tok.encode(record["prompt"])
    return prompt, [prompt + tok.encode(record["prompt"] + record[k])[len(prompt):] + [tok.eos_token_id]
                    for k in ("chosen", "rejected")]


def test_truncation_and_drop_counts(bpe_tok):
    """truncation_mode cuts each joined prompt + completion to max_length, as TRL 1.16's collator
    (``ids[:max_length]`` / ``ids[-max_length:]``); max_prompt_length / max_completion_length come first."""
    long_prompt = {"prompt": "Repeat: " + "cat dog " * 20, "chosen": " cat dog cat.", "rejected": " sun moon sky sun."}
    long_answer = {"prompt": "Say:", "chosen": " cat" * 20, "rejected": " dog."}
    records = [dict(PAIR), long_prompt, long_answer, {"prompt": "p", "chosen": " same", "rejected": " same"}]
    prompt, (chosen, rejected) = _joined(bpe_tok, long_prompt)
    assert len(prompt) > 12 and len(rejected) > len(chosen)

    pairs, stats = tokenize_pairs(records, bpe_tok, DPOConfig(max_length=12))  # keep_start, the default
    assert stats == dict(pairs=4, kept=2, truncated=1, dropped_too_long=1, dropped_identical=1, dropped_no_prompt=0)
    p, (c, r) = _joined(bpe_tok, long_answer)
    assert pairs[1].prompt + pairs[1].chosen == c[:12] and pairs[1].prompt + pairs[1].rejected == r[:12]

    n = len(bpe_tok.encode(PAIR["prompt"]))  # TRL drops a pair whose prompt has >= max_length tokens
    assert tokenize_pairs([PAIR], bpe_tok, DPOConfig(max_length=n))[1]["dropped_too_long"] == 1
    [pair], _ = tokenize_pairs([PAIR], bpe_tok, DPOConfig(max_length=n + 1))
    assert len(pair.chosen) == len(pair.rejected) == 1

    pairs, stats = tokenize_pairs(records, bpe_tok, DPOConfig(max_length=12, truncation_mode="keep_end"))
    assert stats["kept"] == 3 and stats["truncated"] == 2 and stats["dropped_too_long"] == 0
    pair = pairs[1]  # the longer (rejected) sequence is TRL's; chosen shares its prompt
    assert pair.prompt + pair.rejected == rejected[-12:] and pair.chosen == chosen[len(prompt):]
    pair = pairs[2]  # a completion longer than max_length - 1: one prompt token stays, completions keep their end
    assert pair.prompt == p[-1:] and pair.chosen == c[-11:] and pair.rejected == r[len(p):]

    cfg = DPOConfig(max_prompt_length=10, max_length=12, max_completion_length=3)  # our extras first
    pairs, stats = tokenize_pairs(records, bpe_tok, cfg)
    assert stats["kept"] == 3 and stats["truncated"] == 3
    assert pairs[1].prompt == prompt[-10:] and pairs[1].chosen == chosen[len(prompt):][:2]  # 3, then 12 - 10


def test_counts_are_logged(bpe_tok, tmp_path):
    records = [{**PAIR, "chosen": PAIR["chosen"] + "!" * i} for i in range(3)]  # distinct (no duplicate warning)
    records += [{"prompt": "p", "chosen": " same", "rejected": " same"}]
    records.append({"prompt": "Repeat: " + "cat dog " * 20, "chosen": " a", "rejected": " b"})
    path = write_jsonl(tmp_path / "d.jsonl", records)
    train, _, lines = load(bpe_tok, tmp_path, data=str(path), max_prompt_length=None, max_length=20)
    assert len(train) == 3
    assert lines == ["train: 3 pairs (0 truncated, 1 dropped as too long, 1 skipped with chosen == rejected)"]


class NoBos:
    """A tokenizer that adds no BOS (as Qwen2/Qwen3): the toy tokenizer minus its leading BOS."""

    bos_token_id = None

    def __init__(self, tok):
        self._tok = tok

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def encode(self, text, add_special_tokens=True):
        ids = list(self._tok.encode(text, add_special_tokens=add_special_tokens))
        return ids[1:] if ids[:1] == [self._tok.bos_token_id] else ids


def test_pairs_with_no_prompt_tokens_are_dropped(bpe_tok, tmp_path):
    """With no BOS an empty prompt has 0 tokens: the first completion token has nothing to be scored from."""
    no_bos = NoBos(bpe_tok)
    records = [
        dict(PAIR),
        {"prompt": "", "chosen": "yes", "rejected": "no"},  # standard, empty prompt
        {"chosen": "yes it is", "rejected": "no it is not"},  # implicit, differs at the first character
    ]
    assert no_bos.encode("") == [] and no_bos.encode("a") == bpe_tok.encode("a")[1:]
    pairs, stats = tokenize_pairs(records, no_bos, DPOConfig())
    assert stats["kept"] == 1 and stats["dropped_no_prompt"] == 2
    assert pairs[0].prompt == no_bos.encode(PAIR["prompt"])
    pairs, stats = tokenize_pairs(records, bpe_tok, DPOConfig())  # BOS alone is a prompt
    assert stats["kept"] == 3 and stats["dropped_no_prompt"] == 0 and pairs[1].prompt == [bpe_tok.bos_token_id]
    path = write_jsonl(tmp_path / "d.jsonl", [dict(PAIR), records[1]])
    train, _, lines = load(no_bos, tmp_path, data=str(path))
    assert len(train) == 1 and "1 skipped with no prompt" in lines[0]


# ---------------------------------------------------------------------------
# Sources: file types, directories, splits, Hub snapshots
# ---------------------------------------------------------------------------


def records(n, offset=0):
    return [
        {"prompt": f"Repeat: w{i}. Answer:", "chosen": f" w{i}.", "rejected": f" x{i}."} for i in range(offset, offset + n)
    ]


def write_parquet(path, recs):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(recs), path)
    return path


def test_file_types_give_the_same_pairs(bpe_tok, tmp_path):
    recs = records(5)
    (tmp_path / "d.json").write_text(json.dumps(recs))
    (tmp_path / "d.jsonl.gz").write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in recs).encode()))
    (tmp_path / "lines.json").write_text("".join(json.dumps(r) + "\n" for r in recs))  # JSON Lines named .json
    write_parquet(tmp_path / "d.parquet", recs)
    write_jsonl(tmp_path / "d.jsonl", recs)
    results = [load(bpe_tok, tmp_path, data=str(tmp_path / n))[0] for n in ("d.jsonl", "d.json", "d.jsonl.gz", "lines.json", "d.parquet")]
    assert len(results[0]) == 5 and all(r == results[0] for r in results)


def test_conversational_parquet(bpe_tok, tmp_path):
    recs = [json.loads(line) for line in (EXAMPLES / "conversational.jsonl").read_text().splitlines()]
    a, _, _ = load(bpe_tok, tmp_path, data=str(write_parquet(tmp_path / "c.parquet", recs)))
    b, _, _ = load(bpe_tok, tmp_path, data=str(EXAMPLES / "conversational.jsonl"))
    assert a == b


def test_directory_splits(bpe_tok, tmp_path):
    write_jsonl(tmp_path / "d" / "train.jsonl", records(6))
    write_parquet(tmp_path / "d" / "test.parquet", records(2, 100))
    train, evals, lines = load(bpe_tok, tmp_path, data=str(tmp_path / "d"))
    assert (len(train), len(evals)) == (6, 2) and lines[1].startswith("eval: 2 pairs")
    # eval_split holds out a seeded fraction when there is no eval set
    write_jsonl(tmp_path / "e" / "train.jsonl", records(8))
    train, evals, _ = load(bpe_tok, tmp_path, data=str(tmp_path / "e"), eval_split=0.25)
    again, evals2, _ = load(bpe_tok, tmp_path / "other", data=str(tmp_path / "e"), eval_split=0.25)
    assert (len(train), len(evals)) == (6, 2) and (train, evals) == (again, evals2)
    # explicit eval_data
    path = write_jsonl(tmp_path / "extra.jsonl", records(3, 50))
    _, evals, _ = load(bpe_tok, tmp_path, data=str(tmp_path / "e"), eval_data=str(path))
    assert len(evals) == 3


def test_split_slicing(bpe_tok, tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", records(10))
    every, _, _ = load(bpe_tok, tmp_path, data=str(path))
    for spec, expected in [("train[:20%]", every[:2]), ("train[2:5]", every[2:5]), ("train[-3:]", every[-3:]),
                           ("train[50%:]", every[5:])]:
        got, _, _ = load(bpe_tok, tmp_path, data=str(path), dataset_split=spec)
        assert got == expected, spec
    assert parse_split("train[10%:20%]") == ("train", "10%", "20%")
    with pytest.raises(DataError, match="split 'train\\[1-2\\]'"):
        parse_split("train[1-2]")


def fake_hub(monkeypatch, snapshot):
    calls = []

    def download(**kwargs):
        calls.append(kwargs)
        return str(snapshot)

    monkeypatch.setattr(hubnet, "snapshot_download", download)
    return calls


def test_hub_snapshot_parquet(bpe_tok, tmp_path, monkeypatch):
    snap = tmp_path / "snapshot"
    write_parquet(snap / "data" / "train-00000-of-00002.parquet", records(4))
    write_parquet(snap / "data" / "train-00001-of-00002.parquet", records(4, 4))
    write_parquet(snap / "data" / "test-00000-of-00001.parquet", records(2, 100))
    write_parquet(snap / "data" / "train_sft-00000-of-00001.parquet", records(7, 200))  # another split
    calls = fake_hub(monkeypatch, snap)
    train, evals, _ = load(bpe_tok, tmp_path, data="org/prefs", dataset_split="train[:75%]", dataset_revision="v1")
    assert calls[0]["repo_id"] == "org/prefs" and calls[0]["repo_type"] == "dataset"
    assert calls[0]["revision"] == "v1"
    assert (len(train), len(evals)) == (6, 2)
    local = write_jsonl(tmp_path / "local.jsonl", records(8))
    assert train == load(bpe_tok, tmp_path, data=str(local))[0][:6]


def test_hub_snapshot_subsets(bpe_tok, tmp_path, monkeypatch):
    snap = tmp_path / "snapshot"
    write_jsonl(snap / "harmless" / "train.jsonl", records(3))
    write_jsonl(snap / "helpful" / "train.jsonl", records(5, 10))
    write_jsonl(snap / "helpful" / "test.jsonl", records(2, 100))
    calls = fake_hub(monkeypatch, snap)
    train, evals, _ = load(bpe_tok, tmp_path, data="org/hh", dataset_subset="helpful")
    assert (len(train), len(evals)) == (5, 2)
    assert "helpful/*" in calls[0]["allow_patterns"]
    train, _, _ = load(bpe_tok, tmp_path, data="org/hh")  # no subset: every subset's train files
    assert len(train) == 8
    with pytest.raises(DataError, match="no subset 'nope' \\(folders: harmless, helpful\\)"):
        load(bpe_tok, tmp_path, data="org/hh", dataset_subset="nope")
    with pytest.raises(DataError, match="no 'validation' split"):
        load(bpe_tok, tmp_path, data="org/hh", dataset_subset="helpful", eval_dataset_split="validation")


def test_hub_download_failure_is_a_data_error(bpe_tok, tmp_path, monkeypatch):
    def download(**kwargs):
        raise OSError("offline")

    monkeypatch.setattr(hubnet, "snapshot_download", download)
    with pytest.raises(DataError, match="'org/missing' is not a local path, and fetching it as a Hugging Face Hub dataset failed: offline"):
        load(bpe_tok, tmp_path, data="org/missing")


# ---------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------


class CountingTokenizer:
    def __init__(self, tokenizer):
        self._wrapped = tokenizer
        self.calls = 0

    def _count(self, name):
        def call(*args, **kwargs):
            self.calls += 1
            return getattr(self._wrapped, name)(*args, **kwargs)

        return call

    def __getattr__(self, name):
        if name in ("encode", "decode", "apply_chat_template"):
            return self._count(name)
        return getattr(self._wrapped, name)


def test_tokenized_data_is_cached(bpe_tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", records(6))
    tok = CountingTokenizer(bpe_tok)
    first, _, lines = load(tok, tmp_path, data=str(path), eval_split=0.5)
    assert tok.calls > 0 and "cached" not in lines[0]
    assert len(list((tmp_path / "cache" / "tokenized").glob("*.npz"))) == 1
    tok.calls = 0
    second, evals, lines = load(tok, tmp_path, data=str(path), eval_split=0.5)
    assert tok.calls == 0 and second == first and len(evals) == 3
    assert lines[0].startswith("train: 3 pairs") and "(cached: " in lines[0]
    # a setting that changes the result, or a changed file, tokenizes again
    load(tok, tmp_path, data=str(path), eval_split=0.5, max_prompt_length=4)
    assert tok.calls > 0
    tok.calls = 0
    write_jsonl(path, records(8))
    third, _, _ = load(tok, tmp_path, data=str(path), eval_split=0.5)
    assert tok.calls > 0 and len(third) == 4
    # the default cache root honours MLX_DPO_CACHE (set by conftest)
    from mlx_dpo.util.paths import cache_root

    assert data_mod.cache_path(DPOConfig(), "k") == cache_root() / "tokenized" / "k.npz"


# ---------------------------------------------------------------------------
# Bad input: clear errors naming file, line/record and field
# ---------------------------------------------------------------------------

GOOD = json.dumps(PAIR)
BAD_JSONL = {
    "malformed": ([GOOD, '{"prompt": "a", "chosen": "b",'], r"d.jsonl:2: malformed JSON"),
    "missing": ([GOOD, GOOD, json.dumps({"prompt": "a", "chosen": "b"})], r"d.jsonl:3: missing field 'rejected' \(have: chosen, prompt\)"),
    "number": ([json.dumps({**PAIR, "chosen": 3})], r"d.jsonl:1: field 'chosen' must be a string, got int"),
    "null": ([GOOD, json.dumps({**PAIR, "rejected": None})], r"d.jsonl:2: field 'rejected' must be a string, got null"),
    "empty chosen": ([json.dumps({**PAIR, "chosen": "  "})], r"d.jsonl:1: field 'chosen' is empty"),
    "empty file": (["", "  "], r"d.jsonl: empty file"),
    "not an object": (["[1, 2]"], r"d.jsonl:1: expected a JSON object, got list"),
    "unknown format": (
        [json.dumps({"question": "q", "answer": "a"})],
        r"d.jsonl:1: unknown format: found keys answer, question; expected prompt/chosen/rejected",
    ),
    "empty messages": (
        [json.dumps({"prompt": [{"role": "user", "content": "hi"}], "chosen": [], "rejected": [{"role": "assistant", "content": "x"}]})],
        r"d.jsonl:1: field 'chosen' is empty",
    ),
    "bad message": (
        [json.dumps({"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant"}], "rejected": [{"role": "assistant", "content": "x"}]})],
        r"d.jsonl:1: field 'chosen' message 0 has no 'content'",
    ),
    "mixed types": (
        [json.dumps({"prompt": [{"role": "user", "content": "hi"}], "chosen": "a", "rejected": "b"})],
        r"d.jsonl:1: field 'chosen' must be a list of messages, got str",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_JSONL))
def test_bad_jsonl(bpe_tok, tmp_path, case):
    lines, message = BAD_JSONL[case]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=message):
        load(bpe_tok, tmp_path, data=str(path))
    assert not (tmp_path / "cache").exists()  # nothing written


def test_invalid_utf8(bpe_tok, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(GOOD.encode() + b"\n" + b'{"prompt": "\xff\xfe", "chosen": "a", "rejected": "b"}\n')
    with pytest.raises(DataError, match=r"d.jsonl:2: invalid UTF-8"):
        load(bpe_tok, tmp_path, data=str(path))


def test_bad_json_and_parquet_records_are_named_by_index(bpe_tok, tmp_path):
    (tmp_path / "d.json").write_text(json.dumps([PAIR, PAIR, {**PAIR, "prompt": 7}]))
    with pytest.raises(DataError, match=r"d.json record index 2: field 'prompt' must be a string, got int"):
        load(bpe_tok, tmp_path, data=str(tmp_path / "d.json"))
    (tmp_path / "e.json").write_text('[{"a": 1')
    with pytest.raises(DataError, match=r"e.json:1: malformed JSON"):
        load(bpe_tok, tmp_path, data=str(tmp_path / "e.json"))
    (tmp_path / "f.json").write_text(json.dumps({"prompt": ["a"], "chosen": ["b"], "rejected": ["c"]}))
    with pytest.raises(DataError, match=r"f.json: expected a list of records \(or JSON Lines\), got an object with keys prompt"):
        load(bpe_tok, tmp_path, data=str(tmp_path / "f.json"))
    path = write_parquet(tmp_path / "d.parquet", [PAIR, {**PAIR, "chosen": None}])
    with pytest.raises(DataError, match=r"d.parquet record index 1: field 'chosen' must be a string, got null"):
        load(bpe_tok, tmp_path, data=str(path))


def test_missing_parquet_dependency(bpe_tok, tmp_path, monkeypatch):
    import builtins

    path = write_parquet(tmp_path / "d.parquet", [PAIR])
    real_import = builtins.__import__

    def no_pyarrow(name, *args, **kwargs):
        if name.startswith("pyarrow"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pyarrow)
    with pytest.raises(DataError, match="reading Parquet needs pyarrow"):
        load(bpe_tok, tmp_path, data=str(path))


def test_column_mapping_errors(bpe_tok, tmp_path):
    path = EXAMPLES / "stackexchange.jsonl"
    columns = {"prompt": "question", "chosen": "response_j", "rejected": "response_x"}
    with pytest.raises(DataError, match=r"stackexchange.jsonl:1: columns maps 'rejected' to 'response_x', which does not exist \(columns: date, qid, question"):
        load(bpe_tok, tmp_path, data=str(path), columns=columns)
    with pytest.raises(DataError, match=r"columns: unknown key\(s\) answer"):
        load(bpe_tok, tmp_path, data=str(path), columns={"answer": "response_j"})
    with pytest.raises(DataError, match="set `columns`"):
        load(bpe_tok, tmp_path, data=str(path))
    with pytest.raises(DataError, match=r"prompt_template must contain \{prompt\}"):
        load(bpe_tok, tmp_path, data=str(path), columns=STACKEXCHANGE["columns"], prompt_template="Q: ")


def test_missing_sources(bpe_tok, tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load(bpe_tok, tmp_path, data=str(tmp_path / "nope.jsonl"))
    (tmp_path / "d").mkdir()
    write_jsonl(tmp_path / "d" / "valid.jsonl", records(2))
    with pytest.raises(DataError, match=r"no 'train' split files \(data files found: valid.jsonl\)"):
        load(bpe_tok, tmp_path, data=str(tmp_path / "d"))
    path = write_jsonl(tmp_path / "only.jsonl", [{"prompt": "p", "chosen": " a", "rejected": " a"}])
    with pytest.raises(DataError, match="no usable training pairs"):
        load(bpe_tok, tmp_path, data=str(path))


def test_toy_data(bpe_tok, tmp_path, toy_data_dir):
    train, evals, _ = load(bpe_tok, tmp_path, data=str(toy_data_dir))
    n_train, n_valid = (len((toy_data_dir / n).read_text().splitlines()) for n in ("train.jsonl", "valid.jsonl"))
    assert (len(train), len(evals)) == (n_train, n_valid)

