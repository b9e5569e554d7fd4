"""The ``cerberus`` console script and ``python -m cerberus``.

This module imports nothing of Cerberus' until :func:`main` runs, so that a Ctrl-C landing while
the command line's modules load is an interrupt like any other (exit 130), never a traceback;
results that cannot be printed (a full disk) are one error line too.
"""

from __future__ import annotations

import os
import sys


def main() -> None:
    """Console-script entry point."""
    import errno

    try:
        from cerberus.cli import app

        app(prog_name="cerberus")
    except KeyboardInterrupt:  # one that no command caught: still an interrupt, exit 130
        raise SystemExit(130) from None
    except RuntimeError as err:
        # A Ctrl-C that lands while a module defines a class reaches us wrapped by Python 3.11
        # ("Error calling __set_name__"): it is an interrupt all the same, not a crash.
        if isinstance(err.__cause__, KeyboardInterrupt):
            raise SystemExit(130) from None
        raise
    except OSError as err:
        # Library writes report their own failures; one that reaches here came from printing the
        # results (stdout on a full disk, `> /dev/full`): one line, not a traceback.
        if err.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO):
            raise
        _silence_stdout()  # what is still buffered would fail again at exit
        where = err.filename or "the output"
        print(f"Error: could not write {where}: {err.strerror}", file=sys.stderr)
        raise SystemExit(1) from None


def _silence_stdout() -> None:
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
