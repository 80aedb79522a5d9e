"""Train with the Python API (scripts, notebooks): the same fields as the YAML recipes.

    python examples/train_api.py
"""

from mlx_dpo import DPOConfig, DPOTrainer

config = DPOConfig(
    model="toy:llama",          # or "Qwen/Qwen2.5-0.5B-Instruct", or a local directory
    data="toy",                 # or a JSONL file / directory / Hub dataset id
    output_dir="runs/api-example",
    overwrite_output_dir=True,
    loss_type="sigmoid",
    beta=0.1,
    learning_rate=3e-3,
    lr_scheduler_type="cosine",
    warmup_steps=10,
    max_steps=60,
    batch_size=8,
    eval_steps=20,
)

trainer = DPOTrainer(config)
before = trainer.evaluate()
result = trainer.train()
print(f"held-out reward accuracy: {before['eval_rewards/accuracies']:.2f} -> "
      f"{result.eval_metrics['eval_rewards/accuracies']:.2f}")
print(f"adapters: {result.output_dir}  (mlx_lm.generate --model BASE --adapter-path {result.output_dir})")
