"""A corpus of malformed configs: each is refused with exit code 2, its culprit named, no traceback.

Every file in ``tests/malformed_configs/`` starts with ``# expect: <substring>``, the text the error
must contain. A file whose refusal comes from the parameter budget alone also says
``# count-params: reports``: ``count-params`` shows the verdict instead of refusing. Cases that
cannot be stored as a file (empty, missing, unreadable, a folder, bad ``--set``) are built below.

Each case runs through ``load_config`` (the library), ``cerberus count-params CONFIG`` (validates
the schema) and ``cerberus train CONFIG --out DIR`` (validates everything, budget included, before
reading any data; skipped until the command exists).
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cerberus.cli import app
from cerberus.config import load_config
from cerberus.errors import ConfigError

CORPUS = Path(__file__).parent / "malformed_configs"
CORPUS_FILES = sorted(CORPUS.glob("*.toml"))
VALID_BASE = '# a sound config that --set overrides break\n[train]\nepochs = 2\ndevice = "cpu"\n'


@dataclass(frozen=True)
class Header:
    expect: str  # substring of the error message
    count_params_refuses: bool  # False when only the budget is wrong: count-params reports it


def read_header(path: Path) -> Header:
    lines = path.read_bytes().decode("ascii", errors="replace").splitlines()
    match = re.fullmatch(r"# expect: (.+)", lines[0]) if lines else None
    assert match, f"{path.name}: line 1 must be '# expect: <substring of the error>'"
    reports = any(line.strip() == "# count-params: reports" for line in lines[1:4])
    return Header(expect=match.group(1).strip(), count_params_refuses=not reports)


# --------------------------------------------------------------------------------------------
# Cases that are not a stored file


@dataclass(frozen=True)
class Special:
    """A case built in a temporary folder: ``make(folder)`` returns the config path to pass."""

    make: Callable[[Path], Path]
    expect: str
    overrides: list[str] = field(default_factory=list)
    count_params_refuses: bool = True
    unreadable: bool = False  # chmod 000: root reads it anyway, so root gets the error simulated


def _write(name: str, content: str) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        path = folder / name
        path.write_text(content)
        return path

    return make


def _missing(folder: Path) -> Path:
    return folder / "missing.toml"


def _folder(folder: Path) -> Path:
    path = folder / "folder.toml"
    path.mkdir()
    return path


def _unreadable(folder: Path) -> Path:
    path = _write("unreadable.toml", VALID_BASE)(folder)
    path.chmod(0)
    return path


SPECIAL = {
    "empty_file": Special(_write("empty.toml", ""), "empty.toml: the config file is empty"),
    "blank_file": Special(_write("blank.toml", "\n   \n\t\n"), "blank.toml: the config file is empty"),
    "missing_file": Special(_missing, "missing.toml: no such config file"),
    "folder": Special(_folder, "folder.toml: is a folder, not a config file"),
    "unreadable_file": Special(
        _unreadable, "unreadable.toml: cannot read the config file (permission denied)", unreadable=True
    ),
    "set_without_equals": Special(
        _write("base.toml", VALID_BASE),
        "--set 'train.lr': expected KEY=VALUE",
        overrides=["train.lr"],
        count_params_refuses=False,
    ),
    "set_invalid_toml_value": Special(
        _write("base.toml", VALID_BASE),
        "--set 'model.blocks=[3, 5': '[3, 5' is not a valid TOML value",
        overrides=["model.blocks=[3, 5"],
        count_params_refuses=False,
    ),
    "set_unknown_key": Special(
        _write("base.toml", VALID_BASE),
        "model.blok: unknown key",
        overrides=["model.blok=3"],
        count_params_refuses=False,
    ),
    "set_unknown_section": Special(  # the error is at `nope`, above the key --set gave
        _write("base.toml", VALID_BASE),
        "nope: unknown key (from --set nope.x=1)",
        overrides=["nope.x=1"],
        count_params_refuses=False,
    ),
    "set_wrong_type": Special(  # the file is sound: the message must point at --set
        _write("base.toml", VALID_BASE),
        "train.epochs: Input should be a valid integer (from --set train.epochs=abc)",
        overrides=["train.epochs=abc"],
        count_params_refuses=False,
    ),
    "set_breaks_a_cross_field_rule": Special(  # the file's nesterov = true is fine with sgd
        _write("base.toml", VALID_BASE + "nesterov = true\n"),
        "train: nesterov applies to the sgd and muon optimizers only (with --set train.optimizer=adamw)",
        overrides=["train.optimizer=adamw"],
        count_params_refuses=False,
    ),
    "set_into_a_value": Special(
        _write("base.toml", VALID_BASE),
        "--set 'train.epochs.max=3': 'epochs' is not a section",
        overrides=["train.epochs.max=3"],
        count_params_refuses=False,
    ),
    "set_over_budget": Special(
        _write("base.toml", VALID_BASE),
        "model has 11,173,962 parameters, over the 5,000,000 budget by 6,173,962",
        overrides=["model.blocks=[2, 2, 2, 2]", "model.channels=[64, 128, 256, 512]"],
        count_params_refuses=False,
    ),
}


def _make(case: Special, folder: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``case.make(folder)``; as root (as in CI), which reads a chmod 000 file anyway, reading the
    unreadable case's file raises the PermissionError a user would get."""
    path = case.make(folder)
    if case.unreadable and hasattr(os, "geteuid") and os.geteuid() == 0:
        denied, read_bytes = path.resolve(), Path.read_bytes

        def refuse(self: Path) -> bytes:
            if self.resolve() == denied:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
            return read_bytes(self)

        monkeypatch.setattr(Path, "read_bytes", refuse)
    return path


# --------------------------------------------------------------------------------------------
# The corpus itself


def test_corpus_is_large_and_self_describing() -> None:
    assert len(CORPUS_FILES) >= 20
    for path in CORPUS_FILES:
        assert read_header(path).expect


# --------------------------------------------------------------------------------------------
# Library: load_config raises ConfigError naming the culprit


@pytest.mark.parametrize("path", CORPUS_FILES, ids=lambda p: p.stem)
def test_load_config_refuses(path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert read_header(path).expect in str(info.value)
    assert info.value.exit_code == 2


@pytest.mark.parametrize("name", SPECIAL)
def test_load_config_refuses_special(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    case = SPECIAL[name]
    with pytest.raises(ConfigError) as info:
        load_config(_make(case, tmp_path, monkeypatch), case.overrides)
    assert case.expect in str(info.value)
    assert info.value.exit_code == 2


# --------------------------------------------------------------------------------------------
# CLI


def assert_refused(result, expect: str) -> None:
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("Error: "), result.output
    assert expect in result.stderr
    assert "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit), result.exception


@pytest.mark.parametrize("path", CORPUS_FILES, ids=lambda p: p.stem)
def test_count_params_refuses(path: Path) -> None:
    header = read_header(path)
    result = CliRunner().invoke(app, ["count-params", str(path)])
    if header.count_params_refuses:
        assert_refused(result, header.expect)
    else:  # count-params reports the budget; it does not refuse
        assert result.exit_code == 0, result.output
        assert "OVER BUDGET" in result.stdout


@pytest.mark.parametrize("name", [n for n, case in SPECIAL.items() if not case.overrides])
def test_count_params_refuses_special(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    case = SPECIAL[name]
    config = _make(case, tmp_path, monkeypatch)
    assert_refused(CliRunner().invoke(app, ["count-params", str(config)]), case.expect)


def files_under(folder: Path) -> set[Path]:
    return set(folder.rglob("*"))


def run_train(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, config: Path, overrides: list[str]):
    """``cerberus train CONFIG --out <tmp>/run [--set ...]`` from inside tmp_path; data unreachable."""
    out = tmp_path / "run"
    monkeypatch.chdir(tmp_path)  # anything written relative to the working folder lands here too
    env = {
        "CERBERUS_DATA": str(tmp_path / "data"),  # absent: a config must fail before data is read
        "CERBERUS_CIFAR10_URL": (tmp_path / "no-such-archive.tar.gz").as_uri(),
    }
    args = ["train", str(config), "--out", str(out)]
    for override in overrides:
        args += ["--set", override]
    before = files_under(tmp_path)
    result = CliRunner().invoke(app, args, env=env)
    assert not out.exists(), "a refused config must not create the run folder"
    assert files_under(tmp_path) == before, "a refused config must not write anything"
    return result


@pytest.mark.parametrize("path", CORPUS_FILES, ids=lambda p: p.stem)
def test_train_refuses(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert_refused(run_train(tmp_path, monkeypatch, path, []), read_header(path).expect)


@pytest.mark.parametrize("name", SPECIAL)
def test_train_refuses_special(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    case = SPECIAL[name]
    config = _make(case, tmp_path, monkeypatch)
    assert_refused(run_train(tmp_path, monkeypatch, config, case.overrides), case.expect)
