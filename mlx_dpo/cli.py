"""The ``mlx-dpo`` command line: a thin layer over the Python API.

Every ``DPOConfig`` field is also a command-line option (``--beta 0.2``,
``--loss-type ipo``); the command line wins over ``--config FILE.yaml``, which
wins over the defaults.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import typing
from dataclasses import fields

import click

from .config import ALIASES, ConfigError, DPOConfig
from .formats import DTYPES, WRITERS, default_dtypes_help, formats_help


def config_options(func):
    """Add one ``--option`` per config field (and per TRL alias), with the field's help."""
    hints = typing.get_type_hints(DPOConfig)
    for f in reversed(fields(DPOConfig)):
        name = f.name.replace("_", "-")
        aliases = [f"--{a.replace('_', '-')}" for a, target in ALIASES.items() if target == f.name]
        text = f"{f.metadata['help']} [default: {_shown(f.default)}]"
        if hints[f.name] is bool:
            flags = [f"--{flag}/--no-{flag}" for flag in (name, *(a[2:] for a in aliases))]
            func = click.option(*flags, f.name, default=None, help=text)(func)
        else:
            func = click.option(f"--{name}", *aliases, f.name, default=None, metavar="VALUE", help=text)(func)
    return func


def _shown(default) -> str:
    if default is None:
        return "unset"
    return str(default).lower() if isinstance(default, bool) else str(default)


def _overrides(kwargs: dict) -> dict:
    return {k: v for k, v in kwargs.items() if v is not None}


def _fail(e: Exception) -> None:
    click.echo(f"error: {e}", err=True)
    sys.exit(2)


class _EchoHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        click.echo(self.format(record))


@contextlib.contextmanager
def _show_logs():
    """While a command runs, print the library's log lines (INFO and up) plainly on stdout."""
    logger, handler = logging.getLogger("mlx_dpo"), _EchoHandler()
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _ignore_stop_signals(*_) -> None:
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_IGN)


def _interrupt_once(signum, frame) -> None:
    _ignore_stop_signals()
    raise KeyboardInterrupt


@contextlib.contextmanager
def _quiet_interrupts():
    """Once a run is stopping (Ctrl-C, SIGTERM), later signals are ignored, so a second Ctrl-C
    cannot print a traceback from cleanup or an atexit handler; the exit code stays 130/143.
    (While the training loop runs, its own handlers take over: see ``checkpoint.StopSignals``.)"""
    old = signal.signal(signal.SIGINT, _interrupt_once)
    try:
        yield
    except KeyboardInterrupt:  # TrainingInterrupted too: the process exits next
        _ignore_stop_signals()
        raise
    finally:
        if signal.getsignal(signal.SIGINT) is _interrupt_once:
            signal.signal(signal.SIGINT, old)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="mlx-dpo")
def main():
    """Preference fine-tuning (DPO and friends) with QLoRA on MLX."""


@main.command()
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="YAML recipe (see configs/).")
@click.option("--resume", is_flag=True, help="Continue from the latest checkpoint in output_dir.")
@click.option("--overwrite", is_flag=True, help="Start over in output_dir (its old checkpoints and adapters are "
              "removed once the config and data have loaded).")
@config_options
def train(config_file, resume, overwrite, **kwargs):
    """Train LoRA/DoRA adapters (or chosen layers) with a DPO-family loss.

    Exit codes: 0 done, 1 training fault (non-finite loss, out of memory, disk full),
    2 config/data error, 130/143 stopped by SIGINT/SIGTERM (a checkpoint was saved)."""
    from .checkpoint import TrainingError, TrainingInterrupted
    from .config import resolve_config
    from .data import DataError
    from .trainer import DPOTrainer

    overrides = _overrides(kwargs)
    if resume:
        overrides.setdefault("resume_from_checkpoint", "latest")
    if overwrite:
        overrides["overwrite_output_dir"] = True
    try:
        with _quiet_interrupts():
            cfg = resolve_config(config_file, **overrides)
            result = DPOTrainer(cfg).train()
    except TrainingInterrupted as e:
        click.echo(str(e), err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted (nothing half-written is left behind)", err=True)
        sys.exit(130)
    except (ConfigError, DataError, FileNotFoundError) as e:
        _fail(e)
    except (TrainingError, OSError) as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
    summary = {k: round(v, 4) for k, v in result.eval_metrics.items() if k in ("eval_loss", "eval_rewards/accuracies")}
    click.echo(f"saved adapters to {result.output_dir} {summary if summary else ''}")


@main.command()
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="YAML recipe (see configs/).")
@click.option("--memory-budget-gb", type=float, default=None,
              help="Memory to plan for (default: 80% of this machine's).")
@click.option("--steps", type=int, default=3, show_default=True, help="Timed steps per batch size.")
@click.option("--json", "json_out", is_flag=True, help="Print the plan as JSON too.")
@config_options
def plan(config_file, memory_budget_gb, steps, json_out, **kwargs):
    """Estimate peak memory and tokens/s of a run on this machine (a few timed
    steps on the longest pairs) and the largest batch that fits the budget."""
    import json

    from .config import resolve_config
    from .data import DataError
    from .plan import plan as run_plan

    try:
        result = run_plan(resolve_config(config_file, **_overrides(kwargs)), memory_budget_gb, steps,
                          log=click.echo)
    except (ConfigError, DataError, FileNotFoundError) as e:
        _fail(e)
    if json_out:
        click.echo(json.dumps(result, indent=2))



@main.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("--output", "-o", default=None, type=click.Path(file_okay=False),
              help="Directory for the PNGs and report.html [default: the first RUN_DIR/report].")
def report(run_dirs, output):
    """Plot what DPO did: PNGs and one self-contained report.html from each run's
    metrics.jsonl and config.yaml; several runs overlay on the same axes."""
    from .report import ReportError
    from .report import report as make_report

    try:
        path, notes = make_report(run_dirs, output)
    except ReportError as e:
        _fail(e)
    for note in notes:
        click.echo(f"note: {note}")
    click.echo(f"report: {path}")


@main.command()
@click.option("--adapter-path", required=True, type=click.Path(exists=True, file_okay=False),
              help="Training run directory (adapters.safetensors + adapter_config.json).")
@click.option("--output", "-o", required=True, type=click.Path(), help="Directory to create.")
@click.option("--model", default=None, help="Base model (default: the one recorded in the run).")
@click.option("--format", "fmt", type=click.Choice(list(WRITERS)), default="hf", show_default=True,
              help=formats_help())
@click.option("--dtype", type=click.Choice(list(DTYPES)), default=None,
              help=f"Weight dtype ({default_dtypes_help()}).")
@click.option("--verify", is_flag=True, help="Compare the export's logits with the MLX model's.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output directory.")
@click.option("--upload-repo", default=None, metavar="USER/NAME", help="Then upload to this Hub repository.")
@click.option("--private", is_flag=True, help="With --upload-repo: create the repository private.")
def export(adapter_path, output, model, fmt, dtype, verify, overwrite, upload_repo, private):
    """Export a run: merged HF/MLX model or PEFT adapter (atomic)."""
    from .export import ExportError
    from .export import export as run_export

    if private and not upload_repo:
        _fail(ConfigError("--private only applies with --upload-repo"))
    try:
        with _show_logs():
            run_export(adapter_path, output, model=model, format=fmt, dtype=dtype, verify=verify, overwrite=overwrite)
    except (ExportError, ConfigError, FileNotFoundError) as e:
        _fail(e)
    except OSError as e:  # disk full, permissions: atomic_directory removed what it had written
        kept = "the old export is kept" if overwrite and os.path.exists(output) else "nothing was written"
        click.echo(f"error: export to {output} failed: {e} ({kept})", err=True)
        sys.exit(1)
    if upload_repo:
        _upload(output, upload_repo, private=private)


@main.command()
@click.argument("folder", type=click.Path(exists=True, file_okay=False))
@click.option("--repo-id", required=True, metavar="USER/NAME", help="Hub repository (created if missing).")
@click.option("--private", is_flag=True, help="Create the repository private.")
@click.option("--revision", default=None, help="Branch to upload to (created if missing).")
@click.option("--dry-run", is_flag=True, help="List what would be uploaded; upload nothing.")
def upload(folder, repo_id, private, revision, dry_run):
    """Upload an exported directory to the Hugging Face Hub with a model card.

    The token comes from HF_TOKEN or `huggingface-cli login`."""
    _upload(folder, repo_id, private=private, revision=revision, dry_run=dry_run)


def _upload(folder, repo_id, **kwargs):
    from .hub import upload as hub_upload

    try:
        with _show_logs():
            hub_upload(folder, repo_id, **kwargs)
    except Exception as e:  # hub errors (auth, network, permissions) carry no token
        _fail(f"upload to {repo_id} failed: {type(e).__name__}: {e}")


if __name__ == "__main__":
    sys.exit(main())
