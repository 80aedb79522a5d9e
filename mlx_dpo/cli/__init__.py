"""The ``mlx-dpo`` command line (click commands)."""
