"""What ``cerberus search`` writes: results before configs, designs the base refuses skipped,
the configs folder checked before training, and no stale configs left from an earlier write."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_search import FakeResult
from typer.testing import CliRunner

from cerberus.arch import Architecture
from cerberus.cli import app
from cerberus.config import load_config
from cerberus.errors import CerberusError, ConfigError
from cerberus.search import enumerate_designs, run_trials, space_from_dict, write_candidate_configs
from cerberus.search.results import check_configs_dir, write_configs

# Two designs: C[8,16] (stem width 8) and C[64,128], whose 64-wide stem a whitening stem refuses
# (it needs an even width from 2 to 54).
TWO_DESIGNS = {"stages": [2], "blocks": [1, 1], "base_width": [8, 64], "max_params": 1_000_000}
WHITEN = {"train": {"whiten_stem": True}}
TRIAL_SETTINGS = ["train.epochs=1", "train.whiten_stem=false"]  # the trials themselves train plain stems
REFUSED = "02-b1-1_c64-128_f3k1p16s64"  # ranked second: the fake trainer scores C[8,16] higher
WHITEN_REASON = "train.whiten_stem fills the stem with whitening filters and their negatives"


class FakeTrainer:
    """One epoch event per epoch; accuracy 0.9 for designs with 8-wide stems, 0.5 otherwise, or
    (``improving``) 0.1 more with each call."""

    def __init__(self, improving: bool = False) -> None:
        self.improving = improving
        self.configs = []

    def __call__(self, config, *, out_dir, on_event, **_):
        self.configs.append(config)
        accuracy = 0.9 if config.model.architecture().stem_width == 8 else 0.5
        if self.improving:
            accuracy = 0.1 * len(self.configs)
        for epoch in range(1, config.train.epochs + 1):
            on_event({"event": "epoch", "epoch": epoch, "val_accuracy": accuracy, "val_loss": 1.0})
        return FakeResult(Path(out_dir), {}, accuracy, config.train.epochs)


def search(out: Path, trainer, n: int, **kwargs):
    kwargs.setdefault("overrides", TRIAL_SETTINGS)
    space = space_from_dict(kwargs.pop("space", TWO_DESIGNS))
    return run_trials(space, trials=n, out_dir=out, seed=0, train_fn=trainer, **kwargs)


def invoke(*args: str):
    return CliRunner().invoke(app, ["search", *args])


def arch(*channels: int) -> Architecture:
    """A design of :data:`TWO_DESIGNS`' kind: 3x3 convolutions, 1x1 shortcuts, 16x16 pooling."""
    return Architecture((1, 1), channels, 3, 1, 16, channels[0])


# --------------------------------------------------------------------------------------------
# A design the base refuses


def test_a_design_the_base_refuses_is_skipped_and_the_results_are_written(tmp_path) -> None:
    out = tmp_path / "s"
    result = search(out, FakeTrainer(), 2, base=WHITEN)
    assert [r.state for r in result.leaderboard] == ["complete", "complete"]
    assert [s.name for s in result.skipped_configs] == [REFUSED]
    assert result.skipped_configs[0].reason.startswith(WHITEN_REASON)
    assert "\n" not in result.skipped_configs[0].reason and "got 64" in result.skipped_configs[0].reason
    assert result.configs == [out / "configs" / "01-b1-1_c8-16_f3k1p16s8.toml"]
    written = load_config(result.configs[0])
    assert written.train.whiten_stem and written.model.architecture() == arch(8, 16)
    assert sorted(p.name for p in (out / "configs").iterdir()) == ["01-b1-1_c8-16_f3k1p16s8.toml"]
    assert (out / "pareto.png").stat().st_size > 0
    saved = json.loads((out / "leaderboard.json").read_text())
    assert saved["configs"] == [str(result.configs[0])]
    assert saved["skipped_configs"] == [s.to_dict() for s in result.skipped_configs]
    report = search(out, FakeTrainer(), 0, base=WHITEN)  # reporting on the study: the same, every time
    assert report.configs == result.configs and report.skipped_configs == result.skipped_configs


def test_a_configs_folder_that_cannot_be_made_is_refused_before_any_training(tmp_path) -> None:
    (tmp_path / "file").write_text("")
    trainer = FakeTrainer()
    with pytest.raises(ConfigError, match="is not a folder"):
        search(tmp_path / "s", trainer, 1, configs_dir=tmp_path / "file" / "cfg")
    assert trainer.configs == []


def test_configs_that_cannot_be_written_lose_neither_leaderboard_nor_plot(tmp_path) -> None:
    out, configs = tmp_path / "s", tmp_path / "file" / "cfg"
    trainer = FakeTrainer()

    def train_then_block(config, **kwargs):  # the folder is refused only after the up-front check
        (tmp_path / "file").write_text("")
        return trainer(config, **kwargs)

    with pytest.raises(CerberusError, match=r"leaderboard\.json was written") as raised:
        search(out, train_then_block, 1, configs_dir=configs)
    assert str(raised.value).startswith(f"could not write configs to {configs}: ")
    saved = json.loads((out / "leaderboard.json").read_text())
    assert [r["state"] for r in saved["leaderboard"]] == ["complete"] and saved["configs"] == []
    assert (out / "pareto.png").stat().st_size > 0


def test_cli_reports_the_skipped_design_and_writes_the_others(tmp_path, monkeypatch) -> None:
    import cerberus.runner

    monkeypatch.setattr(cerberus.runner, "train_run", FakeTrainer())
    (tmp_path / "space.toml").write_text("stages=[2]\nblocks=[1,1]\nbase_width=[8,64]\nmax_params=1000000\n")
    (tmp_path / "base.toml").write_text("[train]\nwhiten_stem = true\n")
    out = tmp_path / "s"
    args = [str(tmp_path / "space.toml"), "--config", str(tmp_path / "base.toml"), "--out", str(out)]
    note = f"skipped 1 design that the --config base refuses: {REFUSED}: {WHITEN_REASON}"
    for trials in ("2", "0"):
        result = invoke(*args, "--trials", trials, "--set", *TRIAL_SETTINGS)
        assert result.exit_code == 0, result.output
        assert note in result.stderr and "Traceback" not in result.output
        assert "best designs as train configs:" in result.stdout
        assert (out / "pareto.png").exists()
    data = json.loads((out / "leaderboard.json").read_text())
    assert [s["name"] for s in data["skipped_configs"]] == [REFUSED]
    assert [Path(p).name for p in data["configs"]] == ["01-b1-1_c8-16_f3k1p16s8.toml"]


def test_enumeration_skips_a_listed_design_the_base_refuses(tmp_path) -> None:
    (tmp_path / "space.toml").write_text("stages=[2]\nblocks=[1,1]\nbase_width=[8,64]\nmax_params=1000000\n")
    (tmp_path / "base.toml").write_text("[train]\nwhiten_stem = true\n")
    found = tmp_path / "found"
    args = [
        str(tmp_path / "space.toml"),
        "--config",
        str(tmp_path / "base.toml"),
        "--write-configs",
        str(found),
    ]
    refused = "01-b1-1_c64-128_f3k1p16s64"  # by params: the larger design is listed first
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert "Top 2 of 2 designs" in result.stdout and f"wrote 1 train config to {found}/" in result.stdout
    assert f"skipped 1 design that the --config base refuses: {refused}: {WHITEN_REASON}" in result.stderr
    assert sorted(p.name for p in found.iterdir()) == ["02-b1-1_c8-16_f3k1p16s8.toml"]  # the table's rank
    result = invoke(*args, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert len(data["candidates"]) == 2 and data["configs"] == [str(found / "02-b1-1_c8-16_f3k1p16s8.toml")]
    assert [s["name"] for s in data["skipped_configs"]] == [refused]


def test_the_default_config_names_itself_as_the_one_refusing(tmp_path) -> None:
    space = space_from_dict({**TWO_DESIGNS, "max_params": 10_000})  # C[8,16] only
    written = write_candidate_configs(enumerate_designs(space), tmp_path, base=None)
    assert len(written) == 1 and written.skipped == []
    over = write_configs([(arch(64, 128), "too big")], tmp_path / "over", max_params=10_000)
    assert list(over) == [] and [s.name for s in over.skipped] == ["01-b1-1_c64-128_f3k1p16s64"]
    assert "over the 10,000 budget" in over.skipped[0].reason  # the budget is checked too


# --------------------------------------------------------------------------------------------
# The configs folder is checked before any training


@pytest.mark.parametrize("given", [True, False])
def test_a_configs_folder_that_cannot_be_made_fails_before_training(tmp_path, monkeypatch, given) -> None:
    import cerberus.runner

    trainer = FakeTrainer()
    monkeypatch.setattr(cerberus.runner, "train_run", trainer)
    (tmp_path / "file").write_text("not a folder")
    (tmp_path / "space.toml").write_text("stages=[2]\nblocks=[1,1]\nbase_width=[8]\nmax_params=1000000\n")
    out = tmp_path / "s"
    args = [str(tmp_path / "space.toml"), "--trials", "1", "--out", str(out), "--set", "train.epochs=1"]
    if given:
        configs = tmp_path / "file" / "cfg"
        args += ["--write-configs", str(configs)]
        blocker = tmp_path / "file"
        message = f"Error: --write-configs {configs}: cannot write configs there: {blocker} is not a folder"
    else:
        out.mkdir()
        (out / "configs").write_text("a file where the configs folder goes")
        message = f"Error: cannot write configs to {out / 'configs'}: {out / 'configs'} is not a folder"
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    assert result.stderr == message + "\n" and "Traceback" not in result.output
    assert trainer.configs == [] and not (out / "study.db").exists()


def test_enumeration_checks_the_configs_folder_before_counting(tmp_path) -> None:
    (tmp_path / "file").write_text("")
    result = invoke("--max-params", "100000", "--write-configs", str(tmp_path / "file" / "x" / "y"))
    assert result.exit_code == 2, result.output
    assert result.stderr == (
        f"Error: --write-configs {tmp_path / 'file' / 'x' / 'y'}: cannot write configs there: "
        f"{tmp_path / 'file'} is not a folder\n"
    )
    assert result.stdout == ""


def test_checking_a_configs_folder_creates_nothing(tmp_path) -> None:
    check_configs_dir(tmp_path / "a" / "b" / "c")
    check_configs_dir(tmp_path)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "link").symlink_to(tmp_path / "missing")
    with pytest.raises(ConfigError, match=r"cannot write configs to .*link/x: .*link is not a folder"):
        check_configs_dir(tmp_path / "link" / "x")


# --------------------------------------------------------------------------------------------
# No stale configs


def test_a_write_removes_the_configs_an_earlier_write_left_and_nothing_else(tmp_path) -> None:
    first = write_configs([(arch(8, 16), "a"), (arch(4, 8), "b"), (arch(6, 12), "c")], tmp_path, 10_000)
    assert [p.name for p in first] == [
        "01-b1-1_c8-16_f3k1p16s8.toml",
        "02-b1-1_c4-8_f3k1p16s4.toml",
        "03-b1-1_c6-12_f3k1p16s6.toml",
    ]
    users = [
        "notes.txt",
        "my.toml",
        "01-mine.toml",
        "02-b1-1_c4-8_f3k1p16s4.toml.bak",
        "x02-b1-1_c4-8_f3k1p16s4.toml",
        "2-b1-1_c4-8_f3k1p16s4.toml",
    ]
    for name in users:
        (tmp_path / name).write_text("the user's")
    (tmp_path / "04-b1-1_c4-8_f3k1p16s4.toml").mkdir()  # a folder is never removed either
    (tmp_path / "05-b1-1_c4-8_f3k1p16s4.toml").symlink_to(tmp_path / "notes.txt")  # nor a link
    again = write_configs([(arch(4, 8), "b"), (arch(8, 16), "a")], tmp_path, 10_000)  # ranks swapped
    kept = {*users, "04-b1-1_c4-8_f3k1p16s4.toml", "05-b1-1_c4-8_f3k1p16s4.toml"}
    assert {p.name for p in tmp_path.iterdir()} == {p.name for p in again} | kept
    assert [p.name for p in again] == ["01-b1-1_c4-8_f3k1p16s4.toml", "02-b1-1_c8-16_f3k1p16s8.toml"]
    assert all((tmp_path / name).read_text() == "the user's" for name in users)
    top1 = write_configs([(arch(8, 16), "a")], tmp_path, 10_000)
    assert {p.name for p in tmp_path.iterdir()} == {"01-b1-1_c8-16_f3k1p16s8.toml"} | kept
    assert load_config(top1[0]).model.architecture() == arch(8, 16)


def test_continuing_a_study_leaves_one_config_per_rank(tmp_path) -> None:
    # each trial scores better than the last: the first call's best design drops to second place
    space = {**TWO_DESIGNS, "base_width": [4, 8], "max_params": 20_000}
    out, trainer = tmp_path / "s", FakeTrainer(improving=True)
    first = search(out, trainer, 1, space=space).configs
    second = search(out, trainer, 1, space=space).configs
    designs = [c.model.architecture() for c in trainer.configs]
    assert sorted(p.name for p in (out / "configs").iterdir()) == [p.name for p in second]
    assert [load_config(p).model.architecture() for p in second] == designs[::-1]
    assert first[0] not in second  # the same design, now ranked second
    search(out, trainer, 0, space=space, top=1)
    assert [p.name for p in (out / "configs").iterdir()] == [second[0].name]
