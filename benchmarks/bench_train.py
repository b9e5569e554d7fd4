"""Training throughput: `cerberus train` against the seed's pipeline, and what the loop costs.

    python benchmarks/bench_train.py --data-dir /tmp/cifar10                 # both parts
    python benchmarks/bench_train.py --data-dir /tmp/cifar10 --part jobs --reps 2
    python benchmarks/bench_train.py --data-dir /tmp/cifar10 --part loop --steps 3 --reps 3
    python benchmarks/bench_train.py --data-dir /tmp/cifar10 --part loop --config configs/cpu-fast.toml \
        --steps 15 --reps 3
    python benchmarks/bench_train.py --data-dir /tmp/cifar10 --part sizes --config configs/cpu-fast.toml
    python benchmarks/bench_train.py --data-dir /tmp/cifar10 --device cuda   # on a GPU machine

Part ``jobs``: the job "1 epoch of ResNet-24 (blocks 3 5 3, channels 64 128 256) in batches of
128 on the first 2,560 training images, then the first 1,000 test images", done twice per rep in
subprocesses, wall time from start to exit (start-up, data loading, checkpoints and evaluation
count on both sides), the two sides alternating (seed, ours, ours, seed, ...):

* ours: ``cerberus train`` with a config of the seed's optimiser (SGD lr 0.01, momentum 0.9,
  weight decay 5e-4 on every parameter, constant LR), crop 4 + flip, data.train_subset=2560,
  data.val_size=0, data.test_subset=1000, train.epochs=1, every other setting at its default
  (precision and layout ``auto``);
* seed: ``benchmarks/seed_pipeline.py train`` (PIL transforms in a 2-worker DataLoader, fp32,
  NCHW; see that file).

Part ``loop``: in-loop images/s of ``Trainer.run_epoch`` on real images (batch order,
augmentation, LR schedule, loss and accuracy bookkeeping, a host read per step) against a bare
forward + backward + SGD step on one fixed synthetic batch, same model, precision and layout,
epochs of ``--steps`` steps interleaved with bare runs of as many steps. By default the model is
ResNet-24 with crop 4 + flip and plain SGD; ``--config`` measures a config's own design, batch
size, augmentation, label smoothing, optimizer, weight EMA, precision and layout instead.

Part ``sizes``: what progressive resizing (``augment.crop_sizes``) saves. Bare forward + backward +
step images/s of the design (the config's, else ResNet-24) on synthetic batches of windows of side
``--sizes`` (default 32 28 24 20), interleaved, median of ``--reps``: each side's time per image
relative to whole images, beside the ratio of the stem's output areas (what the MACs scale with).

The jobs and loop parts also print the rate in GFLOP/s (training ~ 3 x 2 x MACs per image) against this
machine's fp32 GEMM rate measured in the same run, the practical ceiling for a conv net here.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    BENCHMARKS,
    bare_steps_seconds,
    cerberus_command,
    describe_machine,
    gemm_gflops,
    last_json,
    median,
    synchronize,
    timed_command,
)

BLOCKS, CHANNELS, BATCH = (3, 5, 3), (64, 128, 256), 128

CONFIG = """\
name = "bench-train"
seed = 0

[model]
blocks = {blocks}
channels = {channels}

[data]
train_subset = {train_images}
val_size = 0
test_subset = {test_images}

[augment]
crop_padding = 4
flip = true

[train]
epochs = 1
batch_size = {batch}
optimizer = "sgd"
lr = 0.01
momentum = 0.9
weight_decay = 5e-4
schedule = "constant"
"""


def train_gflop_per_image(arch=None) -> float:
    from cerberus.arch import Architecture, count_macs

    arch = arch if arch is not None else Architecture(blocks=BLOCKS, channels=CHANNELS)
    return 3 * 2 * count_macs(arch) / 1e9


# --------------------------------------------------------------------------------------------
# Part 1: the whole job, ours against the seed's


def run_ours(config: Path, data_dir: str, out: Path, device: str) -> tuple[float, dict]:
    cmd = [*cerberus_command(), "train", str(config), "--data-dir", data_dir, "--out", str(out), "--json"]
    cmd += ["--set", f"train.device={device}"]
    seconds, stdout = timed_command(cmd)
    return seconds, last_json(stdout, "summary")["summary"]


def run_seed(data_dir: str, train_images: int, test_images: int, device: str) -> tuple[float, dict]:
    cmd = [
        sys.executable,
        str(BENCHMARKS / "seed_pipeline.py"),
        "train",
        "--data-dir",
        data_dir,
        "--train-images",
        str(train_images),
        "--test-images",
        str(test_images),
        "--device",
        device,
    ]
    seconds, stdout = timed_command(cmd)
    return seconds, last_json(stdout)


def jobs(args) -> None:
    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    config = work / "bench-train.toml"
    config.write_text(
        CONFIG.format(
            blocks=list(BLOCKS),
            channels=list(CHANNELS),
            train_images=args.train_images,
            test_images=args.test_images,
            batch=BATCH,
        )
    )
    walls: dict[str, list[float]] = {"seed": [], "ours": []}
    rates: dict[str, list[float]] = {"seed": [], "ours": []}
    for rep in range(args.reps):
        for side in ("seed", "ours") if rep % 2 == 0 else ("ours", "seed"):
            if side == "ours":
                seconds, result = run_ours(config, args.data_dir, work / f"run{rep}", args.device)
                rate, accuracy = result["train_images_per_sec"], result["test_accuracy"]
                extra = f"{result['device']} {result['precision']} channels_last={result['channels_last']}"
            else:
                seconds, result = run_seed(args.data_dir, args.train_images, args.test_images, args.device)
                rate, accuracy = result["train_images_per_sec"], result["test_accuracy"]
                extra = f"{args.device} fp32 NCHW"
            walls[side].append(seconds)
            rates[side].append(rate)
            print(
                f"  rep {rep + 1} {side:4s}: {seconds:7.1f} s wall, in-loop {rate:5.1f} img/s, "
                f"test acc {accuracy:.3f}, peak RSS {result['peak_rss_mb']:,.0f} MB ({extra})",
                flush=True,
            )
    gflop = train_gflop_per_image()
    seed_wall, ours_wall = median(walls["seed"]), median(walls["ours"])
    print(
        f"job ({args.train_images:,} train + {args.test_images:,} test images, ResNet-24, batch {BATCH}), "
        f"median of {args.reps}: seed {seed_wall:.1f} s, ours {ours_wall:.1f} s -> "
        f"speed-up {seed_wall / ours_wall:.2f}x"
    )
    seed_rate, ours_rate = median(rates["seed"]), median(rates["ours"])
    print(
        f"in-loop training rate: seed {seed_rate:.1f} img/s ({seed_rate * gflop:.0f} GFLOP/s), "
        f"ours {ours_rate:.1f} img/s ({ours_rate * gflop:.0f} GFLOP/s) -> {ours_rate / seed_rate:.2f}x"
    )


# --------------------------------------------------------------------------------------------
# Part 2: the loop's cost against a bare step


def loop(args) -> None:
    import torch

    from cerberus.arch import Architecture
    from cerberus.augment import Augmenter
    from cerberus.config import CIFAR10_MEAN, CIFAR10_STD, AugmentConfig, TrainConfig, load_config
    from cerberus.data import load_cifar10, step_generator
    from cerberus.device import resolve_placement
    from cerberus.engine import EMA, EpochState, LRSchedule, Trainer, build_optimizer, whiten_stem_
    from cerberus.model import build_model

    if args.config:
        exp = load_config(args.config)
        arch, batch = exp.model.architecture(), exp.train.batch_size
        augment = exp.augment.model_copy(update={"crop_sizes": []})  # whole images, as the bare step
        mean, std = exp.data.mean, exp.data.std
        placement = resolve_placement(args.device, exp.train.precision, exp.train.channels_last, arch=arch)
        # the config's optimizer and EMA; a constant LR (the schedule's shape costs nothing)
        cfg = exp.train.model_copy(update={"epochs": 1000, "schedule": "constant", "warmup_epochs": 0})
        ema_decay, smoothing = exp.train.ema_decay, exp.augment.label_smoothing
    else:
        arch, batch = Architecture(blocks=BLOCKS, channels=CHANNELS), BATCH
        augment = AugmentConfig(crop_padding=4, flip=True)
        mean, std = CIFAR10_MEAN, CIFAR10_STD
        placement = resolve_placement(args.device, arch=arch)
        cfg = TrainConfig(
            epochs=1000, batch_size=batch, lr=0.01, momentum=0.9, weight_decay=5e-4, schedule="constant"
        )
        ema_decay, smoothing = 0.0, 0.0
    device, mf = placement.device, placement.memory_format
    n = batch * args.steps
    data = load_cifar10(Path(args.data_dir), download=False, split="train")
    images, labels = data.train_images[:n].to(device), data.train_labels[:n].to(device)
    del data

    torch.manual_seed(0)
    model = build_model(arch).to(device, memory_format=mf)
    if args.config and exp.train.whiten_stem:  # a fixed stem: no gradient for it on either side
        whiten_stem_(model, images, mean, std)
    bare_model = copy.deepcopy(model)
    trainer = Trainer(
        model=model,
        optimizer=build_optimizer(model, cfg),
        schedule=LRSchedule(cfg, args.steps),
        augmenter=Augmenter(augment, mean, std, arch.num_classes),
        placement=placement,
        cfg=cfg,
        seed=0,
        images=images,
        labels=labels,
        label_smoothing=smoothing,
        ema=EMA(model, ema_decay) if ema_decay > 0 else None,
    )
    bare_opt = build_optimizer(bare_model, cfg)  # the loop's optimizer, without the loop
    x = torch.randn(batch, 3, 32, 32, device=device).contiguous(memory_format=mf)
    y = torch.randint(0, 10, (batch,), device=device)

    def bare_steps() -> float:
        return bare_steps_seconds(bare_model, bare_opt, x, y, placement, args.steps)

    def loop_steps(epoch: int) -> float:
        start = time.perf_counter()
        trainer.run_epoch(epoch, EpochState())
        return time.perf_counter() - start

    augmenter = trainer.augmenter

    def augment_once(step: int) -> float:
        generator = step_generator(0, 0, step, device)
        idx = torch.arange(batch, device=device)
        synchronize(device)
        start = time.perf_counter()
        out, _ = augmenter(images[idx], labels[idx], generator)
        out.contiguous(memory_format=mf)
        synchronize(device)
        return time.perf_counter() - start

    design = f"{list(arch.blocks)} x {list(arch.widths)}"
    print(f"{design}, {placement.describe()}; {args.steps} steps of {batch} per measurement", flush=True)
    bare_steps(), loop_steps(0)  # warm-up: oneDNN primitives, allocator
    times: dict[str, list[float]] = {"bare": [], "loop": []}
    for rep in range(args.reps):
        for side in ("bare", "loop") if rep % 2 == 0 else ("loop", "bare"):
            times[side].append(bare_steps() if side == "bare" else loop_steps(rep + 1))
        print(f"  rep {rep + 1}: bare {times['bare'][-1]:.2f} s, loop {times['loop'][-1]:.2f} s", flush=True)
    gflop = train_gflop_per_image(arch)
    bare_rate, loop_rate = n / median(times["bare"]), n / median(times["loop"])
    augment_ms = 1000 * median([augment_once(s) for s in range(20)])
    print(
        f"bare step {bare_rate:.1f} img/s ({bare_rate * gflop:.0f} GFLOP/s), in-loop {loop_rate:.1f} img/s "
        f"-> in-loop / bare = {loop_rate / bare_rate:.1%}"
    )
    print(
        f"augmentation ({augment.crop_padding}-pixel {augment.crop_mode} crop, flip, the rest of "
        f"[augment], normalise, layout) of one batch of {batch}: {augment_ms:.1f} ms "
        f"= {augment_ms / 1000 / (batch / bare_rate):.2%} of a bare step"
    )


def sizes(args) -> None:
    import torch

    from cerberus.arch import Architecture
    from cerberus.config import TrainConfig, load_config
    from cerberus.device import resolve_placement
    from cerberus.engine import build_optimizer
    from cerberus.model import build_model

    if args.config:
        exp = load_config(args.config)
        arch, cfg = exp.model.architecture(), exp.train
        placement = resolve_placement(args.device, cfg.precision, cfg.channels_last, arch=arch)
    else:
        arch, cfg = Architecture(blocks=BLOCKS, channels=CHANNELS), TrainConfig(batch_size=BATCH)
        placement = resolve_placement(args.device, arch=arch)
    small = [s for s in args.sizes if arch.final_side_for(s) < 1]
    if small or arch.pool != arch.final_side:
        raise SystemExit(f"{arch.label()} cannot take windows of side {small or args.sizes}")
    device, mf, batch = placement.device, placement.memory_format, cfg.batch_size
    torch.manual_seed(0)
    model = build_model(arch).to(device, memory_format=mf)
    optimizer = build_optimizer(model, cfg)
    y = torch.randint(0, arch.num_classes, (batch,), device=device)
    inputs = {s: torch.randn(batch, 3, s, s, device=device).contiguous(memory_format=mf) for s in args.sizes}
    print(f"{arch.label()}, {placement.describe()}; {args.steps} steps of {batch} per measurement")
    for s in args.sizes:  # warm-up: oneDNN primitives for every shape
        bare_steps_seconds(model, optimizer, inputs[s], y, placement, 1)
    times: dict[int, list[float]] = {s: [] for s in args.sizes}
    for rep in range(args.reps):
        for s in args.sizes if rep % 2 == 0 else args.sizes[::-1]:
            times[s].append(bare_steps_seconds(model, optimizer, inputs[s], y, placement, args.steps))
    whole = median(times[args.sizes[0]])
    area = arch.stem_side_for(args.sizes[0]) ** 2
    for s in args.sizes:
        rate = batch * args.steps / median(times[s])
        print(
            f"  side {s:2d}: {rate:7.1f} img/s, time per image x{median(times[s]) / whole:.3f} "
            f"(stem map area x{arch.stem_side_for(s) ** 2 / area:.3f})"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True, help="folder holding cifar-10-batches-py/")
    parser.add_argument("--part", choices=["all", "jobs", "loop", "sizes"], default="all")
    parser.add_argument("--reps", type=int, default=2, help="repetitions of each side (median reported)")
    parser.add_argument("--train-images", type=int, default=2560)
    parser.add_argument("--test-images", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=3, help="steps per loop/bare measurement")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda, for both sides")
    parser.add_argument("--config", help="loop and sizes parts: measure this config's design and settings")
    parser.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        default=[32, 28, 24, 20],
        help="sizes part: window sides, first = the reference",
    )
    args = parser.parse_args()
    print(describe_machine())
    print(f"fp32 GEMM ceiling now: {gemm_gflops():.0f} GFLOP/s", flush=True)
    if args.part in ("all", "jobs"):
        jobs(args)
    if args.part in ("all", "loop"):
        loop(args)
    if args.part == "sizes":
        sizes(args)
    print(f"fp32 GEMM ceiling at the end: {gemm_gflops():.0f} GFLOP/s")


if __name__ == "__main__":
    main()
