"""mlx-dpo: preference fine-tuning (DPO and friends) with QLoRA on Apple's MLX."""

from .monitor.callbacks import TrainerCallback
from .config.fields import DPOConfig
from .errors import ConfigError
from .loss.losses import preference_loss
from .train.state import TrainState

__version__ = "0.1.0"


def __getattr__(name):
    # The trainer pulls in mlx-lm's model code; import it only when asked for.
    if name in ("DPOTrainer", "train", "TrainResult"):
        from .train import trainer

        return getattr(trainer, name)
    raise AttributeError(name)


__all__ = ["DPOConfig", "ConfigError", "DPOTrainer", "TrainResult", "TrainState", "TrainerCallback", "train",
           "preference_loss", "__version__"]
