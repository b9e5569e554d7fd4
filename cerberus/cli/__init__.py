"""The ``cerberus`` command line: parse, call one library function, render.

The CLI package is the only code that prints. Library errors
(:class:`cerberus.errors.CerberusError`) become ``Error: <message>`` on stderr and the error's
exit code, never a traceback. Heavy imports (torch above all) happen inside commands, so
``--help`` stays fast. Each command lives in its own module and registers itself on ``app``.
"""

from __future__ import annotations

from cerberus.cli import count, evaluate, search, train  # noqa: F401  (each registers its command)
from cerberus.cli._app import app, output_failures
from cerberus.entry import main

__all__ = ["app", "main", "output_failures"]
