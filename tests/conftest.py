"""Shared fixtures: a small synthetic CIFAR-10 in the official on-disk layout."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def synthetic_images(n: int, seed: int) -> tuple[np.ndarray, list[int]]:
    """Learnable images: each class has its own colour and stripe orientation, plus noise.

    Returns ``data`` as N x 3072 uint8 rows in CHW order (as CIFAR stores them) and labels.
    """
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    rng.shuffle(labels)
    yy, xx = np.mgrid[0:32, 0:32]
    images = np.empty((n, 3, 32, 32), dtype=np.float32)
    for c in range(10):
        idx = np.flatnonzero(labels == c)
        colour = np.array([(c * 37) % 256, (c * 91) % 256, (c * 53) % 256], dtype=np.float32)
        stripes = np.sin((xx * np.cos(c * 0.3) + yy * np.sin(c * 0.3)) * (0.4 + 0.05 * c)) * 60
        images[idx] = colour[:, None, None] * 0.6 + stripes[None] + 60
    images += rng.normal(0, 25, size=images.shape)
    data = np.clip(images, 0, 255).astype(np.uint8).reshape(n, 3072)
    return data, labels.tolist()


def write_cifar(root: Path, train: int = 500, test: int = 200, seed: int = 0) -> Path:
    """Write ``root/cifar-10-batches-py`` (5 train batches, test batch, meta); return ``root``."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    data, labels = synthetic_images(train + test, seed)
    per_batch = train // 5
    for b in range(5):
        rows = slice(b * per_batch, (b + 1) * per_batch)
        batch = {"batch_label": f"training batch {b + 1} of 5", "data": data[rows], "labels": labels[rows]}
        with open(folder / f"data_batch_{b + 1}", "wb") as f:
            pickle.dump(batch, f, protocol=4)
    test_batch = {"batch_label": "testing batch 1 of 1", "data": data[train:], "labels": labels[train:]}
    with open(folder / "test_batch", "wb") as f:
        pickle.dump(test_batch, f, protocol=4)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": CLASSES, "num_cases_per_batch": per_batch, "num_vis": 3072}, f)
    return root


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tests run tiny models, often beside other processes: a single torch thread is fastest
    and keeps in-process timings and results independent of the machine's core count."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def fake_cifar(tmp_path_factory) -> Path:
    """A synthetic CIFAR-10 folder (500 train, 200 test images) shared by the session."""
    return write_cifar(tmp_path_factory.mktemp("fake-cifar"))


@pytest.fixture
def real_cifar() -> Path:
    """The real CIFAR-10 named by $CERBERUS_DATA; skips the test when none is configured."""
    root = os.environ.get("CERBERUS_DATA")
    if not root or not (Path(root) / "cifar-10-batches-py" / "test_batch").exists():
        pytest.skip("real CIFAR-10 not configured (set CERBERUS_DATA to a prepared folder)")
    return Path(root)


def randomize_batchnorm_(model) -> None:
    """Random BatchNorm scales (negative ones included, so folding is no identity) and statistics."""
    import torch

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(-1.0, 1.0)
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)


def varied_model(arch, inputs, seed: int = 0):
    """A fixed-seed model of ``arch`` in eval mode whose predictions differ across ``inputs``
    (images already normalised).

    A freshly built net predicts one class for every image: its features barely vary and the
    head's bias decides. Here the BatchNorms get random statistics and the head reads each image's
    features relative to their mean over ``inputs``, so its argmax depends on the image and on how
    it was preprocessed.
    """
    import torch

    from cerberus.model import build_model

    torch.manual_seed(seed)
    model = build_model(arch).eval()
    randomize_batchnorm_(model)
    with torch.no_grad():
        features = []
        hook = model.linear.register_forward_hook(lambda _, args, __: features.append(args[0]))
        model(inputs)
        hook.remove()
        mean = features[0].mean(0)
        spread = (features[0] - mean).norm(dim=1).mean()
        weight = torch.randn(model.linear.weight.shape) * 2 / spread
        model.linear.weight.copy_(weight)
        model.linear.bias.copy_(-weight @ mean)
    return model


def normalised(images, mean=None, std=None):
    """uint8 images -> ``(x / 255 - mean) / std``, by hand; the documented CIFAR-10 constants by default."""
    import torch

    from cerberus.config import CIFAR10_MEAN, CIFAR10_STD

    mean_t = torch.tensor(CIFAR10_MEAN if mean is None else mean).view(1, 3, 1, 1)
    std_t = torch.tensor(CIFAR10_STD if std is None else std).view(1, 3, 1, 1)
    return (torch.as_tensor(images).float() / 255 - mean_t) / std_t
