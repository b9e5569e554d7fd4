"""torchrun: two CPU processes (gloo) train one model; interrupt, resume, errors on every rank.

The end-to-end tests start ``python -m torch.distributed.run --standalone --nproc-per-node 2`` in a
subprocess, one thread per worker (the CI machine has two cores). The tests without processes
check the pieces the ranks agree through: the stop vote, the shard check, SyncBatchNorm's keys.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cerberus.cli import app
from cerberus.config import load_config
from cerberus.distributed import DistContext
from cerberus.engine import EpochState
from cerberus.errors import ConfigError
from cerberus.model import build_model
from cerberus.runner import Run

EPOCHS = 4
TINY = f"""
name = "tiny-ddp"
seed = 3
[model]
blocks = [1, 1]
channels = [8, 16]
[data]
val_size = 100
[train]
epochs = {EPOCHS}
batch_size = 64
lr = 0.05
nesterov = true
schedule = "cosine"
"""


def worker_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    return {**env, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


def torchrun_command(*args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "cerberus",
        *args,
    ]


def torchrun(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        torchrun_command(*args), env=worker_env(), capture_output=True, text=True, timeout=timeout
    )


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def model_weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


@pytest.fixture(scope="module")
def config_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ddp-config") / "tiny.toml"
    path.write_text(TINY)
    return path


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory, config_file, fake_cifar):
    """One uninterrupted 2-process run, shared by the tests below: (run directory, process)."""
    out = tmp_path_factory.mktemp("ddp") / "run"
    done = torchrun("train", str(config_file), "--data-dir", str(fake_cifar), "--out", str(out), "--quiet")
    assert done.returncode == 0, done.stdout + done.stderr
    return out, done


# --------------------------------------------------------------------------------------------
# End to end under torchrun


@pytest.mark.slow
def test_two_processes_train_one_model_and_rank_0_alone_writes(two_process_run):
    out, done = two_process_run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["epochs"] == EPOCHS
    assert summary["params"] == 5_266
    for name in ("config.toml", "last.pt", "best.pt", "curves.png"):
        assert (out / name).exists(), name
    # One writer: a line per epoch, once each; no temporary file left behind by another rank.
    assert [m["epoch"] for m in metrics(out)] == list(range(1, EPOCHS + 1))
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    # One display: rank 1 prints nothing.
    assert done.stdout.count("run directory:") == 1
    assert done.stdout.count("test accuracy") == 1
    assert "world size 2" in " ".join(done.stdout.split())  # rich wraps lines
    assert "Traceback" not in done.stderr


@pytest.mark.slow
def test_data_pruning_under_two_processes_plans_from_every_ranks_losses(config_file, fake_cifar, tmp_path):
    out = tmp_path / "pruned"
    args = ("train", str(config_file), "--data-dir", str(fake_cifar), "--out", str(out), "-q")
    done = torchrun(*args, "--set", "train.prune_ratio=0.5", "data.val_size=0")
    assert done.returncode == 0, done.stdout + done.stderr
    skipped = [m["pruned_images"] for m in metrics(out)]
    assert skipped[0] == 0 and skipped[-1] == 0 and max(skipped) > 0  # until: int(0.875 * 4) = 3
    # Rank 0 saved the scores: its own shards' losses and rank 1's, merged (none left at the
    # initial 1.0 of an image never scored); both ranks planned the same shorter epochs, or the
    # run would have hung in a gradient all-reduce that one rank never joined.
    scores = torch.load(out / "last.pt", map_location="cpu", weights_only=True)["pruner"]["scores"]
    assert scores.shape == (500,) and not (scores == 1.0).any()


@pytest.mark.slow
def test_eval_of_the_2_process_checkpoint_reproduces_its_test_accuracy(two_process_run, fake_cifar):
    out, _ = two_process_run
    result = CliRunner().invoke(app, ["eval", str(out / "best.pt"), "--data-dir", str(fake_cifar), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    summary = json.loads((out / "summary.json").read_text())
    assert report["images"] == summary["test_images"] == 200
    assert report["accuracy"] == summary["test_accuracy"]
    assert report["loss"] == pytest.approx(summary["test_loss"], rel=1e-5)


@pytest.mark.slow
def test_accuracy_is_in_line_with_the_single_process_run(two_process_run, config_file, fake_cifar, tmp_path):
    out, _ = two_process_run
    command = [sys.executable, "-m", "cerberus", "train", str(config_file), "--data-dir", str(fake_cifar)]
    single = subprocess.run(
        [*command, "--out", str(tmp_path / "single"), "--quiet"],
        env=worker_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert single.returncode == 0, single.stdout + single.stderr
    one = json.loads((tmp_path / "single" / "summary.json").read_text())
    two = json.loads((out / "summary.json").read_text())
    assert one["world_size"] == 1
    # The same global batch and learning rate; only BatchNorm statistics (per 32-image shard)
    # and the order of float sums differ. Chance is 0.10 on the synthetic classes.
    assert one["test_accuracy"] > 0.5 and two["test_accuracy"] > 0.5
    assert abs(one["test_accuracy"] - two["test_accuracy"]) <= 0.15
    # The sums are all-reduced: the 2-process epoch counts every training image once.
    assert abs(metrics(out)[-1]["train_loss"] - metrics(tmp_path / "single")[-1]["train_loss"]) < 0.3


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides",
    [(), ("--set", "train.save_every_epochs=3")],  # the second stops between save points
    ids=["save-every-epoch", "save-every-3"],
)
def test_sigint_stops_every_rank_and_resume_under_torchrun_is_exact(
    two_process_run, config_file, fake_cifar, tmp_path, overrides
):
    full, _ = two_process_run
    out = tmp_path / "cut"
    # torchrun forwards the signal to its workers (each in its own session), as after Ctrl-C.
    args = ("train", str(config_file), "--data-dir", str(fake_cifar), "--out", str(out), "-q", *overrides)
    proc = subprocess.Popen(
        torchrun_command(*args),
        env=worker_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        while not (out / "metrics.jsonl").exists() and proc.poll() is None:
            assert time.monotonic() < deadline, "no epoch finished"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGINT)  # during epoch 2 (or at the end of epoch 1)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode != 0
    assert stderr.count("stopped by SIGINT") == 1, stdout + stderr  # rank 0 alone reports it
    assert "Resume with: torchrun" in stderr
    assert "[rank0]: Traceback" not in stderr and "[rank1]: Traceback" not in stderr
    cut = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert (cut["epoch"], cut["step"]) < (EPOCHS, 0)
    assert not (out / "summary.json").exists()
    assert len(metrics(out)) < EPOCHS

    resumed = torchrun("train", "--resume", str(out / "last.pt"), "--quiet")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resuming at epoch" in resumed.stdout
    assert [m["epoch"] for m in metrics(out)] == list(range(1, EPOCHS + 1))
    assert json.loads((out / "summary.json").read_text())["world_size"] == 2
    # Batches, augmentation and the learning rate are functions of (seed, epoch, step), and
    # gloo's sums are deterministic: the resumed run ends where the uninterrupted one did.
    for name in ("last.pt", "best.pt"):
        a, b = model_weights(full / name), model_weights(out / name)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}: {key} differs"


@pytest.mark.slow
def test_an_error_on_rank_0_alone_stops_every_rank_with_its_message(two_process_run, config_file, fake_cifar):
    out, _ = two_process_run  # rank 0 refuses to write into a finished run; rank 1 has no way to know
    done = torchrun("train", str(config_file), "--data-dir", str(fake_cifar), "--out", str(out), timeout=120)
    assert done.returncode != 0
    # Rank 1 learns of rank 0's error and exits with it silently: one message, from rank 0.
    assert len(re.findall(r"^Error:", done.stderr, flags=re.MULTILINE)) == 1
    assert done.stderr.count("already holds a run") == 1
    assert (
        f"continue it with `torchrun <same options> -m cerberus train --resume {out / 'last.pt'}`"
        in done.stderr
    )
    assert "[rank1]: Traceback" not in done.stderr and "[rank0]: Traceback" not in done.stderr
    assert [m["epoch"] for m in metrics(out)] == list(range(1, EPOCHS + 1))  # untouched


# The CLI with rank 1's process dying (os._exit: as kill -9 would) at a given step.
DYING_RANK = """
import os, sys
from cerberus import engine
from cerberus.cli import main

train_step = engine.Trainer.train_step

def dying_step(self, epoch, step):
    if os.environ["RANK"] == "1" and (epoch, step) == (1, 2):
        os._exit(1)
    return train_step(self, epoch, step)

engine.Trainer.train_step = dying_step
sys.argv[0] = "cerberus"
main()
"""


@pytest.mark.slow
def test_a_process_that_dies_leaves_one_message_and_the_checkpoint(config_file, fake_cifar, tmp_path):
    script = tmp_path / "dying.py"
    script.write_text(DYING_RANK)
    out = tmp_path / "run"
    command = torchrun_command(
        "train", str(config_file), "--data-dir", str(fake_cifar), "--out", str(out), "-q"
    )
    command[command.index("-m", 3) : command.index("cerberus") + 1] = [str(script)]
    done = subprocess.run(command, env=worker_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "[rank0]: Traceback" not in done.stderr, done.stderr  # torchrun's own report follows
    errors = re.findall(r"^Error: .*$", done.stderr, flags=re.MULTILINE)
    assert len(errors) == 1, done.stderr
    assert errors[0].startswith("Error: another process of this run stopped, so process 0 cannot go on (")
    assert "); torchrun's report names the process that failed; " in errors[0]
    assert errors[0].endswith(
        f"; {out / 'last.pt'} is kept. Resume with: torchrun <same options> -m cerberus train "
        f"--resume {out / 'last.pt'}"
    )
    assert torch.load(out / "last.pt", map_location="cpu", weights_only=True)["epoch"] == 1
    resumed = torchrun("train", "--resume", str(out / "last.pt"), "--quiet")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert [m["epoch"] for m in metrics(out)] == list(range(1, EPOCHS + 1))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "train.lr=-1"], "train.lr: Input should be greater than 0 (from --set train.lr=-1)"),
        (
            ["--set", "train.sync_bn=true"],
            "train.sync_bn needs CUDA GPUs (nccl); on the CPU set train.sync_bn = false",
        ),
    ],
)
def test_an_error_before_training_is_reported_once_and_writes_nothing(
    config_file, fake_cifar, tmp_path, args, message
):
    out = tmp_path / "run"
    done = torchrun(
        "train", str(config_file), "--data-dir", str(fake_cifar), "--out", str(out), *args, timeout=120
    )
    assert done.returncode != 0
    assert len(re.findall(r"^Error:", done.stderr, flags=re.MULTILINE)) == 1, done.stderr
    assert done.stderr.count(message) == 1, done.stderr
    assert "[rank0]: Traceback" not in done.stderr and "[rank1]: Traceback" not in done.stderr
    assert not out.exists()  # sync_bn: refused before the data loads and the folder is made


# --------------------------------------------------------------------------------------------
# The pieces, without processes


@pytest.mark.parametrize(
    ("world_size", "local_rank", "waits"), [("2", "0", False), ("2", "1", True), ("1", "1", False)]
)
def test_the_first_process_of_a_machine_reports_an_error_before_training_at_once(
    config_file, tmp_path, monkeypatch, world_size, local_rank, waits
):
    # Every process of a torchrun job reads the same command line and config. The machine's first
    # says what is wrong at once; the others wait (torchrun stops them when the first exits) and
    # then say it too, so the message is never lost. Outside torchrun nothing waits.
    import cerberus.cli.train

    slept = []
    monkeypatch.setattr(cerberus.cli.train.time, "sleep", slept.append)
    monkeypatch.setenv("WORLD_SIZE", world_size)
    monkeypatch.setenv("LOCAL_RANK", local_rank)
    for args in (["--set", "train.lr=-1"], ["--out", "x", "--resume", "last.pt"]):
        result = CliRunner().invoke(app, ["train", str(config_file), *args])
        assert result.exit_code == 2, result.output
        assert result.stderr.startswith("Error: ")
    assert slept == ([cerberus.cli.train.REPORT_WAIT_SECONDS] * 2 if waits else [])


def test_only_a_peer_gone_counts_as_a_lost_process():
    from cerberus.distributed import lost_a_process

    gone = [
        "[gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]:7596: Connection reset by peer",
        "[gloo/transport/tcp/unbound_buffer.cc:81] Connection closed by peer [127.0.0.1]:42",
        "NCCL error: remote process exited or there was a network error",
    ]
    mistakes = [  # this process's own: their tracebacks must not be hidden
        "ProcessGroupGloo::broadcast: invalid root rank: 7",
        "Cannot use ReduceOp.PREMUL_SUM with Gloo",
        "NCCL error in: ProcessGroupNCCL.cpp:1970, unhandled cuda error, NCCL version 2.21.5",
    ]
    assert [lost_a_process(RuntimeError(m)) for m in gone] == [True] * 3
    assert [lost_a_process(RuntimeError(m)) for m in mistakes] == [False] * 3


def test_every_process_that_finds_another_gone_says_so(config_file, monkeypatch):
    # rank 0 may be the process that is gone: rank 1 says what it saw, not only rank 0
    from cerberus.errors import LostProcessError

    def lost(*args, **kwargs):
        raise LostProcessError("another process of this run stopped, so process 1 cannot go on (x)")

    monkeypatch.setattr("cerberus.runner.train_run", lost)
    monkeypatch.setenv("RANK", "1")
    result = CliRunner().invoke(app, ["train", str(config_file)])
    assert result.exit_code == 1
    assert result.stderr == "Error: another process of this run stopped, so process 1 cannot go on (x)\n"


def test_a_single_process_context_has_nothing_to_agree_on(monkeypatch, tmp_path):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ctx = DistContext.from_env()
    assert (ctx.rank, ctx.world_size, ctx.active, ctx.is_main) == (0, 1, False, True)
    model = build_model(tiny_config(tmp_path).model.architecture())
    assert ctx.wrap(model) is model
    assert ctx.convert_sync_bn(model) is model
    assert ctx.any_rank(True) is True and ctx.any_rank(False) is False
    assert ctx.from_main(pow, 2, 5) == 32
    assert ctx.max_over_ranks(15) == 15
    with pytest.raises(ConfigError, match="own message"), ctx.agreement():
        raise ConfigError("own message")


def test_sync_batchnorm_keeps_batchnorm_names_in_checkpoints(tmp_path):
    arch = tiny_config(tmp_path).model.architecture()
    plain = build_model(arch)
    # Two CUDA ranks, as train.sync_bn needs; converting touches neither the device nor a process group.
    ctx = DistContext(rank=0, world_size=2, device=torch.device("cuda"))
    synced = ctx.convert_sync_bn(build_model(arch))
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in synced.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in synced.modules())
    assert list(synced.state_dict()) == list(plain.state_dict())
    plain.load_state_dict(synced.state_dict(), strict=True)


def test_sync_bn_on_the_cpu_is_refused_with_a_message(tmp_path):
    ctx = DistContext(rank=0, world_size=2, device=torch.device("cpu"))
    with pytest.raises(ConfigError, match="sync_bn needs CUDA"):
        ctx.convert_sync_bn(build_model(tiny_config(tmp_path).model.architecture()))


@pytest.fixture
def tiny_run(tmp_path, fake_cifar) -> Run:
    run = Run(tiny_config(tmp_path, data_root=fake_cifar), tmp_path, None, False, DistContext())
    run.place()
    run.load_data()
    run.setup()
    return run


def test_under_ddp_the_ranks_vote_on_stopping_at_sync_points(tiny_run):
    trainer = tiny_run.trainer
    assert trainer.steps_per_epoch == 7  # 400 images in batches of 64
    never, always = (lambda: False), (lambda: True)

    # Alone, a stop ends the epoch after the step it was seen at.
    assert trainer.run_epoch(0, EpochState(), 0, None, always)[1] == 1
    # Under DDP each rank's wish travels with the sums; here another rank wants to stop, so
    # this one stops too, after the same step (the first sync point), though it saw no signal.
    trainer._sync_every = 3
    trainer.reduce = lambda sums: sums + torch.tensor([0.0, 0.0, 1.0])
    state, step = trainer.run_epoch(0, EpochState(), 0, None, never)
    assert step == 3 and state.images == 3 * 64
    # A local stop waits for the next sync point, where every rank hears of it.
    trainer.reduce = lambda sums: sums.clone()
    assert trainer.run_epoch(0, EpochState(), 4, None, always)[1] == 6
    # No one wants to stop: the whole epoch.
    assert trainer.run_epoch(0, EpochState(), 0, None, never)[1] == 7


def test_batches_too_small_to_share_between_ranks_are_refused(tmp_path, fake_cifar):
    cfg = tiny_config(tmp_path, TINY.replace("batch_size = 64", "batch_size = 133"), fake_cifar)
    run = Run(cfg, tmp_path, None, False, DistContext(rank=0, world_size=2))
    # 400 training images = 3 x 133 + 1: the last batch is one image. Refused with the data,
    # before the run directory is written.
    with pytest.raises(ConfigError, match="a batch of 1 image"):
        run.load_data()
    run.dist = DistContext()
    run.load_data()  # alone, any batch will do


def tiny_config(folder: Path, text: str = TINY, data_root: Path | None = None):
    if data_root is not None:
        text = text.replace("[data]\n", f'[data]\nroot = "{data_root}"\n')
    path = folder / "config.toml"
    path.write_text(text)
    return load_config(path)
