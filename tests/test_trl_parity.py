"""mlx-dpo against recorded TRL 1.16 runs (tests/fixtures/trl_parity.json, written by
``benchmarks/trl_parity.py record`` with trl==1.16.0; TRL is not needed here).

Same tiny Llama, four pairs, initial LoRA, AdamW, linear schedule, 10 steps: per-step loss,
rewards/*, logps/* and grad_norm within 2e-4 relative of TRL's (issue 16)."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = json.loads((ROOT / "tests" / "fixtures" / "trl_parity.json").read_text())
TOLERANCE = 2e-4


def _harness():
    spec = importlib.util.spec_from_file_location("trl_parity", ROOT / "benchmarks" / "trl_parity.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tp = _harness()


@pytest.fixture(scope="module")
def parity_model(tmp_path_factory):
    model_dir = tp.build_model(tmp_path_factory.mktemp("parity") / "model")
    assert tp._sha(model_dir / "tokenizer.json") == FIXTURE["tokenizer_json_sha256"], "toy tokenizer changed"
    return model_dir


def test_fixture_is_from_trl_1_16():
    assert FIXTURE["trl_version"] == "1.16.0" and FIXTURE["steps"] == tp.STEPS
    assert set(FIXTURE["cases"]) == set(tp.CASES)


def test_tokenization_matches_trl(parity_model):
    """As TRL 1.16 tokenizes them: a string prompt gets the tokenizer's BOS (TRL calls
    ``tokenizer(text)``), a chat pair only the template's tokens and no EOS after the turn,
    and a token merged across the join ("Answer: " + "blue") goes to the completions."""
    records, theirs = FIXTURE["tokenize"]["records"], FIXTURE["tokenize"]["trl"]
    assert theirs[0]["prompt_ids"][0] == 1 and 1 not in theirs[1]["prompt_ids"]  # the toy tokenizer's BOS is 1
    assert tp.mlx_tokenize(parity_model, records) == theirs


def test_truncation_matches_trl(parity_model):
    """keep_start: TRL's dataset filter and collator, token for token. keep_end: the longer
    sequence of each pair is TRL's; the shorter shares its prompt, so it is the end of TRL's."""
    assert tp.mlx_truncate(parity_model, "keep_start") == FIXTURE["truncate"]["keep_start"]
    ours, theirs = tp.mlx_truncate(parity_model, "keep_end"), FIXTURE["truncate"]["keep_end"]
    assert len(ours) == len(theirs) == len(tp.TRUNCATE)  # keep_end drops nothing
    for a, b in zip(ours, theirs):
        longer = int(len(a["ids"][1]) > len(a["ids"][0]))
        assert a["ids"][longer] == b["ids"][longer] and a["completion_mask"][longer] == b["completion_mask"][longer]
        n = len(a["ids"][1 - longer])
        assert a["ids"][1 - longer] == b["ids"][1 - longer][-n:]


@pytest.mark.parametrize("name", [n for n in tp.CASES if n not in tp.EXPECTED_DIFFERENCES])
def test_per_step_metrics_match_trl(parity_model, tmp_path, name):
    diffs = tp.rel_diffs(tp.run_mlx(name, parity_model, tmp_path), FIXTURE["cases"][name])
    assert max(diffs.values()) <= TOLERANCE, diffs


@pytest.mark.parametrize("name", sorted(tp.EXPECTED_DIFFERENCES))
def test_documented_differences_differ(parity_model, tmp_path, name):
    """bco_pair (delta kept), sigmoid + label_smoothing (cDPO kept), use_weighting (WPO weights
    clamped at 1): the first step's forward pass is TRL's, the numbers are not."""
    ours, theirs = tp.run_mlx(name, parity_model, tmp_path), FIXTURE["cases"][name]
    first = tp.rel_diffs(ours[:1], theirs[:1])
    assert first["logps/chosen"] <= TOLERANCE and first["logps/rejected"] <= TOLERANCE
    assert max(tp.rel_diffs(ours, theirs).values()) > 2 * TOLERANCE


def test_wpo_clamp_is_the_only_difference(parity_model, tmp_path, monkeypatch):
    """Without the clamp (TRL 1.16's weights exp(mean aligned lp chosen + rejected)), use_weighting matches TRL."""
    import mlx.core as mx

    from mlx_dpo.loss import losses

    def unclamped(token_logps, wpo_adjust, mask):
        per_seq = ((token_logps - wpo_adjust) * mask).sum(-1) / mx.maximum(mask.sum(-1), 1.0)
        half = per_seq.shape[0] // 2
        return mx.stop_gradient(mx.exp(per_seq[:half] + per_seq[half:]))

    monkeypatch.setattr(losses, "wpo_weights", unclamped)
    diffs = tp.rel_diffs(tp.run_mlx("sigmoid+use_weighting", parity_model, tmp_path), FIXTURE["cases"]["sigmoid+use_weighting"])
    assert max(diffs.values()) <= TOLERANCE, diffs


def test_real_chat_templates_tokenize_as_trl(parity_model):
    """Qwen3 (enable_thinking false and true, reasoning_content, tools, multi-turn), Gemma 3, Phi-3.5,
    Llama 3.1 (tools) and DeepSeek-R1-Distill templates on conversational rows: our prompt and
    completion ids are TRL 1.16's own (recorded with its DPOTrainer, per-row chat_template_kwargs
    and tools), including where the prompt alone renders differently (the thinking templates)."""
    records, theirs = FIXTURE["templates"]["records"], FIXTURE["templates"]["trl"]
    assert len(records) == len(tp.TEMPLATE_RECORDS) >= 7
    ours = tp.mlx_tokenize_templates(parity_model, records)
    for (template, _), a, b in zip(records, ours, theirs):
        assert a == b, template


def test_prompts_left_short_are_counted_for_the_warning(parity_model):
    """Where TRL 1.16 leaves the end of a rendered prompt out (it warns once), our data step counts
    the pairs for its warning: the rows whose prompt, rendered by transformers alone, is longer than
    TRL's recorded prompt_ids (the DeepSeek-R1 template's '<think>' generation prompt)."""
    from mlx_lm.utils import load_tokenizer
    from transformers import AutoTokenizer

    from mlx_dpo import DPOConfig
    from mlx_dpo.data import tokenize_pairs
    from mlx_dpo.model.loader import use_chat_template

    records, theirs = FIXTURE["templates"]["records"], FIXTURE["templates"]["trl"]
    hf = AutoTokenizer.from_pretrained(parity_model)
    short = set()
    for i, ((template, row), trl) in enumerate(zip(records, theirs)):
        hf.chat_template = (tp.TEMPLATES_DIR / template).read_text()
        tools = {"tools": row["tools"]} if "tools" in row else {}
        text = hf.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True, **tools,
                                      **row.get("chat_template_kwargs", {}))
        if len(hf(text, add_special_tokens=False)["input_ids"]) > len(trl["prompt_ids"]):
            short.add(i)
        cfg = DPOConfig(chat_template=str(tp.TEMPLATES_DIR / template))
        _, stats = tokenize_pairs([dict(row)], use_chat_template(load_tokenizer(parity_model), cfg), cfg)
        assert stats.get("prompt_end_dropped", 0) == (i in short), template
    assert short  # the R1 template leaves its '<think>' out


# --------------------------------------------------------------------------- KTOTrainer (issue 30)

kto = tp.kto_harness()
KTO = FIXTURE["kto"]


def test_kto_fixture_covers_every_case():
    """Every KTO case recorded; the recording exercises what it is for: a step whose KL estimate TRL
    clamped to 0, a first step with desirable rows only (no rewards/rejected, no margin), a log
    every 5 steps."""
    assert set(KTO["cases"]) == set(kto.CASES) and KTO["records"]["rows"] == kto.ROWS
    assert any(r["kl"] == 0.0 for r in KTO["cases"]["kto"]) and any(r["kl"] > 0 for r in KTO["cases"]["kto"])
    first = KTO["cases"]["kto+desirable-only batch"][0]
    assert "rewards/chosen" in first and "rewards/rejected" not in first and "rewards/margins" not in first
    assert [r["step"] for r in KTO["cases"]["kto+logging_steps 5"]] == [5, 10]
    assert all(r["kl"] == 0.0 for r in KTO["cases"]["apo_zero_unpaired"])


def test_kto_tokenization_matches_trl(parity_model):
    """TRL 1.16's KTOTrainer rows: the string prompt with BOS, the completion with EOS, the KL
    completion the previous row's of its batch of 4 (the first row takes the batch's last); a chat
    row with only the template's tokens; a token merged across the join goes to the completion."""
    assert kto.mlx_tokenize(parity_model, KTO["records"]["rows"]) == KTO["tokenize"]["rows"]
    for record, theirs in zip(KTO["records"]["tokenize_only"], KTO["tokenize"]["tokenize_only"]):
        assert kto.mlx_tokenize(parity_model, [record]) == [theirs]


@pytest.mark.parametrize("name", [n for n in kto.CASES if n not in kto.EXPECTED_DIFFERENCES])
def test_kto_per_step_metrics_match_trl(parity_model, tmp_path, name):
    diffs = tp.rel_diffs(kto.run_mlx(name, parity_model, tmp_path), KTO["cases"][name], metrics=kto.METRICS)
    assert max(diffs.values()) <= TOLERANCE, diffs


def test_kto_without_the_kl_clamp_does_not_match_trl(parity_model, tmp_path, monkeypatch):
    """The mutation the parity test catches: a KL reference point not clamped at 0 (the estimate is
    negative at some steps) logs the wrong ``kl`` and trains differently (the gradients)."""
    from mlx_dpo.loss import kto as kto_loss
    from mlx_dpo.util import distributed

    def unclamped(kl_logps, ref_kl_logps, group=None):
        import mlx.core as mx

        return distributed.all_mean(mx.stop_gradient((kl_logps - ref_kl_logps).mean()), group)

    monkeypatch.setattr(kto_loss, "kl_reference_point", unclamped)
    diffs = tp.rel_diffs(kto.run_mlx("kto", parity_model, tmp_path), KTO["cases"]["kto"], metrics=kto.METRICS)
    assert diffs["kl"] > 100 * TOLERANCE and diffs["grad_norm"] > 2 * TOLERANCE, diffs
