"""Evaluation throughput: `predict_logits` against the seed's evaluation loop, ResNet-24 on the CPU.

    python benchmarks/bench_eval.py --data-dir /tmp/cifar10                  # first 2,000 test images
    python benchmarks/bench_eval.py --data-dir /tmp/cifar10 --images 10000 --reps 3 --layouts
    python benchmarks/bench_eval.py --data-dir /tmp/cifar10 --images 10000 --device cuda  # a GPU

The same randomly initialised ResNet-24 (seed 0; speed does not depend on the weights) evaluates
the first ``--images`` test images, the two sides alternating, ``--reps`` times each:

* seed: ``benchmarks/seed_pipeline.py``'s loop: a DataLoader with 2 workers over PIL images,
  ``ToTensor`` + ``Normalize``, batches of 100, fp32 NCHW, ``torch.no_grad()`` (the loader's
  start-up is timed too, as the seed paid it on every evaluation);
* ours: :func:`cerberus.evaluate.predict_logits` on the in-memory uint8 images, with the placement
  ``auto`` resolves on this machine (on the CPU in fp32: channels_last for inference) and the
  default eval batch size (1,000), as the training run and ``cerberus eval`` use it.

``--layouts`` adds ours in NCHW (``channels_last=False``) to show what the layout alone gives.
The logits of the two sides are compared (max abs difference, argmax agreement).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import describe_machine, gemm_gflops, median


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True, help="folder holding cifar-10-batches-py/")
    parser.add_argument("--images", type=int, default=2000, help="first N test images (both sides)")
    parser.add_argument("--reps", type=int, default=3, help="repetitions of each side (median reported)")
    parser.add_argument("--batch-size", type=int, default=1000, help="our eval batch size")
    parser.add_argument("--layouts", action="store_true", help="also time ours in NCHW")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda, for both sides")
    args = parser.parse_args()

    import seed_pipeline
    import torch

    from cerberus.arch import Architecture, count_macs
    from cerberus.config import CIFAR10_MEAN, CIFAR10_STD
    from cerberus.data import load_cifar10
    from cerberus.device import Placement, resolve_placement
    from cerberus.evaluate import predict_logits

    print(describe_machine())
    print(f"fp32 GEMM ceiling now: {gemm_gflops():.0f} GFLOP/s", flush=True)
    data = load_cifar10(Path(args.data_dir), download=False, split="test")
    images = data.test_images[: args.images].clone()
    n = len(images)
    torch.manual_seed(0)
    model = seed_pipeline.seed_model().eval()
    gflop = 2 * count_macs(Architecture(blocks=(3, 5, 3), channels=(64, 128, 256))) / 1e9

    def seed_side() -> torch.Tensor:
        loader = seed_pipeline.test_loader(args.data_dir, limit=n)
        model.to(args.device, memory_format=torch.contiguous_format)
        with torch.no_grad():
            return torch.cat([model(inputs.to(args.device)).cpu() for inputs, _ in loader])

    def ours(placement: Placement):
        def run() -> torch.Tensor:
            return predict_logits(
                model,
                images,
                mean=CIFAR10_MEAN,
                std=CIFAR10_STD,
                placement=placement,
                batch_size=args.batch_size,
            )

        return run

    def label(placement: Placement) -> str:
        layout = "channels_last" if placement.inference_layout else "NCHW"
        return f"ours ({placement.device.type} {placement.precision} {layout})"

    auto = resolve_placement(args.device)
    sides = {"seed": seed_side, label(auto): ours(auto)}
    if args.layouts:
        nchw = Placement(auto.device, auto.precision, channels_last=False)
        sides[label(nchw)] = ours(nchw)
    times: dict[str, list[float]] = {name: [] for name in sides}
    outputs: dict[str, torch.Tensor] = {}
    for rep in range(args.reps):
        names = list(sides) if rep % 2 == 0 else list(reversed(sides))
        for name in names:
            start = time.perf_counter()
            outputs[name] = sides[name]()
            times[name].append(time.perf_counter() - start)
        print("  rep", rep + 1, ", ".join(f"{k}: {times[k][-1]:.1f} s" for k in sides), flush=True)
    seed_time = median(times["seed"])
    print(f"{n:,} test images, ResNet-24, median of {args.reps}:")
    for name, values in times.items():
        rate = n / median(values)
        print(
            f"  {name:32s} {rate:7.1f} img/s ({rate * gflop:4.0f} GFLOP/s) "
            f"-> {seed_time / median(values):.2f}x the seed"
        )
    reference = outputs["seed"]
    for name, logits in outputs.items():
        if name != "seed":
            agree = (logits.argmax(1) == reference.argmax(1)).float().mean().item()
            print(
                f"  {name}: max |logit - seed logit| {(logits - reference).abs().max().item():.2e}, "
                f"argmax agreement {agree:.2%}"
            )
    print(f"fp32 GEMM ceiling at the end: {gemm_gflops():.0f} GFLOP/s")


if __name__ == "__main__":
    main()
