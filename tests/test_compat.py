"""Files written by the mlx-dpo of before the subpackage layout (issue 27) still load and resume:
``tests/fixtures/v0_run`` holds a 2-step run directory with its checkpoints, tokenized-data cache and
reference log-prob cache, written by ``tests/fixtures/make_v0_run.py`` on main f36bddb."""

import json
import shutil
from pathlib import Path

import numpy as np

from mlx_dpo import DPOConfig, DPOTrainer
from mlx_dpo.data.cache import load_cache

FIXTURE = Path(__file__).parent / "fixtures" / "v0_run"


def test_a_run_written_before_the_layout_change_resumes_with_its_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_DPO_CACHE", str(tmp_path / "cache-root"))  # toy:llama is rebuilt there, the same
    shutil.copytree(FIXTURE, tmp_path / "v0")
    run, cache = tmp_path / "v0" / "run", tmp_path / "v0" / "cache"
    cfg = DPOConfig.from_yaml(run / "config.yaml", {"output_dir": str(run), "cache_dir": str(cache),
                                                    "resume_from_checkpoint": "latest", "max_steps": 3})
    lines = []
    trainer = DPOTrainer(cfg, log=lines.append)
    assert any(line.endswith("(step 2)") and line.startswith("resumed from") for line in lines), lines
    # the tokenized cache of then (keyed by the data files' paths, so not found here) holds the pairs tokenized now
    (cached,) = (FIXTURE / "cache" / "tokenized").glob("*.npz")
    train_pairs, eval_pairs = load_cache(cache / "tokenized" / cached.name)[:2]
    assert [(p.prompt, p.chosen, p.rejected) for p in train_pairs] == \
        [(p.prompt, p.chosen, p.rejected) for p in trainer.train_pairs] and len(eval_pairs) == len(trainer.eval_pairs)
    result = trainer.train()
    # the reference cache of then is found under today's key and used
    assert sum("reference log-probs loaded from" in line for line in lines) == 2, lines
    assert np.isfinite(result.metrics["loss"]) and result.step == 3
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
