"""Models: loading (directories, the Hub, GGUF, toy, demo), quantization, adapters, the architectures
table, what trains, and trained runs loaded back."""
