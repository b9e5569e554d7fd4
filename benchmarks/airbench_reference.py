"""Airbench's published recipes on a given copy of CIFAR-10: how far that copy is from the official files.

    pip install airbench                       # Keller Jordan's cifar10-airbench, as published
    python benchmarks/airbench_reference.py --data-dir DATA --out airbench.json [--runs 8 4 2]
    python benchmarks/airbench_reference.py --cpu-speed [--config configs/cpu-fast.toml]

Needs a CUDA GPU (airbench trains in fp16 on ``cuda:0``). The script writes DATA's images and
labels in the cache format airbench's loader reads (``cifar10/train.pt`` and ``test.pt`` in a
work folder, uint8 NHWC as torchvision gives them), then trains airbench94, 95 and 96 the given
numbers of times each with their own hyperparameters and evaluates every network with and without
airbench's test-time augmentation (``tta_level=2``: mirror and one-pixel translations, the six
views Cerberus also uses). Each variant starts with airbench's warm-up run, which is not counted.

Airbench's means on the official files (its README and source, 200-1000 runs each) are the
reference: 94.01%, 95.01% and 96.05% with TTA. A mean well below them on DATA measures how much
accuracy DATA itself costs, independently of Cerberus; the gap is what to subtract from the
targets set against results on the official files before comparing. Results go to ``--out`` after
every run, so a run stopped early keeps what it finished.

``--cpu-speed`` needs no GPU and no data: it times a bare forward + backward + SGD step of
airbench94's and airbench95's networks (built by airbench's own ``make_net``, kept in fp32 on the
CPU, channels_last) and of a config's design (``configs/cpu-fast.toml`` by default, with its
optimizer and layout), on synthetic batches of 128, interleaved, medians of ``--reps``; then prints
each one's forward MACs and how long its recipe's training images would take at that rate
(airbench's epochs x 50,000; the config's whole epochs x its training images: data pruning trains
fewer). With the accuracies the GPU runs measure on a copy of the data, that says what a
time-to-accuracy target on this CPU asks of a recipe, against the most compute-efficient recipes
published.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import time
from pathlib import Path

# mean test accuracy with TTA on the official files, as published with each recipe
PUBLISHED = {"airbench94": 94.01, "airbench95": 95.01, "airbench96": 96.05}
TRAIN_IMAGES = 50_000  # CIFAR-10's training set
CPU_FAST = Path(__file__).resolve().parent.parent / "configs" / "cpu-fast.toml"


def write_cache(data_dir: str, folder: Path) -> None:
    """DATA's splits as airbench's ``CifarLoader`` caches them.

    Each file holds ``{"images": uint8 (N, 32, 32, 3), "labels": int64 (N,), "classes": [...]}``.
    """
    import torch

    from cerberus.data import load_cifar10

    data = load_cifar10(data_dir, download=False)
    folder.mkdir(parents=True, exist_ok=True)
    for name, images, labels in (
        ("train.pt", data.train_images, data.train_labels),
        ("test.pt", data.test_images, data.test_labels),
    ):
        payload = {
            "images": images.permute(0, 2, 3, 1).contiguous(),
            "labels": labels.clone(),
            "classes": list(data.classes),
        }
        torch.save(payload, folder / name)


def parameter_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def forward_macs(model, side: int = 32) -> int:
    """Multiply-adds of one image's forward pass through the model's convs and linear layers."""
    import torch
    from torch import nn

    total = 0

    def count(module, inputs, output) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d):
            per_output = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
            total += output[0].numel() * per_output
        else:
            total += module.in_features * module.out_features

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    was_training = model.training
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, 3, side, side).contiguous(memory_format=torch.channels_last))
    model.train(was_training)
    for hook in hooks:
        hook.remove()
    return total


def airbench_cpu_net(name: str):
    """airbench's own network for ``name``, as its ``make_net`` builds it, but fp32 on the CPU.

    ``make_net`` ends with ``.half().cuda()``: the CUDA move is skipped for the call and the network
    is made fp32 again (its BatchNorms are fp32 already), then channels_last as airbench has it.
    """
    import airbench
    import torch

    make_net = getattr(airbench, f"make_net{name.removeprefix('airbench')}")
    cuda = torch.nn.Module.cuda
    torch.nn.Module.cuda = lambda self, *args, **kwargs: self
    try:
        net = make_net()
    finally:
        torch.nn.Module.cuda = cuda
    return net.float().to(memory_format=torch.channels_last)


def cpu_speed(args) -> None:
    import torch
    from _common import bare_steps_seconds, describe_machine, gemm_gflops, median

    from cerberus.config import load_config
    from cerberus.device import resolve_placement
    from cerberus.engine import build_optimizer
    from cerberus.model import build_model

    torch.manual_seed(0)
    exp = load_config(args.config)
    arch = exp.model.architecture()
    placement = resolve_placement("cpu", exp.train.precision, exp.train.channels_last, arch=arch)
    fp32 = resolve_placement("cpu", "fp32", True)
    ours = build_model(arch).to(memory_format=placement.memory_format)
    train_images = (exp.data.train_subset or TRAIN_IMAGES) - exp.data.val_size
    sides = {  # name: (model, optimizer, placement, images its recipe trains)
        exp.name: (ours, build_optimizer(ours, exp.train), placement, exp.train.epochs * train_images),
    }
    for name in ("airbench94", "airbench95"):
        net = airbench_cpu_net(name)
        params = [p for p in net.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=1e-3, momentum=0.85, nesterov=True)
        epochs = importlib.import_module(f"airbench.lib_{name}").hyp["opt"]["train_epochs"]
        sides[name] = (net, optimizer, fp32, round(epochs * TRAIN_IMAGES))
    batch = 128
    y = torch.randint(0, 10, (batch,))
    synthetic = torch.randn(batch, 3, 32, 32)
    inputs = {
        name: synthetic.contiguous(memory_format=where.memory_format)
        for name, (_, _, where, _) in sides.items()
    }
    print(describe_machine())
    print(f"fp32 GEMM now: {gemm_gflops():.0f} GFLOP/s; {args.steps} steps of {batch} per measurement")
    for name, (model, optimizer, where, _) in sides.items():  # warm-up: oneDNN's primitives
        bare_steps_seconds(model, optimizer, inputs[name], y, where, 1)
    times: dict[str, list[float]] = {name: [] for name in sides}
    names = list(sides)
    for rep in range(args.reps):
        for name in names if rep % 2 == 0 else names[::-1]:
            model, optimizer, where, _ = sides[name]
            times[name].append(bare_steps_seconds(model, optimizer, inputs[name], y, where, args.steps))
    print(f"\n{'design':<12} {'MACs':>7} {'img/s':>7} {'GMAC/s':>7} {'images':>9} {'minutes':>8}")
    for name, (model, _, _, images) in sides.items():
        rate = batch * args.steps / median(times[name])
        macs = forward_macs(model)
        print(
            f"{name:<12} {macs / 1e6:>6.1f}M {rate:>7.1f} {rate * macs / 1e9:>7.1f} {images:>9,} "
            f"{images / rate / 60:>8.1f}"
        )
    if exp.train.prune_ratio:
        print(f"({exp.name}: whole epochs; its data pruning trains fewer images, in proportion less time)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", help="folder holding cifar-10-batches-py/ (the GPU runs)")
    parser.add_argument("--out", type=Path, help="JSON file for the results (the GPU runs)")
    parser.add_argument(
        "--cpu-speed", action="store_true", help="time the networks' training steps on this CPU instead"
    )
    parser.add_argument(
        "--config", default=str(CPU_FAST), help="--cpu-speed: the design to compare (default: cpu-fast.toml)"
    )
    parser.add_argument("--steps", type=int, default=5, help="--cpu-speed: steps per measurement")
    parser.add_argument("--reps", type=int, default=3, help="--cpu-speed: repetitions of each (median)")
    parser.add_argument(
        "--runs",
        type=int,
        nargs=3,
        default=(8, 4, 2),
        metavar=("N94", "N95", "N96"),
        help="counted runs of airbench94, 95 and 96 (0 skips one; default: 8 4 2)",
    )
    parser.add_argument(
        "--work-dir", type=Path, default=Path("airbench-work"), help="folder for airbench's cache"
    )
    args = parser.parse_args()
    if args.cpu_speed:
        cpu_speed(args)
        return
    if args.data_dir is None or args.out is None:
        parser.error("the GPU runs need --data-dir and --out (or pass --cpu-speed)")

    out = args.out.absolute()
    write_cache(args.data_dir, args.work_dir / "cifar10")
    os.chdir(args.work_dir)  # airbench's train() reads its test set from ./cifar10

    import airbench
    import torch

    device = torch.cuda.get_device_name(0)
    print(f"{device}; torch {torch.__version__}; airbench recipes as published", flush=True)
    results: dict = {"device": device, "torch": torch.__version__, "data_dir": str(args.data_dir)}
    results["variants"] = {}
    test_loader = airbench.CifarLoader("cifar10", train=False, batch_size=2000)
    for (name, published), runs in zip(PUBLISHED.items(), args.runs):
        if runs <= 0:
            continue
        suffix = name.removeprefix("airbench")
        train = getattr(airbench, f"train{suffix}")
        make_net = getattr(airbench, f"make_net{suffix}")
        getattr(airbench, f"warmup{suffix}")()  # one step, to start cuDNN and the allocator
        variant = {"published_tta": published, "parameters": parameter_count(make_net()), "runs": []}
        results["variants"][name] = variant
        for run in range(runs):
            torch.cuda.synchronize()
            start = time.perf_counter()
            model = train(run=run, verbose=False)
            torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            single = 100 * airbench.evaluate(model, test_loader, tta_level=0)
            tta = 100 * airbench.evaluate(model, test_loader, tta_level=2)
            variant["runs"].append({"seconds": seconds, "test": single, "tta": tta})
            line = f"{name} run {run + 1}/{runs}: {seconds:.1f}s, test {single:.2f}%, TTA {tta:.2f}%"
            print(line, flush=True)
            out.write_text(json.dumps(results, indent=2) + "\n")

    print(f"\n{'recipe':<11} {'params':>10} {'runs':>4} {'test':>7} {'TTA':>14} {'official':>8} {'gap':>6}")
    for name, variant in results["variants"].items():
        runs = variant["runs"]
        tta = [r["tta"] for r in runs]
        spread = f" ±{statistics.stdev(tta):.2f}" if len(tta) > 1 else ""
        mean_tta = statistics.fmean(tta)
        mean_single = statistics.fmean(r["test"] for r in runs)
        gap = mean_tta - variant["published_tta"]
        print(
            f"{name:<11} {variant['parameters']:>10,} {len(runs):>4} {mean_single:>6.2f}% "
            f"{mean_tta:>7.2f}%{spread:<6} {variant['published_tta']:>7.2f}% {gap:>+6.2f}"
        )


if __name__ == "__main__":
    main()
