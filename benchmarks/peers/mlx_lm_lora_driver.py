"""Run mlx-lm-lora's DPO (5.10.2) on the benchmark's model and token-id pairs.

Usage (inside the mlx-lm-lora venv): ``python mlx_lm_lora_driver.py SPEC.json``.
Prints ``BENCH_RESULT {...}`` with tokens/s over the steps after warm-up.

Workarounds (driver only, the package is not patched):
- ``mx.device_info()`` has no ``max_recommended_working_set_size`` on Linux; wrapped.
- the data are token ids, so the dataset is a list of dicts in the shape
  ``iterate_dpo_batches`` reads (``chosen``/``rejected`` = prompt + completion ids).
"""

import json
import os
import sys
import time

from timing import throughput  # benchmarks/peers/timing.py (the driver's directory is on sys.path)

import mlx.core as mx

_device_info = mx.device_info


def _patched_device_info():
    info = dict(_device_info())
    info.setdefault("max_recommended_working_set_size", info.get("memory_size", 0))
    return info


mx.device_info = _patched_device_info

import mlx.optimizers as optim  # noqa: E402
from mlx_lm.tuner.utils import linear_to_lora_layers  # noqa: E402
from mlx_lm.utils import load  # noqa: E402
from mlx_lm_lora.trainer.dpo_trainer import DPOTrainingArgs, train_dpo  # noqa: E402


def main(spec_path):
    spec = json.loads(open(spec_path).read())
    os.makedirs(spec["out"], exist_ok=True)
    pairs = json.loads(open(spec["data"]).read())
    model, _ = load(spec["model"])
    ref_model, _ = load(spec["model"])
    for m in (model, ref_model):
        m.set_dtype(mx.float32)
    ref_model.freeze()
    model.freeze()
    linear_to_lora_layers(model, len(model.layers), {"rank": spec["lora_rank"], "scale": spec["lora_alpha"] / spec["lora_rank"],
                                                     "dropout": 0.0, "keys": [f"self_attn.{k}" for k in spec["targets"]]})
    data = [{"chosen": p["prompt"] + p["chosen"], "rejected": p["prompt"] + p["rejected"],
             "chosen_prompt_length": len(p["prompt"]), "rejected_prompt_length": len(p["prompt"])} for p in pairs]
    steps, warmup, bs = spec["steps"], spec["warmup"], spec["batch_size"]
    stamps = {}

    class Callback:
        def on_train_loss_report(self, info):
            stamps[info["iteration"]] = time.perf_counter()

        def on_val_loss_report(self, info):
            pass

    args = DPOTrainingArgs(batch_size=bs, iters=steps + warmup, steps_per_report=1, steps_per_eval=10 ** 9,
                           steps_per_save=10 ** 9, max_seq_length=4096, adapter_file=spec["out"] + "/adapters.safetensors",
                           beta=0.1)
    opt = optim.AdamW(learning_rate=1e-5)
    tic = time.perf_counter()
    train_dpo(model, ref_model, opt, data, None, args=args, training_callback=Callback(), loss_type="sigmoid")
    wall = time.perf_counter() - tic
    result = {**throughput(spec, stamps, wall, steps, warmup, bs), **batch_shapes(data, bs)}
    print("BENCH_RESULT " + json.dumps(result), flush=True)


def batch_shapes(data, bs):
    """Distinct padded widths and padding share of iterate_dpo_batches' batches (its rule: sorted
    by chosen length, cut into batches, chosen and rejected padded to the batch's longest)."""
    order = sorted(range(len(data)), key=lambda i: len(data[i]["chosen"]))
    widths, slots, filled = set(), 0, 0
    for k in range(0, len(order) - bs + 1, bs):
        batch = [data[i] for i in order[k: k + bs]]
        width = max(max(len(x["chosen"]), len(x["rejected"])) for x in batch)
        widths.add(width)
        slots += 2 * bs * width
        filled += sum(len(x["chosen"]) + len(x["rejected"]) for x in batch)
    return {"compiled_shapes": len(widths), "padding_fraction": 1 - filled / slots}


if __name__ == "__main__":
    main(sys.argv[1])
