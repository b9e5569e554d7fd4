"""What Cerberus guarantees when things go wrong, each proved where it matters: through the CLI.

Crashes (kill -9), signals, damaged or hostile checkpoints, a full disk, divergence, broken
datasets and two trainings on one run directory. Malformed configs are covered by
tests/test_config_corpus.py. Tests that start ``cerberus train`` subprocesses are marked slow.
All of them train a 5,266-parameter ResNet on the synthetic CIFAR-10 of conftest.py on one CPU
thread, so that every run can be compared bit for bit with one uninterrupted reference run.
"""

from __future__ import annotations

import builtins
import errno
import hashlib
import json
import os
import pickle
import random
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_cifar
from reliability_helpers import TIMEOUT, Launcher, Training, cli_env, wait_until
from typer.testing import CliRunner

from cerberus.checkpoint import load_checkpoint, sidecar_path
from cerberus.cli import app
from cerberus.config import load_config
from cerberus.errors import ConfigError, Interrupted
from cerberus.runner import train_run

# 400 training images in batches of 20: 20 steps per epoch, 2 epochs. EMA, crops and flips make
# the checkpoint carry every kind of state a resume must restore.
CONFIG = """
name = "reliable"
seed = 7
[model]
blocks = [1, 1]
channels = [8, 16]
[data]
val_size = 100
download = false
[augment]
crop_padding = 2
flip = true
[train]
epochs = 2
batch_size = 20
lr = 0.05
nesterov = true
schedule = "cosine"
ema_decay = 0.9
threads = 1
"""
EPOCHS, STEPS = 2, 20


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """``train.threads = 1`` sets torch's thread count for the process; give it back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _no_data_environment(monkeypatch):
    monkeypatch.delenv("CERBERUS_CIFAR10_URL", raising=False)
    monkeypatch.delenv("CERBERUS_DATA", raising=False)


@pytest.fixture(scope="module")
def config_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("config") / "reliable.toml"
    path.write_text(CONFIG)
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory, fake_cifar, config_file) -> Path:
    """The run directory of one uninterrupted run of CONFIG (in this process)."""
    threads = torch.get_num_threads()
    out = tmp_path_factory.mktemp("reference") / "run"
    try:
        train_run(load_config(config_file), out_dir=out, data_dir=str(fake_cifar), handle_signals=False)
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.fixture(scope="module")
def launcher(tmp_path_factory):
    """Forks `cerberus` processes without paying their imports each time (reliability_helpers)."""
    launcher = Launcher(tmp_path_factory.mktemp("launcher"))
    yield launcher
    launcher.close()


def train_args(config_file: Path, data: Path, out: Path, *overrides: str) -> list[str]:
    args = [str(config_file), "--data-dir", str(data), "--out", str(out)]
    return [*args, "--set", *overrides] if overrides else args


def invoke(*args: str | Path):
    return CliRunner().invoke(app, [str(a) for a in args])


def assert_clean_error(result, code: int = 1) -> str:
    """``Error: ...`` on stderr, the given exit code and no traceback; returns stderr."""
    assert result.exit_code == code, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.stderr.startswith("Error: "), result.stderr
    assert "Traceback" not in result.output
    return result.stderr


def temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs"


def assert_matches_reference(run: Path, reference: Path) -> None:
    """A finished run: the same weights as the reference, bit for bit, and a complete, clean folder."""
    last, expected = load_checkpoint(run / "last.pt"), load_checkpoint(reference / "last.pt")
    assert (last["epoch"], last["step"]) == (EPOCHS, 0)
    assert_same_tensors(last["model"], expected["model"])
    assert_same_tensors(last["ema"], expected["ema"])
    for index, state in expected["optimizer"]["state"].items():
        assert_same_tensors(last["optimizer"]["state"][index], state)
    best, expected_best = load_checkpoint(run / "best.pt"), load_checkpoint(reference / "best.pt")
    assert_same_tensors(best["model"], expected_best["model"])
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    expected_metrics = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == list(range(1, EPOCHS + 1))
    assert [m["ema_val_accuracy"] for m in metrics] == [m["ema_val_accuracy"] for m in expected_metrics]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["test_accuracy"] == json.loads((reference / "summary.json").read_text())["test_accuracy"]
    assert temporaries(run) == []


# --------------------------------------------------------------------------------------------
# 1. Crashes: kill -9 at random moments


KILLS = 20


@pytest.mark.slow
def test_kill_9_at_random_moments_never_loses_the_last_checkpoint(
    tmp_path, fake_cifar, config_file, reference, launcher
):
    """SIGKILL while checkpoints are written after every step (train.checkpoint_every=1).

    After every kill, the run's last.pt (and best.pt) load and verify against their sidecars,
    and last.pt never holds an earlier position than after the previous kill: nothing saved is
    lost. The next trial resumes the killed run (or starts it, when no last.pt exists yet) and
    is killed in turn; every run carried to its end has exactly the reference's weights and no
    temporary file left. A quarter of the kills come at any moment after the process starts, the
    rest while it trains, after a delay from a seeded generator. The trials are forked from a
    process that has done the imports (reliability_helpers.Launcher); the final resume is a plain
    `python -m cerberus train --resume`.
    """
    rng = random.Random(1234)
    chain, kills, finished = 0, 0, 0
    run = tmp_path / "run0"
    position = (0, 0)  # what last.pt of this run held after the previous kill
    positions, leftovers = [], []  # what each kill left: last.pt's position, temporary files
    for _ in range(3 * KILLS):
        if kills == KILLS:
            break
        if (run / "last.pt").exists():
            args = ["train", "--resume", run / "last.pt"]
        else:
            args = ["train", *train_args(config_file, fake_cifar, run, "train.checkpoint_every=1")]
        with launcher.start(*args) as child:
            if rng.random() < 0.25:  # any moment from the process's start
                child.wait(rng.uniform(0.0, 1.0))
            else:  # while it trains
                child.wait_for("start")
                child.wait(rng.uniform(0.0, 0.6))
            killed = child.kill()
            assert killed or child.returncode == 0, child.stderr
        if not killed:  # it reached the end first
            assert_matches_reference(run, reference)
            finished += 1
            chain += 1
            run, position = tmp_path / f"run{chain}", (0, 0)
            continue
        kills += 1
        # Check a copy: loading may finish a save's last rename, which the resume must manage.
        copy = tmp_path / "copy"
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(run, copy)
        leftovers.append(temporaries(copy))
        if (copy / "last.pt").exists():
            ckpt = load_checkpoint(copy / "last.pt")
            now = (ckpt["epoch"], ckpt["step"])
            assert now >= position, f"kill {kills}: last.pt went back from {position} to {now}"
            position = now
            assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
        if (copy / "best.pt").exists():
            load_checkpoint(copy / "best.pt")
        positions.append(position)
    assert kills == KILLS
    if (run / "last.pt").exists():  # carry the last killed run to its end
        with Training("--resume", run / "last.pt", cwd=tmp_path) as proc:
            assert proc.finish() == 0, proc.stderr
        assert_matches_reference(run, reference)
        finished += 1
    assert finished >= 1
    print(f"\n{kills} kills, {finished} runs finished; last.pt after each kill: {positions}")
    print(f"temporaries after each kill: {leftovers}")


# --------------------------------------------------------------------------------------------
# 2. Signals: SIGINT / SIGTERM write last.pt, and --resume ends where an uninterrupted run ends


@pytest.mark.slow
@pytest.mark.parametrize(
    "signum,moment",
    [(signal.SIGINT, "mid-epoch"), (signal.SIGINT, "epoch-end"), (signal.SIGTERM, "mid-epoch")],
    ids=["SIGINT-mid-epoch", "SIGINT-epoch-end", "SIGTERM-mid-epoch"],
)
def test_signal_then_resume_equals_an_uninterrupted_run(
    tmp_path, fake_cifar, config_file, reference, launcher, signum, moment
):
    """The signal is sent as the first epoch starts (so it lands mid-epoch) or once epoch 1's
    files are written (so it lands at the boundary); the exit code is 128 + the signal, last.pt
    holds the position the `interrupted` event reports, and a resume ends bit-identical."""
    run = tmp_path / "run"
    with launcher.start("train", *train_args(config_file, fake_cifar, run)) as proc:
        if moment == "mid-epoch":
            proc.wait_for("start")  # the first of 20 steps is running
        else:
            # Epoch 1 has written best.pt, last.pt and metrics.jsonl; curves.png and the epoch
            # event follow, then the stop flag is read.
            wait_until(lambda: (run / "metrics.jsonl").exists())
        proc.signal(signum)
        code = proc.finish()
    name = signal.Signals(signum).name
    assert code == 128 + signum, proc.stderr
    assert proc.stderr.startswith(f"stopped by {name} at "), proc.stderr
    assert f"Resume with: cerberus train --resume {run / 'last.pt'}" in proc.stderr
    assert "Traceback" not in proc.stderr
    (stopped,) = [e for e in proc.events if e["event"] == "interrupted"]
    if moment == "mid-epoch":
        assert stopped["epoch"] == 0 and 0 < stopped["step"] < STEPS, stopped
    else:  # (1, 0) unless this process stalled past the plot; in-process tests pin the boundary
        assert stopped["epoch"] == 1 and 0 <= stopped["step"] < STEPS, stopped
    ckpt = load_checkpoint(run / "last.pt")
    assert (ckpt["epoch"], ckpt["step"]) == (stopped["epoch"], stopped["step"])

    with launcher.start("train", "--resume", run / "last.pt") as proc:
        assert proc.finish() == 0, proc.stderr
        (start,) = [e for e in proc.events if e["event"] == "start"]
    assert (start["start_epoch"], start["start_step"]) == (stopped["epoch"], stopped["step"])
    assert_matches_reference(run, reference)


INTERRUPT_AT_IMPORT = """
import builtins, os, signal, sys
real_import = builtins.__import__
def interrupting(name, *args, **kwargs):
    if name == {module!r} and name not in sys.modules:
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C as the module's import begins
    return real_import(name, *args, **kwargs)
builtins.__import__ = interrupting
"""


def interrupted_at_import(module: str, code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh Python whose first import of ``module`` meets a Ctrl-C."""
    return subprocess.run(
        [sys.executable, "-c", INTERRUPT_AT_IMPORT.format(module=module) + code],
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )


def test_a_ctrl_c_during_the_torch_import_arrives_once_it_is_done():
    """torch's C++ start-up loses a SIGINT that lands inside it (the command would run on), so
    the commands import torch with SIGINT held back: it arrives after the import instead."""
    done = interrupted_at_import(
        "torch",
        """
from cerberus.cli._app import import_torch
try:
    import_torch()
except KeyboardInterrupt:
    unblocked = signal.pthread_sigmask(signal.SIG_BLOCK, set()) == set()
    print("KeyboardInterrupt; torch imported:", "torch" in sys.modules, "; SIGINT unblocked:", unblocked)
""",
    )
    assert done.stdout == "KeyboardInterrupt; torch imported: True ; SIGINT unblocked: True\n", done.stderr


def test_a_ctrl_c_while_the_command_line_loads_is_an_interrupt_not_a_traceback():
    done = interrupted_at_import(  # what the console script and python -m cerberus run
        "typer", 'sys.argv = ["cerberus", "--help"]\nfrom cerberus.entry import main\nmain()\n'
    )
    assert (done.returncode, done.stdout, done.stderr) == (130, "", "")


# --------------------------------------------------------------------------------------------
# 3. Checkpoint integrity: every command that reads a checkpoint verifies it first


def _command(command: str, checkpoint: Path, data: Path, tmp_path: Path) -> list[str | Path]:
    if command == "train --resume":
        return ["train", "--resume", checkpoint]
    if command == "eval":
        return ["eval", checkpoint, "--data-dir", data, "--json"]
    kaggle = tmp_path / "kaggle.pkl"  # two images in the 2024 course layout
    kaggle.write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"ids": [0, 1]}))
    return ["predict", checkpoint, "--input", kaggle, "--output", tmp_path / "submission.csv", "--json"]


COMMANDS = ["train --resume", "eval", "predict"]


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _truncate_without_sidecar(path: Path) -> None:
    _truncate(path)
    sidecar_path(path).unlink()


DAMAGE = {
    "flipped-byte": (_flip_a_byte, "checksum mismatch: {path} is corrupt or was modified"),
    "truncated": (_truncate, "checksum mismatch: {path} is corrupt or was modified"),
    "truncated-no-sidecar": (_truncate_without_sidecar, "{path} is truncated or corrupt"),
}


@pytest.mark.parametrize("damage", DAMAGE)
@pytest.mark.parametrize("command", COMMANDS)
def test_a_damaged_checkpoint_is_refused_by_every_command(tmp_path, fake_cifar, reference, command, damage):
    run = tmp_path / "run"
    run.mkdir()
    path = run / "last.pt"
    for name in ("last.pt", "last.pt.sha256"):
        shutil.copy(reference / name, run / name)
    damage_file, message = DAMAGE[damage]
    damage_file(path)
    files = sorted(run.iterdir())
    result = invoke(*_command(command, path, fake_cifar, tmp_path))
    stderr = assert_clean_error(result)
    assert message.format(path=path) in stderr
    assert sorted(run.iterdir()) == files  # nothing written next to it
    assert not (tmp_path / "submission.csv").exists()


class _RunsCode:
    """Unpickling this runs a shell command (pickle calls os.system)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("command", COMMANDS)
def test_a_checkpoint_carrying_code_is_refused_without_running_it(tmp_path, fake_cifar, command):
    marker = tmp_path / "CODE-RAN"
    run = tmp_path / "run"
    run.mkdir()
    path = run / "last.pt"
    torch.save({"format": "cerberus-checkpoint", "model": _RunsCode(marker)}, path)
    # An attacker can write a matching sidecar too: the checksum proves integrity, not trust.
    sidecar_path(path).write_text(f"{hashlib.sha256(path.read_bytes()).hexdigest()}  last.pt\n")
    result = invoke(*_command(command, path, fake_cifar, tmp_path))
    stderr = assert_clean_error(result)
    assert f"{path} holds pickled Python objects" in stderr
    assert "it was not loaded" in stderr
    assert not marker.exists()


# --------------------------------------------------------------------------------------------
# 4. A full disk


class DiskFills:
    """An ``open`` for one module: from the ``at``-th file it opens for writing on, every write
    stores half its bytes and fails with ENOSPC. Keeps the run folder's files as they were just
    before the disk filled."""

    def __init__(self, at: int, folder: Path):
        self.at, self.folder, self.opened = at, folder, 0
        self.before: dict[str, bytes] | None = None

    def __call__(self, file, mode="r", *args, **kwargs):
        handle = builtins.open(file, mode, *args, **kwargs)  # noqa: SIM115 (an open() stand-in)
        if "w" not in mode:
            return handle
        self.opened += 1
        if self.opened < self.at:
            return handle
        if self.before is None:
            files = [p for p in self.folder.iterdir() if p.is_file() and not p.name.endswith(".tmp")]
            self.before = {p.name: p.read_bytes() for p in files}
        return _FullFile(handle)


class _FullFile:
    def __init__(self, handle):
        self.handle = handle

    def write(self, data):
        self.handle.write(data[: len(data) // 2])
        self.handle.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self.handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.handle.close()


CHECKPOINT_FAILED = (
    r"could not write (best|last)\.pt: No space left on device; the previous checkpoint is intact"
)

# Every file goes through cerberus.files. Writes in order: config.toml (1); at the end of epoch 1
# best.pt's checksum and weights (2-3), last.pt's (4-5), metrics.jsonl (6), curves.png (7); then
# epoch 2's first checkpoint (8-9). With checkpoint_every=1, step N's last.pt is 2N and 2N+1.
DISK_FULL = {
    "checksum-at-epoch-end": ("cerberus.files", 8, (), CHECKPOINT_FAILED),
    "weights-at-epoch-end": ("cerberus.files", 9, (), CHECKPOINT_FAILED),
    "weights-mid-epoch": ("cerberus.files", 9, ("train.checkpoint_every=1",), CHECKPOINT_FAILED),
    "metrics": ("cerberus.files", 6, (), r"could not write \S*metrics\.jsonl: No space left on device"),
}


@pytest.mark.parametrize("case", DISK_FULL)
def test_disk_full_keeps_the_previous_files_and_says_so(
    tmp_path, fake_cifar, config_file, reference, monkeypatch, case
):
    module, at, overrides, message = DISK_FULL[case]
    run = tmp_path / "run"
    run.mkdir()
    disk = DiskFills(at, run)
    monkeypatch.setattr(f"{module}.open", disk, raising=False)
    result = invoke("train", *train_args(config_file, fake_cifar, run, *overrides), "--quiet")
    stderr = assert_clean_error(result)
    assert re.search(message, stderr), stderr
    assert disk.before is not None
    for name, data in disk.before.items():
        assert (run / name).read_bytes() == data, f"{name} changed"
    assert temporaries(run) == []
    # Nothing was lost: the run continues from the checkpoint the full disk left, to the end.
    monkeypatch.undo()
    train_run(resume=run / "last.pt", handle_signals=False)
    assert_matches_reference(run, reference)


def test_disk_full_while_plotting_is_one_error(tmp_path, fake_cifar, config_file, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("matplotlib.figure.Figure.savefig", full)
    result = invoke("train", *train_args(config_file, fake_cifar, tmp_path / "run"), "--quiet")
    stderr = assert_clean_error(result)
    assert "curves.png" in stderr and "No space left on device" in stderr


# --------------------------------------------------------------------------------------------
# 6. Divergence while checkpoints are written every step


def test_divergence_keeps_the_last_finite_checkpoint(tmp_path, fake_cifar, config_file):
    run = tmp_path / "run"
    overrides = ("train.lr=300", "train.warmup_epochs=0.5", "train.checkpoint_every=1")
    result = invoke("train", *train_args(config_file, fake_cifar, run, *overrides), "--quiet")
    stderr = assert_clean_error(result)
    assert "non-finite at epoch" in stderr and "lower train.lr" in stderr, stderr
    assert stderr.count("the last good checkpoint was kept") == 1, stderr
    epoch, step = map(int, re.search(r"at epoch (\d+), step (\d+)", stderr).groups())
    assert step > 1  # checkpoints were written before it diverged
    ckpt = load_checkpoint(run / "last.pt")
    assert (ckpt["epoch"], ckpt["step"]) == (epoch - 1, step - 1)  # the step before
    for key in ("model", "ema"):
        assert all(torch.isfinite(v).all() for v in ckpt[key].values() if v.is_floating_point())
    assert temporaries(run) == []


# --------------------------------------------------------------------------------------------
# 7. Dataset problems through `cerberus train`


def _corrupt_header(path: Path) -> None:
    path.write_bytes(b"\x00" * 64 + path.read_bytes()[64:])


DATA_PROBLEMS = {
    "missing-file": (lambda folder: (folder / "data_batch_3").unlink(), "data_batch_3", "is missing"),
    "partial-file": (lambda folder: _truncate(folder / "test_batch"), "test_batch", "truncated or corrupt"),
    "corrupt-file": (lambda folder: _corrupt_header(folder / "data_batch_1"), "data_batch_1", "corrupt"),
    "no-dataset": (shutil.rmtree, "", "does not exist and downloading is off (data.download = false)"),
}


@pytest.mark.parametrize("problem", DATA_PROBLEMS)
def test_a_dataset_problem_is_one_error_naming_the_file(tmp_path, config_file, problem):
    root = write_cifar(tmp_path / "data", train=100, test=20)
    damage, name, words = DATA_PROBLEMS[problem]
    damage(root / "cifar-10-batches-py")
    run = tmp_path / "run"
    result = invoke("train", *train_args(config_file, root, run, "data.val_size=10"))
    stderr = assert_clean_error(result)
    assert f"{root / 'cifar-10-batches-py' / name}" in stderr and words in stderr, stderr
    assert not (run / "last.pt").exists()


def test_a_failed_download_names_the_mirror_option(tmp_path, config_file):
    url = "http://127.0.0.1:9/cifar-10-python.tar.gz"  # the discard port: connection refused
    run = tmp_path / "run"
    result = invoke(
        "train", *train_args(config_file, tmp_path / "data", run, "data.download=true", f"data.url={url}")
    )
    stderr = assert_clean_error(result)
    assert f"could not download CIFAR-10 from {url}" in stderr
    assert "data.url" in stderr and "CERBERUS_CIFAR10_URL" in stderr
    assert not (tmp_path / "data" / "cifar-10-batches-py").exists()


# --------------------------------------------------------------------------------------------
# 8. One training per run directory


@pytest.mark.slow
def test_a_run_directory_in_use_is_refused_to_a_second_training(
    tmp_path, fake_cifar, config_file, reference, launcher
):
    """The first training is stopped (SIGSTOP) while it holds the lock; a second `cerberus train`
    on its folder, with the same --out or with --resume of its last.pt, is refused and writes
    nothing; the first then finishes as if alone. (The second runs in this process: flock
    refuses a second open file description in the same process just as in another.)"""
    run = tmp_path / "run"

    def folder_state() -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in sorted(run.iterdir())}

    with launcher.start("train", *train_args(config_file, fake_cifar, run)) as first:
        first.wait_for("start")  # the lock is taken before the data is read
        first.signal(signal.SIGSTOP)
        try:  # (in epoch 1 unless this process stalled: the refusal does not depend on it)
            before = folder_state()
            result = invoke("train", *train_args(config_file, fake_cifar, run))
            stderr = assert_clean_error(result)
            assert (
                f"{run} is in use by another cerberus process; wait for it to finish or choose another --out"
                in stderr
            )
            assert folder_state() == before
        finally:
            first.signal(signal.SIGCONT)
        first.wait_for("epoch")  # last.pt of epoch 1 is written
        first.signal(signal.SIGSTOP)
        try:
            before = folder_state()
            result = invoke("train", "--resume", run / "last.pt")
            stderr = assert_clean_error(result)
            assert (
                f"{run} is in use by another cerberus process; wait for it to finish\n" in stderr
            )  # no --out
            assert folder_state() == before
        finally:
            first.signal(signal.SIGCONT)
        assert first.finish() == 0, first.stderr
    assert_matches_reference(run, reference)


# --------------------------------------------------------------------------------------------
# Run-directory odds and ends


def test_resuming_a_finished_run_restores_lost_metrics(tmp_path, reference):
    """A kill between the final last.pt and metrics.jsonl loses the last line; a resume of the
    finished run writes it back (and the summary) without training again."""
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    lines = (reference / "metrics.jsonl").read_text().splitlines(keepends=True)
    (run / "metrics.jsonl").write_text(lines[0])
    (run / "summary.json").unlink()
    result = train_run(resume=run / "last.pt", handle_signals=False)
    assert result.epochs_completed == EPOCHS
    assert (run / "metrics.jsonl").read_text() == "".join(lines)
    assert_matches_reference(run, reference)


def test_resuming_without_the_sidecar_says_the_checksum_was_not_verified(tmp_path, reference):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    (run / "last.pt.sha256").unlink()
    result = invoke("train", "--resume", run / "last.pt")
    assert result.exit_code == 0, result.output
    assert result.stderr.startswith(
        "Note: last.pt has no last.pt.sha256 beside it, so its checksum was not verified; "
    )


@pytest.mark.parametrize("output", ["--json", "--quiet"])
def test_a_reader_closing_stdout_does_not_stop_training(tmp_path, fake_cifar, config_file, output):
    """``cerberus train ... | head -1``: the output goes, the run finishes and writes its files."""
    args = train_args(config_file, fake_cifar, tmp_path / "run")
    command = [sys.executable, "-m", "cerberus", "train", *args, output]
    pipes = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc = subprocess.Popen(command, cwd=tmp_path, env=cli_env(), **pipes)
    try:
        first = proc.stdout.readline()  # the start event, or the display's first line
        start = json.loads(first)["event"] == "start" if output == "--json" else " parameters on " in first
        assert start, first
        proc.stdout.close()  # as `head -1` does: the next event's write finds no reader
        stderr = proc.stderr.read()
        assert proc.wait(timeout=TIMEOUT) == 0, stderr
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stderr.close()
    assert stderr == ""
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["epochs"] == EPOCHS


def test_checkpoint_every_writes_last_pt_within_epochs(tmp_path, fake_cifar, config_file):
    run = tmp_path / "run"
    seen = set()

    def record(event):
        if event["event"] == "step" and (run / "last.pt").exists():
            ckpt = load_checkpoint(run / "last.pt")
            seen.add((ckpt["epoch"], ckpt["step"]))

    cfg = load_config(config_file, ["train.checkpoint_every=6"])
    train_run(cfg, out_dir=run, data_dir=str(fake_cifar), on_event=record, evaluate_test=False)
    assert sorted(seen) == [(0, 6), (0, 12), (0, 18), (1, 0), (1, 6), (1, 12), (1, 18)]


def test_an_unusable_run_directory_is_one_error(tmp_path, fake_cifar, config_file):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = invoke("train", *train_args(config_file, fake_cifar, blocker / "run"))
    stderr = assert_clean_error(result, code=2)
    assert f"cannot create the run directory {blocker / 'run'}" in stderr


# --------------------------------------------------------------------------------------------
# Signals outside the epochs: loading the data and the final test stop at once


@pytest.mark.parametrize(
    "signum, code, name", [(signal.SIGINT, 130, "SIGINT"), (signal.SIGTERM, 143, "SIGTERM")]
)
def test_a_signal_during_the_final_test_stops_it_and_a_resume_finishes_the_run(
    tmp_path, fake_cifar, config_file, reference, monkeypatch, signum, code, name
):
    real, calls = torch.load, []

    def signalled(path, *args, **kwargs):  # arrives while best.pt is read for the test (once),
        calls.append(Path(path))  # inside load_checkpoint's `except Exception`
        if len(calls) == 1:
            os.kill(os.getpid(), signum)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(torch, "load", signalled)
    run = tmp_path / "run"
    with pytest.raises(Interrupted) as stopped:
        train_run(load_config(config_file), out_dir=run, data_dir=str(fake_cifar))
    assert stopped.value.exit_code == code
    assert str(stopped.value) == (
        f"stopped by {name} during the final test; last.pt and best.pt hold all {EPOCHS} epochs. "
        f"Finish the run (the test and summary.json) with: cerberus train --resume {run / 'last.pt'}"
    )
    assert not (run / "summary.json").exists() and (run / "last.pt").exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers given back
    train_run(resume=run / "last.pt")  # tests again, and writes the summary
    assert calls[0] == calls[-1] == run / "best.pt"
    assert_matches_reference(run, reference)


def test_a_signal_while_the_data_loads_stops_before_anything_is_written(
    tmp_path, fake_cifar, config_file, monkeypatch
):
    import cerberus.safe_pickle as safe_pickle

    real = safe_pickle.load

    def signalled(file, *args, **kwargs):  # inside the read of a batch file, under its except
        os.kill(os.getpid(), signal.SIGINT)
        return real(file, *args, **kwargs)

    monkeypatch.setattr(safe_pickle, "load", signalled)
    run = tmp_path / "run"
    with pytest.raises(Interrupted) as stopped:
        train_run(load_config(config_file), out_dir=run, data_dir=str(fake_cifar))
    assert stopped.value.exit_code == 130
    assert str(stopped.value) == "stopped by SIGINT while the data loaded, before anything was written"
    assert not run.exists()


def test_runs_started_in_the_same_second_get_folders_of_their_own(
    tmp_path, fake_cifar, config_file, monkeypatch
):
    """The default runs/<name>-<time> of another run started in the same second (here: one that
    holds a last.pt already) is not this run's: it gets <name>-<time>-2, the next -3."""
    import cerberus.runner as runner

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(runner, "default_out_dir", lambda config: Path("runs") / "reliable-20261127-120000")
    other = tmp_path / "runs" / "reliable-20261127-120000"
    other.mkdir(parents=True)
    (other / "last.pt").write_bytes(b"another run's")
    config = load_config(config_file).model_copy(
        update={"train": load_config(config_file).train.model_copy(update={"epochs": 1})}
    )
    first = train_run(config, data_dir=str(fake_cifar), handle_signals=False)
    second = train_run(config, data_dir=str(fake_cifar), handle_signals=False)
    assert first.out_dir == Path("runs/reliable-20261127-120000-2")
    assert second.out_dir == Path("runs/reliable-20261127-120000-3")
    assert (first.out_dir / "summary.json").exists() and (second.out_dir / "summary.json").exists()
    assert sorted(p.name for p in other.iterdir()) == ["last.pt"]


def test_a_default_run_folder_that_cannot_be_made_is_one_error(
    tmp_path, fake_cifar, config_file, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").symlink_to(tmp_path / "unmounted")  # a dangling link: no folder can go there
    with pytest.raises(ConfigError, match="cannot create the run directory runs/reliable-"):
        train_run(load_config(config_file), data_dir=str(fake_cifar), handle_signals=False)


def test_a_damaged_best_pt_is_refused_before_a_resume_trains(tmp_path, reference):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    (run / "summary.json").unlink()
    _flip_a_byte(run / "best.pt")
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    stderr = assert_clean_error(invoke("train", "--resume", run / "last.pt"))
    best_epoch = load_checkpoint(run / "last.pt")["best_epoch"]
    assert stderr == (
        f"Error: checksum mismatch: {run / 'best.pt'} is corrupt or was modified: last.pt names epoch "
        f"{best_epoch} as the best so far, whose weights only best.pt holds; put back an intact copy "
        "beside last.pt to resume\n"
    )
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


@pytest.mark.parametrize(
    "field, value, problem",
    [
        (
            "epoch_state",
            {"foo": 1},
            "TypeError: EpochState.__init__() got an unexpected keyword argument 'foo'",
        ),
        ("epoch", "x", "ValueError: its epoch is 'x', not a count"),
        ("step", -1, "ValueError: its step is -1, not a count"),
        (
            "metrics",
            [{"epoch": 1}],
            "ValueError: its metrics are not epoch records (each has epoch, train_accuracy, "
            "train_images_per_sec, train_loss)",
        ),
    ],
)
def test_a_last_pt_with_a_malformed_field_is_refused_cleanly(tmp_path, reference, field, value, problem):
    """A last.pt whose checksum holds but whose training state was written by something else."""
    from cerberus.checkpoint import save_checkpoint

    run = tmp_path / "run"
    shutil.copytree(reference, run)
    payload = load_checkpoint(run / "last.pt")
    payload[field] = value
    save_checkpoint(run / "last.pt", payload)
    stderr = assert_clean_error(invoke("train", "--resume", run / "last.pt"))
    assert (
        stderr
        == f"Error: the training state in last.pt does not fit this run ({problem}); it cannot be resumed\n"
    )


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["train", "cfg.toml", "--out", ""], "--out"),
        (["train", "cfg.toml", "--out="], "--out"),
        (["train", "--resume", ""], "--resume"),
        (["train", "cfg.toml", "--data-dir", ""], "--data-dir"),
        (["eval", "best.pt", "--out", ""], "--out"),
        (["predict", "best.pt", "--input", "t.pkl", "--output", ""], "--output"),
        (["predict", "best.pt", "--input", "t.pkl", "--probs="], "--probs"),
        (["search", "--trials", "1", "--out", ""], "--out"),
        (["search", "--write-configs", ""], "--write-configs"),
    ],
)
def test_an_empty_path_is_refused_not_read_as_the_current_folder(tmp_path, monkeypatch, args, flag):
    # `--out "$OUT"` with OUT unset: read as ".", a run would spill its files into the working folder
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert f"Error: Invalid value for '{flag}': an empty path" in result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
@pytest.mark.parametrize("args", [["count-params", "--json"], ["count-params", "--blocks", "1", "1"]])
def test_results_that_cannot_be_printed_are_one_error_line(args):
    with open("/dev/full", "w") as full:  # the shell's `> /dev/full`: every write fails, disk full
        done = subprocess.run(
            [sys.executable, "-m", "cerberus", *args],
            stdout=full,
            stderr=subprocess.PIPE,
            env=cli_env(),
            text=True,
            timeout=TIMEOUT,
        )
    message = "Error: could not write the output: No space left on device\n"
    assert (done.returncode, done.stderr) == (1, message)
