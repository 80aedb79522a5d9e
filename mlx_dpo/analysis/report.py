"""Run reports: PNG plots and one self-contained ``report.html`` from what a run wrote.

Reads only ``metrics.jsonl`` and ``config.yaml`` of each run directory (plus, for the
completion-length panel, the local training data ``config.yaml`` names). Pure steps::

    runs = [read_run_records(d) for d in run_dirs]
    figures, notes = build_figures(runs)       # {name: matplotlib Figure}
    pngs = write_pngs(figures, out_dir)         # {name: path}
    write_html(runs, pngs, notes, out_dir / "report.html")

:func:`report` does all four. Several runs overlay on the same axes (label: the run
directory's name). An unpaired (KTO) run's ``rewards/chosen`` and ``rewards/rejected`` are the
desirable and undesirable rows' means (TRL's KTO names), labelled so; it has no pairs, so no
accuracy, and its margin is a difference of two means. matplotlib (``pip install "mlx-dpo[report]"``) is imported only here.
"""

from __future__ import annotations

import base64
import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import yaml

from ..monitor.callbacks import COMPLETIONS_FILE
from ..train.rundir import METRICS_FILE
from ..errors import ReportError

SMOOTHING = 0.6  # EMA weight of the previous value (TensorBoard's slider)
STEP_LABEL = "step (optimizer steps)"
COMPLETIONS_HEADER = "#1f4e79"  # the background of the completions tables' header row (white text on it)


@dataclass
class RunRecords:
    name: str
    path: Path
    records: List[dict]
    config: dict = field(default_factory=dict)
    completions: List[dict] = field(default_factory=list)  # generate_during_eval's rows
    unpaired: bool = False  # a kto / apo_zero_unpaired run (its config's loss_type)


@dataclass(frozen=True)
class Series:
    key: str
    label: str
    smooth: bool = True
    unpaired: Optional[str] = None  # its label in an unpaired run's plot ("": not drawn; None: ``label``)


@dataclass(frozen=True)
class Panel:
    title: str
    ylabel: str
    series: Tuple[Series, ...]


# One PNG per entry; each panel is one axes of that figure.
FIGURES: Dict[str, Tuple[Panel, ...]] = {
    "loss": (Panel("Loss", "loss (nats)", (Series("loss", "train"), Series("eval_loss", "eval", False))),),
    "rewards": (Panel("Implicit rewards: beta * log(pi / pi_ref)", "reward (beta x nats)",
                      (Series("rewards/chosen", "chosen", unpaired="desirable rows (rewards/chosen)"),
                       Series("rewards/rejected", "rejected", unpaired="undesirable rows (rewards/rejected)"),
                       Series("rewards/margins", "margin", unpaired="desirable mean - undesirable mean"))),),
    "accuracy": (Panel("Reward accuracy (chosen reward > rejected)", "fraction of pairs",
                       (Series("rewards/accuracies", "train", unpaired=""),
                        Series("eval_rewards/accuracies", "eval", False, unpaired=""))),),
    "logps": (Panel("Policy log-probs (both falling: the chosen likelihood is lost too)", "log-prob (nats)",
                    (Series("logps/chosen", "chosen", unpaired="desirable rows (logps/chosen)"),
                     Series("logps/rejected", "rejected", unpaired="undesirable rows (logps/rejected)"))),),
    "kl": (Panel("KTO's KL reference point (the rewards are measured against it)", "KL estimate (nats, >= 0)",
                 (Series("kl", "train"), Series("eval_kl", "eval", False))),),
    "optimizer": (Panel("Gradient norm (before clipping)", "L2 norm", (Series("grad_norm", "grad_norm"),)),
                  Panel("Learning rate", "learning rate", (Series("learning_rate", "lr", False),))),
    "speed": (Panel("Throughput", "tokens / s", (Series("tokens_per_second", "tokens/s"),)),
              Panel("Peak memory", "GB", (Series("peak_memory_gb", "peak memory", False),))),
}
UNPAIRED_ONLY = ("kl",)  # figures drawn only when an unpaired run is in the report


# ---------------------------------------------------------------------------- loading
def read_run_records(path) -> RunRecords:
    """A run directory's records (``metrics.jsonl``) and config (``config.yaml``, if any)."""
    path = Path(path)
    metrics = path / METRICS_FILE
    if not metrics.is_file():
        raise ReportError(f"{path}: no {METRICS_FILE} (is it a training run's output_dir?)")
    records = read_jsonl(metrics)
    if not records:
        raise ReportError(f"{metrics} is empty: the run has logged nothing yet (a record is written every "
                          "logging_steps)")
    config_file = path / "config.yaml"
    try:
        config = yaml.safe_load(config_file.read_text()) if config_file.is_file() else {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise ReportError(f"{config_file}{where}: not a readable YAML config ({getattr(e, 'problem', None) or e})"
                          ) from None
    completions = read_jsonl(path / COMPLETIONS_FILE) if (path / COMPLETIONS_FILE).is_file() else []
    config = config if isinstance(config, dict) else {}
    return RunRecords(path.resolve().name, path, records, config, completions, is_unpaired(config))


def is_unpaired(config: dict) -> bool:
    """Whether a run's config trains an unpaired loss (``loss.kto.UNPAIRED_LOSSES``)."""
    from ..loss.kto import UNPAIRED_LOSSES

    loss = config.get("loss_type")
    return any(name in UNPAIRED_LOSSES for name in (loss if isinstance(loss, list) else [loss]))


def read_jsonl(path: Path) -> List[dict]:
    """The JSON objects (each with a ``step``) of ``metrics.jsonl`` or ``completions.jsonl``."""
    records, text = [], path.read_text()
    lines = text.splitlines()
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines) and not text.endswith("\n"):
                break  # the last record of a killed run, cut short (every record ends with a newline)
            raise ReportError(f"{path}:{i}: not a JSON object ({e.msg})") from None
        if not isinstance(record, dict) or "step" not in record:
            raise ReportError(f"{path}:{i}: expected a JSON object with a 'step', got {line[:80]!r}")
        records.append(record)
    return records


def points(records: Sequence[dict], key: str) -> Tuple[List[float], List[float]]:
    """``(steps, values)`` of the records that have a finite number under ``key``."""
    xs, ys = [], []
    for r in records:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            xs.append(r["step"])
            ys.append(float(v))
    return xs, ys


def ema(values: Sequence[float], weight: float = SMOOTHING) -> List[float]:
    """Debiased exponential moving average (TensorBoard's smoothing)."""
    out, last = [], 0.0
    for i, v in enumerate(values, 1):
        last = weight * last + (1 - weight) * v
        out.append(last / (1 - weight ** i))
    return out


# ---------------------------------------------------------------------------- figures
def _matplotlib():
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib.figure import Figure
    except ImportError:
        raise ReportError('the report needs matplotlib: pip install "mlx-dpo[report]"') from None
    return Figure


def _style(run_index: int, series_index: int, n_series: int) -> dict:
    color = f"C{(run_index * n_series + series_index) % 10}"
    return {"color": color, "linestyle": ("-", "--", ":", "-.")[run_index % 4]}


def plot_panel(ax, panel: Panel, runs: Sequence[RunRecords]) -> bool:
    """Draw every run's series of ``panel`` on ``ax``; False when no run has any of them."""
    drawn = False
    for i, run in enumerate(runs):
        for j, s in enumerate(panel.series):
            xs, ys = points(run.records, s.key)
            name = s.unpaired if run.unpaired and s.unpaired is not None else s.label
            if not xs or not name:
                continue
            style = _style(i, j, len(panel.series))
            label = name if len(runs) == 1 else f"{run.name}: {name}"
            ax.scatter(xs, ys, s=10, alpha=0.3, color=style["color"], label="_nolegend_")
            ax.plot(xs, ema(ys) if s.smooth else ys, label=label, linewidth=1.8, marker=None if s.smooth else "o",
                    markersize=3, **style)
            drawn = True
    ax.set_title(panel.title, fontsize=10)
    ax.set_xlabel(STEP_LABEL)
    ax.set_ylabel(panel.ylabel)
    ax.grid(True, alpha=0.3)
    if drawn:
        ax.legend(fontsize=8)
    return drawn


def metric_figure(Figure, panels: Sequence[Panel], runs: Sequence[RunRecords]):
    """One figure with a row of ``panels``; None when none of them has data."""
    fig = Figure(figsize=(6.4 * len(panels), 4.2), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    drawn = [plot_panel(ax, panel, runs) for ax, panel in zip(axes, panels)]
    for ax, ok in zip(axes, drawn):
        if not ok:
            fig.delaxes(ax)
    if not any(drawn):
        return None
    fig.suptitle(", ".join(r.name for r in runs), fontsize=9, color="0.4")
    return fig


def best_eval(run: RunRecords) -> Optional[Tuple[int, str]]:
    """``(step, "eval_loss 0.61")``: the run's best evaluation by ``metric_for_best_model``, as
    its last evaluation recorded it (``best_step`` / ``best_metric``); None without one."""
    last = next((r for r in reversed(run.records) if r.get("best_step") is not None), None)
    if last is None:
        return None
    name = str(run.config.get("metric_for_best_model", "eval_loss"))
    return last["best_step"], f"{name if name.startswith('eval_') else 'eval_' + name} {last['best_metric']:.4g}"


def mark_best(fig, runs: Sequence[RunRecords]) -> None:
    """A dashed vertical line at each run's best step on the loss figure."""
    for i, run in enumerate(runs):
        best = best_eval(run)
        if best is not None:
            label = f"best: step {best[0]}" if len(runs) == 1 else f"{run.name}: best step {best[0]}"
            fig.axes[0].axvline(best[0], linestyle="--", linewidth=1, color=f"C{i}", label=label)
            fig.axes[0].legend(fontsize=8)


def build_figures(runs: Sequence[RunRecords]) -> Tuple[dict, List[str]]:
    """``({name: Figure}, notes)``: the metric figures, then the completion lengths; a note
    for each figure left out."""
    Figure = _matplotlib()
    figures, notes = {}, []
    for name, panels in FIGURES.items():
        if name in UNPAIRED_ONLY and not any(run.unpaired for run in runs):
            continue
        fig = metric_figure(Figure, panels, runs)
        if fig is None and name == "accuracy" and all(run.unpaired for run in runs):
            notes.append("accuracy: unpaired (KTO) rows have no pair to rank, so no reward accuracy; the rewards "
                         "figure shows the desirable and undesirable rows' mean rewards")
        elif fig is None:
            keys = ", ".join(s.key for p in panels for s in p.series)
            notes.append(f"{name}: no run logged any of {keys}")
        else:
            figures[name] = fig
    if "loss" in figures:
        mark_best(figures["loss"], runs)
    lengths = {run.name: completion_lengths(run.config) for run in runs}
    missing = [f"{n} ({why})" for n, (_, why) in lengths.items() if why]
    if missing:
        notes.append("lengths: no completion lengths for " + "; ".join(missing))
    found = {n: v for n, (v, why) in lengths.items() if v}
    if found:
        figures["lengths"] = length_figure(Figure, found)
    return figures, notes


# ---------------------------------------------------------------------------- training data
def _text_length(value) -> int:
    if isinstance(value, list):  # messages
        return sum(len(str(m.get("content", ""))) for m in value if isinstance(m, dict))
    return len(str(value))


def completion_lengths(config: dict) -> Tuple[Optional[dict], str]:
    """``({"chosen": [...], "rejected": [...]}, "")``: the characters of each training pair's
    completions (unpaired rows: ``desirable`` and ``undesirable``, by label), read from the local
    (or ``toy``) data ``config`` names; else ``(None, why)``."""
    from ..config.fields import DPOConfig
    from ..data import column_map, get_format, load_records

    data = config.get("data")
    if not data:
        return None, "config.yaml names no data"
    if data != "toy" and not Path(str(data)).expanduser().exists():
        return None, f"data {data} is not a local file or directory here"
    try:
        cfg = DPOConfig.from_dict(config, "config.yaml")
        rows, _ = load_records(cfg)
        mapping = column_map(cfg)
        examples = [get_format(row.format).normalize(row, mapping, cfg) for row in rows]
    except (ValueError, OSError) as e:  # ConfigError and DataError are ValueErrors
        return None, f"could not read data {data}: {e}"
    examples = [e for e in examples if isinstance(e, dict)]
    if not examples:
        return None, f"data {data} has no usable pairs"
    if "label" in examples[0]:  # unpaired rows, the completion in both "chosen" and "rejected"
        sides = {side: [_text_length(e["chosen"]) for e in examples if e["label"] == want]
                 for side, want in (("desirable", True), ("undesirable", False))}
        return {k: v for k, v in sides.items() if v}, ""
    return {k: [_text_length(e[k]) for e in examples] for k in ("chosen", "rejected")}, ""


def length_figure(Figure, lengths: Dict[str, dict]):
    """Histograms (shared bins) of chosen and rejected (or desirable and undesirable) completion
    lengths; runs on the same data are drawn once, labelled with all their names."""
    import numpy as np

    same: Dict[tuple, List[str]] = {}
    for name, lens in lengths.items():
        same.setdefault(tuple((side, tuple(v)) for side, v in lens.items()), []).append(name)
    bins = np.histogram_bin_edges([v for lens in lengths.values() for k in lens for v in lens[k]], bins=30)
    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = fig.subplots()
    for i, (data, names) in enumerate(same.items()):
        for j, (side, values) in enumerate(data):
            label = f"{side} (mean {np.mean(values):.0f})"
            label = label if len(lengths) == 1 else f"{', '.join(names)}: {label}"
            ax.hist(values, bins=bins, histtype="step", linewidth=1.8, label=label, **_style(i, j, 2))
    ax.set_title("Training data: completion lengths (a length gap is what DPO may learn)", fontsize=10)
    ax.set_xlabel("completion length (characters, before tokenization)")
    ax.set_ylabel("pairs (unpaired: rows)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return fig


# ---------------------------------------------------------------------------- output
def write_pngs(figures: dict, out_dir) -> Dict[str, Path]:
    """Each figure as ``out_dir/NAME.png``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, fig in figures.items():
        paths[name] = out_dir / f"{name}.png"
        fig.savefig(paths[name], dpi=110)
    return paths


def run_warnings(run: RunRecords) -> List[Tuple[int, str]]:
    """``(step, message)`` of every health warning recorded in the run's metrics."""
    return [(r["step"], f"{msg} [{kind}]") for r in run.records for kind, msg in (r.get("warnings") or {}).items()]


def _run_row(run: RunRecords) -> str:
    c = run.config
    best = best_eval(run)
    cells = [run.name, str(run.path), str(run.records[-1]["step"]), f"{best[0]} ({best[1]})" if best else "",
             str(c.get("loss_type", "")),
             str(c.get("beta", "")), str(c.get("learning_rate", "")), str(c.get("model", ""))]
    return "<tr>" + "".join(f"<td>{html.escape(x)}</td>" for x in cells) + "</tr>"


def completions_table(run: RunRecords) -> str:
    """``generate_during_eval``'s completions side by side: a row per prompt, the reference's,
    then the policy's at each evaluated step."""
    columns = sorted({(r["model"] != "reference", r["step"], r["model"]) for r in run.completions})
    text = {(r["prompt"], r["model"], r["step"]): r["completion"] for r in run.completions}
    prompts = list(dict.fromkeys(r["prompt"] for r in run.completions))
    esc = lambda s: html.escape(str(s))  # noqa: E731
    head = "".join(f"<th>{esc(model)} (step {step})</th>" for _, step, model in columns)
    rows = ["<tr><td>" + esc(p) + "</td>" + "".join(f"<td>{esc(text.get((p, m, s), ''))}</td>"
                                                    for _, s, m in columns) + "</tr>" for p in prompts]
    return (f"<h2>Completions: {esc(run.name)}</h2><table class='completions'><tr><th>prompt</th>{head}</tr>"
            + "".join(rows) + "</table>")


def write_html(runs: Sequence[RunRecords], pngs: Dict[str, Path], notes: Sequence[str], path) -> Path:
    """One self-contained page: the runs, health warnings, notes and every PNG (base64)."""
    path = Path(path)
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>mlx-dpo report</title>",
             "<style>body{font-family:sans-serif;margin:2em}img{max-width:100%;display:block;margin:1em 0}"
             "td,th{padding:2px 10px;text-align:left;vertical-align:top}"
             ".completions td{white-space:pre-wrap;border-top:1px solid #ddd;max-width:30em}"
             f".completions th{{background:{COMPLETIONS_HEADER};color:#fff}}</style></head><body>",
             "<h1>mlx-dpo report</h1><table><tr><th>run</th><th>path</th><th>last step</th><th>best step</th><th>loss</th>"
             "<th>beta</th><th>learning rate</th><th>model</th></tr>", *map(_run_row, runs), "</table>"]
    warnings = [(run.name, step, msg) for run in runs for step, msg in run_warnings(run)]
    if warnings:
        parts.append("<h2>Health warnings</h2><ul>")
        parts += [f"<li>{html.escape(n)} step {s}: {html.escape(m)}</li>" for n, s, m in warnings]
        parts.append("</ul>")
    parts += [completions_table(run) for run in runs if run.completions]  # before the figures: on the first screen
    if notes:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>")
    for name, png in pngs.items():
        data = base64.b64encode(Path(png).read_bytes()).decode("ascii")
        parts.append(f"<h2>{html.escape(name)}</h2><img alt='{html.escape(name)}' src='data:image/png;base64,{data}'>")
    parts.append("</body></html>")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts))
    return path


def report(run_dirs: Sequence, output=None) -> Tuple[Path, List[str]]:
    """PNGs and ``report.html`` for ``run_dirs`` in ``output`` (default: the first run's
    ``report/``); returns the HTML path and the notes."""
    if not run_dirs:
        raise ReportError("give at least one run directory")
    runs = [read_run_records(d) for d in run_dirs]
    out_dir = Path(output) if output else Path(run_dirs[0]) / "report"
    figures, notes = build_figures(runs)
    pngs = write_pngs(figures, out_dir)
    return write_html(runs, pngs, notes, out_dir / "report.html"), notes
