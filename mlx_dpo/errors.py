"""Every exception mlx-dpo raises on purpose, in one place (the lowest layer: any module may
import it). Each message says what to fix: the file, the key or the field, and what was expected.

User input (``ValueError``): :class:`ConfigError`, :class:`DataError`, :class:`ExportError`,
:class:`GGUFExportError`, :class:`JudgeError`, :class:`SampleError`, :class:`RunError`, :class:`AuditError`,
:class:`ReportError`. Training faults (``RuntimeError``): :class:`TrainingError` and its
:class:`CheckpointError`, :class:`NonFiniteError`, :class:`DistributedError`; a stop on a
signal: :class:`TrainingInterrupted`. Network: :class:`HubUnreachable`. A check that cannot
run here: :class:`VerifySkipped`.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration problem the user can fix: says which key and why."""


class DataError(ValueError):
    """Bad input data: the message names the file, the record and the field."""


class ExportError(ValueError):
    """An export problem the user can fix."""


class GGUFExportError(ValueError):
    """The model cannot be written as GGUF (the message says why)."""


class JudgeError(ValueError):
    """A judge spec the user can fix, or a judge that failed; the message names it."""


class SampleError(ValueError):
    """A sampling option, judge or file the user can fix; the message names it."""


class RunError(ValueError):
    """A run directory that cannot be loaded: missing or broken files, or a config that asks
    for what the command line did not allow (``--trust-remote-code``)."""


class AuditError(ValueError):
    """A run or data problem the user can fix; the message names the file."""


class ReportError(ValueError):
    """A run directory that cannot be reported, or matplotlib missing."""


class TrainingError(RuntimeError):
    """Training stopped on a fault (non-finite values, out of memory, disk full)."""


class CheckpointError(TrainingError):
    """A checkpoint could not be written or read."""


class NonFiniteError(TrainingError):
    """Loss or gradient became NaN/inf."""


class DistributedError(TrainingError):
    """A data-parallel collective failed: another rank went away."""


class TrainingInterrupted(KeyboardInterrupt):
    """Stopped by SIGINT/SIGTERM; ``exit_code`` is 128 + the signal number."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum, self.message = signum, message
        self.exit_code = 128 + signum


class HubUnreachable(ConnectionError):
    """The Hub did not answer within the timeout (or the connection failed)."""


class VerifySkipped(Exception):
    """The export cannot be loaded here (the reason is the message)."""
