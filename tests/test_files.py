"""Atomic writes: several files both or neither, through links, into devices and FIFOs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cerberus import files
from cerberus.errors import CerberusError
from cerberus.files import atomic_write, atomic_write_all, check_can_write


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_a_second_file_that_cannot_be_written_leaves_the_first_as_it_was(tmp_path, monkeypatch):
    (tmp_path / "a.csv").write_text("old a\n")
    (tmp_path / "b.csv").write_text("old b\n")
    real, calls = files.write_temporary, []

    def full_disk_on_the_second(folder, name, data):
        calls.append(name)
        if len(calls) == 2:
            raise OSError(28, "No space left on device", str(folder / f".{name}.x.tmp"))
        return real(folder, name, data)

    monkeypatch.setattr(files, "write_temporary", full_disk_on_the_second)
    with pytest.raises(CerberusError) as err:
        atomic_write_all({tmp_path / "a.csv": "new a\n", tmp_path / "b.csv": "new b\n"})
    assert str(err.value) == f"could not write {tmp_path / 'b.csv'}: No space left on device"
    assert (tmp_path / "a.csv").read_text() == "old a\n" and (tmp_path / "b.csv").read_text() == "old b\n"
    assert leftovers(tmp_path) == []


def test_a_refused_rename_names_the_file_not_its_temporary(tmp_path, monkeypatch):
    real, calls = os.replace, []

    def refuse_the_second(source, target):
        calls.append(target)
        if len(calls) == 2:
            raise PermissionError(1, "Operation not permitted", str(source))
        return real(source, target)

    monkeypatch.setattr(files.os, "replace", refuse_the_second)
    with pytest.raises(CerberusError) as err:
        atomic_write_all({tmp_path / "a.csv": "new a\n", tmp_path / "b.csv": "new b\n"})
    assert str(err.value) == f"could not write {tmp_path / 'b.csv'}: Operation not permitted"
    assert leftovers(tmp_path) == []


def test_a_link_is_written_through_and_kept(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "target.csv").write_text("old\n")
    (tmp_path / "link.csv").symlink_to(Path("real") / "target.csv")  # relative, another folder
    atomic_write(tmp_path / "link.csv", "new\n")
    assert (tmp_path / "link.csv").is_symlink()
    assert (tmp_path / "real" / "target.csv").read_text() == "new\n"
    assert leftovers(tmp_path) == [] and leftovers(tmp_path / "real") == []


FIFO_NOBODY_READS = """
import sys
from pathlib import Path
from cerberus.errors import CerberusError
from cerberus.files import atomic_write_all
folder = Path(sys.argv[1])
try:
    atomic_write_all({folder / "out.csv": "x\\n", folder / "probs.csv": "y\\n"})
except CerberusError as err:
    print(err)
"""


def test_a_fifo_nobody_reads_is_an_error_not_a_hang(tmp_path):
    os.mkfifo(tmp_path / "out.csv")
    # in a subprocess with a time limit: were it to wait for a reader, it would wait for ever
    done = subprocess.run(
        [sys.executable, "-c", FIFO_NOBODY_READS, str(tmp_path)], capture_output=True, text=True, timeout=60
    )
    assert done.stdout == f"could not write {tmp_path / 'out.csv'}: no process is reading this FIFO\n"
    assert (tmp_path / "out.csv").is_fifo() and not (tmp_path / "probs.csv").exists()
    assert leftovers(tmp_path) == []


WRITE_TO_STDOUT = """
import sys
from cerberus.files import atomic_write
print("before")  # still buffered: it goes first all the same
atomic_write("/dev/stdout", "ID,Labels\\n0,3\\n")
print("after", flush=True)
print("on stderr", file=sys.stderr, flush=True)
"""


@pytest.mark.skipif(not Path("/dev/stdout").exists(), reason="needs /dev/stdout")
@pytest.mark.parametrize("mode", ["a", "w"])  # the shell's `>> log.txt 2>&1` and `> log.txt 2>&1`
def test_stdout_redirected_to_a_file_is_written_into_in_order(tmp_path, mode):
    log = tmp_path / "log.txt"
    log.write_text("previous\n")
    with open(log, mode) as stdout:
        subprocess.run(
            [sys.executable, "-c", WRITE_TO_STDOUT], stdout=stdout, stderr=stdout, check=True, timeout=60
        )
    kept = "previous\n" if mode == "a" else ""
    assert log.read_text() == kept + "before\nID,Labels\n0,3\nafter\non stderr\n"


def test_this_processs_own_descriptors_are_checked_as_such():
    assert check_can_write(Path("/dev/fd/987")) == "file descriptor 987 is not open"
    read_end, write_end = os.pipe()
    try:
        reading = check_can_write(Path(f"/dev/fd/{read_end}"))
        assert reading == f"file descriptor {read_end} is not open for writing"
        assert check_can_write(Path(f"/proc/self/fd/{write_end}")) is None
    finally:
        os.close(read_end)
        os.close(write_end)


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_where_a_link_lands_is_what_is_checked(tmp_path):
    (tmp_path / "link.csv").symlink_to("/proc/sub.csv")  # /proc takes no new files, for root too
    assert check_can_write(tmp_path / "link.csv").startswith("the folder /proc is not writable (")
    assert check_can_write(tmp_path / "plain.csv") is None
    assert check_can_write(Path("/dev/null")) is None  # a device is written as it is
    assert check_can_write(tmp_path / "none" / "x.csv") == f"the folder {tmp_path / 'none'} does not exist"
