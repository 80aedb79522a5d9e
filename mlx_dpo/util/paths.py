"""Where mlx-dpo keeps what it can rebuild: toy models and data, converted GGUF models, the
demo model, tokenized data and reference log-probs.

``MLX_DPO_CACHE`` (default ``~/.cache/mlx_dpo``) is the root; a run's ``cache_dir`` moves its
tokenized data and reference log-probs elsewhere.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional


def cache_root() -> Path:
    """``$MLX_DPO_CACHE``, else ``~/.cache/mlx_dpo``."""
    return Path(os.environ.get("MLX_DPO_CACHE", Path.home() / ".cache" / "mlx_dpo"))


def cache_subdir(cache_dir: Optional[str], name: str) -> Path:
    """``<cache_dir or cache_root()>/<name>``."""
    return (Path(cache_dir).expanduser() if cache_dir else cache_root()) / name
