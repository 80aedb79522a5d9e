"""Run TRL's DPOTrainer (1.16) + PEFT LoRA on the benchmark's model and token-id pairs.

Usage (inside the TRL venv): ``python trl_driver.py SPEC.json``. Prints
``BENCH_RESULT {...}`` with tokens/s over the steps after warm-up.

The data are already token ids (``prompt_ids``/``chosen_ids``/``rejected_ids``), so
the driver skips TRL's text tokenization (``_prepare_dataset`` returns the dataset).
float32, CPU, no gradient checkpointing (TRL's default is on), reference = adapters off.
"""

import json
import sys
import time

from timing import throughput  # benchmarks/peers/timing.py (the driver's directory is on sys.path)

import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import DPOConfig, DPOTrainer


def main(spec_path):
    spec = json.loads(open(spec_path).read())
    pairs = json.loads(open(spec["data"]).read())
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(spec["model"], torch_dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(spec["model"])
    ds = Dataset.from_list([{"prompt_ids": p["prompt"], "chosen_ids": p["chosen"], "rejected_ids": p["rejected"]}
                            for p in pairs])
    DPOTrainer._prepare_dataset = lambda self, dataset, *a, **k: dataset
    steps, warmup, bs = spec["steps"], spec["warmup"], spec["batch_size"]
    stamps = {}

    class Timer(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            stamps[state.global_step] = time.perf_counter()

    args = DPOConfig(output_dir=spec["out"], per_device_train_batch_size=bs, max_steps=steps + warmup,
                     learning_rate=1e-5, logging_steps=10 ** 6, save_strategy="no", report_to=[], use_cpu=True,
                     bf16=False, fp16=False, gradient_checkpointing=False, dataloader_num_workers=0,
                     precompute_ref_log_probs=spec.get("precompute", False), max_length=None, beta=0.1,
                     disable_tqdm=True)
    lora = LoraConfig(r=spec["lora_rank"], lora_alpha=spec["lora_alpha"], lora_dropout=0.0,
                      target_modules=spec["targets"], task_type="CAUSAL_LM")
    trainer = DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, peft_config=lora,
                         callbacks=[Timer()])
    tic = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - tic
    result = {**throughput(spec, stamps, wall, steps, warmup, bs), "threads": torch.get_num_threads()}
    print("BENCH_RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
