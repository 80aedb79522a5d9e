"""Live experiment trackers as callbacks (TRL's ``report_to``): ``wandb``, ``tensorboard``, ``mlflow``
and ``trackio``.

Each is imported only when asked for; a missing package is a config error with the install
line, before anything loads. Metric names follow transformers' integrations: ``train/loss``,
``eval/loss``, ... at the optimizer step.
"""

from __future__ import annotations

import importlib
import os
import time
from pathlib import Path
from typing import Dict

from .callbacks import TrainerCallback
from ..config.fields import DPOConfig
from ..errors import ConfigError
from ..util.io import unwritable_ancestor

# report_to name -> (modules to try, in order; the pip package to suggest)
PACKAGES = {"wandb": (("wandb",), "wandb"), "tensorboard": (("tensorboardX", "torch.utils.tensorboard"), "tensorboardX"),
            "mlflow": (("mlflow",), "mlflow"), "trackio": (("trackio",), "trackio")}
MLFLOW_PARAM_LENGTH = 500  # longer config values (a chat template) are cut to this in the run's params


def _import(name: str):
    modules, package = PACKAGES[name]
    for module in modules:
        try:
            return importlib.import_module(module)
        except ImportError:
            continue
    raise ConfigError(f"report_to: {name} needs the {package} package (pip install {package}); "
                      "or remove it from report_to")


def check_log_dir(path: Path, name: str) -> None:
    """Refuse now, before anything is loaded or an old run is removed, a tracker directory that
    cannot be written (or that a file or link stands in for)."""
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise ConfigError(f"report_to: {name} writes to {path}, which is not a directory; remove it")
    blocked = unwritable_ancestor(path)
    if blocked is not None:
        raise ConfigError(f"report_to: {name} writes to {path}, but {blocked} is not writable (fix its permissions, "
                          "choose another output_dir, or remove it from report_to)")


def wandb_credentials() -> bool:
    """Whether wandb can start without asking: an API key in ``WANDB_API_KEY`` or ``~/.netrc``
    (what ``wandb login`` writes), or a mode that needs none (``WANDB_MODE=offline|disabled``)."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun"):
        return True
    try:
        import netrc

        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


COMPLETION_COLUMNS = ("step", "model", "prompt", "completion")


def completion_rows(rows: list) -> list:
    """``generate_during_eval``'s rows as lists in :data:`COMPLETION_COLUMNS` order (a table's data)."""
    return [[r[k] for k in COMPLETION_COLUMNS] for r in rows]


def completions_markdown(rows: list) -> str:
    """``generate_during_eval``'s rows as a Markdown table (TensorBoard's text panel)."""
    cell = lambda v: str(v).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = ["| " + " | ".join(COMPLETION_COLUMNS) + " |", "|" + "---|" * len(COMPLETION_COLUMNS)]
    return "\n".join(lines + ["| " + " | ".join(cell(r[k]) for k in COMPLETION_COLUMNS) + " |" for r in rows])


def scalars(record: dict) -> Dict[str, float]:
    """Numeric entries of a logged record under transformers' names (``eval_loss`` -> ``eval/loss``)."""
    out = {}
    for key, value in record.items():
        if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        out[f"eval/{key[5:]}" if key.startswith("eval_") else f"train/{key}"] = float(value)
    return out


class WandbCallback(TrainerCallback):
    """Logs every record to a Weights & Biases run (project ``$WANDB_PROJECT`` or ``mlx-dpo``)."""

    def __init__(self, cfg: DPOConfig, output_dir: Path):
        self.wandb, self.cfg, self.output_dir, self.run = _import("wandb"), cfg, Path(output_dir), None
        if not wandb_credentials():
            raise ConfigError("report_to: wandb has no API key (run `wandb login`, set WANDB_API_KEY, or "
                              "WANDB_MODE=offline to log locally)")
        check_log_dir(self.output_dir / "wandb", "wandb")

    def on_train_begin(self, state) -> None:
        self.run = self.wandb.init(project=os.environ.get("WANDB_PROJECT", "mlx-dpo"), name=self.output_dir.name,
                                   config=self.cfg.to_dict(), dir=str(self.output_dir))

    def on_log(self, state, record: dict) -> None:
        if self.run is not None:
            self.run.log(scalars(record), step=state.step)

    def on_completions(self, state, rows: list) -> None:
        if self.run is not None:
            table = self.wandb.Table(columns=list(COMPLETION_COLUMNS), data=completion_rows(rows))
            self.run.log({"completions": table}, step=state.step)

    def on_train_end(self, state) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


class TensorBoardCallback(TrainerCallback):
    """Writes every record as scalars to ``OUTPUT_DIR/runs`` (transformers' default place)."""

    def __init__(self, cfg: DPOConfig, output_dir: Path):
        self.module, self.log_dir, self.writer = _import("tensorboard"), Path(output_dir) / "runs", None
        check_log_dir(self.log_dir, "tensorboard")

    def on_train_begin(self, state) -> None:
        self.writer = self.module.SummaryWriter(log_dir=str(self.log_dir))

    def on_log(self, state, record: dict) -> None:
        if self.writer is not None:
            for key, value in scalars(record).items():
                self.writer.add_scalar(key, value, state.step)
            self.writer.flush()

    def on_completions(self, state, rows: list) -> None:
        if self.writer is not None:
            self.writer.add_text("completions", completions_markdown(rows), state.step)
            self.writer.flush()

    def on_train_end(self, state) -> None:
        self.close()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class MLflowCallback(TrainerCallback):
    """Logs the config as params, every record as metrics and each evaluation's completions as a
    table (``completions/step-N.json``) to an MLflow run (transformers' environment names):
    ``$MLFLOW_TRACKING_URI``, else a local store in ``OUTPUT_DIR/mlflow.db`` with its artifacts in
    ``OUTPUT_DIR/mlartifacts`` (MLflow 3 keeps the ``./mlruns`` file store in maintenance mode);
    experiment ``$MLFLOW_EXPERIMENT_NAME`` or ``mlx-dpo``; the run is named after ``output_dir``."""

    def __init__(self, cfg: DPOConfig, output_dir: Path):
        self.mlflow, self.cfg, self.output_dir, self.run_id = _import("mlflow"), cfg, Path(output_dir), None
        given, local = os.environ.get("MLFLOW_TRACKING_URI"), self.output_dir.resolve()
        self.uri = given or f"sqlite:///{local / 'mlflow.db'}"
        # the local store's artifacts beside it (MLflow's default is ./mlruns in the working directory)
        self.artifacts = None if given else (local / "mlartifacts").as_uri()
        self.client = None

    def on_train_begin(self, state) -> None:
        entities = self.mlflow.entities
        self.client = self.mlflow.MlflowClient(tracking_uri=self.uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "mlx-dpo")
        found = self.client.get_experiment_by_name(name)
        experiment = found.experiment_id if found else self.client.create_experiment(name, self.artifacts)
        self.run_id = self.client.create_run(experiment, run_name=self.output_dir.name).info.run_id
        params = [entities.Param(k, str(v)[:MLFLOW_PARAM_LENGTH]) for k, v in self.cfg.to_dict().items()]
        self.client.log_batch(self.run_id, params=params)

    def on_log(self, state, record: dict) -> None:
        if self.run_id is not None:
            now = int(time.time() * 1000)
            metrics = [self.mlflow.entities.Metric(k, v, now, state.step) for k, v in scalars(record).items()]
            self.client.log_batch(self.run_id, metrics=metrics)

    def on_completions(self, state, rows: list) -> None:
        if self.run_id is not None:
            columns = {k: [r[k] for r in rows] for k in COMPLETION_COLUMNS}
            self.client.log_table(self.run_id, columns, f"completions/step-{state.step}.json")

    def on_train_end(self, state) -> None:
        self._end("FINISHED")

    def close(self) -> None:
        self._end("FAILED")  # still open: training raised

    def _end(self, status: str) -> None:
        if self.run_id is not None:
            self.client.set_terminated(self.run_id, status=status)
            self.run_id = None


class TrackioCallback(TrainerCallback):
    """Logs every record, and each evaluation's completions as a table (``completions``), to a
    trackio run (project ``$TRACKIO_PROJECT`` or ``mlx-dpo``, named after ``output_dir``), in
    trackio's local store (``$TRACKIO_DIR``, by default in the Hugging Face cache); no
    system-metrics thread."""

    def __init__(self, cfg: DPOConfig, output_dir: Path):
        self.trackio, self.cfg, self.output_dir, self.running = _import("trackio"), cfg, Path(output_dir), False

    def on_train_begin(self, state) -> None:
        self.trackio.init(project=os.environ.get("TRACKIO_PROJECT", "mlx-dpo"), name=self.output_dir.name,
                          config=self.cfg.to_dict(), auto_log_cpu=False, auto_log_gpu=False)
        self.running = True

    def on_log(self, state, record: dict) -> None:
        if self.running:
            self.trackio.log(scalars(record), step=state.step)

    def on_completions(self, state, rows: list) -> None:
        if self.running:
            table = self.trackio.Table(columns=list(COMPLETION_COLUMNS), data=completion_rows(rows))
            self.trackio.log({"completions": table}, step=state.step)

    def on_train_end(self, state) -> None:
        self.close()

    def close(self) -> None:
        if self.running:
            self.running = False
            self.trackio.finish()


TRACKERS = {"wandb": WandbCallback, "tensorboard": TensorBoardCallback, "mlflow": MLflowCallback,
            "trackio": TrackioCallback}


def tracker_callbacks(cfg: DPOConfig, output_dir: Path) -> list:
    """One callback per ``report_to`` entry (imports checked now)."""
    return [TRACKERS[name](cfg, output_dir) for name in cfg.trackers]
