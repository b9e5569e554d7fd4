"""Small file-system guarantees: atomic writes, an exclusive lock on a run directory, strict JSON."""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import secrets
import stat
import sys
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


def _names_a_descriptor(path: Path) -> bool:
    """Whether ``path``, or a link on the way to its file, is an open file's name in ``/proc``
    (``/dev/stdout``, ``/dev/fd/1``, ``/proc/self/fd/1``): what it names may be a file the shell
    redirected to, which must be written into, not replaced."""
    current = Path(path)
    for _ in range(40):  # a link chain longer than the kernel's limit is a loop
        if os.path.realpath(current.parent).startswith("/proc/"):
            return True
        if not current.is_symlink():
            return False
        target = Path(os.readlink(current))
        current = target if target.is_absolute() else current.parent / target
    return False


def write_target(path: Path) -> tuple[Path, bool]:
    """Where writing ``path`` lands, and whether it is replaced there by a rename.

    A symbolic link's target is replaced and the link kept. A device, FIFO or socket
    (``/dev/null``) and an open file's name (``/dev/stdout``, whatever it was redirected to) are
    written in place, appending: a rename would put a new file where they were.
    """
    path = Path(path)
    try:
        mode = os.stat(path).st_mode  # follows links
    except OSError:  # not there yet (or a link to a file yet to be written)
        mode = None
    special = mode is not None and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))
    if special or _names_a_descriptor(path):
        return path, False
    return (Path(os.path.realpath(path)) if path.is_symlink() else path), True


def own_descriptor(path: Path) -> int | None:
    """The descriptor of this process that ``path`` names (``/dev/stdout`` 1, ``/dev/stderr`` 2,
    ``/dev/fd/N`` and ``/proc/self/fd/N`` N), or None."""
    named = {"/dev/stdin": 0, "/dev/stdout": 1, "/dev/stderr": 2}
    text = os.path.normpath(str(path))
    if text in named:
        return named[text]
    match = re.fullmatch(rf"/(?:dev/fd|proc/self/fd|proc/{os.getpid()}/fd)/(\d+)", text)
    return int(match.group(1)) if match else None


def _write_in_place(path: Path, data: bytes) -> None:
    """Append ``data`` to a device, FIFO or open file's name (see :func:`write_target`).

    This process's own descriptors (``/dev/stdout``) are written through themselves, after what
    Python buffered for them: a second opening would keep its own position in a redirected file,
    and what the process wrote later would overwrite the data.
    """
    fd = own_descriptor(path)
    if fd is not None:
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:
                stream.flush()
        with open(os.dup(fd), "wb") as out:
            out.write(data)
        return
    flags = os.O_WRONLY | os.O_APPEND
    try:
        fifo = stat.S_ISFIFO(os.stat(path).st_mode)
    except OSError:
        fifo = False
    if fifo:  # no reader yet would block for ever: say so instead
        try:
            fd = os.open(path, flags | os.O_NONBLOCK)
        except OSError as err:
            if err.errno == errno.ENXIO:
                raise OSError(err.errno, "no process is reading this FIFO", str(path)) from None
            raise
        os.set_blocking(fd, True)
    else:
        fd = os.open(path, flags)
    with open(fd, "wb") as stream:
        stream.write(data)


def replace_atomically(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` all at once: readers see the old file or the new, never a mix.

    The bytes go to a temporary file in the same folder, are fsynced, then renamed over ``path``
    (over the file a link points to; a device, FIFO or ``/dev/stdout`` is written in place, see
    :func:`write_target`). Raises :class:`OSError`; the previous file, if any, is left as it was.
    """
    replace_all_atomically({Path(path): data})


def replace_all_atomically(files: Mapping[Path, bytes]) -> None:
    """:func:`replace_atomically` for several files, all or none as far as writing goes: every
    temporary file is written before the first rename, so a full disk or a folder that takes no
    files leaves every file as it was. (A rename refused after another succeeded, over a file
    made immutable say, leaves the earlier files new.)

    Raises :class:`OSError` whose ``filename`` is the path given for the file at fault.
    """
    targets = []
    for given, data in files.items():
        target, replaceable = write_target(Path(given))
        if replaceable and target.is_dir():
            raise IsADirectoryError(errno.EISDIR, "Is a directory", str(given))
        targets.append((given, target, replaceable, data))
    temps: list[tuple[Path, Path, Path]] = []
    try:
        for given, target, replaceable, data in targets:
            if replaceable:
                try:
                    temps.append((write_temporary(target.parent, target.name, data), target, given))
                except OSError as err:
                    raise OSError(err.errno, err.strerror, str(given)) from None
        for given, target, replaceable, data in targets:
            if not replaceable:
                try:
                    _write_in_place(target, data)
                except OSError as err:
                    raise OSError(err.errno, err.strerror, str(given)) from None
        while temps:
            temp, target, given = temps[0]
            try:
                os.replace(temp, target)
            except OSError as err:
                raise OSError(err.errno, err.strerror, str(given)) from None
            temps.pop(0)
            fsync_dir(target.parent)
    finally:
        for temp, _, _ in temps:
            temp.unlink(missing_ok=True)


def _descriptor_problem(fd: int) -> str | None:
    """Why this process cannot write its descriptor ``fd``, or None."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: writing it will tell
        return None
    try:
        access = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
    except OSError:
        return f"file descriptor {fd} is not open"
    return None if access in (os.O_WRONLY, os.O_RDWR) else f"file descriptor {fd} is not open for writing"


def check_can_write(path: Path) -> str | None:
    """Why writing ``path`` would fail, or None when it should not: the folder where its file
    lands (a link's target's) must take new files; a device or FIFO must be writable."""
    target, replaceable = write_target(Path(path))
    if not replaceable:
        fd = own_descriptor(target)
        if fd is not None:
            return _descriptor_problem(fd)
        if not target.exists():
            return "no such file or device"
        return None if os.access(target, os.W_OK) else "permission denied"
    folder = target.parent
    if folder.exists() and not folder.is_dir():
        return f"{folder} is a file, not a folder"
    if not folder.is_dir():
        return f"the folder {folder} does not exist"
    problem = creation_problem(folder)
    return None if problem is None else f"the folder {folder} is not writable ({problem})"


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
