"""The ``cerberus`` console script and ``python -m cerberus``.

This module imports nothing of Cerberus' until :func:`main` runs, so that a Ctrl-C landing while
the command line's modules load is an interrupt like any other (exit 130), never a traceback.
Results that cannot be printed (a full disk) are one error line: see
:func:`cerberus.cli.output_failures`.
"""

from __future__ import annotations


def main() -> None:
    """Console-script entry point."""
    try:
        from cerberus.cli import app, output_failures

        with output_failures():
            app(prog_name="cerberus")
    except KeyboardInterrupt:  # one that no command caught: still an interrupt, exit 130
        raise SystemExit(130) from None
    except RuntimeError as err:
        # A Ctrl-C that lands while a module defines a class reaches us wrapped by Python 3.11
        # ("Error calling __set_name__"): it is an interrupt all the same, not a crash.
        if isinstance(err.__cause__, KeyboardInterrupt):
            raise SystemExit(130) from None
        raise
