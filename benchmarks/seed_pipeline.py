"""The seed project's data pipeline and loops, rebuilt as the baseline the benchmarks compare with.

What the seed did (and what this file does, on the same ``cifar-10-batches-py/`` pickles):

* a torchvision.datasets-style ``Dataset``: the batches unpickled into one uint8 (N, 32, 32, 3)
  array at construction, each item turned into a PIL image in ``__getitem__`` and transformed;
* training transforms ``RandomCrop(32, padding=4)``, ``RandomHorizontalFlip()``, ``ToTensor()``,
  ``Normalize(seed mean, seed std)``; evaluation transforms ``ToTensor()`` + ``Normalize``;
* a ``DataLoader`` with 2 worker processes (shuffled batches of 128 for training, batches of 100
  for evaluation), fp32, NCHW, ``SGD(lr=0.01, momentum=0.9, weight_decay=5e-4)``, evaluation
  under ``torch.no_grad()``;
* the seed's ResNet-24 (blocks [3, 5, 3], channels [64, 128, 256]); the layer layout is the one
  ``cerberus.model`` reproduces, so the model is built from there.

Run as a script it does one whole job and prints one JSON line, so that a benchmark can time it
in a subprocess, start-up included::

    python benchmarks/seed_pipeline.py train --data-dir /tmp/cifar10 --train-images 2560 --test-images 1000
    python benchmarks/seed_pipeline.py eval --data-dir /tmp/cifar10 --test-images 2000
"""

from __future__ import annotations

import argparse
import json
import pickle
import resource
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

SEED_MEAN = (0.4914, 0.4822, 0.4465)
SEED_STD = (0.2023, 0.1994, 0.2010)
TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]


class SeedCIFAR10(Dataset):
    """torchvision.datasets.CIFAR10 minus the checksum check (the JPEG-75 mirror fails it)."""

    def __init__(self, root: str | Path, train: bool, transform, limit: int = 0):
        folder = Path(root) / "cifar-10-batches-py"
        data, targets = [], []
        for name in TRAIN_FILES if train else ["test_batch"]:
            with open(folder / name, "rb") as f:
                entry = pickle.load(f, encoding="latin1")
            data.append(entry["data"])
            targets.extend(entry["labels"])
        self.data = np.vstack(data).reshape(-1, 3, 32, 32).transpose((0, 2, 3, 1))  # HWC
        self.targets = targets
        if limit:
            self.data, self.targets = self.data[:limit], self.targets[:limit]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int):
        img = Image.fromarray(self.data[index])
        return self.transform(img), self.targets[index]


def train_transform():
    return transforms.Compose(
        [
            transforms.RandomCrop(32, padding=4),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(SEED_MEAN, SEED_STD),
        ]
    )


def test_transform():
    return transforms.Compose([transforms.ToTensor(), transforms.Normalize(SEED_MEAN, SEED_STD)])


def seed_model(blocks=(3, 5, 3), channels=(64, 128, 256)) -> torch.nn.Module:
    from cerberus.arch import Architecture
    from cerberus.model import build_model

    return build_model(Architecture(blocks=tuple(blocks), channels=tuple(channels)))


def test_loader(root, limit: int = 0, batch_size: int = 100, workers: int = 2) -> DataLoader:
    dataset = SeedCIFAR10(root, train=False, transform=test_transform(), limit=limit)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)


def evaluate(model: torch.nn.Module, loader: DataLoader, device: str = "cpu") -> tuple[float, int]:
    """Accuracy and image count, the seed's way: eval mode, no_grad, NCHW fp32."""
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for inputs, targets in loader:
            inputs, targets = inputs.to(device), targets.to(device)
            outputs = model(inputs)
            correct += (outputs.argmax(1) == targets).sum().item()
            total += targets.size(0)
    return correct / total, total


def train_epoch(model: torch.nn.Module, loader: DataLoader, optimizer, device: str = "cpu") -> dict:
    model.train()
    start, images, loss_sum = time.perf_counter(), 0, 0.0
    for inputs, targets in loader:
        inputs, targets = inputs.to(device), targets.to(device)
        optimizer.zero_grad()
        outputs = model(inputs)
        loss = F.cross_entropy(outputs, targets)
        loss.backward()
        optimizer.step()
        loss_sum += loss.item() * targets.size(0)
        images += targets.size(0)
    seconds = time.perf_counter() - start
    return {"train_loss": loss_sum / images, "train_images": images, "train_images_per_sec": images / seconds}


def peak_rss_mb() -> float:
    """Peak resident set size in megabytes (10^6 bytes; ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6


def train_job(
    root, train_images: int, test_images: int, epochs: int = 1, seed: int = 0, device: str = "cpu"
) -> dict:
    """The seed's training script on a subset: ``epochs`` epochs, then the test set once."""
    torch.manual_seed(seed)
    train_set = SeedCIFAR10(root, train=True, transform=train_transform(), limit=train_images)
    loader = DataLoader(train_set, batch_size=128, shuffle=True, num_workers=2)
    model = seed_model().to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    result: dict = {}
    for _ in range(epochs):
        result = train_epoch(model, loader, optimizer, device)
    result["test_accuracy"], result["test_images"] = evaluate(model, test_loader(root, test_images), device)
    result["peak_rss_mb"] = round(peak_rss_mb(), 1)
    return result


def eval_job(root, test_images: int, seed: int = 0, device: str = "cpu") -> dict:
    torch.manual_seed(seed)
    model = seed_model().to(device)
    start = time.perf_counter()
    accuracy, images = evaluate(model, test_loader(root, test_images), device)
    seconds = time.perf_counter() - start
    return {
        "accuracy": accuracy,
        "images": images,
        "images_per_sec": images / seconds,
        "peak_rss_mb": peak_rss_mb(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("job", choices=["train", "eval"])
    parser.add_argument("--data-dir", required=True, help="folder holding cifar-10-batches-py/")
    parser.add_argument("--train-images", type=int, default=2560, help="first N training images")
    parser.add_argument("--test-images", type=int, default=1000, help="first N test images")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (the seed moved batches with .to)")
    args = parser.parse_args()
    if args.job == "train":
        result = train_job(
            args.data_dir, args.train_images, args.test_images, args.epochs, device=args.device
        )
    else:
        result = eval_job(args.data_dir, args.test_images, device=args.device)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
