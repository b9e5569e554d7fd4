"""Plumbing for tests/test_reliability.py: training subprocesses whose JSON events can be awaited.

``cerberus train ... --json`` prints one JSON object per event (``start``, ``epoch``,
``interrupted``, ...; not ``step``), so a test can wait for an event and then signal, stop or
kill the process at a known point. :class:`Training` runs ``python -m cerberus`` as it is;
:class:`Launcher` forks the same command line from a process that has done the imports (seconds
of them), for tests that start many short-lived trainings.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

TIMEOUT = 180.0  # seconds; generous, for a machine shared with other test runs


def cli_env() -> dict[str, str]:
    """The environment of a CLI subprocess: one CPU thread, no mirror or data folder inherited."""
    env = dict(os.environ)
    for name in ("CERBERUS_CIFAR10_URL", "CERBERUS_DATA"):
        env.pop(name, None)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


class Training:
    """``python -m cerberus train <args> --json`` in a subprocess. Use it as a context manager:
    leaving the block kills the process if it still runs (a failed test leaves nothing behind)."""

    def __init__(self, *args: str | Path, cwd: Path):
        command = [sys.executable, "-m", "cerberus", "train", *map(str, args), "--json"]
        self.proc = subprocess.Popen(
            command,
            cwd=cwd,
            env=cli_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.events: list[dict[str, Any]] = []
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._stderr: list[str] = []
        self._readers = [
            threading.Thread(target=self._read_stdout, daemon=True),
            threading.Thread(target=lambda: self._stderr.extend(self.proc.stderr), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def stderr(self) -> str:
        return "".join(self._stderr)

    def _read_stdout(self) -> None:
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)  # end of output

    def wait_for(self, kind: str, timeout: float = TIMEOUT) -> dict[str, Any]:
        """Block until the process prints the event ``kind``; return it."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._lines.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                raise AssertionError(f"no {kind!r} event within {timeout:.0f}s:\n{self.stderr}") from None
            if line is None:
                self.proc.wait()
                raise AssertionError(
                    f"exited ({self.proc.returncode}) before a {kind!r} event; stderr:\n{self.stderr}"
                )
            if not line.startswith("{"):
                continue
            event = json.loads(line)
            self.events.append(event)
            if event["event"] == kind:
                return event

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def finish(self, timeout: float = TIMEOUT) -> int:
        """Wait for the exit; collect the remaining events; return the exit status."""
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running after {timeout:.0f}s; stderr:\n{self.stderr}") from None
        for reader in self._readers:
            reader.join(timeout=10)
        while True:
            line = self._lines.get_nowait() if not self._lines.empty() else None
            if line is None:
                break
            if line.startswith("{"):
                self.events.append(json.loads(line))
        return self.proc.returncode

    def __enter__(self) -> Training:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for reader in self._readers:  # they reach the end of the pipes once the process is gone
            reader.join(timeout=10)
        for stream in (self.proc.stdout, self.proc.stderr):
            stream.close()


def wait_until(condition, timeout: float = TIMEOUT, interval: float = 0.002) -> None:
    """Poll ``condition()`` until it is true."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout:.0f}s")
        time.sleep(interval)


# A process that imports Cerberus once, then forks one child per request: the child runs the
# `cerberus` command line with the requested arguments, its stdout and stderr going to files.
_LAUNCHER = r"""
import io, json, os, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch, torch._dynamo  # torch.optim imports dynamo on first use: seconds
import cerberus.cli, cerberus.report, cerberus.runner
figure, axes = plt.subplots()  # the first plot loads fonts
axes.plot([0, 1], label="warm-up")
axes.legend()
figure.savefig(io.BytesIO(), format="png")
plt.close(figure)
for line in sys.stdin:
    request = json.loads(line)
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    files = [os.open(request[name], flags, 0o644) for name in ("stdout", "stderr")]
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        os.dup2(files[0], 1)
        os.dup2(files[1], 2)
        sys.argv = ["cerberus", *request["argv"]]
        code = 0
        try:
            cerberus.cli.main()
        except SystemExit as exit:
            code = exit.code if isinstance(exit.code, int) else 1
        except BaseException:
            import traceback
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    for fd in files:
        os.close(fd)
    print(json.dumps({"pid": pid}), flush=True)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"exit": os.waitstatus_to_exitcode(status)}), flush=True)
"""


class Launcher:
    """Starts ``cerberus <argv> --json`` processes by forking a parent that has imported torch,
    Cerberus and matplotlib already: a child is a process of its own, running the command line
    from its first line, without paying seconds of imports. One child at a time."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _LAUNCHER],
            cwd=self.folder,
            env=cli_env(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self._replies: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.children = 0

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._replies.put(line)
        self._replies.put(None)

    def _reply(self, timeout: float) -> dict[str, Any] | None:
        """The launcher's next line, or None if none came within ``timeout`` seconds."""
        try:
            line = self._replies.get(timeout=timeout)
        except queue.Empty:
            return None
        if line is None:
            raise AssertionError(f"the launcher exited ({self.proc.wait()})")
        return json.loads(line)

    def start(self, *argv: str | Path) -> Child:
        """Fork ``cerberus <argv> --json``; use the result as a context manager."""
        self.children += 1
        out, err = (self.folder / f"child-{self.children}.{name}" for name in ("out", "err"))
        request = {"argv": [*map(str, argv), "--json"], "stdout": str(out), "stderr": str(err)}
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        reply = self._reply(TIMEOUT)
        assert reply is not None, "the launcher did not fork"
        return Child(self, reply["pid"], out, err)

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(timeout=10)
        self.proc.stdout.close()


class Child:
    """One process forked by a :class:`Launcher`: its JSON events, exit status and signals.
    Leaving its ``with`` block kills it if it still runs, so the launcher is free again."""

    def __init__(self, launcher: Launcher, pid: int, out: Path, err: Path):
        self.launcher, self.pid, self.out, self.err = launcher, pid, out, err
        self.returncode: int | None = None

    @property
    def stderr(self) -> str:
        return self.err.read_text() if self.err.exists() else ""

    @property
    def events(self) -> list[dict[str, Any]]:
        text = self.out.read_text() if self.out.exists() else ""
        lines = text.splitlines(keepends=True)
        return [json.loads(line) for line in lines if line.startswith("{") and line.endswith("}\n")]

    def wait(self, timeout: float) -> int | None:
        """The exit status, or None if the process still runs after ``timeout`` seconds."""
        if self.returncode is None:
            reply = self.launcher._reply(max(timeout, 0.0))
            if reply is not None:
                self.returncode = reply["exit"]
        return self.returncode

    def finish(self, timeout: float = TIMEOUT) -> int:
        """Wait for the exit; return the exit status (negative: killed by that signal)."""
        if self.wait(timeout) is None:
            raise AssertionError(f"still running after {timeout:.0f}s:\n{self.stderr}")
        return self.returncode

    def wait_for(self, kind: str, timeout: float = TIMEOUT) -> dict[str, Any]:
        """Block until the process has printed the event ``kind``; return it."""
        deadline = time.monotonic() + timeout
        while True:
            found = [e for e in self.events if e["event"] == kind]
            if found:
                return found[0]
            if self.wait(0.002) is not None:
                raise AssertionError(f"exited ({self.returncode}) before a {kind!r} event:\n{self.stderr}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {kind!r} event within {timeout:.0f}s:\n{self.stderr}")

    def signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def kill(self) -> bool:
        """SIGKILL the process; False when it had already exited on its own."""
        if self.wait(0) is not None:
            return False
        with contextlib.suppress(ProcessLookupError):  # it is exiting: the status tells
            os.kill(self.pid, signal.SIGKILL)
        return self.finish() == -signal.SIGKILL

    def __enter__(self) -> Child:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.wait(0) is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            self.finish()
