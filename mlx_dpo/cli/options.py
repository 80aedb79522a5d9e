"""The command line's shared pieces: one option per config field, the ``--trust-remote-code``
flag of the commands that load a trained run, the one-line error exit, log lines on stdout and
quiet interrupts."""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import typing
from dataclasses import fields

import click

from ..config.fields import ALIASES, DPOConfig


def config_options(func, names: tuple = ()):
    """Add one ``--option`` per config field (only ``names`` when given) and per TRL alias, with the
    field's help."""
    hints = typing.get_type_hints(DPOConfig)
    for f in reversed([f for f in fields(DPOConfig) if not names or f.name in names]):
        name = f.name.replace("_", "-")
        aliases = [f"--{a.replace('_', '-')}" for a, target in ALIASES.items() if target == f.name]
        text = f"{f.metadata['help']} [default: {_shown(f.default)}]"
        if hints[f.name] is bool:
            flags = [f"--{flag}/--no-{flag}" for flag in (name, *(a[2:] for a in aliases))]
            func = click.option(*flags, f.name, default=None, help=text)(func)
        else:
            func = click.option(f"--{name}", *aliases, f.name, default=None, metavar="VALUE", help=text)(func)
    return func


def template_options(func):
    """``--chat-template`` and ``--chat-template-kwargs`` (the config's fields) for the commands that
    render prompts from a model or run without a config (``sample``, ``generate``)."""
    return config_options(func, ("chat_template", "chat_template_kwargs"))


def _shown(default) -> str:
    if default is None:
        return "unset"
    return str(default).lower() if isinstance(default, bool) else str(default)


def given_options(kwargs: dict) -> dict:
    """The options given on the command line (click passes None for the others)."""
    return {k: v for k, v in kwargs.items() if v is not None}


def fail(e: Exception) -> None:
    click.echo(f"error: {e}", err=True)
    sys.exit(2)


class _EchoHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        click.echo(self.format(record))


@contextlib.contextmanager
def show_logs():
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
def quiet_interrupts():
    """Once a run is stopping (Ctrl-C, SIGTERM), later signals are ignored, so a second Ctrl-C
    cannot print a traceback from cleanup or an atexit handler; the exit code stays 130/143.
    (While the training loop runs, its own handlers take over: see ``stopping.StopSignals``.)"""
    old = signal.signal(signal.SIGINT, _interrupt_once)
    try:
        yield
    except KeyboardInterrupt:  # TrainingInterrupted too: the process exits next
        _ignore_stop_signals()
        raise
    finally:
        if signal.getsignal(signal.SIGINT) is _interrupt_once:
            signal.signal(signal.SIGINT, old)


# The commands that load a trained run: its config.yaml is data and never allows code by itself.
TRUST_REMOTE_CODE = click.option(
    "--trust-remote-code", is_flag=True,
    help="Allow the model's own Python code (transformers' flag). A run's config.yaml never allows it by itself.")
