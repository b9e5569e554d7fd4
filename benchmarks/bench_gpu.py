"""A config's training speed on this device, and the epochs that fit a time budget.

    python benchmarks/bench_gpu.py configs/resnet24.toml --data-dir /path/to/cifar10 --minutes 5

For time-to-accuracy runs on a GPU (the default device is the config's, ``auto``): times the
config's own training loop (``Trainer.run_epoch``: batch order, augmentation, the resolved
precision and layout, EMA, bookkeeping) on real training images, a bare forward + backward + SGD
step of the same model on one synthetic batch, and one evaluation of the test images. Prints a
line per measurement and, last, one JSON line with the rates and ``epochs``: how many epochs of
the config's training split fit ``--minutes`` of training (at least 1), counting one test evaluation
per epoch (``train.test_every_epoch``), the validation split's evaluations (two with a weight EMA)
when the config holds images out, and ``--margin`` for the rest: on an H200 a 171-epoch run
of ResNet-24 took 1.93 s per epoch where the loop and one evaluation predicted 1.66 s, and a
188-epoch run 1.69 s where they predicted 1.35 s (checkpoints, metrics and plots, start-up, and
epochs that ran slower than the probe's).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import bare_steps_seconds, median, synchronize


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="the training config (TOML)")
    parser.add_argument("--data-dir", required=True, help="folder holding cifar-10-batches-py/")
    parser.add_argument("--minutes", type=float, default=5.0, help="training time to fill")
    parser.add_argument(
        "--margin", type=float, default=0.25, help="fraction kept for checkpoints, plots, start-up"
    )
    parser.add_argument("--steps", type=int, default=40, help="steps per timed epoch of the loop")
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions of each side")
    parser.add_argument("--set", nargs="*", default=[], help="config overrides, as cerberus --set")
    args = parser.parse_args()

    import torch

    from cerberus.augment import Augmenter
    from cerberus.config import load_config
    from cerberus.data import load_cifar10, make_splits
    from cerberus.device import resolve_placement, tune_backends
    from cerberus.engine import EMA, EpochState, LRSchedule, Trainer, build_optimizer
    from cerberus.evaluate import predict_logits
    from cerberus.model import build_model

    cfg = load_config(args.config, [*args.set, f"data.root={args.data_dir}"])
    t = cfg.train
    placement = resolve_placement(t.device, t.precision, t.channels_last, arch=cfg.model.architecture())
    tune_backends(placement)
    device, mf = placement.device, placement.memory_format
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{name}; torch {torch.__version__}; {placement.describe()}; batch {t.batch_size}", flush=True)

    data = load_cifar10(Path(args.data_dir), download=False)
    splits = make_splits(data, cfg.data)
    train_n = len(splits.train_labels)
    n = min(t.batch_size * args.steps, train_n)
    images, labels = splits.train_images[:n].to(device), splits.train_labels[:n].to(device)

    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model.architecture()).to(device, memory_format=mf)
    bare_model = copy.deepcopy(model)
    trainer = Trainer(
        model=model,
        optimizer=build_optimizer(model, t),
        schedule=LRSchedule(t, -(-n // t.batch_size)),
        # whole images and no pruner: the timing stands for every epoch (augment.crop_sizes and
        # train.prune_ratio would shorten some, so the epochs it fits in the time are a lower bound)
        augmenter=Augmenter(
            cfg.augment.model_copy(update={"crop_sizes": []}),
            cfg.data.mean,
            cfg.data.std,
            cfg.model.num_classes,
        ),
        placement=placement,
        cfg=t,
        seed=cfg.seed,
        images=images,
        labels=labels,
        label_smoothing=cfg.augment.label_smoothing,
        ema=EMA(model, t.ema_decay) if t.ema_decay > 0 else None,
    )
    bare_opt = torch.optim.SGD(bare_model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    x = torch.randn(t.batch_size, 3, 32, 32, device=device).contiguous(memory_format=mf)
    y = torch.randint(0, 10, (t.batch_size,), device=device)

    def bare(steps: int) -> float:
        return bare_steps_seconds(bare_model, bare_opt, x, y, placement, steps)

    def loop(epoch: int) -> float:
        synchronize(device)
        start = time.perf_counter()
        trainer.run_epoch(epoch, EpochState())
        synchronize(device)
        return time.perf_counter() - start

    def evaluate() -> float:
        synchronize(device)
        start = time.perf_counter()
        predict_logits(
            trainer.base_model,
            splits.test_images,
            mean=cfg.data.mean,
            std=cfg.data.std,
            placement=placement,
            batch_size=t.eval_batch_size,
        )
        synchronize(device)
        return time.perf_counter() - start

    steps = -(-n // t.batch_size)
    bare(steps), loop(0), evaluate()  # warm-up: cuDNN's algorithm search, allocator
    times: dict[str, list[float]] = {"bare": [], "loop": [], "eval": []}
    for rep in range(args.reps):
        for side in ("bare", "loop") if rep % 2 == 0 else ("loop", "bare"):
            times[side].append(bare(steps) if side == "bare" else loop(rep + 1))
        times["eval"].append(evaluate())
        print(
            f"  rep {rep + 1}: bare {times['bare'][-1]:.2f} s, loop {times['loop'][-1]:.2f} s "
            f"({n} images each), test evaluation {times['eval'][-1]:.2f} s",
            flush=True,
        )
    bare_rate = steps * t.batch_size / median(times["bare"])
    loop_rate = n / median(times["loop"])
    test_n, val_n = len(splits.test_labels), len(splits.val_labels)
    eval_seconds = median(times["eval"])
    # every epoch evaluates the validation split (twice with an EMA: both weights) and the test
    # curve; the validation passes at the rate the test images were evaluated
    val_passes = (2 if trainer.ema is not None else 1) if val_n else 0
    evaluated = test_n + val_passes * val_n
    epoch_seconds = train_n / loop_rate + eval_seconds * evaluated / test_n
    epochs = max(int(args.minutes * 60 * (1 - args.margin) // epoch_seconds), 1)
    val = f" + {val_passes} x {val_n:,} validation images" if val_passes else ""
    print(
        f"bare step {bare_rate:,.0f} img/s, in-loop {loop_rate:,.0f} img/s -> in-loop / bare = "
        f"{loop_rate / bare_rate:.1%}; evaluation {test_n / eval_seconds:,.0f} img/s; an epoch of "
        f"{train_n:,} images + the test curve{val} ~{epoch_seconds:.2f} s -> "
        f"{epochs} epochs in {args.minutes:g} min"
    )
    result = {
        "device": name,
        "placement": placement.describe(),
        "batch_size": t.batch_size,
        "bare_images_per_sec": round(bare_rate, 1),
        "loop_images_per_sec": round(loop_rate, 1),
        "eval_images_per_sec": round(test_n / eval_seconds, 1),
        "epoch_seconds": round(epoch_seconds, 3),
        "minutes": args.minutes,
        "epochs": epochs,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
