"""Small file-system guarantees: atomic writes, an exclusive lock on a run directory, strict JSON."""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import stat
from collections.abc import Iterator, Mapping
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


def write_target(path: Path) -> tuple[Path, bool]:
    """Where writing ``path`` lands, and whether it is replaced there by a rename.

    A symbolic link's target is replaced and the link kept. A device, FIFO or socket
    (``/dev/null``, ``/dev/stdout``) is written in place: a rename would put a file where it was.
    """
    path = Path(path)
    try:
        mode = os.stat(path).st_mode  # follows links
    except OSError:  # not there yet (or a link to a file yet to be written)
        mode = None
    if mode is not None and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        return path, False
    return (Path(os.path.realpath(path)) if path.is_symlink() else path), True


def replace_atomically(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` all at once: readers see the old file or the new, never a mix.

    The bytes go to a temporary file in the same folder, are fsynced, then renamed over ``path``
    (over the file a link points to; a device or FIFO is written in place, see
    :func:`write_target`). Raises :class:`OSError`; the previous file, if any, is left as it was.
    """
    replace_all_atomically({Path(path): data})


def replace_all_atomically(files: Mapping[Path, bytes]) -> None:
    """:func:`replace_atomically` for several files, all or none: every temporary file is written
    before the first rename, so a folder that cannot take one leaves every file as it was.

    Raises :class:`OSError` whose ``filename`` is the path given for the file at fault.
    """
    targets = []
    for given, data in files.items():
        target, replaceable = write_target(Path(given))
        if replaceable and target.is_dir():
            raise IsADirectoryError(21, "Is a directory", str(given))
        targets.append((given, target, replaceable, data))
    temps: list[tuple[Path, Path]] = []
    try:
        for given, target, replaceable, data in targets:
            if replaceable:
                try:
                    temps.append((write_temporary(target.parent, target.name, data), target))
                except OSError as err:
                    raise OSError(err.errno, err.strerror, str(given)) from None
        for given, target, replaceable, data in targets:
            if not replaceable:
                try:
                    with open(target, "wb") as stream:
                        stream.write(data)
                except OSError as err:
                    raise OSError(err.errno, err.strerror, str(given)) from None
        while temps:
            temp, target = temps[0]
            os.replace(temp, target)
            temps.pop(0)
            fsync_dir(target.parent)
    finally:
        for temp, _ in temps:
            temp.unlink(missing_ok=True)


def atomic_write(path: Path, data: bytes | str) -> None:
    """:func:`replace_atomically`, with a failure reported as one :class:`CerberusError`."""
    atomic_write_all({Path(path): data})


def atomic_write_all(files: Mapping[Path, bytes | str]) -> None:
    """:func:`replace_all_atomically` (text as UTF-8), a failure reported as one
    :class:`CerberusError` naming the file."""
    encoded = {Path(p): d.encode("utf-8") if isinstance(d, str) else d for p, d in files.items()}
    try:
        replace_all_atomically(encoded)
    except OSError as err:
        name = err.filename if err.filename is not None else ", ".join(map(str, encoded))
        raise CerberusError(f"could not write {name}: {err.strerror or err}") from None


def creation_problem(folder: Path) -> str | None:
    """Why no file can be created in the existing ``folder``, or None when one can.

    Found by creating and removing an empty temporary file: permission bits do not tell (root
    passes ``os.access`` on a read-only mount or in ``/sys``).
    """
    try:
        temp = write_temporary(Path(folder), "write-check", b"")
    except OSError as err:
        return err.strerror or str(err)
    temp.unlink(missing_ok=True)
    return None


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
