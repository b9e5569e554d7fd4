"""One exception family. Messages are written for the person at the terminal.

The CLI turns any :class:`CerberusError` into ``Error: <message>`` on stderr and exits with
the class's ``exit_code``; nothing below the CLI prints or exits.
"""

from __future__ import annotations

import signal


class CerberusError(Exception):
    """Base class of every error Cerberus reports to a user."""

    exit_code = 1


class ConfigError(CerberusError):
    """A config, override or command-line design that cannot be used (exit code 2).

    ``field`` names the setting at fault where one does, and ``detail`` is the message without
    the setting's name, so that a caller which took the value from elsewhere (a command-line
    flag) can name its own source instead.
    """

    exit_code = 2

    def __init__(self, message: str, *, field: str | None = None, detail: str | None = None):
        super().__init__(message)
        self.field = field
        self.detail = detail if detail is not None else message


class BudgetError(ConfigError):
    """The architecture has more parameters than the budget allows."""


class DataError(CerberusError):
    """The dataset is missing, partial, corrupt, or could not be downloaded."""


class CheckpointError(CerberusError):
    """A checkpoint or weights file that cannot be read, verified or trusted."""


class DivergenceError(CerberusError):
    """Training produced a non-finite loss."""


class RunLockedError(CerberusError):
    """Another process is writing to the same run directory."""


class Interrupted(CerberusError):
    """Training stopped on SIGINT or SIGTERM after writing ``last.pt`` (exit 130 or 143)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class RankFailedError(CerberusError):
    """Another rank failed; raised on the ranks that did not, with that rank's message and code."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class LostProcessError(CerberusError):
    """A collective call failed because another process of the run is gone (killed, crashed):
    raised on every process that finds out, rank 0 or not (rank 0 may be the one gone)."""


def signal_name(signum: int | None) -> str:
    """``"SIGTERM"`` for SIGTERM, else ``"SIGINT"`` (Ctrl-C): the two signals that stop work."""
    return "SIGTERM" if signum == signal.SIGTERM else "SIGINT"


def signal_exit_code(signum: int | None) -> int:
    """The exit code after stopping on ``signum``, 128 + the signal: 143 for SIGTERM, else 130."""
    return 143 if signum == signal.SIGTERM else 130
