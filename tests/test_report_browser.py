"""report.html in a real browser: headless Chromium (Debian's ``chromium`` package; .ci/run installs
it) draws the report of a tiny run with ``generate_during_eval`` in a window of one screen, and
the screenshot, read here, shows the completions table: its header row (white text on the report's
header colour) with one cell per column of ``completions.jsonl``, the completions' text beneath.
(``tests/test_real_model.py`` checks the SmolLM2 recipe's report the same way.)"""

import json

import pytest

from mlx_dpo import DPOConfig, DPOTrainer
from mlx_dpo.analysis.report import report
from helpers import CHROMIUM_MISSING, assert_completions_on_screen, screenshot

pytestmark = pytest.mark.skipif(CHROMIUM_MISSING is not None, reason=str(CHROMIUM_MISSING))
WINDOW = (1200, 700)


@pytest.fixture(scope="module")
def run_dir(llama_dir, toy_data_dir, tmp_path_factory):
    """Two steps, evaluated at each: completions of 2 prompts by the reference (step 1) and the policy (steps 1, 2)."""
    out = tmp_path_factory.mktemp("browser") / "run"
    DPOTrainer(DPOConfig(model=str(llama_dir), data=str(toy_data_dir), output_dir=str(out), max_steps=2, batch_size=4,
                         logging_steps=1, eval_steps=1, max_eval_batches=1, progress_bar=False, seed=0,
                         generate_during_eval=True, generate_eval_prompts=2, generate_max_new_tokens=8),
               log=lambda *a: None).train()
    return out


def test_the_completions_table_is_visible_in_chromium(run_dir, tmp_path):
    rows = [json.loads(line) for line in (run_dir / "completions.jsonl").read_text().splitlines()]
    assert [(r["model"], r["step"]) for r in rows] == [("reference", 1)] * 2 + [("policy", 1)] * 2 + [("policy", 2)] * 2
    rgb = screenshot(report([run_dir])[0], tmp_path / "report.png", WINDOW)
    assert rgb.shape == (WINDOW[1], WINDOW[0], 3)
    assert_completions_on_screen(rgb, rows)
