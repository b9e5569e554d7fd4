"""Test accuracy of checkpoints under several sets of test-time augmentation views.

    python benchmarks/tta_views.py --data-dir /tmp/cifar10 runs/cpu-fast/best.pt [more.pt ...]

Each view of the test images (the image or its mirror, translated by -2..2 pixels with reflected
borders) is built on the uint8 images and evaluated once, as a single view, through the
checkpoint's own inference settings (:func:`cerberus.evaluate.prepare_inference`); the sets below
are weighted averages of those logits. Flips and reflected translations commute with the
per-channel normalisation, so a view's logits are the ones ``predict_logits`` computes for it.
The line ``cerberus (tta=True)`` is the library's own six-view evaluation, as a cross-check of the
``(cerberus)`` line it implements.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def shifted(images, dy: int, dx: int, pad: int = 2):
    """``images`` with their content moved ``dy`` pixels down and ``dx`` right (reflected borders)."""
    import torch.nn.functional as F

    height, width = images.shape[-2:]
    padded = F.pad(images.float(), (pad,) * 4, mode="reflect").to(images.dtype)
    return padded[:, :, pad - dy : pad - dy + height, pad - dx : pad - dx + width]


# name -> [(view, weight)], a view named (flipped, dy, dx): the image, mirrored first if
# `flipped`, with its content moved `dy` pixels down and `dx` right
VIEW_SETS = {
    "single view": [((False, 0, 0), 1.0)],
    "flip": [((False, 0, 0), 1 / 2), ((True, 0, 0), 1 / 2)],
    "4 views, shift 2 down-right (the old default)": [
        ((f, s, s), 1 / 4) for f in (False, True) for s in (0, 2)
    ],
    "4 views, shift 2 up-left": [((f, s, s), 1 / 4) for f in (False, True) for s in (0, -2)],
    "4 views, shift 1 down-right": [((f, s, s), 1 / 4) for f in (False, True) for s in (0, 1)],
    "4 views, shift 1 up-left": [((f, s, s), 1 / 4) for f in (False, True) for s in (0, -1)],
    "6 views: mirror, then shifts +-1, weights 1/4 and 1/8 (cerberus)": [
        ((f, 0, 0), 1 / 4) for f in (False, True)
    ]
    + [((f, s, s), 1 / 8) for f in (False, True) for s in (-1, 1)],
    # airbench shifts, then mirrors: its mirrored views move the other way across
    "6 views: shifts +-1, then mirror, weights 1/4 and 1/8 (airbench)": [
        ((f, 0, 0), 1 / 4) for f in (False, True)
    ]
    + [((False, s, s), 1 / 8) for s in (-1, 1)]
    + [((True, s, -s), 1 / 8) for s in (-1, 1)],
    "6 views, shifts +-1, equal weights": [((f, s, s), 1 / 6) for f in (False, True) for s in (0, -1, 1)],
    "6 views, shifts +-2, equal weights": [((f, s, s), 1 / 6) for f in (False, True) for s in (0, -2, 2)],
    "10 views, shifts +-1 and +-2, equal weights": [
        ((f, s, s), 1 / 10) for f in (False, True) for s in (0, -2, -1, 1, 2)
    ],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+", type=Path, help="Cerberus checkpoints (best.pt)")
    parser.add_argument("--data-dir", required=True, help="folder holding cifar-10-batches-py/")
    args = parser.parse_args()

    from cerberus.data import load_cifar10
    from cerberus.evaluate import prepare_inference

    data = load_cifar10(args.data_dir, download=False, split="test")
    images, labels = data.test_images, data.test_labels
    views = {view for members in VIEW_SETS.values() for view, _ in members}
    for path in args.checkpoints:
        run = prepare_inference(path)
        start = time.perf_counter()
        logits = {}
        for flipped, dy, dx in sorted(views):
            source = images.flip(3) if flipped else images
            logits[flipped, dy, dx] = run.logits(shifted(source, dy, dx) if dy or dx else source)
        seconds = time.perf_counter() - start
        print(f"{path}: {len(views)} views of {len(labels):,} test images in {seconds:.1f}s")
        for name, members in VIEW_SETS.items():
            average = sum(logits[view] * weight for view, weight in members)
            accuracy = (average.argmax(1) == labels).double().mean().item()
            print(f"  {accuracy:7.2%}  {name}")
        library = run.logits(images, tta=True)
        print(f"  {(library.argmax(1) == labels).double().mean().item():7.2%}  cerberus (tta=True)")


if __name__ == "__main__":
    main()
