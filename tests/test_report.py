"""mlx-dpo report: panels with data, valid non-blank PNGs, runs overlaid, a self-contained
HTML page, clear errors; on synthetic run directories (no training)."""

import base64
import json
import math
import re
import subprocess
import sys

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from mlx_dpo.cli.commands import main
from mlx_dpo.analysis.report import FIGURES, build_figures, ema, read_run_records, report, write_html, write_pngs
from mlx_dpo.errors import ReportError

PNG = b"\x89PNG\r\n\x1a\n"
# axes with data per figure: the two-panel figures are grad_norm + lr and tokens/s + memory
PANELS = {"loss": 1, "rewards": 1, "accuracy": 1, "logps": 1, "optimizer": 2, "speed": 2, "lengths": 1}


def fake_records(scale: float) -> list:
    records = [{"step": 0, "epoch": 0.0, "eval_loss": math.log(2), "eval_rewards/accuracies": 0.0}]
    for step in range(10, 101, 10):
        t = step / 100
        records.append({"step": step, "loss": 0.69 - 0.3 * t * scale, "rewards/chosen": -0.1 * t,
                        "rewards/rejected": -scale * t, "rewards/margins": (scale - 0.1) * t,
                        "rewards/accuracies": min(1.0, 0.5 + t), "logps/chosen": -30 - 2 * t,
                        "logps/rejected": -30 - 8 * t * scale, "grad_norm": 1 + np.sin(step), "learning_rate": 1e-3 * (1 - t),
                        "tokens_per_second": 1000 + step, "peak_memory_gb": 0.5})
        if step % 50 == 0:
            records[-1].update({"eval_loss": 0.69 - 0.25 * t * scale, "eval_rewards/accuracies": 0.5 + 0.4 * t})
    records[3]["warnings"] = {"loss_at_ln2": "loss has stayed at ln 2"}
    return records


def write_run(path, records, config=None):
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if config is not None:
        (path / "config.yaml").write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"q{i}", "chosen": "long answer " * (2 + i % 3), "rejected": "no"} for i in range(20)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def two_runs(tmp_path, data_file):
    config = {"data": str(data_file), "loss_type": "sigmoid", "beta": 0.1, "learning_rate": 1e-3}
    return [write_run(tmp_path / "beta0.1", fake_records(1.0), config),
            write_run(tmp_path / "beta0.5", fake_records(2.0), {**config, "beta": 0.5})]


def axes_with_data(fig):
    return [ax for ax in fig.axes if ax.has_data()]


def test_every_panel_is_drawn(two_runs):
    figures, notes = build_figures([read_run_records(two_runs[0])])
    assert notes == [] and set(figures) == set(FIGURES) - {"kl"} | {"lengths"}  # kl: unpaired runs only
    assert {name: len(axes_with_data(fig)) for name, fig in figures.items()} == PANELS
    for fig in figures.values():
        for ax in axes_with_data(fig):
            assert ax.get_title() and ax.get_ylabel() and ax.get_xlabel()


def test_pngs_are_valid_and_not_blank(two_runs, tmp_path):
    import matplotlib.image

    figures, _ = build_figures([read_run_records(two_runs[0])])
    paths = write_pngs(figures, tmp_path / "out")
    assert set(paths) == set(PANELS)
    for path in paths.values():
        assert path.read_bytes()[:8] == PNG
        rgb = (matplotlib.image.imread(path)[..., :3] * 255).astype(np.uint32)
        colours = np.unique(rgb[..., 0] << 16 | rgb[..., 1] << 8 | rgb[..., 2])
        assert rgb.std() > 5 and len(colours) > 20, path  # not one colour, not a near-blank canvas


def test_two_runs_overlay_with_their_names(two_runs):
    figures, _ = build_figures([read_run_records(p) for p in two_runs])
    for name, fig in figures.items():
        for ax in axes_with_data(fig):
            labels = [t.get_text() for t in ax.get_legend().get_texts()]
            assert any(label.startswith("beta0.1") for label in labels), (name, labels)
            assert any("beta0.5" in label for label in labels), (name, labels)
    loss = figures["loss"].axes[0]
    assert len(loss.get_lines()) == 4  # 2 runs x (train, eval) smoothed/eval lines
    assert all(len(ax.get_lines()) == 2 for ax in figures["optimizer"].axes)  # one series x 2 runs
    assert len(figures["rewards"].axes[0].get_lines()) == 6
    assert figures["lengths"].axes[0].get_legend().get_texts()[0].get_text().startswith("beta0.1, beta0.5: chosen")


def test_html_embeds_every_image_and_lists_warnings(two_runs, tmp_path):
    path, notes = report(two_runs, tmp_path / "out")
    text = path.read_text()
    images = re.findall(r"src='data:image/png;base64,([^']+)'", text)
    assert len(images) == len(PANELS) and all(base64.b64decode(i)[:8] == PNG for i in images)
    assert "src='http" not in text and "loss has stayed at ln 2" in text and "beta0.5" in text


def test_missing_panels_are_noted(tmp_path):
    run = write_run(tmp_path / "run", [{"step": 1, "loss": 0.6}, {"step": 2, "loss": 0.5}])
    figures, notes = build_figures([read_run_records(run)])
    assert set(figures) == {"loss"}
    assert any(n.startswith("lengths: ") and "config.yaml names no data" in n for n in notes)
    assert any(n.startswith("speed: ") for n in notes)


def test_default_output_is_the_run_report_dir(two_runs):
    path, _ = report(two_runs[:1])
    assert path == two_runs[0] / "report" / "report.html" and (two_runs[0] / "report" / "loss.png").is_file()


@pytest.mark.parametrize("content, message", [(None, "no metrics.jsonl"), ("", "is empty"),
                                              ('{"step": 1}\nnot json\n', "metrics.jsonl:2: not a JSON")])
def test_unreadable_runs_say_why(tmp_path, content, message):
    run = tmp_path / "run"
    run.mkdir()
    if content is not None:
        (run / "metrics.jsonl").write_text(content)
    with pytest.raises(ReportError, match=message):
        read_run_records(run)


def test_missing_matplotlib_says_how_to_install(two_runs, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ReportError, match=re.escape('pip install "mlx-dpo[report]"')):
        build_figures([read_run_records(two_runs[0])])


def test_ema_is_debiased():
    assert ema([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])
    assert ema([0.0, 10.0], weight=0.5) == pytest.approx([0.0, 10 * 0.5 / 0.75])


def test_cli_report(two_runs, tmp_path):
    out = tmp_path / "cli"
    result = CliRunner().invoke(main, ["report", *map(str, two_runs), "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert f"report: {out / 'report.html'}" in result.output and (out / "rewards.png").is_file()
    bad = CliRunner().invoke(main, ["report", str(tmp_path)])
    assert bad.exit_code == 2 and "no metrics.jsonl" in bad.output


def test_the_cli_starts_without_matplotlib():
    code = "import sys; import mlx_dpo.cli.commands; print('matplotlib' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"


def test_write_html_alone(tmp_path, two_runs):
    run = read_run_records(two_runs[0])
    path = write_html([run], {}, ["a note"], tmp_path / "page" / "report.html")
    assert "a note" in path.read_text() and "<td>beta0.1</td>" in path.read_text()


def test_a_last_record_cut_short_by_a_crash_is_skipped(tmp_path):
    """A killed run can leave half a line at the end of metrics.jsonl (each record ends with a newline)."""
    from mlx_dpo.analysis.report import read_run_records

    run = tmp_path / "killed"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 0.69}\n{"step": 2, "loss": 0.6}\n{"step": 3, "lo')
    assert [r["step"] for r in read_run_records(run).records] == [1, 2]


def test_the_best_step_is_marked(tmp_path):
    """The last evaluation's best_step / best_metric: a column of the runs table and a line on the loss plot."""
    records = fake_records(1.0)
    records[5].update(best_step=50, best_metric=0.5)
    records[-1].update(best_step=50, best_metric=0.5)  # the run's last evaluation
    run = write_run(tmp_path / "run", records, {"metric_for_best_model": "loss"})
    figures, _ = build_figures([read_run_records(run)])
    lines = [line for line in figures["loss"].axes[0].get_lines() if list(line.get_xdata()) == [50, 50]]
    assert [line.get_label() for line in lines] == ["best: step 50"]
    page = write_html([read_run_records(run)], {}, [], tmp_path / "report.html").read_text()
    assert "<th>best step</th>" in page and "<td>50 (eval_loss 0.5)</td>" in page


# ---------------------------------------------------------------------------------------------
# An unpaired (KTO) run: a real tiny one on the toy model
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kto_run(llama_dir, toy_data_dir, tmp_path_factory):
    """``(run_dir, history, rows)`` of 6 KTO steps (eval every 3) on 48 unpaired rows."""
    from helpers import feedback_rows
    from mlx_dpo.config.fields import DPOConfig
    from mlx_dpo.train.trainer import DPOTrainer

    tmp = tmp_path_factory.mktemp("kto_report")
    rows = feedback_rows(toy_data_dir, 64)
    data, evals = tmp / "feedback.jsonl", tmp / "feedback_eval.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows[:48]))
    evals.write_text("".join(json.dumps(r) + "\n" for r in rows[48:]))
    cfg = DPOConfig(model=str(llama_dir), data=str(data), eval_data=str(evals), output_dir=str(tmp / "kto"),
                    loss_type="kto", max_steps=6, batch_size=4, learning_rate=1e-2, logging_steps=1, eval_steps=3,
                    progress_bar=False, seed=0, cache_dir=str(tmp / "cache"))
    history = DPOTrainer(cfg, log=lambda *a: None).train().history
    return tmp / "kto", history, rows[:48]


def _legend(fig):
    return [t.get_text() for t in fig.axes[0].get_legend().get_texts()]


def test_an_unpaired_run_is_reported_by_label(kto_run):
    """rewards/chosen and rewards/rejected drawn as the desirable and undesirable rows' means, no accuracy
    (a note says why), the KL reference point, and completion lengths by label."""
    run_dir, history, rows = kto_run
    run = read_run_records(run_dir)
    assert run.unpaired
    figures, notes = build_figures([run])
    assert set(figures) == {"loss", "rewards", "logps", "kl", "optimizer", "speed", "lengths"}
    assert _legend(figures["rewards"]) == ["desirable rows (rewards/chosen)", "undesirable rows (rewards/rejected)",
                                           "desirable mean - undesirable mean"]
    assert _legend(figures["logps"]) == ["desirable rows (logps/chosen)", "undesirable rows (logps/rejected)"]
    assert any(n.startswith("accuracy: unpaired (KTO) rows have no pair to rank") for n in notes)
    kl = figures["kl"].axes[0]
    assert _legend(figures["kl"]) == ["train", "eval"]
    eval_line = [line for line in kl.get_lines() if line.get_label() == "eval"][0]  # eval: not smoothed
    want = [(r["step"], r["eval_kl"]) for r in history if "eval_kl" in r]
    assert [(int(x), y) for x, y in zip(eval_line.get_xdata(), eval_line.get_ydata())] == want and len(want) >= 2
    rewards = figures["rewards"].axes[0].collections[0].get_offsets()  # the raw points of rewards/chosen
    np.testing.assert_allclose(rewards[:, 1], [r["rewards/chosen"] for r in history if "rewards/chosen" in r])
    lengths = _legend(figures["lengths"])  # the characters of each label's completions, all 48 rows
    for side, want in (("desirable", True), ("undesirable", False)):
        mean = np.mean([len(r["completion"]) for r in rows if r["label"] is want])
        assert f"{side} (mean {mean:.0f})" in lengths
    assert len(lengths) == 2


def test_an_unpaired_run_overlaid_with_a_paired_one(kto_run, two_runs):
    """Each run's series named by its own kind; the accuracy figure holds the paired run only."""
    figures, notes = build_figures([read_run_records(kto_run[0]), read_run_records(two_runs[0])])
    rewards = _legend(figures["rewards"])
    assert "kto: desirable rows (rewards/chosen)" in rewards and "beta0.1: chosen" in rewards
    assert "kto: chosen" not in rewards and "beta0.1: desirable rows (rewards/chosen)" not in rewards
    assert _legend(figures["accuracy"]) == ["beta0.1: train", "beta0.1: eval"]
    assert _legend(figures["kl"]) == ["kto: train", "kto: eval"] and not any("accuracy" in n for n in notes)
