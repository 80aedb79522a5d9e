"""Train the offline default once per loss and print a table of held-out figures.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 python benchmarks/loss_sweep.py [--steps 60]

For each loss: eval reward accuracy and margin before and after training, final eval loss,
whether any logged value was non-finite. Reference-free losses report rewards as beta * logps.
"""

from __future__ import annotations

import argparse
import math
import tempfile

from mlx_dpo import DPOConfig, DPOTrainer
from mlx_dpo.loss.losses import LOSSES

ALIASES = {"cdpo", "rso", "aot_pair"}
# per-loss settings a user would pick (beta scale differs between families)
OVERRIDES = {"simpo": {"beta": 2.0}, "cpo": {"beta": 0.5}, "orpo": {"beta": 0.5}, "ipo": {"beta": 0.5},
             "sigmoid_norm": {"beta": 2.0}, "robust": {"label_smoothing": 0.1}, "exo_pair": {"label_smoothing": 0.1}}


def run(loss: str, steps: int, out: str) -> dict:
    cfg = DPOConfig(model="toy:llama", data="toy", output_dir=out, overwrite_output_dir=True, loss_type=loss,
                    learning_rate=3e-3, lr_scheduler_type="cosine", warmup_steps=5, max_steps=steps, batch_size=8,
                    logging_steps=10, eval_steps=steps, progress_bar=False, seed=0, **OVERRIDES.get(loss, {}))
    trainer = DPOTrainer(cfg, log=lambda *a: None)
    before = trainer.evaluate()
    result = trainer.train()
    finite = all(math.isfinite(v) for r in result.history for v in r.values() if isinstance(v, float))
    after = result.eval_metrics
    return {"loss": loss, "acc0": before["eval_rewards/accuracies"], "acc": after["eval_rewards/accuracies"],
            "margin0": before["eval_rewards/margins"], "margin": after["eval_rewards/margins"],
            "eval_loss": after["eval_loss"], "finite": finite}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--losses", nargs="*", default=[n for n in LOSSES if n not in ALIASES])
    args = parser.parse_args()
    print("| loss_type | eval acc before | eval acc after | eval margin before | after | eval loss | finite |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for loss in args.losses:
            r = run(loss, args.steps, f"{tmp}/{loss}")
            print(f"| {r['loss']} | {r['acc0']:.3f} | {r['acc']:.3f} | {r['margin0']:.4f} | {r['margin']:.4f} | "
                  f"{r['eval_loss']:.4f} | {'yes' if r['finite'] else 'NO'} |", flush=True)


if __name__ == "__main__":
    main()
