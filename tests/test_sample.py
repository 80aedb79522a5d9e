"""mlx-dpo sample: judges against hand-computed scores, best-vs-worst pairs with ties skipped,
greedy batched generation against mlx-lm's single-sequence ``generate_step``, seeding, the
written file through the data loader, a run's adapters, errors and atomic output."""

import json
import math
import re

import mlx.core as mx
import pytest
from click.testing import CliRunner

from mlx_dpo.generation import sample as sample_mod
from mlx_dpo.cli.commands import main
from mlx_dpo.config.fields import DPOConfig
from mlx_dpo.data import load_records, tokenize_pairs
from mlx_dpo.generation.judges import make_judge, pick_pair, score
from mlx_dpo.errors import JudgeError, SampleError
from mlx_dpo.model.loader import load_model
from mlx_dpo.generation.sample import encode_prompt, generate_samples, sample, sample_pairs

PROMPTS = ["apple banana red", "owl", "list three fruit and two colours please", "sky sea"]


@pytest.fixture(scope="module")
def toy(llama_dir):
    model, tokenizer, _ = load_model(DPOConfig(model=str(llama_dir)))
    return model, tokenizer


@pytest.fixture()
def prompts_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


# --------------------------------------------------------------------------- judges


def test_builtin_judges_against_hand_computed_scores():
    assert make_judge("shorter")("p", "héllo wörld") == -11.0  # characters, not bytes (13)
    assert make_judge("longer")("p", "héllo wörld") == 11.0
    assert make_judge("longer")("p", "") == 0.0
    assert make_judge(r"regex:\d+\.$")("p", "It is 42.") == 1.0
    assert make_judge(r"regex:\d+\.$")("p", "42 it is.") == 0.0
    assert make_judge("regex:^[A-Z]")("p", "yes") == 0.0
    assert make_judge("contains:fox")("p", "a quick fox") == 1.0
    assert make_judge("contains:fox")("p", "a quick Fox") == 0.0
    assert make_judge("contains:a:b")("p", "xa:by") == 1.0  # the text may hold ':'


def test_pick_pair_is_first_best_against_first_worst_and_none_on_a_tie():
    assert pick_pair([1.0, 3.0, 3.0, 0.0]) == (1, 3)
    assert pick_pair([0.0, -1.0, 5.0, -1.0]) == (2, 1)
    assert pick_pair([2.0, 2.0, 2.0]) is None
    assert pick_pair([-3.0, -2.0]) == (1, 0)


def test_user_judge_from_a_file_and_a_module(tmp_path, monkeypatch):
    (tmp_path / "my_judges.py").write_text(
        "def count_a(prompt, completion):\n    return completion.count('a') - len(prompt)\n")
    judge = make_judge(f"{tmp_path / 'my_judges.py'}:count_a")
    assert judge("xy", "banana") == 1  # 3 a's minus 2
    monkeypatch.syspath_prepend(str(tmp_path))
    assert make_judge("my_judges:count_a")("", "aa") == 2


@pytest.mark.parametrize("spec, message", [
    ("shortr", "did you mean 'shorter'"),
    ("shorter:3", "takes no argument"),
    ("regex:", "needs an argument"),
    ("regex:(", "invalid regular expression"),
    ("no_such_module_xyz:f", "cannot import no_such_module_xyz"),
    ("missing/judge.py:f", "missing/judge.py does not exist"),
    ("os.path:no_such_function", "has no function 'no_such_function'"),
    (":f", "expected module:function"),
])
def test_bad_judge_specs_name_the_problem(spec, message):
    with pytest.raises(JudgeError, match=message.replace("(", r"\(")):
        make_judge(spec)


def test_a_judge_that_fails_or_returns_no_number_is_named(tmp_path):
    (tmp_path / "broken.py").write_text("raise RuntimeError('boom')\n")
    with pytest.raises(JudgeError, match="importing .*broken.py failed .RuntimeError: boom"):
        make_judge(f"{tmp_path / 'broken.py'}:f")
    for value in (math.nan, math.inf, "1", None, True):
        with pytest.raises(JudgeError, match="prompt 3, sample 1: the judge returned"):
            score(lambda p, c, v=value: v, "p", "c", "prompt 3, sample 1")
    with pytest.raises(JudgeError, match="the judge failed .ZeroDivisionError"):
        score(lambda p, c: 1 / 0, "p", "c", "prompt 0, sample 0")


# --------------------------------------------------------------------------- pairs


def test_pairs_are_best_against_worst_with_ties_skipped(toy, monkeypatch):
    """A deterministic fake generator: the texts per prompt are fixed, so the pairs are known."""
    model, tokenizer = toy
    texts = [["aaa", "a", "aaaaa"], ["bb", "cc", "dd"], ["x", "yy", "z"]]

    def fake(model, tokenizer, prompt_ids, k, sampler, max_tokens, batch_size, on_prompt_done):
        assert k == 3 and len(prompt_ids) == 3
        tokens = [[tokenizer.encode(t, add_special_tokens=False) for t in row] for row in texts]
        return tokens, [[True] * k for _ in texts], type("Stats", (), {"wall_time": 2.0, "peak_memory": 0.0})()

    monkeypatch.setattr(sample_mod, "generate_samples", fake)
    records, summary = sample_pairs(model, tokenizer, ["p0", "p1", "p2"], "shorter", num_samples=3)
    user = lambda p: [{"role": "user", "content": p}]  # noqa: E731
    reply = lambda t: [{"role": "assistant", "content": t}]  # noqa: E731
    assert records == [
        {"prompt": user("p0"), "chosen": reply("a"), "rejected": reply("aaaaa"), "score_chosen": -1.0,
         "score_rejected": -5.0},
        {"prompt": user("p2"), "chosen": reply("x"), "rejected": reply("yy"), "score_chosen": -1.0,
         "score_rejected": -2.0},
    ]
    assert (summary["prompts"], summary["samples"], summary["pairs"], summary["ties"]) == (3, 9, 2, 1)
    n_tokens = [len(tokenizer.encode(t, add_special_tokens=False)) for t in ("a", "aaaaa", "x", "yy")]
    assert summary["mean_chosen_tokens"] == (n_tokens[0] + n_tokens[2]) / 2
    assert summary["mean_rejected_tokens"] == (n_tokens[1] + n_tokens[3]) / 2
    total = sum(len(tokenizer.encode(t, add_special_tokens=False)) for row in texts for t in row)
    assert summary["generated_tokens"] == total and summary["tokens_per_sec"] == total / 2.0


def test_without_a_chat_template_pairs_are_plain_strings(toy, monkeypatch):
    model, tokenizer = toy
    fake = lambda m, tok, ids, k, *a: ([[tok.encode(t, add_special_tokens=False) for t in ("ab", "a")]],  # noqa: E731
                                       [[True, True]], type("S", (), {"wall_time": 1.0, "peak_memory": 0.0})())
    monkeypatch.setattr(sample_mod, "generate_samples", fake)
    monkeypatch.setattr(tokenizer._tokenizer, "chat_template", None)
    records, _ = sample_pairs(model, tokenizer, ["Q: hi\nA:"], "longer", num_samples=2)
    assert records == [{"prompt": "Q: hi\nA:", "chosen": "ab", "rejected": "a", "score_chosen": 2.0,
                        "score_rejected": 1.0}]
    assert encode_prompt("Q: hi", tokenizer, "")[0] == tokenizer.encode("Q: hi")  # with special tokens, as training
    with pytest.raises(SampleError, match="prompt 0: conversational data .* has none: set chat_template"):
        sample_pairs(model, tokenizer, [[{"role": "user", "content": "hi"}]], "longer", num_samples=2)


def greedy_oracle(model, tokenizer, ids, max_tokens):
    """One sequence with mlx-lm's own ``generate_step`` (no batching, no padding)."""
    from mlx_lm.generate import generate_step

    out = []
    for token, _ in generate_step(mx.array(ids), model, max_tokens=max_tokens):
        if token in tokenizer.eos_token_ids:
            break
        out.append(int(token))
    return out


def test_batched_greedy_generation_equals_mlx_lm_single_sequence(toy):
    """Prompts of different lengths share a batch (padding), 2 samples each; a token the
    model emits early is made an extra EOS, so stopping is exercised too."""
    model, tokenizer = toy
    ids = [encode_prompt(p, tokenizer, "")[0] for p in PROMPTS]
    assert len({len(i) for i in ids}) > 2
    first = greedy_oracle(model, tokenizer, ids[0], 12)
    stop = next(j for j in range(3, 12) if first[j] not in first[:j])
    eos = set(tokenizer.eos_token_ids)
    tokenizer.eos_token_ids = eos | {first[stop]}
    try:
        expected = [greedy_oracle(model, tokenizer, i, 12) for i in ids]
        tokens, finished, _ = generate_samples(model, tokenizer, ids, 2, None, 12, batch_size=8)
    finally:
        tokenizer.eos_token_ids = eos
    assert len(expected[0]) == stop  # stopped at the extra EOS
    assert tokens == [[e, e] for e in expected]
    assert finished == [[len(e) < 12] * 2 for e in expected]


def test_temperature_zero_ties_every_prompt_and_writes_nothing(llama_dir, prompts_file, tmp_path):
    out = tmp_path / "pairs.jsonl"
    result = sample(prompts_file, out, "shorter", model=str(llama_dir), num_samples=2, temperature=0.0,
                    max_tokens=6)
    assert (result["pairs"], result["ties"], result["output"]) == (0, len(PROMPTS), None)
    assert not out.exists()
    text = sample_mod.format_summary(result)
    assert "0 pairs written, 4 ties skipped" in text and "temperature 0" in text and "no file written" in text


def test_same_seed_same_file_other_seed_other_file(llama_dir, prompts_file, tmp_path):
    files = {}
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        files[name] = tmp_path / f"{name}.jsonl"
        result = sample(prompts_file, files[name], "longer", model=str(llama_dir), num_samples=3, seed=seed,
                        max_tokens=8, batch_size=5)
        assert result["pairs"] == len(PROMPTS)  # random toy tokens: lengths differ
    assert files["a"].read_bytes() == files["b"].read_bytes()
    assert files["a"].read_bytes() != files["c"].read_bytes()


def test_written_pairs_load_as_a_preference_dataset(llama_dir, toy, tmp_path):
    """Conversational prompts (a system message) and string prompts; the data loader reads the
    file, and the prompt tokens training sees are the ones the samples were generated after
    (the oracle: transformers' own ``apply_chat_template(tokenize=True)``)."""
    model, tokenizer = toy
    prompts = tmp_path / "prompts.jsonl"
    chat = [{"role": "system", "content": "Be brief. Ünïcode ✓"}, {"role": "user", "content": "owl sky"}]
    prompts.write_text(json.dumps({"prompt": chat}) + "\n" + json.dumps({"prompt": "red fox", "id": 7}) + "\n")
    out = tmp_path / "pairs.jsonl"
    result = sample(prompts, out, "shorter", model=str(llama_dir), num_samples=4, max_tokens=8, seed=1)
    assert result["pairs"] == 2
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert records[0]["prompt"] == chat and records[1]["prompt"] == [{"role": "user", "content": "red fox"}]
    cfg = DPOConfig(model=str(llama_dir), data=str(out))
    rows, _ = load_records(cfg)
    pairs, stats = tokenize_pairs(rows, tokenizer, cfg)
    assert stats["kept"] == 2 and [r.format for r in rows] == ["conversational"] * 2
    for pair, record in zip(pairs, records):
        expected = tokenizer._tokenizer.apply_chat_template(record["prompt"], add_generation_prompt=True)
        assert pair.prompt == list(expected["input_ids"])
        assert tokenizer.decode(pair.chosen).startswith(record["chosen"][0]["content"])
        assert record["score_chosen"] == -len(record["chosen"][0]["content"]) > record["score_rejected"]


@pytest.fixture(scope="module")
def run_dir(llama_dir, tmp_path_factory):
    """A toy run of 4 steps (lr high enough to move greedy tokens)."""
    from mlx_dpo.model.toy import toy_pairs, write_jsonl
    from mlx_dpo.train.trainer import DPOTrainer

    tmp = tmp_path_factory.mktemp("sample_run")
    write_jsonl(tmp / "pairs.jsonl", toy_pairs(16))
    cfg = DPOConfig(model=str(llama_dir), data=str(tmp / "pairs.jsonl"), output_dir=str(tmp / "run"), max_steps=4,
                    batch_size=4, learning_rate=1e-2, logging_steps=4, progress_bar=False, seed=0)
    DPOTrainer(cfg).train()
    return tmp / "run"


def test_adapter_path_samples_from_the_trained_adapters(run_dir, llama_dir, prompts_file, tmp_path):
    """Greedy tokens with the run's adapters equal mlx-lm's with those adapters (mlx_lm.load
    with adapter_path), and differ from the base model's."""
    from mlx_lm import load

    from mlx_dpo.model.trained import load_adapter_run

    run = load_adapter_run(run_dir)
    ids = [encode_prompt(p, run.tokenizer, "")[0] for p in PROMPTS]
    tokens, _, _ = generate_samples(run.model, run.tokenizer, ids, 2, None, 8, batch_size=8)
    adapted, tok = load(str(llama_dir), adapter_path=str(run_dir))
    assert tokens == [[greedy_oracle(adapted, tok, i, 8)] * 2 for i in ids]
    base, _ = load(str(llama_dir))
    assert any(t[0] != greedy_oracle(base, tok, i, 8) for t, i in zip(tokens, ids))
    outs = []
    for name, adapter in (("base", None), ("run", str(run_dir))):
        outs.append(tmp_path / f"{name}.jsonl")
        sample(prompts_file, outs[-1], "longer", model=None if adapter else str(llama_dir), adapter_path=adapter,
               num_samples=2, max_tokens=8, seed=0)
    assert outs[0].read_text() != outs[1].read_text()


# --------------------------------------------------------------------------- command line and errors


def test_cli_writes_pairs_and_refuses_to_overwrite(llama_dir, prompts_file, tmp_path):
    out = tmp_path / "pairs.jsonl"
    args = ["sample", "--model", str(llama_dir), "--prompts", str(prompts_file), "-k", "2", "--judge", "longer",
            "-o", str(out), "--max-tokens", "6", "--seed", "5"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    found = re.search(r"4 prompts x 2 samples: (\d) pairs written, (\d) ties skipped", result.output)
    assert found and int(found[1]) + int(found[2]) == 4 and "tokens/s" in result.output, result.output
    first = out.read_text()
    assert len(first.splitlines()) == int(found[1]) > 0
    result = CliRunner().invoke(main, args + ["--seed", "6"])
    assert result.exit_code == 2 and "already exists; pass --overwrite" in result.output
    assert out.read_text() == first
    result = CliRunner().invoke(main, args + ["--seed", "6", "--overwrite"])
    assert result.exit_code == 0 and out.read_text() != first
    result = CliRunner().invoke(main, args[:-2] + ["--temperature", "0", "--overwrite", "-o", str(tmp_path / "t.jsonl")])
    assert result.exit_code == 1 and "no file written" in result.output


@pytest.mark.parametrize("change, message", [
    ({"prompts": "missing.txt"}, "prompts file .*missing.txt does not exist"),
    ({"judge": "longr"}, "did you mean 'longer'"),
    ({"num_samples": 1}, "num_samples must be an integer >= 2"),
    ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
    ({"temperature": -1.0}, "temperature must be >= 0"),
    ({"model": None}, "pass --model"),
    ({"adapter_path": "no_run_here"}, "run directory no_run_here does not exist"),
])
def test_errors_name_the_input_and_write_nothing(llama_dir, prompts_file, tmp_path, change, message):
    out = tmp_path / "pairs.jsonl"
    kwargs = {"prompts": prompts_file, "output": out, "judge": "longer", "model": str(llama_dir), "max_tokens": 4}
    kwargs.update(change)
    if "prompts" in change:
        kwargs["prompts"] = tmp_path / change["prompts"]
    with pytest.raises((SampleError, JudgeError), match=message):
        sample(**kwargs)
    assert list(tmp_path.iterdir()) == [prompts_file]


def test_a_failing_judge_keeps_the_old_output(llama_dir, prompts_file, tmp_path):
    out = tmp_path / "pairs.jsonl"
    out.write_text("old\n")
    calls = []

    def flaky(prompt, completion):
        calls.append(prompt)
        if len(calls) == 5:
            raise ValueError("judge server down")
        return len(completion)

    with pytest.raises(JudgeError, match="prompt 2, sample 0: the judge failed .ValueError: judge server down"):
        sample(prompts_file, out, flaky, model=str(llama_dir), num_samples=2, max_tokens=4, overwrite=True)
    assert out.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["pairs.jsonl", "prompts.txt"]
    result = CliRunner().invoke(main, ["sample", "--model", str(llama_dir), "--prompts", str(tmp_path / "nope.txt"),
                                       "--judge", "shorter", "-o", str(tmp_path / "x.jsonl")])
    assert result.exit_code == 2 and "nope.txt does not exist" in result.output


def test_prompts_file_with_messages_and_bad_records(tmp_path):
    from mlx_dpo.errors import DataError
    from mlx_dpo.generation.generate import read_prompts

    path = tmp_path / "p.jsonl"
    chat = [{"role": "user", "content": "hi"}]
    path.write_text(json.dumps({"prompt": chat}) + "\n" + json.dumps({"prompt": "plain"}) + "\n")
    assert read_prompts(path, messages=True) == [chat, "plain"]
    with pytest.raises(DataError, match="p.jsonl:1: expected an object with a 'prompt' string$"):
        read_prompts(path)  # mlx-dpo generate takes strings only
    path.write_text(json.dumps({"prompt": [{"role": "robot", "content": "hi"}]}) + "\n")
    with pytest.raises(DataError, match="p.jsonl:1: field 'prompt' message 0 has role 'robot'"):
        read_prompts(path, messages=True)
