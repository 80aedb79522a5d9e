"""The ``mlx-dpo`` command line: a thin layer over the Python API."""

from __future__ import annotations

import sys

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mlx-dpo")
def main():
    """Preference fine-tuning (DPO and friends) with QLoRA on MLX."""


if __name__ == "__main__":
    sys.exit(main())
