"""Settings that are valid but would do nothing in this run, or differ from TRL on purpose:
one line each.

(Settings that cannot work are errors in :mod:`mlx_dpo.config.fields`; these are the ones where the run
is still meaningful, so it goes on, and says so.)
"""

from __future__ import annotations

from typing import Callable

from ..config.fields import DPOConfig
from ..loss.losses import trl_notes


def warn_unused_settings(cfg: DPOConfig, has_eval: bool, total_steps: int, warmup: int,
                         log: Callable[[str], None]) -> None:
    for note in trl_notes(cfg):  # where we follow the paper rather than TRL
        log(f"note: {note}")
    if cfg.truncation_mode == "keep_end" and cfg.max_length is not None:
        log("note: truncation_mode keep_end cuts the prompt's start so the longer completion fits, the same "
            "prompt tokens for chosen and rejected (TRL 1.16 cuts each sequence on its own, and deprecates keep_end)")
    if (cfg.eval_mode != "no" or cfg.eval_on_start) and not has_eval:
        log(f"warning: eval_strategy is {cfg.eval_mode!r} but there is no eval data (set eval_data, "
            "eval_dataset_split or eval_split); nothing will be evaluated")
    if warmup >= total_steps:
        log(f"warning: warmup ({warmup} steps) is not shorter than the run ({total_steps} steps): "
            "the learning rate never reaches learning_rate; lower warmup_steps/warmup_ratio")
