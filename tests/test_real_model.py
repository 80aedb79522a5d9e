"""The real-model recipe end to end: ``configs/smollm2-135m.yaml`` trains QLoRA DPO on
SmolLM2-135M-Instruct (the 4-bit GGUF from PyPI, as stored) with on-policy pairs the model
sampled itself, judged "shorter" (``examples/data/smollm2-shorter``). The oracles are the
untrained baseline (``eval_on_start``), the reference model's own answers on held-out
prompts, the in-memory model's logits (export), and mlx-lm's generator (adapters).
About 7 minutes on 2 cores (``pytest tests/test_real_model.py -s`` prints the figures)."""

import json
import os
from pathlib import Path

import numpy as np
import pytest

from helpers import CHROMIUM_MISSING, assert_completions_on_screen, screenshot

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "configs" / "smollm2-135m.yaml"
HELDOUT = ROOT / "examples" / "prompts" / "heldout.txt"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """The recipe, trained once as on a new machine: empty caches (GGUF conversion, tokenized
    data, reference log-probs); the wheel cached in MLX_DPO_DEMO_DIR or ~/.cache/mlx_dpo/demo."""
    from mlx_dpo.config.fields import DPOConfig
    from mlx_dpo.train.trainer import train

    root = tmp_path_factory.mktemp("smollm2")
    with pytest.MonkeyPatch.context() as env:  # for the whole module: the tests load the converted model
        env.setenv("MLX_DPO_DEMO_DIR", os.environ.get("MLX_DPO_DEMO_DIR")
                   or str(Path.home() / ".cache" / "mlx_dpo" / "demo"))
        env.setenv("MLX_DPO_CACHE", str(root / "cache"))
        cwd = os.getcwd()
        os.chdir(ROOT)  # the recipe's data paths are relative to the repository
        try:
            train(DPOConfig.from_yaml(RECIPE, {"output_dir": str(root / "run"), "progress_bar": False}))
        finally:
            os.chdir(cwd)
        yield root / "run"


def evaluations(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "eval_rewards/accuracies" in r]


def test_heldout_preference_accuracy_rises_from_the_untrained_baseline(run_dir):
    evals = evaluations(run_dir)
    first, last = evals[0], evals[-1]
    print("eval accuracy by step:", [(r["step"], round(r["eval_rewards/accuracies"], 3)) for r in evals])
    assert first["step"] == 0 and first["eval_rewards/accuracies"] == 0.0  # policy == reference: ties
    assert first["eval_loss"] == pytest.approx(np.log(2), abs=1e-4)
    assert last["eval_rewards/accuracies"] >= 0.75 and last["eval_loss"] < 0.6


def test_greedy_answers_on_heldout_prompts_get_shorter(run_dir):
    from mlx_dpo.generation.generate import generate, read_prompts

    results = generate(run_dir, read_prompts(HELDOUT), max_tokens=64)
    policy = np.mean([r["policy"]["tokens"] for r in results])
    reference = np.mean([r["reference"]["tokens"] for r in results])
    print(f"held-out greedy answer length: reference {reference:.1f} -> policy {policy:.1f} tokens")
    assert policy <= 0.75 * reference  # measured 27.9 -> 15.8 tokens


def test_completions_during_eval_are_the_policy_and_the_reference_answers(run_dir):
    """generate_during_eval: at step 0 (eval_on_start) the policy answers as the reference (LoRA B
    is 0); at the end, the same prompts get other answers, those of ``mlx-dpo generate`` on the
    saved run (a fresh load, its own prompt rendering); report.html shows them."""
    from mlx_dpo.analysis.report import report
    from mlx_dpo.generation.generate import generate

    rows = [json.loads(line) for line in (run_dir / "completions.jsonl").read_text().splitlines()]
    reference = [r for r in rows if r["model"] == "reference"]
    first, last = ([r for r in rows if r["model"] == "policy" and r["step"] == s] for s in (0, rows[-1]["step"]))
    assert len(reference) == len(first) == len(last) == 4 and rows[-1]["step"] > 0
    assert [r["step"] for r in reference] == [0] * 4 and [r["prompt"] for r in last] == [r["prompt"] for r in reference]
    assert [r["completion"] for r in first] == [r["completion"] for r in reference]
    assert [r["completion"] for r in last] != [r["completion"] for r in reference]
    print("completion tokens during eval, reference -> policy:", [(r["tokens"], s["tokens"]) for r, s in
                                                                  zip(reference, last)])
    heldout = [json.loads(line) for line in (ROOT / "examples/data/smollm2-shorter/heldout.jsonl").open()][:4]
    questions = [r["prompt"][-1]["content"] for r in heldout]
    assert all(r["prompt"].endswith(f"{q}\nassistant\n") for r, q in zip(last, questions))
    fresh = generate(run_dir, questions, max_tokens=64)
    assert [r["completion"].strip() for r in last] == [f["policy"]["text"].strip() for f in fresh]
    assert [r["completion"].strip() for r in reference] == [f["reference"]["text"].strip() for f in fresh]
    page = report([run_dir])[0].read_text()
    assert "<h2>Completions: run</h2>" in page and f"<th>policy (step {last[0]['step']})</th>" in page


@pytest.mark.skipif(CHROMIUM_MISSING is not None, reason=str(CHROMIUM_MISSING))
def test_the_report_shows_the_completions_in_chromium(run_dir, tmp_path):
    """report.html as headless Chromium draws it: the completions table, a column per model and
    evaluation, is on the first screen (as tests/test_report_browser.py checks on a toy run)."""
    from mlx_dpo.analysis.report import report

    rows = [json.loads(line) for line in (run_dir / "completions.jsonl").read_text().splitlines()]
    rgb = screenshot(report([run_dir], tmp_path / "report")[0], tmp_path / "report.png", (1200, 900))
    assert_completions_on_screen(rgb, rows)


def test_gguf_export_reads_back_as_the_trained_model(run_dir, tmp_path):
    """The merged float32 GGUF, read back by our loader: the logits of the in-memory model
    (4-bit base + adapters), the same greedy tokens."""
    from mlx_dpo.model.trained import TrainedRun
    from mlx_dpo.export.writers import WRITERS
    from mlx_dpo.export.verify import load_gguf, reference_outputs, verify_export

    run = TrainedRun(run_dir)
    reference = reference_outputs(run.model, run.tokenizer)
    WRITERS["gguf"].write(run, tmp_path, "float32")
    report = verify_export(tmp_path, load_gguf, reference, run.tokenizer, run.base_path)
    print("gguf export:", report)
    assert report["relative"] < 1e-5 and report["greedy_match"]


def test_mlx_lm_generates_with_the_adapters(run_dir):
    """mlx-lm's own loader and generator with ``adapter_path`` continue like our policy."""
    from mlx_lm import generate as mlx_generate
    from mlx_lm import load
    from mlx_lm.sample_utils import make_sampler

    from mlx_dpo.generation.generate import generate
    from mlx_dpo.model.loader import resolve_model_path

    prompt = "Tell me about a tornado."
    ours = generate(run_dir, [prompt], max_tokens=12)[0]["policy"]["text"]
    model, tokenizer = load(str(resolve_model_path("demo:smollm2")), adapter_path=str(run_dir))
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    theirs = mlx_generate(model, tokenizer, ids, max_tokens=12, sampler=make_sampler(0.0))
    assert theirs.strip() == ours.strip() and theirs.strip()
