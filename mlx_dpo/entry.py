"""The ``mlx-dpo`` program: the CLI (:mod:`mlx_dpo.cli.commands`), with torch kept out of training processes.

mlx-lm's tokenizer loader imports transformers' ``AutoTokenizer``, which imports torch whenever
torch is installed (+180-230 MB peak RSS measured here, ``benchmarks/README.md``), though
training never calls it and mlx-lm itself needs no torch. So before anything imports mlx-lm,
``train`` and ``plan`` import it with torch hidden from transformers. This module imports
nothing that imports mlx-lm.
"""

from __future__ import annotations

import faulthandler
import os
import sys

TORCH_FREE_COMMANDS = ("train", "plan")


def import_mlx_lm_without_torch() -> bool:
    """Import mlx-lm with ``sys.modules["torch"] = None`` (its import fails, so transformers'
    availability check says no torch); True if torch was hidden. torch stays importable
    afterwards (tensorboard); only transformers' torch models are off in this process."""
    if "transformers" in sys.modules or "torch" in sys.modules:
        return False
    sys.modules["torch"] = None
    try:
        import mlx_lm  # noqa: F401  (imports transformers)
    except ImportError:  # a transformers that insists on torch: import everything normally
        for name in [m for m in sys.modules if m.split(".")[0] in ("transformers", "mlx_lm")]:
            del sys.modules[name]
        return False
    finally:
        del sys.modules["torch"]
    return True


def run() -> None:
    """``mlx-dpo ...`` (``MLX_DPO_IMPORT_TORCH=1`` keeps transformers' usual torch import)."""
    from .util.clock import mark_process_start

    mark_process_start()  # a run's reported start-up time counts from here
    faulthandler.enable()  # a fatal signal (SIGSEGV past a memory limit) prints where, not nothing
    if sys.argv[1:2] and sys.argv[1] in TORCH_FREE_COMMANDS and not os.environ.get("MLX_DPO_IMPORT_TORCH"):
        import_mlx_lm_without_torch()
    from .cli.commands import main

    main()
