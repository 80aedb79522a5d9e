"""Export of a trained run: the writers table, HF/PEFT/MLX/GGUF writers, verification, the Hub."""
