"""Every loss trains inside the compiled step, selected by config alone."""

import math
import sys
import textwrap

import numpy as np
import pytest

from mlx_dpo.config import ConfigError, DPOConfig
from mlx_dpo.losses import LOSSES
from mlx_dpo.trainer import DPOTrainer

OPTIONS = {"robust": {"label_smoothing": 0.1}, "simpo": {"beta": 2.0}}


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_each_loss_trains_without_nan(loss, llama_dir, toy_data_dir, tmp_path):
    cfg = DPOConfig(model=str(llama_dir), data=str(toy_data_dir), output_dir=str(tmp_path / "run"), loss_type=loss,
                    max_steps=4, batch_size=4, learning_rate=1e-2, logging_steps=2, eval_steps=4, max_eval_batches=2,
                    progress_bar=False, **OPTIONS.get(loss, {}))
    trainer = DPOTrainer(cfg, log=lambda *a: None)
    result = trainer.train()
    last = result.history[-1]
    assert all(math.isfinite(v) for v in last.values() if isinstance(v, float)), last
    assert trainer.trace_count <= 3
    if loss in ("cpo", "orpo"):
        assert last["nll_loss"] > 0


def test_loss_mixture_and_custom_loss_from_config(llama_dir, toy_data_dir, tmp_path, monkeypatch):
    module = tmp_path / "my_losses.py"
    module.write_text(textwrap.dedent("""
        import mlx.core as mx
        def margin_loss(c, r, rc, rr, beta=0.1, **kw):
            chosen, rejected = beta * (c - rc), beta * (r - rr)
            return mx.maximum(0.0, 1.0 - (chosen - rejected)), chosen, rejected
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    for loss_type, weights in ((["sigmoid", "bco_pair"], [0.8, 0.2]), ("my_losses:margin_loss", None)):
        cfg = DPOConfig(model=str(llama_dir), data=str(toy_data_dir), output_dir=str(tmp_path / "run"),
                        overwrite_output_dir=True, loss_type=loss_type, loss_weights=weights, max_steps=2,
                        batch_size=4, learning_rate=1e-2, eval_steps=0, progress_bar=False)
        trainer = DPOTrainer(cfg, log=lambda *a: None)
        result = trainer.train()
        assert np.isfinite(result.history[-1]["loss"])
    sys.modules.pop("my_losses", None)


def test_options_a_loss_cannot_use_fail_at_config_time(llama_dir, toy_data_dir, tmp_path):
    with pytest.raises(ConfigError, match="label_smoothing"):
        DPOTrainer(DPOConfig(model=str(llama_dir), data=str(toy_data_dir), output_dir=str(tmp_path), loss_type="hinge",
                             label_smoothing=0.1), log=lambda *a: None)
    with pytest.raises(ConfigError, match="sigmoid"):
        DPOTrainer(DPOConfig(model=str(llama_dir), data=str(toy_data_dir), output_dir=str(tmp_path),
                             loss_type="sigmod"), log=lambda *a: None)
