"""Airbench's published recipes on a given copy of CIFAR-10: how far that copy is from the official files.

    pip install airbench                       # Keller Jordan's cifar10-airbench, as published
    python benchmarks/airbench_reference.py --data-dir DATA --out airbench.json [--runs 8 4 2]

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
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

# mean test accuracy with TTA on the official files, as published with each recipe
PUBLISHED = {"airbench94": 94.01, "airbench95": 95.01, "airbench96": 96.05}


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True, help="folder holding cifar-10-batches-py/")
    parser.add_argument("--out", type=Path, required=True, help="JSON file for the results")
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
