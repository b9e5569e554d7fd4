"""The ``cerberus`` command line: parse, call one library function, render.

The CLI package is the only code that prints. Library errors
(:class:`cerberus.errors.CerberusError`) become ``Error: <message>`` on stderr and the error's
exit code, never a traceback. Heavy imports (torch above all) happen inside commands, so
``--help`` stays fast. Each command lives in its own module and registers itself on ``app``.
"""

from __future__ import annotations

from cerberus.cli import count, evaluate, search, train  # noqa: F401  (each registers its command)
from cerberus.cli._app import app


def main() -> None:
    """Console-script entry point."""
    try:
        app(prog_name="cerberus")
    except KeyboardInterrupt:  # one that no command caught: still an interrupt, exit 130
        raise SystemExit(130) from None
    except RuntimeError as err:
        # A Ctrl-C that lands while a module defines a class reaches us wrapped by Python 3.11
        # ("Error calling __set_name__"): it is an interrupt all the same, not a crash.
        if isinstance(err.__cause__, KeyboardInterrupt):
            raise SystemExit(130) from None
        raise


__all__ = ["app", "main"]
