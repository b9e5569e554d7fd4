"""Small file-system guarantees: atomic writes, an exclusive lock on a run directory, strict JSON."""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cerberus.errors import CerberusError, RunLockedError


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value


def to_json(data: Any, indent: int | None = None) -> str:
    """``data`` as standard JSON: a non-finite float (a diverged loss, say) becomes ``null``, where
    ``json.dumps`` would write ``NaN``, which strict parsers (JavaScript's, jq's) reject."""
    return json.dumps(_finite(data), indent=indent, allow_nan=False)


def fsync_dir(folder: Path) -> None:
    """Make a rename inside ``folder`` durable (a no-op where folders cannot be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_synced(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` and fsync it (not atomic: for files nobody reads yet)."""
    with open(path, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())


def write_temporary(folder: Path, name: str, data: bytes) -> Path:
    """Write ``data`` to a fresh hidden ``.<name>.<random>.tmp`` in ``folder``, fsynced.

    On failure the temporary file is removed and the error re-raised.
    """
    while True:
        temp_path = folder / f".{name}.{secrets.token_hex(4)}.tmp"
        try:  # mode 0o666 less the umask, like any new file (mkstemp would make it 0o600)
            fd = os.open(temp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            break
        except FileExistsError:
            continue
    try:
        with open(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
    except BaseException:
        temp_path.unlink(missing_ok=True)
        raise
    return temp_path


def replace_atomically(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` all at once: readers see the old file or the new, never a mix.

    The bytes go to a temporary file in the same folder, are fsynced, then renamed over ``path``.
    Raises :class:`OSError`; the previous file, if any, is left as it was.
    """
    path = Path(path)
    temp = write_temporary(path.parent, path.name, data)
    try:
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write(path: Path, data: bytes | str) -> None:
    """:func:`replace_atomically`, with a failure reported as one :class:`CerberusError`."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    try:
        replace_atomically(Path(path), data)
    except OSError as err:
        raise CerberusError(f"could not write {path}: {err.strerror or err}") from None


@contextlib.contextmanager
def run_lock(folder: Path, *, hint: str = "wait for it to finish or choose another --out") -> Iterator[None]:
    """Hold an exclusive lock on a run directory; a second holder is refused at once.

    The lock is an ``flock`` on ``folder/.lock``: the kernel releases it when the process dies,
    so a killed run never leaves a stale lock behind.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no locking
        yield
        return
    lock_path = Path(folder) / ".lock"
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise CerberusError(f"cannot lock {folder}: {err.strerror or err} ({lock_path})") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunLockedError(f"{folder} is in use by another cerberus process; {hint}") from None
        with contextlib.suppress(OSError):  # the pid is a note for people; a full disk may refuse it
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)
