"""``cerberus search``: exact vectorised enumeration, and Optuna trials (fake and real training)."""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import os
import random
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import optuna
import pytest
from typer.testing import CliRunner

from cerberus.arch import Architecture, count_macs, count_params
from cerberus.cli import app
from cerberus.config import load_config
from cerberus.errors import BudgetError, CerberusError, ConfigError, DataError, DivergenceError, Interrupted
from cerberus.search import (
    SearchSpace,
    count_designs,
    enumerate_designs,
    load_space,
    pareto_front,
    run_trials,
    space_from_dict,
    write_candidate_configs,
)
from cerberus.search import enumeration as search
from cerberus.search import trials as trials_module

REPO = Path(__file__).resolve().parents[1]

# A space small enough to list by brute force, using every design variable: per-stage block
# ranges, growth, kernels, a pool that only divides some final sides, an explicit stem width.
SMALL_SPACE = {
    "stages": [2, 3],
    "blocks": [[1, 3], [1, 2], [1, 4]],
    "base_width": [4, 6],
    "growth": [1.5, 2.0],
    "conv_kernel": [1, 3],
    "skip_kernel": [1, 3],
    "pool_size": [0, 2, 16],
    "stem_channels": [0, 5],
    "downsample": ["stride", "pool"],
    "stem_kernel": [3, 2],
    "max_params": 9_000,
    "min_params": 1_000,
}


def brute_force(space: SearchSpace) -> list[tuple[Architecture, int, int]]:
    """Every distinct design of the space, counted one by one with cerberus.arch."""
    designs = {}
    for n in space.stage_counts():
        ranges = [range(lo, hi + 1) for lo, hi in space.block_ranges(n)]
        for widths, f, k, pool, stem, mode, s, blocks in itertools.product(
            space.widths(n),
            space.conv_kernel,
            space.skip_kernel,
            space.pool_size,
            space.stem_channels,
            space.downsample,
            space.stem_kernel,
            itertools.product(*ranges),
        ):
            # pooling: at most 5 stages from a 32x32 stem map, 4 from an even stem's 31x31
            if n > (6 if mode == "stride" else 5 if s % 2 else 4):
                continue
            side = Architecture(blocks=(1,) * n, downsample=mode, stem_kernel=s).final_side
            if pool and side % pool:
                continue
            arch = Architecture(
                blocks, widths, f, k, pool or side, stem or widths[0], downsample=mode, stem_kernel=s
            )
            designs[arch] = (arch, count_params(arch), count_macs(arch))
    return list(designs.values())


# --------------------------------------------------------------------------------------------
# The space


def test_default_space_covers_the_seed_exploration() -> None:
    space = SearchSpace()
    assert space.stage_counts() == [3, 4]
    assert space.block_ranges(4) == [(1, 16)] * 4
    assert space.widths(3)[0] == (16, 32, 64) and space.widths(3)[-1] == (128, 256, 512)
    assert count_designs(space) == 6 * (16**3 + 16**4) == 417_792


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"stage": [3]}, "stage: unknown key"),
        ({"blocks": [3, 1]}, "1 <= min <= max"),
        ({"blocks": [0, 2]}, "1 <= min <= max"),
        ({"blocks": [[1, 2], [1, 2]], "stages": [3]}, "2 ranges given but designs have up to 3 stages"),
        ({"stages": [7]}, "each count must be 1-6"),
        ({"stages": [6], "downsample": ["pool"]}, "stages: [6] do not fit downsample ['pool']"),
        ({"downsample": ["avg"]}, "downsample.0: Input should be 'stride' or 'pool'"),
        ({"conv_kernel": [2]}, "positive odd numbers"),
        ({"pool_size": [3]}, "[3] divide(s) no final feature map side"),
        ({"stem_kernel": [3, 8]}, "stem_kernel: sides must be 1-7, got [3, 8]"),
        (
            {"stem_kernel": [0], "stages": [7]},
            "each count must be 1-6, got [7]; stem_kernel: sides must be 1-7",
        ),
        (
            {"stages": [5], "downsample": ["pool"], "stem_kernel": [2]},
            "do not fit downsample ['pool'] and stem_kernel [2] (at most 4 with 'pool' and stem 2)",
        ),
        ({"channels": [[8, 16]], "base_width": [8]}, "not both"),
        ({"channels": [[8, 0]]}, "one positive width per stage"),
        ({"max_params": 10, "min_params": 10}, "must be below max_params"),
        ({"growth": ["2"]}, "growth.0"),
        ({"blocks": [1, 2_000_000_000]}, "blocks: at most 256 blocks per stage, got [1, 2000000000]"),
        ({"blocks": [[1, 2], [1, 257], [1, 2], [1, 2]]}, "blocks: at most 256 blocks per stage"),
    ],
)
def test_space_errors_name_the_key(data, message) -> None:
    with pytest.raises(ConfigError, match="invalid search space") as err:
        space_from_dict(data)
    assert message in str(err.value)


def test_space_file_errors_name_the_file(tmp_path) -> None:
    path = tmp_path / "space.toml"
    path.write_text("stages = [3]\nwidths = [16]\n")
    with pytest.raises(ConfigError, match=r"space\.toml: invalid search space\nwidths: unknown key"):
        load_space(path)


def test_space_file_read_errors_say_it_is_the_search_space_file(tmp_path) -> None:
    with pytest.raises(ConfigError) as err:
        load_space(tmp_path / "nonexist.toml")
    assert str(err.value) == f"{tmp_path / 'nonexist.toml'}: no such search space file"
    with pytest.raises(ConfigError, match="is a folder, not a search space file"):
        load_space(tmp_path)
    empty = tmp_path / "empty.toml"
    empty.write_text("\n")
    with pytest.raises(ConfigError, match="the search space file is empty"):
        load_space(empty)
    broken = tmp_path / "broken.toml"
    broken.write_text("stages = [3\n")
    with pytest.raises(ConfigError, match=r"broken\.toml(:\d+)?: TOML syntax error"):
        load_space(broken)


def test_example_space_file_loads() -> None:
    space = load_space(REPO / "configs" / "search-space.toml")
    assert count_designs(space) == 2_515_968


# --------------------------------------------------------------------------------------------
# Enumeration: exact, complete, within budget


def test_linear_costs_equal_arch_counts_on_random_designs() -> None:
    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(1, 6)
        s = rng.randint(1, 7)
        mode = "stride" if n > (5 if s % 2 else 4) else rng.choice(("stride", "pool"))
        side = Architecture(blocks=(1,) * n, downsample=mode, stem_kernel=s).final_side
        fam = search._family(
            tuple(rng.randint(1, 200) for _ in range(n)),
            rng.choice((1, 3, 5, 7)),
            rng.choice((1, 3)),
            rng.choice([d for d in range(1, side + 1) if side % d == 0]),
            rng.randint(1, 100),
            mode,
            s,
        )
        blocks = [rng.randint(1, 20) for _ in range(n)]
        arch = fam.architecture(blocks)
        assert fam.const_params + sum(b * a for b, a in zip(blocks, fam.coef_params)) == count_params(arch)
        assert fam.const_macs + sum(b * a for b, a in zip(blocks, fam.coef_macs)) == count_macs(arch)


@pytest.mark.parametrize("chunk", [search.CHUNK_DESIGNS, 5])  # 5: stages split across chunks
@pytest.mark.parametrize("sort", ["params", "macs"])
def test_enumeration_equals_brute_force(monkeypatch, chunk, sort) -> None:
    monkeypatch.setattr(search, "CHUNK_DESIGNS", chunk)
    space = space_from_dict(SMALL_SPACE)
    designs = brute_force(space)
    fits = [d for d in designs if space.min_params <= d[1] <= space.max_params]
    key = (lambda d: (-d[1], d[2])) if sort == "params" else (lambda d: (d[2], -d[1]))
    result = enumerate_designs(space, top=25, sort=sort)
    assert result.total == len(designs) == count_designs(space)
    assert result.within_budget == len(fits) > 25
    got = [(c.params, c.macs) for c in result.candidates]
    assert got == [(p, m) for _, p, m in sorted(fits, key=key)[:25]]
    for c in result.candidates:  # each listed design is what it says, and within the budget
        assert count_params(c.architecture) == c.params <= space.max_params
        assert c.params >= space.min_params
        assert count_macs(c.architecture) == c.macs
    listed = {c.architecture for c in enumerate_designs(space, top=10_000, sort=sort).candidates}
    assert listed == {d[0] for d in fits}  # all of them, nothing over the budget


def test_pooling_designs_keep_to_five_stages() -> None:
    space = space_from_dict({"stages": [5, 6], "blocks": [1, 2], "base_width": [4], "growth": [1.0]})
    both = space.with_budget().model_copy(update={"downsample": ["stride", "pool"]})
    assert both.geometries(6) == [("stride", 3)] and both.geometries(5) == [("stride", 3), ("pool", 3)]
    assert count_designs(both) == count_designs(space) + 2**5
    pooled = [
        c.architecture
        for c in enumerate_designs(both, top=10_000).candidates
        if c.architecture.max_pool_downsampling
    ]
    assert len(pooled) == 2**5 and all(len(a.blocks) == 5 and a.final_side == 1 for a in pooled)


def test_an_even_stem_allows_one_pooling_stage_fewer() -> None:
    # 31x31 after an unpadded 2x2 stem: pooling stages give 15, 7, 3, 1 (4 stages); striding
    # ones (all but the first) 31, 16, 8, 4, 2, 1 (6)
    space = space_from_dict(
        {"stages": [4, 5], "blocks": [1, 2], "base_width": [4], "growth": [1.0], "stem_kernel": [3, 2]}
    ).model_copy(update={"downsample": ["stride", "pool"]})
    assert space.geometries(5) == [("stride", 3), ("stride", 2), ("pool", 3)]
    assert space.geometries(4) == [("stride", 3), ("stride", 2), ("pool", 3), ("pool", 2)]
    assert space.pools(4, ("pool", 2)) == [1] and space.pools(4, ("pool", 3)) == [2]
    assert space.pools(4, ("stride", 2)) == [4] and space.pools(5, ("stride", 2)) == [2]
    # 2**4 designs per stride geometry and pooling geometry at 4 stages, 2**5 at 5 but none pooled from 31
    assert count_designs(space) == 4 * 2**4 + 3 * 2**5
    listed = [c.architecture for c in enumerate_designs(space, top=10_000).candidates]
    assert len(listed) == len(set(listed)) == 4 * 2**4 + 3 * 2**5
    even = [a for a in listed if a.stem_kernel == 2]
    assert {(len(a.blocks), a.downsample, a.final_side) for a in even} == {
        (4, "pool", 1),
        (4, "stride", 4),
        (5, "stride", 2),
    }


def test_block_ranges_are_cut_to_the_budget_before_counting() -> None:
    space = space_from_dict({"stages": [3], "blocks": [1, 256], "base_width": [64]})
    seen = []
    result = enumerate_designs(space, top=1, on_progress=lambda done, total: seen.append((done, total)))
    # 256**3 designs, but only stage ranges [1, 51] x [1, 13] x [1, 4] can fit 5M: one small chunk
    assert seen == [(256**3, 256**3)]
    assert (result.total, result.within_budget) == (256**3, 606)
    (best,) = result.candidates
    assert best.architecture.blocks == (44, 3, 1)
    assert best.params == count_params(best.architecture) == 4_999_754


def test_explicit_channel_lists() -> None:
    space = space_from_dict({"channels": [[8, 16], [8, 12, 16]], "blocks": [1, 3], "max_params": 20_000})
    designs = brute_force(space)
    result = enumerate_designs(space, top=3)
    assert result.total == 9 + 27 == len(designs)
    assert result.within_budget == sum(p <= 20_000 for _, p, _ in designs)
    assert [c.params for c in result.candidates] == sorted((p for _, p, _ in designs if p <= 20_000))[::-1][
        :3
    ]


def test_default_space_within_five_million() -> None:
    result = enumerate_designs(SearchSpace(), top=3)
    assert (result.total, result.within_budget) == (417_792, 71_988)
    best = result.candidates[0]
    assert best.params == 4_999_898 and best.macs == 138_855_680
    assert best.architecture.blocks == (5, 2, 8, 15) and best.architecture.widths == (16, 32, 64, 128)
    assert result.to_dict()["candidates"][0] == {
        "blocks": [5, 2, 8, 15],
        "channels": [16, 32, 64, 128],
        "conv_kernel": 3,
        "skip_kernel": 1,
        "pool_size": 4,
        "stem_channels": 16,
        "downsample": "stride",
        "stem_kernel": 3,
        "params": 4_999_898,
        "macs": 138_855_680,
    }


def test_counts_equal_instantiated_models() -> None:
    from cerberus.model import build_model

    rng = random.Random(1)
    space = space_from_dict(SMALL_SPACE)
    candidates = enumerate_designs(space, top=10_000).candidates
    for c in rng.sample(candidates, 8):
        assert sum(p.numel() for p in build_model(c.architecture).parameters()) == c.params


def test_written_configs_are_valid_train_configs(tmp_path) -> None:
    result = enumerate_designs(space_from_dict(SMALL_SPACE), top=3)
    base = {"train": {"epochs": 7}}
    paths = write_candidate_configs(result, tmp_path / "found", base)
    assert [p.name[:3] for p in paths] == ["01-", "02-", "03-"]
    for path, c in zip(paths, result.candidates):
        assert path.read_text().startswith(f"# {c.params:,} parameters")
        config = load_config(path)
        assert config.model.architecture() == c.architecture
        assert config.model.max_params == 9_000
        assert config.train.epochs == 7


def test_written_configs_replace_old_files_atomically(tmp_path) -> None:
    result = enumerate_designs(space_from_dict(SMALL_SPACE), top=1)
    (path,) = write_candidate_configs(result, tmp_path)
    path.write_text("old")
    os.link(path, tmp_path / "reader.toml")  # a reader holding the old file
    assert write_candidate_configs(result, tmp_path) == [path]
    assert (tmp_path / "reader.toml").read_text() == "old"  # a new file, renamed over the path
    assert load_config(path).model.architecture() == result.candidates[0].architecture
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, "reader.toml"])


# --------------------------------------------------------------------------------------------
# CLI: enumeration


def invoke(*args: str):
    return CliRunner().invoke(app, ["search", *args])


def test_cli_json(tmp_path) -> None:
    space = tmp_path / "space.toml"
    space.write_text("stages = [3]\nblocks = [1, 4]\nbase_width = [16, 32]\n")
    result = invoke(
        str(space), "--max-params", "500000", "--top", "2", "--json", "--write-configs", str(tmp_path / "out")
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert set(data) == {
        "candidates",
        "total",
        "within_budget",
        "max_params",
        "min_params",
        "sort",
        "configs",
        "skipped_configs",
    }
    assert data["skipped_configs"] == []
    assert (data["max_params"], data["sort"]) == (500_000, "params")
    assert data["total"] == 2 * 4**3
    assert len(data["candidates"]) == 2
    assert all(c["params"] <= 500_000 for c in data["candidates"])
    assert data["candidates"][0]["params"] >= data["candidates"][1]["params"]
    assert sorted(data["configs"]) == sorted(str(p) for p in (tmp_path / "out").glob("*.toml"))
    assert len(data["configs"]) == 2
    plain = json.loads(invoke(str(space), "--max-params", "500000", "--top", "1", "--json").stdout)
    assert "configs" not in plain  # nothing was asked to be written


def test_cli_counts_are_singular_for_one(tmp_path) -> None:
    space = tmp_path / "space.toml"
    space.write_text("stages = [1]\nblocks = [1, 1]\nbase_width = [8]\nstem_kernel = [3]\n")
    result = invoke(str(space), "--max-params", "10000", "--write-configs", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    assert "Top 1 of 1 design within the 10,000-parameter budget" in result.stdout
    assert "1 design counted in" in result.stdout and "1 designs" not in result.stdout
    assert f"wrote 1 train config to {tmp_path / 'out'}/" in " ".join(result.stdout.split())


def test_a_long_count_says_so_when_no_progress_bar_can_show(tmp_path) -> None:
    space = tmp_path / "space.toml"
    space.write_text("stages = [4]\nblocks = [1, 50]\nbase_width = [8]\n")  # 50**4 designs
    result = invoke(str(space), "--max-params", "20000", "--top", "1", "--json")
    assert result.exit_code == 0, result.output
    assert "counting 6,250,000 designs" in result.stderr
    assert json.loads(result.stdout)["total"] == 6_250_000
    small = tmp_path / "small.toml"
    small.write_text("stages = [3]\nblocks = [1, 4]\nbase_width = [16]\n")
    assert "counting" not in invoke(str(small), "--max-params", "500000", "--json").stderr


def test_ctrl_c_while_counting_says_so_and_exits_130(tmp_path, monkeypatch) -> None:
    import cerberus.search

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cerberus.search, "enumerate_designs", interrupted)
    result = invoke("--max-params", "100000", "--write-configs", str(tmp_path / "out"))
    assert result.exit_code == 130
    assert "Interrupted while counting designs; nothing was written." in result.stderr
    assert not (tmp_path / "out").exists()


def test_cli_table() -> None:
    result = invoke("--max-params", "100000", "--top", "1")
    assert result.exit_code == 0, result.output
    assert "417,792 designs counted" in result.stdout
    assert "within the 100,000-parameter budget" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--storage", "sqlite:///x.db"], "--storage only applies to trials: add --trials N"),
        (["--set", "train.epochs=2"], "--set only applies to trials"),
        (["--max-params", "0"], "--max-params: must be positive, got 0"),
        (["--min-params", "-1"], "--min-params: must be 0 or more, got -1"),
        (
            ["--min-params", "6000000"],
            "--min-params: 6,000,000 must be below the space's max_params (5,000,000)",
        ),
        (["--min-params", "9", "--max-params", "9"], "--min-params: 9 must be below --max-params (9)"),
        (["--top", "-1"], "--top: must be 0 or more"),
        (["--trials", "1", "--seed", "-1"], "--seed: must be in 0..4294967295 (Optuna's sampler), got -1"),
        (["--trials", "1", "--seed", str(2**32)], "--seed: must be in 0..4294967295"),
        (["missing.toml"], "missing.toml: no such search space file"),
        (["missing.toml", "--trials", "0"], "missing.toml: no such search space file"),
        (["--trials", "1", "--sort", "macs"], "--sort only applies to enumeration: drop --trials"),
        (["--config", "missing.toml"], "missing.toml: no such config file"),
    ],
)
def test_cli_refusals(args, message) -> None:
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("Error: ") and message in result.stderr
    assert "Traceback" not in result.output


def test_a_budget_below_the_space_files_floor_names_the_flag(tmp_path) -> None:
    space = tmp_path / "space.toml"
    space.write_text("stages = [3]\nmin_params = 1000\n")
    result = invoke(str(space), "--max-params", "1000")
    assert result.exit_code == 2, result.output
    assert result.stderr == "Error: --max-params: 1,000 must be above the space's min_params (1,000)\n"


# --------------------------------------------------------------------------------------------
# Trials with a fake trainer (deterministic accuracies, no torch)

TINY_SPACE = {"stages": [2], "blocks": [1, 3], "base_width": [4, 8], "max_params": 20_000}


@dataclass
class FakeResult:
    out_dir: Path
    summary: dict
    best_val_accuracy: float | None
    epochs_completed: int


class FakeTrainer:
    """Emits an epoch event per epoch with accuracy ``accuracies[call] * epoch / epochs``."""

    def __init__(self, accuracies=(0.5,), interrupt_on: int | None = None, error=None, after_epochs=0):
        self.accuracies = accuracies
        self.interrupt_on = interrupt_on  # this call raises ``error`` (KeyboardInterrupt)...
        self.error = error
        self.after_epochs = after_epochs  # ...after reporting this many epochs
        self.configs = []
        self.out_dirs = []
        self.epochs_run = []

    def __call__(self, config, *, out_dir, data_dir, on_event, evaluate_test, save_checkpoints, **_):
        assert not evaluate_test and not save_checkpoints and not config.train.test_every_epoch
        call = len(self.configs)
        self.configs.append(config)
        self.out_dirs.append(Path(out_dir))
        if call == self.interrupt_on and not self.after_epochs:
            raise self.error or KeyboardInterrupt()
        epochs, best = config.train.epochs, 0.0
        self.epochs_run.append(0)
        for epoch in range(1, epochs + 1):
            accuracy = self.accuracies[min(call, len(self.accuracies) - 1)] * epoch / epochs
            best = max(best, accuracy)
            self.epochs_run[-1] = epoch
            on_event({"event": "epoch", "epoch": epoch, "val_accuracy": accuracy, "val_loss": 1.0})
            if call == self.interrupt_on and epoch == self.after_epochs:
                raise self.error or KeyboardInterrupt()
        return FakeResult(Path(out_dir), {}, best, epochs)


def trials(tmp_path, trainer, n=3, space=TINY_SPACE, **kwargs):
    kwargs.setdefault("overrides", ["train.epochs=3"])
    events = []
    result = run_trials(
        space_from_dict(space),
        trials=n,
        out_dir=tmp_path / "search",
        seed=0,
        train_fn=trainer,
        on_event=events.append,
        **kwargs,
    )
    return result, events


def test_a_base_asking_for_channels_last_rejects_designs_the_cpu_cannot_train_in_it(tmp_path) -> None:
    trainer = FakeTrainer()
    overrides = ["train.epochs=3", "train.device=cpu", "train.channels_last=true"]
    narrow = {**TINY_SPACE, "blocks": [1, 1]}  # two designs, widths 4 or 8 read by 1x1 shortcuts
    result, _ = trials(tmp_path, trainer, n=3, space=narrow, overrides=overrides)
    assert trainer.configs == [] and [r.state for r in result.leaderboard] == ["rejected"] * 2
    assert (result.trials_run, result.trials_trained) == (2, 0)  # each design is rejected once
    assert result.stopped == (
        "the study holds every design within the budget (2); all of them were rejected before training "
        "(the trial config's train.channels_last does not suit them; see the leaderboard's notes)"
    )
    wide = {**TINY_SPACE, "base_width": [16], "max_params": 200_000}
    result, _ = trials(tmp_path / "wide", trainer, n=1, space=wide, overrides=overrides)
    assert [r.state for r in result.leaderboard] == ["complete"] and len(trainer.configs) == 1


def test_designs_rejected_on_an_x86_cpu_are_trained_by_a_worker_elsewhere(tmp_path, monkeypatch) -> None:
    # oneDNN's channels_last fault is an x86 CPU's: a worker on other hardware sharing the study
    # (here: x86_cpu says no, as on a GPU) trains the designs a CPU worker rejected for it
    import cerberus.device

    overrides = ["train.epochs=3", "train.device=cpu", "train.channels_last=true"]
    narrow = {**TINY_SPACE, "blocks": [1, 1]}  # two designs, both rejected on this CPU
    trials(tmp_path, FakeTrainer(), n=3, space=narrow, overrides=overrides)
    monkeypatch.setattr(cerberus.device, "x86_cpu", lambda device: False)
    elsewhere = FakeTrainer()
    result, _ = trials(tmp_path, elsewhere, n=3, space=narrow, overrides=overrides)
    assert len({c.model.architecture() for c in elsewhere.configs}) == len(elsewhere.configs) == 2
    assert sorted(r.state for r in result.leaderboard) == ["complete", "complete", "rejected", "rejected"]
    assert result.stopped == "the study holds every design within the budget (2)"
    monkeypatch.undo()  # back on the x86 CPU: nothing is left to train or reject
    again, _ = trials(tmp_path, FakeTrainer(), n=1, space=narrow, overrides=overrides)
    assert again.trials_run == 0 and again.stopped == "the study holds every design within the budget (2)"


def test_trials_write_leaderboard_pareto_and_configs(tmp_path) -> None:
    trainer = FakeTrainer(accuracies=(0.5, 0.7, 0.6))
    result, events = trials(tmp_path, trainer, pruner="none")
    assert result.trials_run == 3 and len(result.leaderboard) == 3
    assert [r.state for r in result.leaderboard] == ["complete"] * 3
    assert [r.val_accuracy for r in result.leaderboard] == pytest.approx([0.7, 0.6, 0.5])
    for r in result.leaderboard:
        assert r.epochs == r.epochs_planned == 3
        assert r.params == count_params(Architecture(tuple(r.design["blocks"]), tuple(r.design["channels"])))
    for config in trainer.configs:  # trials train what the space allows, under the budget
        assert count_params(config.model.architecture()) <= 20_000
        assert config.model.max_params == 20_000
    front = [(r.params, r.val_accuracy) for r in result.pareto]
    assert front == sorted(front) and front
    assert result.plot == tmp_path / "search" / "pareto.png" and result.plot.stat().st_size > 0
    assert [p.parent for p in result.configs] == [tmp_path / "search" / "configs"] * 3
    best = load_config(result.configs[0])  # the written configs are the defaults + the design
    assert best.model.architecture().label() == result.leaderboard[0].label
    assert best.train.epochs == 30
    saved = json.loads((tmp_path / "search" / "leaderboard.json").read_text())
    assert saved["leaderboard"][0]["val_accuracy"] == pytest.approx(0.7)
    kinds = [e["event"] for e in events]
    assert kinds[0] == "study" and kinds.count("trial_start") == 3 and kinds.count("trial_epoch") == 9
    assert kinds.count("trial_end") == 3


@pytest.mark.parametrize(("pruner", "epochs"), [("halving", 6), ("hyperband", 2)])
def test_pruning_stops_a_poor_trial_early(tmp_path, pruner, epochs) -> None:
    trainer = FakeTrainer(accuracies=(0.9, 0.1))  # the first trial is good, the next ones poor
    result, _ = trials(tmp_path, trainer, n=2, pruner=pruner, overrides=[f"train.epochs={epochs}"])
    assert trainer.epochs_run == [epochs, 1]
    poor = next(r for r in result.leaderboard if r.number == 1)
    assert (poor.state, poor.epochs, poor.epochs_planned) == ("pruned", 1, epochs)
    assert poor.note.startswith("after epoch 1 (val accuracy ")  # the state says "pruned"
    assert [r.number for r in result.pareto] == [0]  # pruned trials are not on the front


def test_trials_draw_both_ways_of_downsampling(tmp_path) -> None:
    # 6 stages fit only striding designs; the pooling ones draw from 5 or fewer.
    space = {
        **TINY_SPACE,
        "stages": [2, 6],
        "base_width": [4],
        "growth": [1.0],
        "downsample": ["stride", "pool"],
    }
    trainer = FakeTrainer()
    result, _ = trials(tmp_path, trainer, n=12, space=space, pruner="none", top=12)
    archs = [c.model.architecture() for c in trainer.configs]
    assert {a.downsample for a in archs} == {"stride", "pool"}
    assert all(len(a.blocks) == 2 for a in archs if a.max_pool_downsampling)
    for r in result.leaderboard:
        arch = Architecture(
            **{**r.design, "blocks": tuple(r.design["blocks"]), "channels": tuple(r.design["channels"])}
        )
        assert count_params(arch) == r.params and arch.label() == r.label
    pooled = next(c for c in result.configs if "_maxpool" in c.name)
    assert load_config(pooled).model.downsample == "pool"


@pytest.mark.parametrize(
    ("extra", "modes"),
    [
        ({"stages": [6], "downsample": ["stride", "pool"]}, ["stride"]),  # 6 stages cannot pool
        ({"stages": [2, 3], "pool_size": [16], "downsample": ["stride", "pool"]}, ["stride"]),
    ],
)
def test_trials_draw_only_what_some_design_allows(tmp_path, extra, modes) -> None:
    # 'pool' fits no stage count (or no pool size) of these spaces: never drawn, nothing crashes
    space = {**TINY_SPACE, "base_width": [2], "growth": [1.0], "max_params": 50_000, **extra}
    trainer = FakeTrainer()
    result, _ = trials(tmp_path, trainer, n=4, space=space, pruner="none")
    assert [r.state for r in result.leaderboard] == ["complete"] * 4
    assert {c.model.downsample for c in trainer.configs} == set(modes)


def test_trials_draw_stem_kernels_only_where_they_fit(tmp_path) -> None:
    # pooling 4 stages from an even stem's 31x31 map leaves 1x1, so a pool size of 2 fits only
    # the odd stem there; striding fits both stems
    space = {
        **TINY_SPACE,
        "stages": [4],
        "blocks": [1, 1],
        "base_width": [2],
        "growth": [1.0],
        "pool_size": [2],
        "stem_kernel": [3, 2],
        "downsample": ["stride", "pool"],
    }
    trainer = FakeTrainer()
    result, _ = trials(tmp_path, trainer, n=12, space=space, pruner="none")
    assert [r.state for r in result.leaderboard] == ["complete"] * 3  # three designs: each once
    drawn = [(c.model.downsample, c.model.stem_kernel) for c in trainer.configs]
    assert sorted(drawn) == [("pool", 3), ("stride", 2), ("stride", 3)]
    assert result.stopped == "the study holds every design within the budget (3)"
    for config in trainer.configs:
        arch = config.model.architecture()
        assert arch.final_side % arch.pool == 0
    even = next(r for r in result.leaderboard if r.design["stem_kernel"] == 2)
    assert "S2" in even.label


def test_a_study_from_before_a_space_key_existed_resumes(tmp_path) -> None:
    # a study whose recorded space predates `stem_kernel` had the default, [3]
    import optuna

    trials(tmp_path, FakeTrainer(), n=1)
    storage = f"sqlite:///{tmp_path / 'search' / 'study.db'}"
    study = optuna.load_study(study_name="default", storage=storage)
    recorded = dict(study.user_attrs["space"])
    del recorded["stem_kernel"]
    study.set_user_attr("space", recorded)
    result, _ = trials(tmp_path, FakeTrainer(), n=1)
    assert len(result.leaderboard) == 2
    with pytest.raises(ConfigError, match=r"another search space.*differs in: stem_kernel"):
        trials(tmp_path, FakeTrainer(), n=1, space={**TINY_SPACE, "stem_kernel": [2]})


def test_designs_over_the_budget_are_never_drawn(tmp_path) -> None:
    # base width 32 cannot fit 20,000 parameters even with one block per stage: never drawn;
    # width 4 fits, and its block ranges are narrowed so that every drawn design fits.
    space = {**TINY_SPACE, "base_width": [4, 32], "blocks": [1, 16]}
    trainer = FakeTrainer()
    result, _ = trials(tmp_path, trainer, n=8, space=space, pruner="none")
    assert [r.state for r in result.leaderboard] == ["complete"] * 8
    assert (result.trials_run, result.trials_trained, result.stopped) == (8, 8, "")
    archs = [c.model.architecture() for c in trainer.configs]
    assert len(set(archs)) == 8 and {a.widths for a in archs} == {(4, 8)}
    assert all(count_params(a) <= 20_000 for a in archs)
    storage = f"sqlite:///{tmp_path / 'search' / 'study.db'}"
    (distribution,) = {
        t.distributions["family"] for t in optuna.load_study(study_name="default", storage=storage).trials
    }
    assert distribution.choices == ("C[4,8] F3 K1 P16 stem4",)


def test_a_space_with_no_design_within_the_budget_is_refused(tmp_path) -> None:
    trainer = FakeTrainer()
    with pytest.raises(BudgetError, match=r"no design of the search space fits the 1,000-parameter budget"):
        trials(tmp_path, trainer, n=1, space={**TINY_SPACE, "max_params": 1_000})
    assert trainer.configs == [] and not (tmp_path / "search").exists()
    result = invoke("--max-params", "1000", "--trials", "1", "--out", str(tmp_path / "cli"))
    assert result.exit_code == 2, result.output
    assert result.stderr == (
        "Error: no design of the search space fits the 1,000-parameter budget (the smallest has "
        "78,042); raise the budget or search smaller designs\n"
    )
    assert not (tmp_path / "cli").exists()


def test_trials_train_each_design_within_the_budget_once(tmp_path, monkeypatch) -> None:
    # the default space holds 6 designs within 100,000 parameters: 8 trials train those 6 once
    # each and say why they stopped; another run has nothing left to train and says so
    import cerberus.runner

    trainer = FakeTrainer()
    monkeypatch.setattr(cerberus.runner, "train_run", trainer)
    args = ["--max-params", "100000", "--out", str(tmp_path / "s"), "--set", "train.epochs=1", "--seed", "0"]
    result = invoke("--trials", "8", "--json", *args)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [r["state"] for r in data["leaderboard"]] == ["complete"] * 6
    assert (data["trials_run"], data["trials_trained"]) == (6, 6)
    assert data["stopped"] == "the study holds every design within the budget (6)"
    assert "Trained 6 of 8 trials: the study holds every design within the budget (6)." in result.stderr
    assert "" not in result.stderr.splitlines()  # no live display, nor its blank line, to a file
    listed = json.loads(invoke("--max-params", "100000", "--json").stdout)["candidates"]
    archs = [c.model.architecture() for c in trainer.configs]
    assert sorted(a.blocks for a in archs) == sorted(tuple(c["blocks"]) for c in listed)
    again = invoke("--trials", "1", *args)
    assert again.exit_code == 1, again.output
    assert "Error: no trial trained: the study holds every design within the budget (6)" in again.stderr
    assert "Leaderboard of study 'default' (6 trials)" in again.stdout and len(trainer.configs) == 6


def test_family_labels_name_the_stem_once_and_stay_the_samplers_choices() -> None:
    # Optuna stores these strings as a study's categorical choices: they may not change.
    assert search._family((8, 16), 3, 1, 16, 8).label() == "C[8,16] F3 K1 P16 stem8"
    assert search._family((8, 16), 3, 1, 16, 6).label() == "C[8,16] F3 K1 P16 stem6"
    pooled = search._family((32, 128, 128), 3, 1, 3, 24, downsample="pool", stem_kernel=2)
    assert pooled.label() == "C[32,128,128] F3 K1 P3 S2 maxpool stem24"
    # a design's own label shows the stem only where it differs from the first stage's width
    assert (
        search._family((8, 16), 3, 1, 16, 6).architecture([1, 2]).label() == "B[1,2] C[8,16] F3 K1 P16 stem6"
    )
    assert search._family((8, 16), 3, 1, 16, 8).architecture([1, 2]).label() == "B[1,2] C[8,16] F3 K1 P16"


def test_a_drawn_design_the_study_holds_gives_way_to_the_nearest_untried_one() -> None:
    fam = search._family((4, 8), 3, 1, 16, 4)
    ranges = [(1, 3), (1, 3)]
    tried = {fam.architecture(b): 0 for b in [(2, 2), (1, 2)]}
    assert trials_module._nearest_untried(fam, ranges, (2, 2), tried, 20_000) == (3, 2)
    assert trials_module._nearest_untried(fam, ranges, (2, 2), tried, fam.params((2, 2))) == (2, 1)
    assert trials_module._nearest_untried(fam, ranges, (1, 1), tried, 20_000) == (1, 1)
    every = {fam.architecture((a, b)): 0 for a in (1, 2, 3) for b in (1, 2, 3)}
    assert trials_module._nearest_untried(fam, ranges, (2, 2), every, 20_000) is None


def test_duplicate_draws_are_not_trained_again(tmp_path, caplog) -> None:
    # 9 designs, 9 trials: the sampler draws some designs twice, and each repeat gives way
    caplog.set_level("WARNING", logger="optuna")
    trainer = FakeTrainer()
    result, _ = trials(tmp_path, trainer, n=9, space={**TINY_SPACE, "base_width": [4]}, pruner="none")
    assert len(set(c.model.architecture() for c in trainer.configs)) == len(trainer.configs) == 9
    assert [r.state for r in result.leaderboard] == ["complete"] * 9 and result.stopped == ""
    study = optuna.load_study(study_name="default", storage=result.storage)
    skipped = [t for t in study.trials if t.state == optuna.trial.TrialState.FAIL]
    assert skipped and all("duplicate" in t.user_attrs for t in skipped)  # hidden from the leaderboard
    assert not [r.getMessage() for r in caplog.records if "failed" in r.getMessage()]  # nor logged


@pytest.mark.parametrize("other_number", [0, 1])
def test_two_workers_claiming_one_design_at_once_train_it_once(tmp_path, monkeypatch, other_number) -> None:
    # Another worker's running trial claims the design this worker drew, between this worker's
    # first look at the study and its own claim. Whichever number it has (0: started before this
    # trial; 1: after), this trial sees a claim beside its own and gives way: the other worker,
    # which checked before this claim was written, trains the design.
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    study = optuna.create_study(study_name="default", storage=storage, direction="maximize")
    others = [study.ask()] if other_number == 0 else []  # trial 0, running
    space = {**TINY_SPACE, "base_width": [4]}
    drawn: list[Architecture] = []
    real_suggest, real_tried = trials_module._suggest_design, trials_module._tried_designs

    def suggest(trial, families, max_params):
        label, arch = real_suggest(trial, families, max_params)
        drawn.append(arch)
        return label, arch

    def tried(study, *args):
        found = real_tried(study, *args)
        if len(drawn) == 1 and not any("design" in t.user_attrs for t in study.get_trials()):
            if not others:  # the other worker's trial starts now: the next number
                others.append(optuna.load_study(study_name="default", storage=storage).ask())
            others[0].set_user_attr("design", drawn[0].to_dict())  # after this worker's first look
        return found

    monkeypatch.setattr(trials_module, "_suggest_design", suggest)
    monkeypatch.setattr(trials_module, "_tried_designs", tried)
    trainer = FakeTrainer()
    result, _ = trials(tmp_path, trainer, n=1, space=space, storage=storage)
    trained = [c.model.architecture() for c in trainer.configs]
    assert len(drawn) == 2 and drawn[1] != drawn[0]  # the second draw is the nearest untried design
    assert trained == [drawn[1]]
    study = optuna.load_study(study_name="default", storage=result.storage)
    other = study.trials[other_number]
    mine = study.trials[1 - other_number]
    assert mine.state == optuna.trial.TrialState.FAIL and mine.user_attrs["duplicate"] == other_number
    assert other.state == optuna.trial.TrialState.RUNNING  # untouched: it trains the design


def test_study_resumes_and_refuses_another_space(tmp_path) -> None:
    trials(tmp_path, FakeTrainer(), n=2)
    result, events = trials(tmp_path, FakeTrainer(), n=1)
    assert events[0]["existing_trials"] == 2
    assert result.trials_run == 1 and len(result.leaderboard) == 3
    with pytest.raises(ConfigError, match=r"another search space.*differs in: max_params"):
        trials(tmp_path, FakeTrainer(), n=1, space={**TINY_SPACE, "max_params": 30_000})
    report, _ = trials(tmp_path, FakeTrainer(), n=0)  # report only
    assert len(report.leaderboard) == 3 and report.trials_run == 0


def test_study_refuses_another_trial_recipe(tmp_path) -> None:
    trials(tmp_path, FakeTrainer(), n=1, overrides=["train.epochs=1", "data.val_size=64"])
    with pytest.raises(ConfigError) as err:
        trials(tmp_path, FakeTrainer(), n=1, overrides=["train.epochs=2", "data.val_size=64"])
    assert str(err.value) == (
        f"study 'default' in sqlite:///{tmp_path / 'search' / 'study.db'} was trained with another "
        "trial config (train.epochs = 1 in the study, 2 now); use the same --config and --set, or a "
        "new --study name"
    )
    with pytest.raises(ConfigError, match=r"\(data\.val_size = 64 in the study, 5000 now; train\.lr"):
        trials(tmp_path, FakeTrainer(), n=1, overrides=["train.epochs=1", "train.lr=0.2"])
    # the same recipe continues, however it is spelled and wherever the worker runs it
    same = ["data.val_size=64", "train.epochs=1", "train.device=cpu", "data.root=/elsewhere"]
    result, _ = trials(tmp_path, FakeTrainer(), n=1, overrides=same)
    assert len(result.leaderboard) == 2
    # nor do the settings that cannot change what a trial learns
    unused = [
        "train.eval_batch_size=256",
        "train.compile=true",
        "train.test_tta=true",
        "train.checkpoint_every=5",
    ]
    result, _ = trials(tmp_path, FakeTrainer(), n=1, overrides=[*same, *unused])
    assert len(result.leaderboard) == 3
    report, _ = trials(tmp_path, FakeTrainer(), n=0, overrides=["train.epochs=5"])  # trains nothing
    assert len(report.leaderboard) == 3


def test_a_study_from_before_recipes_were_recorded_records_its_next_one(tmp_path) -> None:
    trials(tmp_path, FakeTrainer(), n=1, overrides=["train.epochs=1"])
    study = optuna.load_study(study_name="default", storage=f"sqlite:///{tmp_path / 'search' / 'study.db'}")
    study.set_user_attr("recipe", None)  # as a study created before recipes were recorded
    trials(tmp_path, FakeTrainer(), n=1, overrides=["train.epochs=2"])
    with pytest.raises(ConfigError, match=r"train\.epochs = 2 in the study, 1 now"):
        trials(tmp_path, FakeTrainer(), n=1, overrides=["train.epochs=1"])


def test_cli_refuses_another_trial_recipe(tmp_path, monkeypatch) -> None:
    import cerberus.runner

    monkeypatch.setattr(cerberus.runner, "train_run", FakeTrainer())
    args = ["--max-params", "100000", "--trials", "1", "--out", str(tmp_path / "s")]
    assert invoke(*args, "--set", "train.epochs=1").exit_code == 0
    result = invoke(*args, "--set", "train.epochs=2")
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("Error: study 'default' in sqlite:///")
    assert "was trained with another trial config (train.epochs = 1 in the study, 2 now)" in result.stderr
    assert "Traceback" not in result.output
    assert invoke(*args, "--set", "train.epochs=1").exit_code == 0


def test_listing_a_study_that_does_not_exist_leaves_nothing_behind(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = invoke("--trials", "0")
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("Error: no study named 'default' in sqlite:///")
    assert list(tmp_path.iterdir()) == []  # no runs/search-default/study.db, nor its lock
    result = invoke("--trials", "0", "--out", "s", "--storage", "sqlite:///elsewhere/x.db")
    assert result.exit_code == 2 and "no study named 'default'" in result.stderr, result.output
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ConfigError, match="no study named 'default'"):
        trials(tmp_path, FakeTrainer(), n=0)
    assert list(tmp_path.iterdir()) == []


def test_a_study_of_another_storage_is_listed_into_a_new_search_folder(tmp_path) -> None:
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    trials(tmp_path, FakeTrainer(), n=1, storage=storage)
    report, _ = trials(tmp_path / "elsewhere", FakeTrainer(), n=0, storage=storage)
    assert len(report.leaderboard) == 1
    assert (tmp_path / "elsewhere" / "search" / "leaderboard.json").exists()
    with pytest.raises(ConfigError, match="no study named 'other'"):  # the file exists, the study not
        trials(tmp_path / "third", FakeTrainer(), n=0, storage=storage, study_name="other")
    assert not (tmp_path / "third").exists()


def test_cli_says_how_many_trials_the_study_holds(tmp_path, monkeypatch) -> None:
    import cerberus.runner

    monkeypatch.setattr(cerberus.runner, "train_run", FakeTrainer())
    out = str(tmp_path / "s")
    args = ["--max-params", "100000", "--trials", "1", "--out", out, "--set", "train.epochs=1"]
    first = invoke(*args)
    assert first.exit_code == 0, first.output
    assert "0 trials so far; running 1 more" in first.stderr
    second = invoke(*args)
    assert second.exit_code == 0, second.output
    assert "1 trial so far; running 1 more" in second.stderr
    assert "Leaderboard of study 'default' (2 trials)" in second.stdout


def test_ctrl_c_stops_cleanly_and_the_study_continues(tmp_path) -> None:
    result, _ = trials(tmp_path, FakeTrainer(interrupt_on=1), n=3)
    assert result.interrupted and result.trials_run == 1
    assert sorted(r.state for r in result.leaderboard) == ["complete", "failed"]
    result, _ = trials(tmp_path, FakeTrainer(), n=1)
    assert not result.interrupted and len(result.leaderboard) == 3


def test_the_leaderboard_ranks_complete_trials_above_partial_ones(tmp_path) -> None:
    # an interrupted trial reached 0.66 after 2 of 3 epochs: above the complete trials' 0.5 and
    # 0.4, but partial, so it ranks below them, its state and why it stopped shown
    stopped = Interrupted("stopped by SIGTERM at the end of epoch 2", 143)
    trainer = FakeTrainer(accuracies=(0.5, 0.99), interrupt_on=1, error=stopped, after_epochs=2)
    trials(tmp_path, trainer, n=3, pruner="none")
    result, _ = trials(tmp_path, FakeTrainer(accuracies=(0.4,)), n=1, pruner="none")
    ranked = [(r.state, round(r.val_accuracy, 2), r.note) for r in result.leaderboard]
    assert ranked == [
        ("complete", 0.5, ""),
        ("complete", 0.4, ""),
        ("failed", 0.66, "interrupted by SIGTERM"),
    ]
    written = json.loads((tmp_path / "search" / "leaderboard.json").read_text())["leaderboard"]
    assert [r["state"] for r in written] == ["complete", "complete", "failed"]
    assert {r.state for r in result.pareto} == {"complete"}


def test_leaderboard_order_of_states() -> None:
    from optuna.trial import TrialState, create_trial

    from cerberus.search import leaderboard

    study = optuna.create_study(direction="maximize")

    def add(state, accuracy=None, **attrs):
        if accuracy is not None:
            attrs["best_val_accuracy"] = accuracy
        value = accuracy if state == TrialState.COMPLETE else None
        study.add_trial(create_trial(state=state, value=value, user_attrs=attrs))

    add(TrialState.FAIL, 0.99, interrupted="interrupted by SIGINT at epoch 2, step 5")
    add(TrialState.PRUNED, 0.95, pruned="pruned after epoch 1")
    add(TrialState.COMPLETE, 0.5)
    add(TrialState.PRUNED, rejected="invalid config: train.whiten_stem ...")
    add(TrialState.COMPLETE, 0.6)
    add(TrialState.FAIL, duplicate=2)  # a skipped draw: not listed
    add(TrialState.PRUNED, 0.97, pruned="pruned after epoch 2")
    add(TrialState.RUNNING, 0.98)
    add(TrialState.FAIL, fatal="CIFAR-10 not found")
    ranked = [(r.number, r.state) for r in leaderboard(study)]
    assert ranked == [
        (4, "complete"),
        (2, "complete"),
        (6, "pruned"),
        (1, "pruned"),
        (7, "running"),
        (0, "failed"),
        (8, "failed"),
        (3, "rejected"),
    ]
    notes = {r.number: r.note for r in leaderboard(study)}
    assert notes[0] == "interrupted by SIGINT at epoch 2, step 5" and notes[8] == "CIFAR-10 not found"


@pytest.fixture
def sigterm_guard():
    """SIGTERM that no handler of Cerberus takes fails the test (instead of killing pytest)."""

    def unhandled(signum, frame):
        raise AssertionError("SIGTERM reached the default handler: the process would have died")

    previous = signal.signal(signal.SIGTERM, unhandled)
    yield
    signal.signal(signal.SIGTERM, previous)


TINY_REAL = [
    "train.epochs=2",
    "data.train_subset=80",
    "data.val_size=20",
    "train.batch_size=10",
    "train.eval_batch_size=20",
    "train.threads=1",
    "train.device=cpu",
]


def test_sigterm_during_a_trial_marks_it_failed_and_writes_the_results(
    tmp_path, fake_cifar, sigterm_guard
) -> None:
    # real training: SIGTERM at the first step; the runner finishes that step and stops the trial
    sent = []

    def on_event(event) -> None:
        if event["event"] == "trial_step" and not sent:
            sent.append(event)
            os.kill(os.getpid(), signal.SIGTERM)

    def search(trials: int, **kwargs):
        settings = {"overrides": TINY_REAL, "pruner": "none", "seed": 0, **kwargs}
        space, out_dir = space_from_dict(TINY_SPACE), tmp_path / "search"
        return run_trials(space, trials=trials, out_dir=out_dir, data_dir=str(fake_cifar), **settings)

    result = search(3, on_event=on_event)
    assert sent and result.interrupted and result.stopped == "interrupted by SIGTERM"
    (record,) = result.leaderboard
    assert record.state == "failed" and record.note.startswith("interrupted by SIGTERM at epoch 1, step ")
    written = json.loads((tmp_path / "search" / "leaderboard.json").read_text())
    assert written["interrupted"] and written["leaderboard"][0]["note"] == record.note
    study = optuna.load_study(study_name="default", storage=result.storage)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.FAIL]  # not left RUNNING
    # the design is not held: the next run may train it
    again = search(1)
    assert again.trials_trained == 1 and [r.state for r in again.leaderboard] == ["complete", "failed"]


class SignalAfter(FakeTrainer):
    """Sends this process ``signum`` once the trial ``call`` has trained (between two trials)."""

    def __init__(self, call: int, signum: int):
        super().__init__()
        self.call, self.signum = call, signum

    def __call__(self, config, **kwargs):
        result = super().__call__(config, **kwargs)
        if len(self.configs) - 1 == self.call:
            os.kill(os.getpid(), self.signum)
        return result


def test_sigterm_between_trials_stops_the_search_before_the_next(tmp_path, sigterm_guard) -> None:
    trainer = SignalAfter(0, signal.SIGTERM)
    result, events = trials(tmp_path, trainer, n=3)
    assert len(trainer.configs) == 1 and result.interrupted and result.stopped == "interrupted by SIGTERM"
    assert [r.state for r in result.leaderboard] == ["complete"]  # trial 0 finished; none started
    assert [e["event"] for e in events].count("trial_end") == 1
    assert json.loads((tmp_path / "search" / "leaderboard.json").read_text())["interrupted"]


def test_a_data_error_stops_the_search_and_keeps_the_results(tmp_path) -> None:
    message = "CIFAR-10 not found: /nowhere/cifar-10-batches-py/ does not exist"
    trainer = FakeTrainer(interrupt_on=1, error=DataError(message))
    with pytest.raises(DataError, match="CIFAR-10 not found"):
        trials(tmp_path, trainer, n=3)
    assert len(trainer.configs) == 2  # no third trial
    written = json.loads((tmp_path / "search" / "leaderboard.json").read_text())
    assert [(r["state"], r["note"]) for r in written["leaderboard"]] == [
        ("complete", ""),
        ("failed", message),
    ]
    assert len(written["configs"]) == 1  # the completed design as a train config
    # the design was not at fault: it may be drawn again
    study = optuna.load_study(study_name="default", storage=f"sqlite:///{tmp_path / 'search' / 'study.db'}")
    failed = study.trials[-1]
    assert failed.user_attrs["fatal"] == message and "error" not in failed.user_attrs
    held = trials_module._tried_designs(study)
    assert trials_module._arch_from_dict(failed.user_attrs["design"]) not in held
    # a config error the trainer meets is raised as well, with its exit code
    trainer = FakeTrainer(interrupt_on=0, error=ConfigError("data.train_subset (9999) is too large"))
    with pytest.raises(ConfigError, match="train_subset"):
        trials(tmp_path / "other", trainer, n=2)
    written = json.loads((tmp_path / "other" / "search" / "leaderboard.json").read_text())
    assert [(r["state"], r["note"]) for r in written["leaderboard"]] == [
        ("failed", "data.train_subset (9999) is too large")
    ]


def test_no_dataset_stops_the_search_with_its_message_before_the_study_is_made(tmp_path) -> None:
    # the real runner, no CIFAR-10 and no download: every trial would fail on it, so the search
    # says so before it creates its folder and study
    overrides = ["train.epochs=1", "data.download=false", "train.device=cpu"]
    empty = tmp_path / "empty"
    with pytest.raises(DataError, match=rf"CIFAR-10 not found: {empty}/cifar-10-batches-py/ does not exist"):
        trials(tmp_path, None, n=2, overrides=overrides, data_dir=str(empty))
    assert not (tmp_path / "search").exists()


def test_cli_reports_a_data_error_after_writing_the_results(tmp_path, monkeypatch) -> None:
    import cerberus.runner

    trainer = FakeTrainer(interrupt_on=1, error=DataError("CIFAR-10 not found: /nowhere"))
    monkeypatch.setattr(cerberus.runner, "train_run", trainer)
    out = str(tmp_path / "s")
    args = ["--max-params", "100000", "--trials", "3", "--out", out, "--set", "train.epochs=1"]
    result = invoke(*args)
    assert result.exit_code == 1, result.output
    assert result.stderr.endswith("Error: CIFAR-10 not found: /nowhere\n")
    written = json.loads((tmp_path / "s" / "leaderboard.json").read_text())["leaderboard"]
    assert [r["state"] for r in written] == ["complete", "failed"]


def test_test_only_settings_are_not_part_of_the_trial_recipe(tmp_path) -> None:
    trials(tmp_path, FakeTrainer(), n=1, overrides=["train.epochs=1"])
    test_only = ["data.test_subset=100", "train.test_tta=true"]
    result, _ = trials(tmp_path, FakeTrainer(), n=1, overrides=["train.epochs=1", *test_only])
    assert len(result.leaderboard) == 2


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("", "--study: the study name is empty"),
        ("  ", "--study: the study name is empty"),
        ("a/b", "--study 'a/b': a study name cannot hold '/'"),
        ("a\\b", "--study 'a\\\\b': a study name cannot hold '\\\\'"),
    ],
)
def test_a_study_name_that_cannot_name_a_folder_is_refused(tmp_path, monkeypatch, name, message) -> None:
    monkeypatch.chdir(tmp_path)
    trainer = FakeTrainer()
    with pytest.raises(ConfigError) as err:
        run_trials(space_from_dict(TINY_SPACE), trials=1, study_name=name, train_fn=trainer)
    assert str(err.value).startswith(message)
    result = invoke("--max-params", "100000", "--trials", "1", "--study", name)
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(f"Error: {message}")
    assert list(tmp_path.iterdir()) == [] and trainer.configs == []  # nothing created


def test_a_search_folder_holds_one_study_and_refuses_another(tmp_path) -> None:
    trainer = FakeTrainer()
    first, _ = trials(tmp_path, trainer, n=1, study_name="first")
    folder = tmp_path / "search"
    assert trainer.out_dirs == [folder / "trials" / "first-0000"]
    mark = json.loads((folder / "study.json").read_text())
    assert (mark["study"], mark["storage"]) == ("first", first.storage) and len(mark["uid"]) == 32
    leaderboard = (folder / "leaderboard.json").read_text()
    # Another study in the same folder would write over the first one's leaderboard and configs.
    with pytest.raises(
        ConfigError, match=r"holds the results of study 'first', in sqlite:///.*; choose another --out"
    ):
        trials(tmp_path, trainer, n=1, study_name="second run")
    # The same name in a study made anew (its file deleted, say) is another study too; refused
    # before anything is created, so the next attempt is refused the same way.
    (folder / "study.db").unlink()
    for _ in range(2):
        with pytest.raises(
            ConfigError,
            match=r"holds the results of study 'first', which sqlite:///.* no longer holds \(deleted\?\)",
        ):
            trials(tmp_path, trainer, n=1, study_name="first")
    assert not (folder / "study.db").exists()
    assert (folder / "leaderboard.json").read_text() == leaderboard and len(trainer.configs) == 1
    assert invoke("--trials", "1", "--study", "other", "--out", str(folder)).exit_code == 2


def test_a_folder_from_before_folders_named_their_study_is_taken_by_its_study(tmp_path) -> None:
    trainer = FakeTrainer()
    trials(tmp_path, trainer, n=1)
    folder = tmp_path / "search"
    (folder / "study.json").unlink()  # as a search folder was written before
    trials(tmp_path, trainer, n=1)  # the study with trials there takes it
    assert json.loads((folder / "study.json").read_text())["study"] == "default"
    (folder / "study.json").unlink()
    storage = f"sqlite:///{tmp_path / 'new.db'}"
    with pytest.raises(ConfigError, match=r"holds the results of study 'default' \(leaderboard.json\)"):
        trials(tmp_path, trainer, n=1, study_name="new", storage=storage)
    assert len(trainer.configs) == 2 and not (tmp_path / "new.db").exists()  # no study made
    # A study that exists is taken, trials or not; one from before studies recorded a uid (made
    # by another tool, say) is not given one by a worker that merely opens it: only a study's
    # creator writes it, so workers sharing a server database cannot race to name it.
    other = f"sqlite:///{tmp_path / 'other.db'}"
    optuna.create_study(study_name="zero", storage=other)
    trials(tmp_path / "zero", FakeTrainer(), n=0, study_name="zero", storage=other)  # a report
    assert (tmp_path / "zero" / "search" / "leaderboard.json").exists()  # a folder with results
    trials(tmp_path / "zero", trainer, n=1, study_name="zero", storage=other)
    assert len(trainer.configs) == 3
    assert "uid" not in optuna.load_study(study_name="zero", storage=other).user_attrs
    assert not (tmp_path / "zero" / "search" / "study.json").exists()


def test_a_folder_without_study_json_still_refuses_another_study(tmp_path) -> None:
    trainer = FakeTrainer()
    trials(tmp_path, trainer, n=1)
    folder = tmp_path / "search"
    (folder / "study.json").unlink()
    (folder / "trials" / "default-0000").mkdir(parents=True)  # as a real trial leaves it
    shared = f"sqlite:///{tmp_path / 'shared.db'}"
    # its leaderboard names its study...
    with pytest.raises(ConfigError, match=r"holds the results of study 'default' \(leaderboard.json\)"):
        trials(tmp_path, trainer, n=0, study_name="s", storage=shared)
    # ...and so do its trial folders' names, without the leaderboard
    (folder / "leaderboard.json").unlink()
    with pytest.raises(ConfigError, match=r"holds the trials of another study \(trials/default-NNNN\)"):
        trials(tmp_path, trainer, n=1, study_name="s", storage=shared)
    assert not (folder / "leaderboard.json").exists() and len(trainer.configs) == 1


def test_a_leaderboard_names_its_study_exactly(tmp_path) -> None:
    shared = f"sqlite:///{tmp_path / 'shared.db'}"
    trials(tmp_path, FakeTrainer(), n=1, study_name="a b", storage=shared)
    (tmp_path / "search" / "study.json").unlink()
    with pytest.raises(ConfigError, match=r"holds the results of study 'a b' \(leaderboard.json\)"):
        trials(tmp_path, FakeTrainer(), n=1, study_name="a_b", storage=shared)  # its trials: a_b-0000


def test_workers_in_other_folders_name_a_relative_storage_alike(tmp_path, monkeypatch) -> None:
    (tmp_path / "w1").mkdir()
    monkeypatch.chdir(tmp_path / "w1")
    first, _ = trials(tmp_path / "w1", FakeTrainer(), n=1, storage="sqlite:///../shared.db")
    assert first.storage == f"sqlite:///{tmp_path / 'shared.db'}"
    (tmp_path / "w2").mkdir()
    monkeypatch.chdir(tmp_path / "w2")
    second, _ = trials(tmp_path / "w2", FakeTrainer(), n=1, storage="sqlite:///../shared.db")
    assert len(second.leaderboard) == 2 and 0 in {r.number for r in second.leaderboard}  # one study
    assert second.storage == first.storage  # named alike, in the folders' study.json too
    # a worker folder opened from elsewhere without --storage names the storage to pass, as given
    with pytest.raises(ConfigError, match=rf"pass --storage sqlite:///{tmp_path / 'shared.db'} to continue"):
        trials(tmp_path / "w1", FakeTrainer(), n=1)


def test_a_worker_folder_opened_without_its_storage_says_which(tmp_path) -> None:
    shared = f"sqlite:///{tmp_path / 'shared.db'}"
    trials(tmp_path, FakeTrainer(), n=1, study_name="s", storage=shared)
    with pytest.raises(ConfigError) as caught:
        trials(tmp_path, FakeTrainer(), n=1, study_name="s")  # --storage forgotten
    assert str(caught.value) == (
        f"--out {tmp_path / 'search'}: holds the results of study 's' in {shared}; pass --storage "
        f"{shared} to continue it, or choose another --out"
    )
    assert not (tmp_path / "search" / "study.db").exists()


def test_a_moved_search_folder_records_where_its_study_is_now(tmp_path) -> None:
    trials(tmp_path / "a", FakeTrainer(), n=1)
    (tmp_path / "a").rename(tmp_path / "b")
    result, _ = trials(tmp_path / "b", FakeTrainer(), n=1)
    assert json.loads((tmp_path / "b" / "search" / "study.json").read_text())["storage"] == result.storage
    assert str(tmp_path / "b" / "search" / "study.db") in result.storage


def test_a_report_writes_nothing_into_a_database_without_studies(tmp_path) -> None:
    import sqlite3

    db = tmp_path / "other.db"
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.execute("CREATE TABLE mine (x)")
    before = db.read_bytes()
    (tmp_path / "empty.db").write_bytes(b"")
    for path in (db, tmp_path / "empty.db"):
        result = invoke("--trials", "0", "--out", str(tmp_path / "out"), "--storage", f"sqlite:///{path}")
        assert result.exit_code == 2 and "Error: no study named 'default'" in result.stderr
    assert db.read_bytes() == before and (tmp_path / "empty.db").read_bytes() == b""
    assert not (tmp_path / "out").exists()


def test_a_damaged_study_json_or_a_file_as_out_is_one_error_line(tmp_path) -> None:
    trials(tmp_path, FakeTrainer(), n=1)
    (tmp_path / "search" / "study.json").write_text("{bad")
    result = invoke("--trials", "0", "--out", str(tmp_path / "search"))
    assert result.exit_code == 1, result.output
    assert result.stderr == (
        f"Error: {tmp_path / 'search' / 'study.json'}: damaged; remove it (the folder's study is then "
        "read from leaderboard.json and trials/) or choose another --out\n"
    )
    (tmp_path / "search" / "study.json").write_text("[1, 2]")  # JSON, but not this tool's record
    result = invoke("--trials", "0", "--out", str(tmp_path / "search"))
    assert result.exit_code == 2
    assert result.stderr.endswith(
        "study.json: not a search folder's record of its study; choose another --out\n"
    )
    (tmp_path / "file").write_text("")
    result = invoke("--trials", "0", "--top", "0", "--out", str(tmp_path / "file"))
    assert result.exit_code == 2
    assert result.stderr == f"Error: --out {tmp_path / 'file'}: is a file, not a folder for the search\n"


def test_a_failed_out_binds_no_study_to_its_recipe(tmp_path) -> None:
    # The folder is made before the study is: a study recorded with nowhere to write would refuse
    # the next search's recipe.
    (tmp_path / "file").write_text("")
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        run_trials(
            space_from_dict(TINY_SPACE),
            trials=1,
            out_dir=tmp_path / "file",
            storage=storage,
            overrides=["train.epochs=1"],
            train_fn=FakeTrainer(),
            top=0,
        )
    trainer = FakeTrainer()
    trials(tmp_path, trainer, n=1, storage=storage, overrides=["train.epochs=2"])
    assert len(trainer.configs) == 1


def test_a_trial_whose_process_died_releases_its_design(tmp_path) -> None:
    # Two designs; one trained, the other claimed by a trial whose process was killed.
    space = {**TINY_SPACE, "blocks": [1, 1]}  # widths 4 or 8, one block a stage
    trainer = FakeTrainer()
    result, _ = trials(tmp_path, trainer, n=1, space=space)
    study = optuna.load_study(study_name="default", storage=result.storage)
    trained = trainer.configs[0].model.architecture()
    families = {f.label(): (f, r) for f, r in search.families_within_budget(space_from_dict(space))}
    label, blocks = trials_module._untried_design(families, {trained: 0}, 20_000)
    dead = study.ask()
    dead.set_user_attr("design", families[label][0].architecture(blocks).to_dict())
    study._storage.record_heartbeat(dead._trial_id)
    again = trials(tmp_path, trainer, n=1, space=space)[0]
    assert len(trainer.configs) == 1 and again.trials_trained == 0  # its heartbeat is recent: held
    assert again.stopped == (
        "the study holds every design within the budget (2); 1 of them is held by a running trial, "
        "released if its process has died once 5 minutes pass without its heartbeat"
    )
    import sqlite3

    with contextlib.closing(sqlite3.connect(tmp_path / "search" / "study.db")) as conn:
        conn.execute("UPDATE trial_heartbeats SET heartbeat = datetime(heartbeat, '-1 hour')")
        conn.commit()
    again = trials(tmp_path, trainer, n=1, space=space)[0]
    assert again.trials_trained == 1
    assert trainer.configs[1].model.architecture() == families[label][0].architecture(blocks)
    states = {
        t.number: t.state for t in optuna.load_study(study_name="default", storage=result.storage).trials
    }
    assert states[dead.number] == optuna.trial.TrialState.FAIL
    record = next(r for r in again.leaderboard if r.number == dead.number)
    assert (record.state, record.note) == ("failed", "no result: its process died or crashed")


def test_a_trial_declared_dead_while_it_trained_stops_the_search_with_the_results_written(
    tmp_path, caplog
) -> None:
    # The process was stopped (SIGSTOP, a laptop asleep) for longer than the grace period: another
    # worker marked its trial failed and may train the design. Its result cannot be told.
    class Sleeper(FakeTrainer):
        def __call__(self, config, **kwargs):
            result = super().__call__(config, **kwargs)
            study = optuna.load_study(
                study_name="default", storage=f"sqlite:///{tmp_path / 'search' / 'study.db'}"
            )
            running = [t for t in study.get_trials() if t.state == optuna.trial.TrialState.RUNNING]
            study._storage.set_trial_state_values(running[0]._trial_id, optuna.trial.TrialState.FAIL)
            return result

    trainer = Sleeper()
    with pytest.raises(CerberusError) as caught:
        trials(tmp_path, trainer, n=2)
    check_declared_dead(caught, trainer, tmp_path)

    # Marked failed between two epochs: the next epoch's report cannot be recorded either.
    class Dozer(FakeTrainer):
        def __call__(self, config, *, on_event, **kwargs):
            def on_epoch(event):
                on_event(event)
                study = optuna.load_study(
                    study_name="default", storage=f"sqlite:///{tmp_path / 'search' / 'study.db'}"
                )
                running = [t for t in study.get_trials() if t.state == optuna.trial.TrialState.RUNNING]
                if running:
                    study._storage.set_trial_state_values(running[0]._trial_id, optuna.trial.TrialState.FAIL)

            return super().__call__(config, on_event=on_epoch, **kwargs)

    shutil.rmtree(tmp_path / "search")
    caplog.set_level("WARNING", logger="optuna")
    trainer = Dozer()
    with pytest.raises(CerberusError) as caught:
        trials(tmp_path, trainer, n=2)
    check_declared_dead(caught, trainer, tmp_path)
    assert not [r.getMessage() for r in caplog.records if "failed" in r.getMessage()]  # no Optuna traceback


@pytest.mark.parametrize("error", [ValueError("a bug in the trainer"), AssertionError("bad shape")])
def test_a_trials_own_value_or_assertion_error_is_not_blamed_on_another_process(tmp_path, error) -> None:
    with pytest.raises(type(error), match=str(error)):
        trials(tmp_path, FakeTrainer(interrupt_on=0, error=error), n=1)


def marked_failed_then(error: BaseException, tmp_path: Path) -> FakeTrainer:
    """A trainer whose trial another process marks failed (its heartbeat lapsed), then ``error``."""

    class Trainer(FakeTrainer):
        def __call__(self, config, **kwargs):
            self.configs.append(config)
            study = optuna.load_study(
                study_name="default", storage=f"sqlite:///{tmp_path / 'search' / 'study.db'}"
            )
            running = [t for t in study.get_trials() if t.state == optuna.trial.TrialState.RUNNING]
            study._storage.set_trial_state_values(running[0]._trial_id, optuna.trial.TrialState.FAIL)
            raise error

    return Trainer()


def test_a_signal_after_the_trial_was_marked_failed_still_stops_as_a_signal(tmp_path) -> None:
    result, _ = trials(tmp_path, marked_failed_then(Interrupted("stopped by SIGINT", 130), tmp_path), n=2)
    assert result.interrupted and result.stopped == "interrupted by SIGINT"


@pytest.mark.parametrize(
    "error", [optuna.TrialPruned("after epoch 1"), DivergenceError("the loss became non-finite")]
)
def test_a_pruned_or_diverged_trial_marked_failed_meanwhile_is_reported_as_such(tmp_path, error) -> None:
    trainer = marked_failed_then(error, tmp_path)
    with pytest.raises(CerberusError) as caught:
        trials(tmp_path, trainer, n=2)
    check_declared_dead(caught, trainer, tmp_path)


def check_declared_dead(caught, trainer, tmp_path) -> None:
    assert str(caught.value) == (
        "trial 0 was marked failed while it trained: no heartbeat reached the study for over 5 minutes "
        "(this process was stopped or lost the study storage), so its design went back to the study "
        "and its result is not recorded; run the search again to go on"
    )
    assert caught.value.exit_code == 1 and len(trainer.configs) == 1
    board = json.loads((tmp_path / "search" / "leaderboard.json").read_text())  # written all the same
    assert [(t["state"], t["note"]) for t in board["leaderboard"]] == [
        ("failed", "no result: its process died or crashed")
    ]


def test_a_damaged_study_file_is_one_error_line(tmp_path) -> None:
    import sqlite3

    trials(tmp_path, FakeTrainer(), n=1)
    db = tmp_path / "search" / "study.db"
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.execute("UPDATE study_user_attributes SET value_json = CAST(X'FFFE' AS TEXT)")
        conn.commit()
    result = invoke("--trials", "0", "--out", str(tmp_path / "search"))
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith(f"Error: study file {db}: the study storage cannot be read or written: ")
    assert len(result.stderr.splitlines()) == 1 and "Traceback" not in result.output
    db.write_bytes(b"not a database" * 100)
    result = invoke("--trials", "1", "--out", str(tmp_path / "search"))
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith(f"Error: study file {db}: cannot open the study storage (damaged")


@pytest.mark.parametrize("url", ["sqlite:///:memory:", "sqlite://"])
def test_an_in_memory_study_is_refused(tmp_path, url) -> None:
    result = invoke("--max-params", "100000", "--trials", "1", "--out", str(tmp_path / "s"), "--storage", url)
    assert result.exit_code == 2, result.output
    assert result.stderr == (
        f"Error: --storage {url}: an in-memory study vanishes with this process and cannot be resumed "
        "or shared; name a file, e.g. sqlite:///study.db\n"
    )
    assert not (tmp_path / "s").exists()


def test_a_design_the_base_settings_do_not_suit_is_rejected_not_fatal(tmp_path) -> None:
    # whiten_stem needs an even stem: width 5 cannot have one, width 8 can
    space = {**TINY_SPACE, "base_width": [5, 8], "blocks": [1, 1]}
    trainer = FakeTrainer()
    overrides = ["train.epochs=2", "train.whiten_stem=true"]
    result, _ = trials(tmp_path, trainer, n=6, space=space, overrides=overrides, pruner="none")
    widths = {r.design["channels"][0]: r for r in result.leaderboard}
    assert widths.keys() == {5, 8}
    assert widths[5].state == "rejected"
    assert widths[5].note.startswith("invalid config: train.whiten_stem fills")  # the setting first, once
    assert all(c.model.architecture().stem_width == 8 for c in trainer.configs)
    # the study holds both designs now, and says why one of them was never trained
    assert result.stopped == (
        "the study holds every design within the budget (2); 1 of them was rejected before training "
        "(the trial config's train.whiten_stem does not suit it; see the leaderboard's notes)"
    )


def test_trial_config_refusals(tmp_path) -> None:
    with pytest.raises(ConfigError, match="the model comes from the search space"):
        trials(tmp_path, FakeTrainer(), overrides=["model.blocks=[1,1]"])
    with pytest.raises(ConfigError, match=r"data\.val_size is 0"):
        trials(tmp_path, FakeTrainer(), overrides=["data.val_size=0"])
    with pytest.raises(ConfigError, match=r"trial config: invalid config\ntrain\.epoch: unknown key"):
        trials(tmp_path, FakeTrainer(), overrides=["train.epoch=2"])
    with pytest.raises(ConfigError, match="no study named 'nope'"):
        trials(tmp_path, FakeTrainer(), n=0, study_name="nope")
    with pytest.raises(ConfigError, match="cannot open the study storage"):
        trials(tmp_path, FakeTrainer(), storage="sqlite:////nonexistent/dir/x.db")


def test_pareto_front() -> None:
    points = [(100, 0.5), (200, 0.7), (150, 0.5), (300, 0.7), (250, 0.8), (100, 0.5), (50, 0.1)]
    # (150, .5) is beaten by (100, .5); (300, .7) by (200, .7); equal points both stay
    assert pareto_front(points) == [6, 0, 5, 1, 4]


def test_cli_trials_json_and_interrupt(tmp_path, monkeypatch) -> None:
    import cerberus.runner

    monkeypatch.setattr(cerberus.runner, "train_run", FakeTrainer(accuracies=(0.4, 0.6)))
    space = tmp_path / "space.toml"
    space.write_text("stages = [2]\nblocks = [1, 2]\nbase_width = [4, 8]\nmax_params = 20000\n")
    args = [str(space), "--trials", "2", "--out", str(tmp_path / "s"), "--set", "train.epochs=2", "--json"]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert len(data["leaderboard"]) == 2 and data["pareto"] and len(data["configs"]) == 2
    assert "trial   0" in result.stderr  # a progress line per trial
    monkeypatch.setattr(cerberus.runner, "train_run", FakeTrainer(interrupt_on=0))
    result = invoke(*args[:-1])
    assert result.exit_code == 130, result.output
    assert "Run the same command again to continue study 'default'" in result.stderr
    assert "Leaderboard of study 'default' (3 trials)" in result.stdout


# --------------------------------------------------------------------------------------------
# Real training: two processes share one study


@pytest.mark.slow
def test_two_processes_share_one_study(tmp_path, fake_cifar) -> None:
    space = tmp_path / "space.toml"
    space.write_text("stages = [2]\nblocks = [1, 2]\nbase_width = [4, 8]\nmax_params = 20000\n")
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    tiny = (
        "--trials 2 --study s --json --set train.epochs=2 data.train_subset=60 data.val_size=20 "
        "train.batch_size=40 train.eval_batch_size=20 train.threads=1 train.device=cpu"
    )
    paths = ["--storage", storage, "--data-dir", str(fake_cifar), "--out", str(tmp_path / "out")]
    command = [sys.executable, "-m", "cerberus", "search", str(space), *paths, *tiny.split()]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    processes = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=300) for p in processes]
    for p, (stdout, stderr) in zip(processes, outputs):
        assert p.returncode == 0, stderr
        assert json.loads(stdout)["trials_run"] == 2
    study = optuna.load_study(study_name="s", storage=storage)
    trained = [t for t in study.get_trials() if "duplicate" not in t.user_attrs]  # not repeated draws
    assert len(trained) == 4
    assert all(t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED) for t in trained)
    for t in trained:
        assert 1 <= t.user_attrs["epochs"] <= 2 and t.user_attrs["params"] <= 20_000


@pytest.mark.parametrize("signal_name, code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_cli_exits_with_the_code_of_the_signal_that_stopped_the_trials(
    tmp_path, monkeypatch, signal_name, code
):
    import cerberus.runner

    trainer = FakeTrainer(interrupt_on=0, error=Interrupted(f"stopped by {signal_name}", code))
    monkeypatch.setattr(cerberus.runner, "train_run", trainer)
    result = invoke("--max-params", "100000", "--trials", "2", "--out", str(tmp_path / "s"), "--json")
    assert result.exit_code == code, result.output
    assert json.loads(result.stdout)["signal"] == signal_name
    written = json.loads((tmp_path / "s" / "leaderboard.json").read_text())
    assert written["interrupted"] and written["stopped"] == f"interrupted by {signal_name}"


def test_cli_counts_within_the_parameter_range_and_names_the_smallest_design(tmp_path) -> None:
    space = tmp_path / "space.toml"
    space.write_text("stages = [2]\nblocks = [1, 1]\nbase_width = [8, 16]\nmax_params = 1_000_000\n")
    ranged = invoke(str(space), "--min-params", "10000", "--top", "3")  # 5,266 and 19,994 parameters
    assert ranged.exit_code == 0, ranged.output
    assert "1 within 10,000 to 1,000,000 parameters" in ranged.stdout
    assert "Top 1 of 1 design within 10,000 to 1,000,000 parameters" in ranged.stdout
    over = invoke(str(space), "--max-params", "5000", "--top", "3")
    assert over.exit_code == 0, over.output
    assert "0 within the 5,000-parameter budget; the smallest design has 5,266" in over.stdout


def test_an_out_that_is_a_file_or_a_storage_that_fails_is_refused_leaving_nothing(tmp_path) -> None:
    (tmp_path / "file").write_text("")
    file = tmp_path / "file"
    expected = {  # with configs to write, their folder is what is refused first
        "5": f"cannot write configs to {file / 'configs'}: {file} is not a folder",
        "0": f"--out {file}: is a file, not a folder for the search",
    }
    for top, message in expected.items():
        result = invoke("--max-params", "100000", "--trials", "1", "--out", str(file), "--top", top)
        assert result.exit_code == 2, result.output
        assert result.stderr == f"Error: {message}\n"
    out = tmp_path / "s"
    result = invoke("--max-params", "100000", "--trials", "1", "--out", str(out), "--storage", "nosuch://x")
    assert result.exit_code == 2, result.output
    assert "--storage nosuch://x: cannot open the study storage" in result.stderr
    assert not out.exists()
    # an SQLite URL that does not parse: the same one line, not SQLAlchemy's traceback
    result = invoke("--max-params", "100000", "--trials", "1", "--out", str(out), "--storage", "sqlite")
    assert result.exit_code == 2, result.output
    assert result.stderr == (
        "Error: --storage sqlite: cannot open the study storage: "
        "Could not parse SQLAlchemy URL from given URL string\n"
    )
    assert not out.exists()


def test_a_finished_trial_is_one_line_whatever_its_note_holds() -> None:
    from rich.console import Console

    from cerberus.cli.search import TrialsDisplay

    display = TrialsDisplay()
    display.console = Console(file=io.StringIO(), width=400, color_system=None)
    note = "train.whiten_stem fills the stem\nwith whitening filters:\n  a 64-wide stem is refused"
    display(
        {
            "event": "trial_end",
            "number": 3,
            "state": "rejected",
            "label": "b1-1_c64-128",
            "params": 1234,
            "val_accuracy": None,
            "epochs": 0,
            "epochs_planned": 1,
            "note": note,
        }
    )
    lines = display.console.file.getvalue().splitlines()
    assert lines == [
        "trial   3 rejected b1-1_c64-128  1,234 params  no val acc  epochs 0/1  "
        "(train.whiten_stem fills the stem with whitening filters: a 64-wide stem is refused)"
    ]
