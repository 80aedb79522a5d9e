"""report.html in a real browser: headless Chromium (Debian's ``chromium`` package; .ci/run installs
it) draws the report of a tiny run with ``generate_during_eval`` in a window of one screen, and
the screenshot, read here, shows the completions table: its header row (white text on the report's
header colour) with one cell per column of ``completions.jsonl``, the completions' text beneath."""

import json
import shutil

import numpy as np
import pytest

from mlx_dpo import DPOConfig, DPOTrainer
from mlx_dpo.analysis.report import COMPLETIONS_HEADER, report
from helpers import screenshot, spans

pytestmark = pytest.mark.skipif(shutil.which("chromium") is None,
                                reason="chromium is not installed (apt-get install chromium; .ci/run installs it)")
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


def header_colour() -> np.ndarray:
    return np.array([int(COMPLETIONS_HEADER[i:i + 2], 16) for i in (1, 3, 5)])


def completions_header(rgb):
    """``(top, bottom, cells)``: the rows of the screenshot's band in the header colour and the
    ``(left, right)`` of each header cell in it (cells are apart by the table's border spacing)."""
    fill = (np.abs(rgb.astype(int) - header_colour()) <= 2).all(-1)
    bands = spans(fill.any(1))
    assert len(bands) == 1, f"expected one header row in the header colour, found rows {bands}"
    top, bottom = bands[0]
    return top, bottom, spans(fill[top:bottom].any(0))


def test_the_completions_table_is_visible_in_chromium(run_dir, tmp_path):
    rows = [json.loads(line) for line in (run_dir / "completions.jsonl").read_text().splitlines()]
    columns = sorted({(r["model"] != "reference", r["step"], r["model"]) for r in rows})
    assert len(columns) == 3  # reference at step 1, policy at steps 1 and 2
    rgb = screenshot(report([run_dir])[0], tmp_path / "report.png", WINDOW)
    assert rgb.shape == (WINDOW[1], WINDOW[0], 3)

    top, bottom, cells = completions_header(rgb)
    assert 12 <= bottom - top <= 60, (top, bottom)  # one line of text and its padding
    assert len(cells) == 1 + len(columns), cells  # the prompt, then one per model and step
    body = rgb[bottom:bottom + 40 * len({r["prompt"] for r in rows})].astype(int)
    texts = [[r["prompt"] for r in rows]] + [[r["completion"] for r in rows if (r["model"], r["step"]) == (model, step)]
                                             for _, step, model in columns]
    for i, ((left, right), column) in enumerate(zip(cells, texts)):
        assert (rgb[top:bottom, left:right] >= 200).all(-1).sum() >= 10, f"header cell {i}: no light text on its colour"
        if any(t.strip() for t in column):  # a column of empty completions draws nothing
            assert (body[:, left:right] <= 100).all(-1).sum() >= 10, f"column {i}: no dark text beneath its header"
