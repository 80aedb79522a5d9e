"""Live experiment trackers as callbacks (TRL's ``report_to``): ``wandb`` and ``tensorboard``.

Each is imported only when asked for; a missing package is a config error with the install
line, before anything loads. Metric names follow transformers' integrations: ``train/loss``,
``eval/loss``, ... at the optimizer step.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Dict

from .callbacks import TrainerCallback
from ..config.fields import DPOConfig
from ..errors import ConfigError

# report_to name -> (modules to try, in order; the pip package to suggest)
PACKAGES = {"wandb": (("wandb",), "wandb"), "tensorboard": (("tensorboardX", "torch.utils.tensorboard"), "tensorboardX")}


def _import(name: str):
    modules, package = PACKAGES[name]
    for module in modules:
        try:
            return importlib.import_module(module)
        except ImportError:
            continue
    raise ConfigError(f"report_to: {name} needs the {package} package (pip install {package}); "
                      "or remove it from report_to")


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

    def on_train_begin(self, state) -> None:
        self.run = self.wandb.init(project=os.environ.get("WANDB_PROJECT", "mlx-dpo"), name=self.output_dir.name,
                                   config=self.cfg.to_dict(), dir=str(self.output_dir))

    def on_log(self, state, record: dict) -> None:
        if self.run is not None:
            self.run.log(scalars(record), step=state.step)

    def on_train_end(self, state) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


class TensorBoardCallback(TrainerCallback):
    """Writes every record as scalars to ``OUTPUT_DIR/runs`` (transformers' default place)."""

    def __init__(self, cfg: DPOConfig, output_dir: Path):
        self.module, self.log_dir, self.writer = _import("tensorboard"), Path(output_dir) / "runs", None

    def on_train_begin(self, state) -> None:
        self.writer = self.module.SummaryWriter(log_dir=str(self.log_dir))

    def on_log(self, state, record: dict) -> None:
        if self.writer is not None:
            for key, value in scalars(record).items():
                self.writer.add_scalar(key, value, state.step)
            self.writer.flush()

    def on_train_end(self, state) -> None:
        self.close()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


TRACKERS = {"wandb": WandbCallback, "tensorboard": TensorBoardCallback}


def tracker_callbacks(cfg: DPOConfig, output_dir: Path) -> list:
    """One callback per ``report_to`` entry (imports checked now)."""
    return [TRACKERS[name](cfg, output_dir) for name in cfg.trackers]
