"""The Typer app and the plumbing every command shares (errors, JSON, list options)."""

from __future__ import annotations

import contextlib
import functools
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, ClassVar

import typer
from typer.core import TyperCommand

from cerberus import __version__
from cerberus.errors import CerberusError, ConfigError
from cerberus.files import to_json

app = typer.Typer(
    name="cerberus",
    no_args_is_help=True,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


# --------------------------------------------------------------------------------------------
# Plumbing shared by every command


class MultiValueCommand(TyperCommand):
    """Accept ``--blocks 3 5 3`` as well as ``--blocks 3 --blocks 5 --blocks 3``.

    Click options take a fixed number of values; list options are repeatable. Before parsing,
    the values that follow a list option (integers for ``--blocks``/``--channels``, ``KEY=VALUE``
    for ``--set``) are rewritten into repeated options.
    """

    value_patterns: ClassVar[dict[str, str]] = {
        "--blocks": r"-?\d+",
        "--channels": r"-?\d+",
        "--set": r"[A-Za-z_][^=\s]*=.*",
    }

    path_options: ClassVar[frozenset[str]] = frozenset(
        {"--data-dir", "--input", "--out", "--output", "--probs", "--resume", "--write-configs"}
    )

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        self.refuse_empty_paths(ctx, args)
        expanded: list[str] = []
        current, awaiting = None, False  # the list option being read; no value seen yet
        split: list[str] = []
        for token in args:  # --blocks=3 reads as --blocks 3
            name, equals, value = token.partition("=")
            split += [name, value] if equals and name in self.value_patterns else [token]
        for token in split:
            if token in self.value_patterns:
                if awaiting:
                    expanded.append(current)  # no value followed: let click report it
                current, awaiting = token, True
                continue
            if current is not None and re.fullmatch(self.value_patterns[current], token):
                expanded += [current, token]
                awaiting = False
                continue
            if awaiting:
                expanded.append(current)
            current, awaiting = None, False
            expanded.append(token)
        if awaiting:
            expanded.append(current)
        return super().parse_args(ctx, expanded)

    def refuse_empty_paths(self, ctx, args: list[str]) -> None:
        """Refuse ``--out ''`` (an unset shell variable, say): a path option would read it as
        ``.``, the current folder, and a run would spill its files there."""
        for token, following in zip(args, [*args[1:], None]):
            name, equals, value = token.partition("=")
            if (equals and name in self.path_options and not value) or (
                token in self.path_options and following == ""
            ):
                raise typer.BadParameter("an empty path", ctx=ctx, param_hint=f"'{name}'")


def fail(message: str, code: int = 1) -> typer.Exit:
    typer.echo(f"Error: {message}", err=True)
    return typer.Exit(code)


def import_torch() -> None:
    """Import torch with Ctrl-C held back until it is done.

    A SIGINT that lands inside torch's C++ start-up is lost there (the command then runs on) or
    aborts the process; held back, it arrives once the import is over, as KeyboardInterrupt.
    """
    import signal
    import sys
    import threading

    main_thread = threading.current_thread() is threading.main_thread()  # where signals arrive
    if "torch" in sys.modules or not main_thread or not hasattr(signal, "pthread_sigmask"):
        return  # imported already, or left to the command's own imports
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        import torch  # noqa: F401
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def handle_errors(command):
    """Turn library errors into one short message and an exit code."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except CerberusError as err:
            raise fail(str(err), err.exit_code) from None

    return wrapper


# The command-line flag of each setting a command takes as a flag (design fields and the like).
FLAGS = {
    "blocks": "--blocks",
    "channels": "--channels",
    "conv_kernel": "--conv-kernel",
    "skip_kernel": "--skip-kernel",
    "pool_size": "--pool-size",
    "stem_channels": "--stem-channels",
    "stem_kernel": "--stem-kernel",
    "num_classes": "--num-classes",
    "downsample": "--downsample",
    "layout": "--layout",
}


@contextlib.contextmanager
def naming_flags(given: dict[str, Any]) -> Iterator[None]:
    """Errors about a setting that came from a flag name the flag rather than the setting.

    ``given`` maps setting names to the flags' values (``None``: not given).
    """
    try:
        yield
    except ConfigError as err:
        if err.field in FLAGS and given.get(err.field) is not None:
            raise ConfigError(f"{FLAGS[err.field]}: {err.detail}") from None
        raise


def silence_stdout() -> None:
    """Point stdout at the null device: what is still buffered goes there, at exit too."""
    import os
    import sys

    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


@contextlib.contextmanager
def output_failures() -> Iterator[None]:
    """Results that cannot be printed (stdout on a full disk, ``> /dev/full``) are one error line
    and exit 1, not a traceback. Library writes report their own failures; only printing is left."""
    import errno

    try:
        yield
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO):
            raise
        silence_stdout()  # what is still buffered would fail again at exit
        typer.echo(f"Error: could not write {err.filename or 'the output'}: {err.strerror}", err=True)
        raise SystemExit(1) from None


def emit_json(data: Any, err: bool = False) -> None:
    typer.echo(to_json(data, indent=2), err=err)


def is_stdout(path: Path | None) -> bool:
    """Whether ``path`` is standard output (``/dev/stdout``, a link to it, the file it was
    redirected to), where a command's own report must then not go."""
    import os

    from cerberus.files import own_descriptor

    if path is None:
        return False
    if own_descriptor(path) == 1:
        return True
    try:
        named, stdout = os.stat(path), os.fstat(1)
    except OSError:
        return False
    return (named.st_dev, named.st_ino) == (stdout.st_dev, stdout.st_ino)


PIPED_WIDTH = 200  # columns for tables written to a file or a pipe (rich would assume 80)


def console(stderr: bool = False):
    """A rich console for results; piped or redirected, tables keep their natural width."""
    import sys

    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() else PIPED_WIDTH
    return Console(stderr=stderr, highlight=False, width=width)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"cerberus {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version_callback, is_eager=True, help="Show the version."),
    ] = False,
) -> None:
    """Design, train and evaluate CIFAR-10 ResNets under a hard parameter budget.

    Each command has its own --help with examples.

    \b
    Examples:
      cerberus count-params --blocks 3 5 3               # ResNet-24: 4,918,602 parameters
      cerberus train configs/cpu-quick.toml              # CIFAR-10 downloaded when absent
      cerberus eval runs/cpu-quick-*/best.pt --tta
      cerberus search --max-params 5000000 --top 10      # designs under the budget
      cerberus predict best.pt --input cifar_test_nolabel.pkl --output submission.csv
    """
