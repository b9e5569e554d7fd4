"""Training end to end: learning, run directory, determinism, resume, budget, divergence."""

from __future__ import annotations

import json
import math
import os
import random
import signal
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from cerberus.arch import Architecture
from cerberus.augment import normalize
from cerberus.cli import app
from cerberus.config import AugmentConfig, TrainConfig, load_config
from cerberus.data import load_cifar10, make_splits
from cerberus.engine import EMA, LRSchedule, whitening_filters
from cerberus.errors import ConfigError, DivergenceError, Interrupted
from cerberus.model import build_model
from cerberus.runner import Run, _rng_state, _set_rng_state, train_run

TINY = """
name = "tiny"
seed = 3
[model]
blocks = [1, 1]
channels = [8, 16]
[data]
val_size = 100
[train]
epochs = 3
batch_size = 64
lr = 0.05
nesterov = true
schedule = "cosine"
"""


def write_config(tmp_path: Path, text: str = TINY, name: str = "tiny.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def tiny_config(tmp_path: Path, *overrides: str):
    return load_config(write_config(tmp_path), list(overrides))


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs"


def test_cli_trains_and_writes_the_run_directory(tmp_path, fake_cifar):
    config = write_config(tmp_path)
    out = tmp_path / "run"
    result = CliRunner().invoke(
        app, ["train", str(config), "--data-dir", str(fake_cifar), "--out", str(out), "--quiet"]
    )
    assert result.exit_code == 0, result.output
    for name in ("config.toml", "metrics.jsonl", "last.pt", "best.pt", "curves.png", "summary.json"):
        assert (out / name).exists(), name
    assert (out / "last.pt.sha256").exists()
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2, 3]
    for key in ("lr", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "train_images_per_sec"):
        assert key in lines[0]
    assert "muon_lr" not in lines[0]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["params"] == 5_266  # count-params --blocks 1 1 --channels 8 16
    assert summary["world_size"] == 1
    # Synthetic classes differ in colour and stripes: three epochs clear chance (0.1) widely.
    assert summary["test_accuracy"] > 0.5
    assert summary["test_images"] == 200  # the fake test set, all of it evaluated
    assert summary["best_epoch"] in (1, 2, 3)
    assert "test accuracy" in result.output
    # The resolved config is the experiment, with the data folder it used filled in.
    resolved = load_config(out / "config.toml")
    assert resolved.data.root == str(fake_cifar.absolute())
    assert resolved.model_copy(update={"data": load_config(config).data}) == load_config(config)


def test_a_muon_run_reports_the_muon_rate_beside_the_sgd_rate(tmp_path, fake_cifar):
    config = write_config(tmp_path)
    out = tmp_path / "run"
    # 0.4x the SGD lr; a constant schedule, so that the epoch's last rate is not cosine's 0
    sets = ["train.epochs=1", "train.optimizer=muon", "train.muon_lr=0.02", "train.schedule=constant"]
    result = CliRunner().invoke(
        app,
        ["train", str(config), "--data-dir", str(fake_cifar), "--out", str(out), "--quiet", "--set", *sets],
    )
    assert result.exit_code == 0, result.output
    (line,) = [json.loads(text) for text in (out / "metrics.jsonl").read_text().splitlines()]
    assert line["lr"] == pytest.approx(0.05) and line["muon_lr"] == pytest.approx(0.02)
    assert f"lr {line['lr']:.4g} (muon {line['muon_lr']:.4g})" in result.output
    steps = []
    train_run(
        tiny_config(tmp_path, *sets),
        out_dir=tmp_path / "events",
        data_dir=str(fake_cifar),
        evaluate_test=False,
        on_event=lambda e: steps.append(e) if e["event"] == "step" else None,
    )
    assert steps and all((e["lr"], e["muon_lr"]) == pytest.approx((0.05, 0.02)) for e in steps)


def test_same_seed_gives_bitwise_identical_weights(tmp_path, fake_cifar):
    cfg = tiny_config(tmp_path, "train.epochs=1")
    a = train_run(cfg, out_dir=tmp_path / "a", data_dir=str(fake_cifar), evaluate_test=False)
    b = train_run(cfg, out_dir=tmp_path / "b", data_dir=str(fake_cifar), evaluate_test=False)
    assert_bitwise_equal(weights(a.out_dir / "last.pt"), weights(b.out_dir / "last.pt"))
    # the test set was never evaluated: the summary counts no test images, as it has no accuracy
    summary = json.loads((a.out_dir / "summary.json").read_text())
    assert (summary["test_accuracy"], summary["test_loss"], summary["test_images"]) == (None, None, 0)
    c = train_run(
        tiny_config(tmp_path, "train.epochs=1", "seed=4"),
        out_dir=tmp_path / "c",
        data_dir=str(fake_cifar),
        evaluate_test=False,
    )
    assert not torch.equal(
        weights(a.out_dir / "last.pt")["linear.weight"], weights(c.out_dir / "last.pt")["linear.weight"]
    )


def interrupt_at(epoch: int, step: int):
    """An event sink that sends this process SIGINT after the given step."""

    def sink(event):
        if event["event"] == "step" and event["epoch"] == epoch and event["step"] == step:
            os.kill(os.getpid(), signal.SIGINT)

    return sink


@pytest.mark.parametrize(
    "epoch,step,extra",
    [
        (2, 3, ()),  # mid-epoch
        (1, 7, ()),  # the end of epoch 1
        (2, 3, ("augment.flip_mode=alternate",)),
        (2, 3, ("train.optimizer=muon", "train.muon_lr=0.02")),  # Muon at 0.4x the SGD lr
        (2, 3, ("augment.crop_sizes=[16, 24]",)),  # mid-epoch in 24x24 windows, then whole images
        # mid-epoch in a pruned epoch: the plan resumes, and the scores half recorded plan the next
        (2, 3, ("train.prune_ratio=0.5", "train.prune_until=1.0")),
        (1, 7, ("train.prune_ratio=0.5",)),  # between epochs: epoch 2 is planned from the scores
    ],
)
def test_resume_after_interrupt_is_bitwise_exact(tmp_path, fake_cifar, epoch, step, extra):
    cfg = tiny_config(
        tmp_path, "train.ema_decay=0.9", "augment.cutout_size=8", "augment.mixup_alpha=0.4", *extra
    )
    full = train_run(cfg, out_dir=tmp_path / "full", data_dir=str(fake_cifar))
    with pytest.raises(Interrupted) as info:
        train_run(cfg, out_dir=tmp_path / "cut", data_dir=str(fake_cifar), on_event=interrupt_at(epoch, step))
    assert info.value.exit_code == 130
    assert "--resume" in str(info.value)
    resumed = train_run(resume=tmp_path / "cut" / "last.pt")
    assert resumed.out_dir == tmp_path / "cut"
    assert_bitwise_equal(weights(full.out_dir / "last.pt"), weights(tmp_path / "cut" / "last.pt"))
    assert_bitwise_equal(weights(full.out_dir / "best.pt"), weights(tmp_path / "cut" / "best.pt"))
    metrics_full = (full.out_dir / "metrics.jsonl").read_text().splitlines()
    metrics_cut = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    assert len(metrics_cut) == 3
    seconds = [json.loads(line)["seconds"] for line in metrics_cut]
    assert seconds == sorted(seconds)  # elapsed time carries on across the resume
    for a, b in zip(metrics_full, metrics_cut):
        a, b = json.loads(a), json.loads(b)
        assert a["val_accuracy"] == b["val_accuracy"]
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-6)
    assert full.summary["test_accuracy"] == resumed.summary["test_accuracy"]


def test_over_budget_is_refused_before_any_data_is_read(tmp_path):
    config = write_config(tmp_path, TINY.replace("channels = [8, 16]", "channels = [2048, 4096]"))
    out = tmp_path / "run"
    result = CliRunner().invoke(
        app, ["train", str(config), "--data-dir", str(tmp_path / "nowhere"), "--out", str(out)]
    )
    assert result.exit_code == 2
    assert "over the 5,000,000 budget by" in result.stderr
    assert "Traceback" not in result.output
    assert not out.exists()


def test_val_size_zero_trains_on_everything_and_best_is_last(tmp_path, fake_cifar):
    cfg = tiny_config(tmp_path, "data.val_size=0", "train.epochs=2")
    events = []
    result = train_run(cfg, out_dir=tmp_path / "run", data_dir=str(fake_cifar), on_event=events.append)
    (start,) = [e for e in events if e["event"] == "start"]
    assert (start["train_images"], start["val_images"], start["steps_per_epoch"]) == (500, 0, 8)
    # every one of the 500 images, in ceil(500 / 64) = 8 steps an epoch (400 would take 7)
    steps = [(e["epoch"], e["step"]) for e in events if e["event"] == "step"]
    assert steps == [(epoch, step) for epoch in (1, 2) for step in range(1, 9)]
    assert result.summary["best_epoch"] == 2
    assert result.summary["best_val_accuracy"] is None
    assert_bitwise_equal(weights(result.out_dir / "best.pt"), weights(result.out_dir / "last.pt"))


def test_divergence_stops_the_run_and_writes_no_nonfinite_weights(tmp_path, fake_cifar):
    cfg = tiny_config(tmp_path, "train.lr=1e30", "train.epochs=2")
    with pytest.raises(DivergenceError, match=r"non-finite.*no checkpoint had been written yet"):
        train_run(cfg, out_dir=tmp_path / "run", data_dir=str(fake_cifar))
    # It diverged in the first epoch: no checkpoint at all rather than one with NaN weights.
    assert not (tmp_path / "run" / "last.pt").exists()
    assert not (tmp_path / "run" / "best.pt").exists()


def test_non_finite_outputs_of_finite_weights_are_divergence(tmp_path, fake_cifar, monkeypatch):
    from cerberus.checkpoint import load_checkpoint

    evaluate = Run.evaluate

    def nan_loss_from_epoch_2(self, *args, **kwargs):
        result = evaluate(self, *args, **kwargs)
        return {**result, "loss": float("nan")} if self.metrics else result

    monkeypatch.setattr(Run, "evaluate", nan_loss_from_epoch_2)
    out = tmp_path / "run"
    message = r"validation loss became non-finite at the end of epoch 2: .*the last good checkpoint was kept"
    with pytest.raises(DivergenceError, match=message):
        train_run(tiny_config(tmp_path), out_dir=out, data_dir=str(fake_cifar))
    assert load_checkpoint(out / "last.pt")["epoch"] == 1  # neither checkpoint took epoch 2
    assert load_checkpoint(out / "best.pt")["best_epoch"] == 1
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1

    # Without a validation split the final test is the first evaluation: the run fails there,
    # and summary.json records the loss as null (JSON has no NaN).
    out = tmp_path / "no-val"
    monkeypatch.setattr(Run, "evaluate", lambda self, *a, **k: {**evaluate(self, *a, **k), "loss": math.inf})
    cfg = tiny_config(tmp_path, "data.val_size=0", "train.epochs=1")
    with pytest.raises(DivergenceError, match=r"the test loss of best\.pt is non-finite"):
        train_run(cfg, out_dir=out, data_dir=str(fake_cifar))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test_loss"] is None and summary["test_accuracy"] is not None
    assert (out / "best.pt").exists()


def test_json_output_writes_non_finite_numbers_as_null():
    from cerberus.files import to_json

    data = {"loss": math.nan, "rates": [1.5, math.inf, -math.inf], "nested": ({"x": math.nan},), "n": 3}
    text = to_json(data)
    assert json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in JSON")) == {
        "loss": None,
        "rates": [1.5, None, None],
        "nested": [{"x": None}],
        "n": 3,
    }


def test_divergence_exit_code_through_the_cli(tmp_path, fake_cifar):
    config = write_config(tmp_path)
    result = CliRunner().invoke(
        app,
        [
            "train",
            str(config),
            "--set",
            "train.lr=1e30",
            "--data-dir",
            str(fake_cifar),
            "--out",
            str(tmp_path / "r"),
        ],
    )
    assert result.exit_code == 1
    assert "Error: the training loss became non-finite" in result.stderr
    assert "Traceback" not in result.output


def test_existing_run_directory_is_not_overwritten(tmp_path, fake_cifar):
    cfg = tiny_config(tmp_path, "train.epochs=1")
    train_run(cfg, out_dir=tmp_path / "run", data_dir=str(fake_cifar), evaluate_test=False)
    result = CliRunner().invoke(
        app,
        ["train", str(write_config(tmp_path)), "--data-dir", str(fake_cifar), "--out", str(tmp_path / "run")],
    )
    assert result.exit_code == 2
    assert "already holds a run" in result.stderr


def test_a_finished_runs_results_are_never_overwritten(tmp_path, fake_cifar):
    cfg = tiny_config(tmp_path, "train.epochs=1")
    out = tmp_path / "run"
    train_run(cfg, out_dir=out, data_dir=str(fake_cifar), evaluate_test=False)
    for name in ("last.pt", "last.pt.sha256"):
        (out / name).unlink()  # kept best.pt, freed the space of last.pt
    best = (out / "best.pt").read_bytes()
    with pytest.raises(ConfigError, match=r"holds a run's results \(best.pt, summary.json, metrics.jsonl\)"):
        train_run(cfg, out_dir=out, data_dir=str(fake_cifar))
    assert (out / "best.pt").read_bytes() == best


def test_a_run_finishing_in_the_folder_while_the_data_loads_is_not_overwritten(
    tmp_path, fake_cifar, monkeypatch
):
    out = tmp_path / "run"
    load_data = Run.load_data

    def another_run_finishes_meanwhile(self) -> None:
        load_data(self)
        out.mkdir(exist_ok=True)
        (out / "last.pt").write_bytes(b"another run's")

    monkeypatch.setattr(Run, "load_data", another_run_finishes_meanwhile)
    with pytest.raises(ConfigError, match="already holds a run"):
        train_run(tiny_config(tmp_path, "train.epochs=1"), out_dir=out, data_dir=str(fake_cifar))
    assert (out / "last.pt").read_bytes() == b"another run's"
    assert not (out / "config.toml").exists()


def test_the_seed_is_a_64_bit_signed_integer_and_its_extremes_train(tmp_path, fake_cifar):
    with pytest.raises(ConfigError, match="seed"):
        tiny_config(tmp_path, f"seed={2**63}")
    with pytest.raises(ConfigError, match="seed"):
        tiny_config(tmp_path, f"seed={-(2**63) - 1}")
    for seed in (2**63 - 1, -(2**63)):  # alternating flips derive their own seed from it
        cfg = tiny_config(tmp_path, f"seed={seed}", 'augment.flip_mode="alternate"', "train.epochs=1")
        result = train_run(cfg, out_dir=tmp_path / str(seed), data_dir=str(fake_cifar), evaluate_test=False)
        assert result.epochs_completed == 1


def test_rng_state_is_the_training_gpus_alone(monkeypatch):
    set_calls = []
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: set_calls.append((state, device)))
    host = {"torch": torch.get_rng_state(), "python": random.getstate()}
    # Earlier checkpoints kept every visible GPU's state: a resume that sees fewer GPUs takes its own.
    _set_rng_state({**host, "cuda": ["gpu0", "gpu1"]}, torch.device("cuda"))
    assert set_calls == [("gpu0", torch.device("cuda"))]
    set_calls.clear()
    _set_rng_state({**host, "cuda": ["gpu0"]}, torch.device("cuda", 1))  # none kept for GPU 1
    _set_rng_state({**host, "cuda": "gpu0"}, torch.device("cpu"))  # a CPU run leaves CUDA alone
    assert set_calls == []
    assert _rng_state(torch.device("cpu")).keys() == {"torch", "python"}


def test_the_recorded_data_root_is_absolute_so_resume_works_elsewhere(tmp_path, fake_cifar, monkeypatch):
    monkeypatch.chdir(fake_cifar.parent)
    cfg = tiny_config(tmp_path, "train.epochs=2", f"data.root={fake_cifar.name}")
    out = tmp_path / "run"
    with pytest.raises(Interrupted):
        train_run(cfg, out_dir=out, on_event=interrupt_after_epoch(1))
    assert load_config(out / "config.toml").data.root == str(fake_cifar.absolute())
    monkeypatch.chdir(tmp_path)  # the relative root no longer names the data from here
    result = train_run(resume=out / "last.pt", handle_signals=False)
    assert result.epochs_completed == 2


def test_an_unavailable_device_is_refused_before_anything_is_written(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    cfg = tiny_config(tmp_path, "train.device=cuda")
    # no data folder exists either: the device is refused first, and nothing is created
    with pytest.raises(ConfigError, match="no CUDA GPU is available"):
        train_run(cfg, out_dir=tmp_path / "run", data_dir=str(tmp_path / "no-data"))
    assert not (tmp_path / "run").exists()


@pytest.mark.realdata
def test_tiny_model_learns_real_cifar(tmp_path, real_cifar):
    cfg = tiny_config(
        tmp_path,
        "data.train_subset=3000",
        "data.val_size=500",
        "data.test_subset=1000",
        "train.epochs=3",
        "train.lr=0.1",
        "model.channels=[16, 32]",
    )
    result = train_run(cfg, out_dir=tmp_path / "run", data_dir=str(real_cifar))
    assert result.summary["test_images"] == 1000
    assert result.summary["test_accuracy"] > 0.25  # chance is 0.10


def test_resuming_from_best_pt_is_refused(tmp_path, fake_cifar):
    cfg = tiny_config(tmp_path, "train.epochs=1", "train.ema_decay=0.9")
    run = train_run(cfg, out_dir=tmp_path / "run", data_dir=str(fake_cifar), evaluate_test=False)
    best = torch.load(run.out_dir / "best.pt", weights_only=True)
    assert (best["role"], best["weights"]) == ("best", "ema")
    result = CliRunner().invoke(app, ["train", "--resume", str(run.out_dir / "best.pt")])
    assert result.exit_code == 2
    assert "holds the best epoch's weights only; resume from" in result.stderr
    assert "last.pt" in result.stderr


def test_resume_without_best_pt_is_refused_before_anything_is_written(tmp_path, fake_cifar):
    import shutil

    cfg = tiny_config(tmp_path, "train.epochs=1")
    train_run(cfg, out_dir=tmp_path / "run", data_dir=str(fake_cifar), evaluate_test=False)
    moved = tmp_path / "moved"
    moved.mkdir()
    for name in ("last.pt", "last.pt.sha256"):
        shutil.copy(tmp_path / "run" / name, moved / name)
    result = CliRunner().invoke(app, ["train", "--resume", str(moved / "last.pt")])
    assert result.exit_code == 1, result.output
    assert f"{moved / 'best.pt'} is missing: last.pt names epoch 1 as the best so far" in result.stderr
    assert sorted(p.name for p in moved.iterdir()) == ["last.pt", "last.pt.sha256"]


@pytest.mark.parametrize(
    ("saved", "now", "how"),
    [(2, "1", "resume it under torchrun with 2 processes in all"), (1, "2", "resume it without torchrun")],
)
def test_a_resume_with_another_number_of_processes_is_refused_before_the_data_loads(
    tmp_path, fake_cifar, monkeypatch, saved, now, how
):
    from cerberus.checkpoint import load_checkpoint, save_checkpoint

    cfg = tiny_config(tmp_path, "train.epochs=1")
    run = tmp_path / "run"
    train_run(cfg, out_dir=run, data_dir=str(fake_cifar), evaluate_test=False)
    save_checkpoint(run / "last.pt", {**load_checkpoint(run / "last.pt"), "world_size": saved})
    monkeypatch.setenv("WORLD_SIZE", now)  # what torchrun would set; refused before joining a group
    monkeypatch.setattr("cerberus.runner.load_cifar10", lambda *a, **k: pytest.fail("the data loaded"))
    before = {p.name: p.stat().st_mtime_ns for p in run.iterdir()}
    result = CliRunner().invoke(app, ["train", "--resume", str(run / "last.pt")])
    assert result.exit_code == 2, result.output
    processes = "process" if saved == 1 else "processes"
    assert result.stderr == (
        f"Error: this run was trained by {saved} {processes} (now {now}); {how}, or the data shards "
        "and augmentation would change\n"
    )
    assert {p.name: p.stat().st_mtime_ns for p in run.iterdir()} == before


def _other_design_weights(ckpt: dict, key: str = "model") -> None:
    ckpt[key] = build_model(Architecture(blocks=(1,), channels=(8,))).state_dict()


@pytest.mark.parametrize(
    "damage,message,before_writing",
    [
        (_other_design_weights, "do not fit the architecture (missing 'layer2.0.conv1.weight'", True),
        (lambda c: _other_design_weights(c, "ema"), "do not fit the architecture (missing 'layer2", True),
        (lambda c: c.pop("config"), "the training checkpoint has no 'config'; cannot resume", True),
        (lambda c: c.pop("rng"), "the training checkpoint has no 'rng'; cannot resume", True),
        (lambda c: c.update(format_version=999), "last.pt: checkpoint format version 999 (written by", True),
        (lambda c: c.pop("format_version"), "last.pt: the checkpoint records no format version", True),
        (lambda c: c.update(model=[1, 2]), "found a builtins.list where the model's weights belong", True),
        (lambda c: c["optimizer"].update(param_groups=[]), "training state in last.pt does not fit", False),
    ],
)  # fmt: skip
def test_resume_refuses_a_damaged_last_pt_in_one_line(
    tmp_path, fake_cifar, monkeypatch, damage, message, before_writing
):
    cfg = tiny_config(tmp_path, "train.epochs=1", "train.ema_decay=0.9")
    run = train_run(cfg, out_dir=tmp_path / "run", data_dir=str(fake_cifar), evaluate_test=False)
    ckpt = torch.load(run.out_dir / "last.pt", weights_only=True)
    damage(ckpt)
    (run.out_dir / "last.pt.sha256").unlink()
    torch.save(ckpt, run.out_dir / "last.pt")
    before = {p.name: p.read_bytes() for p in run.out_dir.iterdir()}
    if before_writing:  # the file checks come before the run folder is touched

        def no_writes(*args, **kwargs):
            raise AssertionError("a file was written")

        monkeypatch.setattr("cerberus.runner.atomic_write", no_writes)
    result = CliRunner().invoke(app, ["train", "--resume", str(run.out_dir / "last.pt")])
    assert result.exit_code != 0
    assert message in result.stderr
    assert "Traceback" not in result.output + result.stderr
    assert {p.name: p.read_bytes() for p in run.out_dir.iterdir()} == before


def test_resume_from_a_pickled_file_does_not_suggest_trusting_it(tmp_path):
    path = tmp_path / "last.pt"
    torch.save(build_model(Architecture(blocks=(1,), channels=(8,))), path)  # a whole nn.Module
    result = CliRunner().invoke(app, ["train", "--resume", str(path)])
    assert result.exit_code != 0
    assert "holds pickled Python objects (cerberus.model.ResNet" in result.stderr
    assert "not a checkpoint written by cerberus" in result.stderr
    assert "--trust-pickle" not in result.stderr


def test_a_model_whose_outputs_do_not_match_the_classes_is_refused_before_writing(tmp_path, fake_cifar):
    cfg = tiny_config(tmp_path, "model.num_classes=5", "data.download=false")
    for data_dir in (fake_cifar, tmp_path / "nowhere"):  # refused before the data is looked for
        with pytest.raises(ConfigError, match=r"model.num_classes: the model has 5 outputs but CIFAR-10 has"):
            train_run(cfg, out_dir=tmp_path / "run", data_dir=str(data_dir))
    assert not (tmp_path / "run").exists()


def test_checkpoints_record_what_exact_resume_depends_on(tmp_path, fake_cifar):
    cfg = tiny_config(tmp_path, "train.epochs=1")
    torch.set_num_threads(2)  # not the 1 of the autouse fixture, which restores the count afterwards
    run = train_run(cfg, out_dir=tmp_path / "run", data_dir=str(fake_cifar), evaluate_test=False)
    last = torch.load(run.out_dir / "last.pt", weights_only=True)
    assert last["threads"] == 2  # train.threads = 0: the count the run trained with
    assert last["world_size"] == 1
    assert (last["role"], last["weights"], last["epoch"], last["step"]) == ("last", "model", 1, 0)
    assert last["elapsed_seconds"] > 0


@pytest.mark.parametrize(
    "schedule,expected",
    [
        # milestones [2]: epochs 1-2 at lr, from epoch 3 on at lr * gamma (per step, 4 steps/epoch)
        ("step", {(0, 0): 1.0, (1, 3): 1.0, (2, 0): 0.1, (3, 3): 0.1}),
        # seed: lr * (1 + cos(pi * e / t_max)) / 2 * gamma**(milestones <= e), e the epoch in progress
        ("seed", {(0, 3): 1.0, (1, 3): 0.5 * (1 + math.cos(math.pi / 4)), (2, 0): 0.05}),
    ],
)
def test_epoch_wise_schedules_change_at_epoch_boundaries(schedule, expected):
    t_max = 4 if schedule == "seed" else None
    cfg = TrainConfig(epochs=4, lr=1.0, schedule=schedule, milestones=[2], gamma=0.1, t_max=t_max)
    lr = LRSchedule(cfg, steps_per_epoch=4)
    for (epoch, step), value in expected.items():
        assert lr.lr_at(epoch, step) == pytest.approx(value), (epoch, step)


@pytest.mark.parametrize(
    ("epochs", "t_max", "milestones", "gamma"),
    [(200, 50, [80, 150], 0.1), (60, 7, [8, 15, 15, 40], 0.5), (30, 30, [], 0.1), (25, 4, [5], 0.2)],
)
def test_the_seed_schedule_is_torchs_chained_cosine_and_multistep(epochs, t_max, milestones, gamma):
    # The seed stepped both of torch's schedulers once per epoch; after the cosine's first return
    # from zero past a milestone (epoch 151 of the seed's 200) torch's rate is not the closed form.
    param = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.SGD([param], lr=0.1)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=t_max)
    steps = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=gamma)
    torchs = []
    for _ in range(epochs):
        torchs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        cosine.step()
        steps.step()
    cfg = TrainConfig(epochs=epochs, lr=0.1, schedule="seed", t_max=t_max, milestones=milestones, gamma=gamma)
    schedule = LRSchedule(cfg, steps_per_epoch=3)
    ours = [schedule.lr_at(epoch, step) for epoch in range(epochs) for step in range(3)]
    assert ours == pytest.approx([lr for lr in torchs for _ in range(3)], rel=1e-9, abs=1e-15)
    if epochs == 200:
        assert ours[151 * 3] == pytest.approx(0.1 * (1 - math.cos(math.pi / 50)) / 2)  # base rate, not x0.01


def interrupt_after_epoch(epoch: int):
    """An event sink that sends this process SIGINT once epoch ``epoch`` is reported."""

    def sink(event):
        if event["event"] == "epoch" and event["epoch"] == epoch:
            os.kill(os.getpid(), signal.SIGINT)

    return sink


def test_save_every_epochs_writes_fewer_checkpoints_that_still_agree(tmp_path, fake_cifar):
    """last.pt every 2 epochs and at the last; best.pt follows it (never ahead, never behind),
    and the run ends with the same weights as one that saved every epoch."""
    cfg = tiny_config(tmp_path, "train.epochs=5", "train.ema_decay=0.9")
    reference = train_run(cfg, out_dir=tmp_path / "every", data_dir=str(fake_cifar), evaluate_test=False)
    run = tmp_path / "sparse"
    on_disk = []

    def record(event):
        if event["event"] == "epoch":
            if not (run / "last.pt").exists():
                on_disk.append((event["epoch"], None, None))
                return
            last = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
            best = torch.load(run / "best.pt", map_location="cpu", weights_only=True)
            assert last["best_epoch"] == best["epoch"]  # best.pt is the epoch last.pt names
            on_disk.append((event["epoch"], last["epoch"], best["epoch"]))

    sparse = train_run(
        tiny_config(tmp_path, "train.epochs=5", "train.ema_decay=0.9", "train.save_every_epochs=2"),
        out_dir=run,
        data_dir=str(fake_cifar),
        on_event=record,
        evaluate_test=False,
    )
    assert [(e, last) for e, last, _ in on_disk] == [(1, None), (2, 2), (3, 2), (4, 4), (5, 5)]
    assert_bitwise_equal(weights(reference.out_dir / "last.pt"), weights(run / "last.pt"))
    assert_bitwise_equal(weights(reference.out_dir / "best.pt"), weights(run / "best.pt"))
    assert sparse.summary["best_epoch"] == reference.summary["best_epoch"]
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 5


def test_a_stop_between_save_points_still_writes_last_pt_and_resumes_exactly(tmp_path, fake_cifar):
    overrides = ("train.epochs=4", "train.save_every_epochs=3")
    full = train_run(tiny_config(tmp_path, *overrides), out_dir=tmp_path / "full", data_dir=str(fake_cifar))
    cut = tmp_path / "cut"
    with pytest.raises(Interrupted) as info:
        train_run(
            tiny_config(tmp_path, *overrides),
            out_dir=cut,
            data_dir=str(fake_cifar),
            on_event=interrupt_after_epoch(1),
        )
    assert "the end of epoch 1" in str(info.value)
    ckpt = torch.load(cut / "last.pt", map_location="cpu", weights_only=True)
    assert (ckpt["epoch"], ckpt["step"]) == (1, 0)
    assert torch.load(cut / "best.pt", map_location="cpu", weights_only=True)["epoch"] == ckpt["best_epoch"]
    assert (cut / "curves.png").exists()
    resumed = train_run(resume=cut / "last.pt")
    assert_bitwise_equal(weights(full.out_dir / "last.pt"), weights(cut / "last.pt"))
    assert_bitwise_equal(weights(full.out_dir / "best.pt"), weights(cut / "best.pt"))
    assert full.summary["test_accuracy"] == resumed.summary["test_accuracy"]


def bare_trainer(images: torch.Tensor, batch: int, **kwargs):
    """A Trainer over ``images`` (seed 5, CPU fp32) with no model worth training: for batch order
    and augmentation inputs."""
    from cerberus.device import Placement
    from cerberus.engine import Trainer

    return Trainer(
        model=torch.nn.Linear(1, 1),
        optimizer=None,
        schedule=None,
        augmenter=kwargs.pop("augmenter", None),
        placement=Placement(torch.device("cpu"), "fp32", False),
        cfg=TrainConfig(batch_size=batch),
        seed=5,
        images=images,
        labels=torch.zeros(len(images), dtype=torch.long),
        **kwargs,
    )


@pytest.mark.parametrize("world_size,rank", [(1, 0), (3, 0), (3, 2)])
def test_the_trainer_draws_the_batches_the_data_module_defines(world_size, rank):
    """Trainer.batch_indices (the epoch's order kept on the device) equals data.batch_indices."""
    from cerberus.data import batch_indices

    n, batch = 103, 16
    trainer = bare_trainer(
        torch.zeros(n, 3, 32, 32, dtype=torch.uint8), batch, rank=rank, world_size=world_size
    )
    for epoch in (0, 1, 0):
        for step in range(7):
            expected = batch_indices(n, batch, 5, epoch, step, rank, world_size)
            assert torch.equal(trainer.batch_indices(epoch, step), expected)


def test_alternating_flip_mirrors_each_image_the_other_way_every_epoch():
    class Seen(Exception):
        pass

    class Recorder:  # stands in for the Augmenter: records which images it was told to mirror
        cfg = AugmentConfig(flip=True, flip_mode="alternate")

        def __init__(self):
            self.mirrored = {}

        def crop_size(self, epoch):
            return None

        def __call__(self, images, labels, generator, mirrored, size):
            for index, flip in zip(images[:, 0, 0, 0].tolist(), mirrored.tolist()):
                self.mirrored.setdefault(index, []).append(flip)
            raise Seen

    n, batch = 103, 16
    recorder = Recorder()
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 32, 32).contiguous()
    trainer = bare_trainer(images, batch, augmenter=recorder)
    for epoch in range(3):
        for step in range(trainer.steps_per_epoch):
            with pytest.raises(Seen):
                trainer.train_step(epoch, step)
    assert sorted(recorder.mirrored) == list(range(n))  # every image, once per epoch
    for flips in recorder.mirrored.values():
        assert flips[1] != flips[0] and flips[2] == flips[0]
    assert 30 < sum(flips[0] for flips in recorder.mirrored.values()) < 73  # a random half first


def test_a_best_pt_written_just_before_a_crash_is_what_the_resumed_summary_describes(tmp_path, fake_cifar):
    """best.pt is written just before last.pt; a kill between the two leaves it one save ahead.
    If the resumed run then never beats the record last.pt carries (as a GPU replay may not),
    the summary must still describe the weights best.pt holds, not last.pt's older best epoch."""
    from cerberus.checkpoint import load_checkpoint, save_checkpoint

    cfg = tiny_config(tmp_path, "train.epochs=3")
    run = tmp_path / "run"
    kept = {}

    def keep_epoch_1(event):
        if event["event"] == "epoch" and event["epoch"] == 1:
            kept["last"] = load_checkpoint(run / "last.pt")

    train_run(cfg, out_dir=run, data_dir=str(fake_cifar), on_event=keep_epoch_1, evaluate_test=False)
    best = load_checkpoint(run / "best.pt")
    # The crash: best.pt from a later save holds a record (epoch 3, 0.97) that the replay will not
    # beat; last.pt is still epoch 1's, whose own record the replay would beat at once.
    save_checkpoint(run / "best.pt", {**best, "best_epoch": 3, "best_val_accuracy": 0.97})
    save_checkpoint(run / "last.pt", {**kept["last"], "best_val_accuracy": 0.96})
    resumed = train_run(resume=run / "last.pt")
    assert resumed.summary["best_epoch"] == 3
    assert resumed.best_val_accuracy == 0.97
    assert_bitwise_equal(weights(run / "best.pt"), best["model"])  # untouched


def test_test_tta_reports_what_eval_reproduces_by_default(tmp_path, fake_cifar):
    cfg = tiny_config(tmp_path, "train.epochs=1", "train.test_tta=true")
    result = train_run(cfg, out_dir=tmp_path / "run", data_dir=str(fake_cifar))
    summary = json.loads((result.out_dir / "summary.json").read_text())
    assert summary["test_tta"] is True
    best = str(result.out_dir / "best.pt")

    def evaluate(*flags):
        done = CliRunner().invoke(app, ["eval", best, "--data-dir", str(fake_cifar), "--json", *flags])
        assert done.exit_code == 0, done.output
        return json.loads(done.stdout)

    # as the run tested: with its six views, unless told otherwise
    as_run, with_tta, plain = evaluate(), evaluate("--tta"), evaluate("--no-tta")
    assert (as_run["tta"], with_tta["tta"], plain["tta"]) == (True, True, False)
    assert as_run["accuracy"] == with_tta["accuracy"] == summary["test_accuracy"]
    # the 6-view average differs from the single view on these images: the setting took effect
    assert as_run["loss"] == pytest.approx(summary["test_loss"])
    assert plain["loss"] != pytest.approx(summary["test_loss"])


def test_a_pooling_design_trains_and_its_checkpoint_evaluates_to_the_summary(tmp_path, fake_cifar):
    cfg = tiny_config(tmp_path, "train.epochs=1", 'model.downsample="pool"')
    assert cfg.model.architecture().max_pool_downsampling
    result = train_run(cfg, out_dir=tmp_path / "run", data_dir=str(fake_cifar))
    summary = json.loads((result.out_dir / "summary.json").read_text())
    best = str(result.out_dir / "best.pt")
    out = CliRunner().invoke(app, ["eval", best, "--data-dir", str(fake_cifar), "--json"])
    assert out.exit_code == 0, out.output
    report = json.loads(out.stdout)
    assert report["architecture"]["downsample"] == "pool"
    assert report["accuracy"] == summary["test_accuracy"]
    assert report["loss"] == pytest.approx(summary["test_loss"], rel=1e-5)


def test_progressive_resizing_trains_on_the_listed_windows_and_evaluates_whole_images(
    tmp_path, fake_cifar, monkeypatch
):
    from cerberus.model import ResNet

    seen: list[tuple[bool, int]] = []
    forward = ResNet.forward

    def recording_forward(self, x):
        seen.append((self.training, x.shape[-1]))
        return forward(self, x)

    monkeypatch.setattr(ResNet, "forward", recording_forward)
    out = tmp_path / "run"
    args = ["train", str(write_config(tmp_path)), "--data-dir", str(fake_cifar), "--out", str(out), "--quiet"]
    sets = ["--set", "augment.crop_sizes=[16, 24]", "data.val_size=0"]
    result = CliRunner().invoke(app, [*args, *sets])
    assert result.exit_code == 0, result.output
    steps = math.ceil(len(load_cifar10(fake_cifar).train_labels) / tiny_config(tmp_path).train.batch_size)
    trained = [side for training, side in seen if training]
    assert trained == [16] * steps + [24] * steps + [32] * steps
    assert {side for training, side in seen if not training} == {32}  # evaluation: whole images
    lines = [json.loads(text) for text in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line.get("crop_size") for line in lines] == [16, 24, None]
    assert "(16x16 windows)" in result.output and "(24x24 windows)" in result.output
    assert result.output.count("windows)") == 2


def test_crop_sizes_need_the_global_pool_and_a_map_at_the_end(tmp_path):
    with pytest.raises(ConfigError, match=r"needs the global average pool: model.pool_size = 2"):
        tiny_config(tmp_path, "model.pool_size=2", "augment.crop_sizes=[24]")
    # blocks [1, 1] with a 3x3 stem: the map halves once, so an 8x8 window still leaves 4x4
    assert tiny_config(tmp_path, "augment.crop_sizes=[8]").augment.crop_sizes == [8]
    # four stages that halve by max-pooling need 16 pixels: 16 -> 8 -> 4 -> 2 -> 1
    four = ("model.blocks=[1, 1, 1, 1]", "model.channels=[4, 4, 4, 4]", 'model.downsample="pool"')
    with pytest.raises(ConfigError, match=r"a 12x12 window leaves no map .* the smallest it takes is 16"):
        tiny_config(tmp_path, *four, "augment.crop_sizes=[24, 12]")
    assert tiny_config(tmp_path, *four, "augment.crop_sizes=[16]").augment.crop_sizes == [16]
    with pytest.raises(ConfigError, match="crop_sizes"):
        tiny_config(tmp_path, "augment.crop_sizes=[33]")


def test_a_window_that_leaves_a_1x1_map_needs_two_images_in_every_batch(tmp_path, fake_cifar):
    # four max-pooling stages: whole images end on 2x2, 16x16 windows on 1x1, where BatchNorm
    # needs two images; 65 images in batches of 64 leave a last batch of one
    design = ("model.blocks=[1, 1, 1, 1]", "model.channels=[4, 4, 4, 4]", 'model.downsample="pool"')
    small = (*design, "data.val_size=0", "data.train_subset=65", "train.epochs=1")
    cropped = tiny_config(tmp_path, *small, "augment.crop_sizes=[16]")
    with pytest.raises(ConfigError, match=r"a batch of 1 image\(s\) .* at least 2 image"):
        train_run(cropped, out_dir=tmp_path / "cropped", data_dir=str(fake_cifar))
    assert not (tmp_path / "cropped" / "last.pt").exists()
    whole = train_run(tiny_config(tmp_path, *small), out_dir=tmp_path / "whole", data_dir=str(fake_cifar))
    assert (whole.out_dir / "best.pt").exists()


# --------------------------------------------------------------------------------------------
# Stem whitening


def test_whitening_filters_make_the_patch_covariance_the_identity():
    generator = torch.Generator().manual_seed(0)
    base = torch.randint(0, 256, (300, 3, 32, 32), generator=generator, dtype=torch.uint8)
    # correlated pixels: neighbours and channels share a common component
    images = ((base.float() + base.roll(1, dims=3).float() + base[:, :1].float()) / 3).to(torch.uint8)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    for kernel in (2, 3):
        filters = whitening_filters(images, kernel, mean, std, chunk=70)
        assert filters.shape == (3 * kernel**2, 3, kernel, kernel)
        out = F.conv2d(normalize(images, mean, std), filters).permute(0, 2, 3, 1).reshape(-1, len(filters))
        covariance = torch.cov(out.double().T)
        # identity up to the eps added to each eigenvalue (lambda / (lambda + eps) per direction)
        assert torch.allclose(covariance, torch.eye(len(filters), dtype=torch.float64), atol=0.02)
        strengths = filters.flatten(1).norm(dim=1)  # 1 / sqrt(lambda + eps): weakest direction last
        assert torch.all(strengths[1:] >= strengths[:-1] * (1 - 1e-5))


def test_a_whitened_stem_stays_fixed_and_resumes_exactly(tmp_path, fake_cifar):
    cfg = tiny_config(
        tmp_path, "model.stem_channels=6", "model.stem_kernel=2", "train.whiten_stem=true", "train.epochs=2"
    )
    full = train_run(cfg, out_dir=tmp_path / "full", data_dir=str(fake_cifar), evaluate_test=False)
    stem = weights(full.out_dir / "last.pt")["conv1.weight"]
    assert stem.shape == (6, 3, 2, 2)
    data = load_cifar10(fake_cifar)
    splits = make_splits(data, cfg.data)
    filters = whitening_filters(splits.train_images, 2, cfg.data.mean, cfg.data.std)
    assert torch.equal(stem[:3], filters[:3]) and torch.equal(stem[3:], -filters[:3])  # never trained
    with pytest.raises(Interrupted):
        train_run(cfg, out_dir=tmp_path / "cut", data_dir=str(fake_cifar), on_event=interrupt_at(2, 2))
    train_run(resume=tmp_path / "cut" / "last.pt", evaluate_test=False)
    assert_bitwise_equal(weights(full.out_dir / "last.pt"), weights(tmp_path / "cut" / "last.pt"))


@pytest.mark.parametrize(
    "stem,kernel,most", [("1", "3", 54), ("7", "3", 54), ("56", "3", 54), ("26", "2", 24), ("8", "1", 6)]
)
def test_whiten_stem_needs_an_even_stem_that_whitening_fills(tmp_path, stem, kernel, most):
    overrides = (f"model.stem_channels={stem}", f"model.stem_kernel={kernel}", "train.whiten_stem=true")
    with pytest.raises(ConfigError, match=rf"even number of stem channels from 2 to {most} .* got {stem};"):
        tiny_config(tmp_path, *overrides)
    tiny_config(
        tmp_path, f"model.stem_channels={most}", f"model.stem_kernel={kernel}", "train.whiten_stem=true"
    )


def test_ema_averages_every_tensor_and_pairs_again_with_another_model():
    torch.manual_seed(0)
    arch = Architecture(blocks=(1, 1), channels=(4, 8))
    model = build_model(arch)
    ema = EMA(model, 0.75)
    expected = {k: v.detach().clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    x = torch.randn(6, 3, 32, 32)

    def step_and_average(m: torch.nn.Module) -> None:
        m(x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        ema.update(m)
        for name, value in m.state_dict().items():
            if value.is_floating_point():
                expected[name].lerp_(value, 0.25)
            else:
                expected[name].copy_(value)

    for _ in range(3):
        step_and_average(model)
    # a checkpoint loaded into the same model changes its tensors in place: still tracked
    model.load_state_dict({k: v * 0.5 if v.is_floating_point() else v for k, v in model.state_dict().items()})
    step_and_average(model)
    assert ema.state["bn1.num_batches_tracked"].item() == 4
    for name, value in expected.items():
        assert torch.equal(ema.state[name], value), name
    # another model object (here a copy): the average pairs again, with the tensors it is given
    other = build_model(arch)
    other.load_state_dict(model.state_dict())
    other.bn1.running_mean.fill_(3.0)
    ema.update(other)
    assert torch.equal(
        ema.state["bn1.running_mean"], expected["bn1.running_mean"].lerp(other.bn1.running_mean, 0.25)
    )
