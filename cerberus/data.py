"""CIFAR-10 on disk -> uint8 tensors in memory; download; splits; batch order; batched augmentation.

* Files: a folder that already holds ``cifar-10-batches-py/`` in the official layout is used as it
  is (no checksums: re-encoded mirrors load too). When it is absent it is downloaded and extracted;
  the MD5 is checked only for the official address. Every problem is one :class:`DataError` that
  names the file, the folder or the URL, and says what to do.
* Memory: all 60,000 images live in memory as uint8 tensors (~180 MB), read once with pickle and
  numpy; nothing is decoded per step and there are no worker processes.
* Order: the batch order is a pure function of ``(seed, epoch, step)`` and the augmentation
  randomness of ``(seed, epoch, step, rank)``, so a run resumed mid-epoch is bitwise identical to
  an uninterrupted one with no generator state to save.
* Augmentation runs on whole batches on the training device (crop, flip, rotation, cutout, mixup,
  cutmix) with index arithmetic, no PIL and no per-image Python loop; a disabled option costs nothing.
"""

from __future__ import annotations

import hashlib
import http.client
import math
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.request
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cerberus.config import AugmentConfig, DataConfig
from cerberus.errors import ConfigError, DataError

CLASSES: tuple[str, ...] = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
OFFICIAL_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
OFFICIAL_MD5 = "c58f30108f718f92721af3b95e74349a"

FOLDER = "cifar-10-batches-py"  # what the official archive extracts to
ARCHIVE = "cifar-10-python.tar.gz"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
META_FILE = "batches.meta"
IMAGE_SHAPE = (3, 32, 32)  # (C, H, W); the files store each image as one CHW row of 3072 bytes
_ROW = 3 * 32 * 32

ENV_ROOT = "CERBERUS_DATA"
ENV_URL = "CERBERUS_CIFAR10_URL"


# --------------------------------------------------------------------------------------------
# Where the data lives


def default_data_root() -> Path:
    """The per-user cache folder: ``$XDG_CACHE_HOME/cerberus``, else ``~/.cache/cerberus``."""
    cache = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(cache) if os.path.isabs(cache) else Path.home() / ".cache"  # XDG: relative = unset
    return base / "cerberus"


def resolve_data_root(data_dir: str | Path | None, config_root: str | None) -> Path:
    """The folder that holds (or will hold) ``cifar-10-batches-py/``.

    First of: ``--data-dir``, ``data.root``, ``$CERBERUS_DATA``, :func:`default_data_root`.
    Empty strings count as unset; ``~`` is expanded.
    """
    for candidate in (data_dir, config_root, os.environ.get(ENV_ROOT)):
        if candidate is not None and str(candidate).strip():
            return Path(str(candidate).strip()).expanduser()
    return default_data_root()


def resolve_url(config_url: str | None) -> str:
    """Where to download from: ``data.url``, ``$CERBERUS_CIFAR10_URL``, then :data:`OFFICIAL_URL`."""
    for candidate in (config_url, os.environ.get(ENV_URL)):
        if candidate is not None and candidate.strip():
            return candidate.strip()
    return OFFICIAL_URL


# --------------------------------------------------------------------------------------------
# Reading the official layout


@dataclass(frozen=True, eq=False, repr=False)
class Cifar10:
    """The whole dataset in memory, as loaded (no split, no normalisation)."""

    train_images: torch.Tensor  # uint8 (50000, 3, 32, 32), contiguous, CPU; (0, 3, 32, 32) if not loaded
    train_labels: torch.Tensor  # int64 (50000,), values 0..9
    test_images: torch.Tensor  # uint8 (10000, 3, 32, 32); (0, 3, 32, 32) if not loaded
    test_labels: torch.Tensor  # int64 (10000,)
    classes: tuple[str, ...]  # class names in label order
    root: Path  # the folder that holds cifar-10-batches-py/

    def __repr__(self) -> str:
        return f"Cifar10(train={len(self.train_labels)}, test={len(self.test_labels)}, root={self.root})"


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles the dicts of numpy arrays CIFAR batches hold, and nothing else.

    A pickle can run arbitrary code; mirrors and hand-copied files are not trusted that far.
    """

    _ALLOWED = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),  # written by numpy 1.x (the official files)
            ("numpy._core.multiarray", "_reconstruct"),  # written by numpy 2.x
            ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "scalar"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("_codecs", "encode"),  # bytes in protocol-2 pickles written by Python 3
        }
    )

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"it refers to {module}.{name}, which a CIFAR-10 file never does")
        return super().find_class(module, name)


def _unpickle(path: Path, folder: Path) -> object:
    try:
        with open(path, "rb") as f:
            return _BatchUnpickler(f, encoding="latin1").load()
    except FileNotFoundError:
        raise DataError(
            f"{path} is missing: the CIFAR-10 folder is incomplete. Restore the file, or delete "
            f"{folder} to download it again."
        ) from None
    except OSError as err:
        raise DataError(f"{path}: cannot read the file ({err.strerror or err})") from None
    except Exception as err:  # pickle raises many types on a truncated or corrupt stream
        reason = str(err) or type(err).__name__
        raise DataError(
            f"{path}: not a readable CIFAR-10 file, truncated or corrupt ({reason}). Delete {folder} "
            "to download it again."
        ) from None


def _read_batch(path: Path, folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """One batch file -> (images uint8 (N, 3, 32, 32) view, labels int64 (N,)), checked."""
    batch = _unpickle(path, folder)
    if not isinstance(batch, dict) or not {"data", "labels"} <= batch.keys():
        keys = sorted(map(str, batch)) if isinstance(batch, dict) else type(batch).__name__
        raise DataError(f"{path}: not a CIFAR-10 batch (expected the keys 'data' and 'labels', got {keys})")
    data = batch["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _ROW:
        what = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{path}: 'data' must be uint8 rows of shape (N, {_ROW}), got {what}")
    try:
        labels = np.asarray(batch["labels"], dtype=np.int64)
    except (TypeError, ValueError, OverflowError):
        raise DataError(f"{path}: 'labels' must be a list of integers") from None
    if labels.shape != (len(data),):
        raise DataError(f"{path}: {len(data)} images but 'labels' has shape {labels.shape}")
    if len(labels) and (labels.min() < 0 or labels.max() >= len(CLASSES)):
        bad = labels[(labels < 0) | (labels >= len(CLASSES))][0]
        raise DataError(f"{path}: labels must be in 0..{len(CLASSES) - 1}, found {bad}")
    return data.reshape(-1, *IMAGE_SHAPE), labels


def _read_classes(folder: Path) -> tuple[str, ...]:
    path = folder / META_FILE
    meta = _unpickle(path, folder)
    names = meta.get("label_names") if isinstance(meta, dict) else None
    if not isinstance(names, list):
        raise DataError(f"{path}: not a CIFAR-10 meta file (no 'label_names' list)")
    names = tuple(n.decode("latin1") if isinstance(n, bytes) else str(n) for n in names)
    if names != CLASSES:
        raise DataError(f"{path}: the class names are {list(names)}, not CIFAR-10's {list(CLASSES)}")
    return names


def _read_split(folder: Path, files: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate batch files into one contiguous uint8 (N, 3, 32, 32) tensor and int64 labels."""
    batches = [_read_batch(folder / name, folder) for name in files]  # checks every file first
    total = sum(len(labels) for _, labels in batches)
    images = torch.empty((total, *IMAGE_SHAPE), dtype=torch.uint8)
    labels = torch.empty(total, dtype=torch.int64)
    out_images, out_labels, start = images.numpy(), labels.numpy(), 0
    for batch_images, batch_labels in batches:  # one copy per byte, straight into the tensor
        out_images[start : start + len(batch_labels)] = batch_images
        out_labels[start : start + len(batch_labels)] = batch_labels
        start += len(batch_labels)
    return images, labels


def _empty_split() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty((0, *IMAGE_SHAPE), dtype=torch.uint8), torch.empty(0, dtype=torch.int64)


# --------------------------------------------------------------------------------------------
# Downloading


# What urllib, gzip and tarfile raise for an unreachable URL or a broken archive (URLError is an OSError).
_DOWNLOAD_ERRORS = (OSError, ValueError, EOFError, tarfile.TarError, zlib.error, http.client.HTTPException)


def _is_official(url: str) -> bool:
    return url in (OFFICIAL_URL, OFFICIAL_URL.replace("https://", "http://", 1))


def _as_url(url: str) -> str:
    """A bare path to an existing archive becomes a ``file://`` URL; anything else is kept."""
    if "://" not in url and Path(url).expanduser().is_file():
        return Path(url).expanduser().absolute().as_uri()
    return url


def _describe(err: BaseException) -> str:
    reason = getattr(err, "reason", None)  # urllib.error.URLError
    if getattr(err, "code", None) is not None:  # urllib.error.HTTPError
        return f"HTTP {err.code} {reason or ''}".strip()  # type: ignore[attr-defined]
    if reason is not None:
        return str(getattr(reason, "strerror", None) or reason)
    return str(getattr(err, "strerror", None) or err) or type(err).__name__


def _download(root: Path, url: str) -> None:
    """Download the archive from ``url`` and extract ``cifar-10-batches-py/`` into ``root``.

    The archive is fetched and extracted in a temporary folder inside ``root`` and moved into
    place in one rename, so an interrupted download never leaves a partial dataset behind.
    """
    folder = root / FOLDER
    try:
        root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".cerberus-download-", dir=root))
    except OSError as err:
        raise DataError(f"cannot create the data folder {root.absolute()} ({err.strerror or err})") from None
    try:
        from torchvision.datasets.utils import download_url

        md5 = OFFICIAL_MD5 if _is_official(url) else None  # mirrors re-encode: other sums
        try:
            if url.lower().startswith(("http://", "https://")):
                download_url(url, str(staging), filename=ARCHIVE, md5=md5)  # progress bar, MD5 check
            else:
                _fetch(url, staging / ARCHIVE)
            _extract(staging / ARCHIVE, staging)
        except RuntimeError as err:
            if md5 is not None and "corrupted" in str(err):
                raise DataError(
                    f"downloaded {url}, but its MD5 is not the official {OFFICIAL_MD5} (an interrupted or "
                    "altered download). Try again, or use a mirror (data.url or $CERBERUS_CIFAR10_URL)."
                ) from None
            raise DataError(_download_failed(url, folder, _describe(err))) from None
        except _DOWNLOAD_ERRORS as err:
            raise DataError(_download_failed(url, folder, _describe(err))) from None
        extracted = staging / FOLDER
        if not extracted.is_dir():
            raise DataError(
                f"{url}: the archive holds no {FOLDER}/ folder, so it is not cifar-10-python.tar.gz. "
                "Check data.url / $CERBERUS_CIFAR10_URL."
            )
        try:
            extracted.rename(folder)
        except OSError as err:
            if not folder.is_dir():  # else another process finished the same download first
                raise DataError(f"cannot move the downloaded files into {folder} ({err.strerror})") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _extract(archive: Path, folder: Path) -> None:
    """Unpack a .tar.gz into ``folder``, refusing members that would land outside it.

    tarfile's ``"data"`` filter rejects absolute paths, ``..``, links out of the folder and
    special files, so a hostile mirror cannot write elsewhere on the disk.
    """
    with tarfile.open(archive, "r:gz") as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(folder, filter="data")
        else:  # Python < 3.10.12 has no extraction filters: check the members by hand
            base = folder.resolve()
            for member in tar.getmembers():
                inside = (folder / member.name).resolve().is_relative_to(base)
                if not inside or not (member.isfile() or member.isdir()):
                    raise tarfile.TarError(f"unsafe archive member {member.name!r}")
            tar.extractall(folder)
    archive.unlink()


def _fetch(url: str, path: Path) -> None:
    """Copy a ``file://`` (or ``ftp://``) URL to ``path`` with urllib.

    torchvision's downloader reads the HTTP Content-Length (``response.length``), which these
    responses lack (AttributeError in torchvision 0.29), so they are fetched here instead.
    """
    with urllib.request.urlopen(url) as response, open(path, "wb") as out:
        shutil.copyfileobj(response, out, 1 << 20)


def _download_failed(url: str, folder: Path, reason: str) -> str:
    return (
        f"could not download CIFAR-10 from {url} ({reason}).\n"
        "Point at a mirror or a local copy of cifar-10-python.tar.gz with data.url in the config or "
        f"the environment variable {ENV_URL} (file:///path/to/cifar-10-python.tar.gz works), or "
        f"put the extracted files (data_batch_1..5, test_batch, batches.meta) by hand in {folder.absolute()}/"
    )


def _not_found(folder: Path) -> str:
    return (
        f"CIFAR-10 not found: {folder.absolute()}/ does not exist and downloading is off "
        "(data.download = false).\n"
        f"Put the extracted {FOLDER}/ folder (data_batch_1..5, test_batch, batches.meta) in "
        f"{folder.parent.absolute()}/, point --data-dir, data.root or ${ENV_ROOT} at a folder that holds "
        f"it, or turn data.download on (data.url or ${ENV_URL} select a mirror)."
    )


# --------------------------------------------------------------------------------------------
# Loading


def load_cifar10(
    root: str | Path, *, download: bool = True, url: str | None = None, split: str = "all"
) -> Cifar10:
    """Load CIFAR-10 from ``root/cifar-10-batches-py/``, downloading it first if it is absent.

    ``root`` may also be the ``cifar-10-batches-py`` folder itself. ``url`` defaults to
    :func:`resolve_url` of nothing (``$CERBERUS_CIFAR10_URL``, then the official address).
    ``split``: ``"all"``, ``"train"`` or ``"test"``; the split not asked for is not read and its
    tensors are empty ``(0, 3, 32, 32)``. Raises :class:`DataError` for anything missing, corrupt
    or not downloadable.
    """
    if split not in ("all", "train", "test"):
        raise ValueError(f"split must be 'all', 'train' or 'test', got {split!r}")
    root = Path(root).expanduser()
    folder = root / FOLDER
    if not folder.exists() and (root / META_FILE).is_file():  # pointed at the batches folder itself
        root, folder = root.parent, root
    if not folder.is_dir():
        if folder.exists():
            raise DataError(f"{folder.absolute()} is a file, not the CIFAR-10 folder")
        if not download:
            raise DataError(_not_found(folder))
        _download(root, _as_url(resolve_url(url)))

    classes = _read_classes(folder)
    train = _read_split(folder, TRAIN_FILES) if split in ("all", "train") else _empty_split()
    test = _read_split(folder, [TEST_FILE]) if split in ("all", "test") else _empty_split()
    return Cifar10(train[0], train[1], test[0], test[1], classes, root)


# --------------------------------------------------------------------------------------------
# Splits


@dataclass(frozen=True, eq=False, repr=False)
class Splits:
    """Train / validation / test images as CPU tensors: uint8 (N, 3, 32, 32) and int64 (N,)."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    val_images: torch.Tensor
    val_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor

    def __repr__(self) -> str:
        sizes = (len(self.train_labels), len(self.val_labels), len(self.test_labels))
        return "Splits(train={}, val={}, test={})".format(*sizes)


def stratified_split(labels: torch.Tensor, val_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Hold out ``val_size`` of ``labels`` (int (N,)) with each class represented in proportion.

    Class ``c`` with ``n_c`` of the ``N`` labels gets ``floor(val_size * n_c / N)`` validation
    images; the remaining few go one each to the classes with the largest fractional parts (ties:
    the smaller label first). Which images of a class are chosen comes from a generator seeded
    with ``seed`` (never the global RNG). Returns ``(train_idx, val_idx)``, int64, sorted ascending,
    disjoint, together ``range(N)``.
    """
    labels = torch.as_tensor(labels).reshape(-1).cpu()
    n = len(labels)
    if not 0 <= val_size <= n:
        raise ValueError(f"val_size must be in 0..{n}, got {val_size}")
    classes, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    # Largest-remainder apportionment in exact integer arithmetic.
    quota = counts * val_size // max(n, 1)
    remainder = counts * val_size % max(n, 1)
    leftover = val_size - int(quota.sum())
    order = sorted(range(len(classes)), key=lambda c: (-int(remainder[c]), c))
    quota[order[:leftover]] += 1

    # Shuffle once, group by class keeping the shuffled order, take the first quota[c] of class c.
    generator = torch.Generator().manual_seed(_derive_seed("split", seed))  # any int seed works
    shuffled = torch.randperm(n, generator=generator)
    grouped = shuffled[torch.argsort(inverse[shuffled], stable=True)]  # (N,) by class, random within
    starts = torch.cumsum(counts, 0) - counts  # (K,) first position of each class in `grouped`
    group = inverse[grouped]
    rank_in_class = torch.arange(n) - starts[group]
    in_val = torch.zeros(n, dtype=torch.bool)
    in_val[grouped[rank_in_class < quota[group]]] = True
    return torch.nonzero(~in_val).flatten(), torch.nonzero(in_val).flatten()


def make_splits(data: Cifar10, cfg: DataConfig) -> Splits:
    """Apply ``data.train_subset``, then hold out ``data.val_size`` (stratified), and ``test_subset``.

    The validation images are drawn from the first ``train_subset`` training images only (seed
    ``data.split_seed``); the rest train. If the training split was not loaded (``split="test"``)
    the train and validation tensors are empty and nothing is checked about them.
    """
    train_images, train_labels = data.train_images, data.train_labels
    val_images, val_labels = _empty_split()
    if len(train_labels):
        available = len(train_labels)
        if cfg.train_subset > available:
            raise ConfigError(
                f"data.train_subset ({cfg.train_subset}) is larger than the {available} training images"
            )
        if cfg.train_subset:
            train_images, train_labels = train_images[: cfg.train_subset], train_labels[: cfg.train_subset]
        if cfg.val_size >= len(train_labels):
            where = " (after data.train_subset)" if cfg.train_subset else ""
            raise ConfigError(
                f"data.val_size ({cfg.val_size}) must be smaller than the {len(train_labels)} training "
                f"images{where}: nothing would be left to train on"
            )
        if cfg.val_size:
            train_idx, val_idx = stratified_split(train_labels, cfg.val_size, cfg.split_seed)
            val_images, val_labels = train_images.index_select(0, val_idx), train_labels[val_idx]
            train_images, train_labels = train_images.index_select(0, train_idx), train_labels[train_idx]

    test_images, test_labels = data.test_images, data.test_labels
    if cfg.test_subset and len(test_labels):
        if cfg.test_subset > len(test_labels):
            raise ConfigError(
                f"data.test_subset ({cfg.test_subset}) is larger than the {len(test_labels)} test images"
            )
        test_images, test_labels = test_images[: cfg.test_subset], test_labels[: cfg.test_subset]
    return Splits(train_images, train_labels, val_images, val_labels, test_images, test_labels)


# --------------------------------------------------------------------------------------------
# Batch order: pure functions of (seed, epoch, step)


def _derive_seed(*parts: object) -> int:
    """A 63-bit seed from a tuple of ints and tags; nearby inputs give unrelated seeds."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@lru_cache(maxsize=2)  # the current epoch's order is reused by every step of the epoch
def _permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(_derive_seed("order", seed, epoch))
    return torch.randperm(n, generator=generator)


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of the ``n`` training images in ``epoch``: an int64 CPU permutation of range(n)."""
    return _permutation(n, seed, epoch).clone()


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Batches in one epoch of ``n`` images: ``ceil(n / batch_size)``; the last partial one is kept."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    return -(-n // batch_size)


def batch_indices(
    n: int, batch_size: int, seed: int, epoch: int, step: int, rank: int = 0, world_size: int = 1
) -> torch.Tensor:
    """Indices (int64, CPU) of global batch ``step`` of ``epoch``, this rank's shard of it only.

    The global batch is split by ``torch.tensor_split`` into ``world_size`` nearly equal parts, so
    the shards of ranks ``0..world_size-1`` concatenate to the global batch. The last batch of an
    epoch may be smaller than ``batch_size``.
    """
    steps = steps_per_epoch(n, batch_size)
    if not 0 <= step < steps:
        raise IndexError(f"step {step} is outside the epoch's {steps} steps")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
    batch = _permutation(n, seed, epoch)[step * batch_size : (step + 1) * batch_size]
    return torch.tensor_split(batch, world_size)[rank].clone()


def step_generator(
    seed: int, epoch: int, step: int, device: torch.device | str, rank: int = 0
) -> torch.Generator:
    """A fresh generator on ``device`` for one step's augmentation, seeded from all four numbers."""
    generator = torch.Generator(device=torch.device(device))
    return generator.manual_seed(_derive_seed("augment", seed, epoch, step, rank))


# --------------------------------------------------------------------------------------------
# Augmentation on batches of tensors, on the training device


def _check_images(images: torch.Tensor) -> None:
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected uint8 images (B, 3, H, W), got {images.dtype} {tuple(images.shape)}")


def _affine(mean: Sequence[float], std: Sequence[float], device: torch.device) -> tuple[torch.Tensor, ...]:
    """(x/255 - mean)/std as x*scale + shift: float32 (3, 1, 1) scale and shift on ``device``."""
    if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
        raise ValueError(f"mean and std need 3 entries each, std positive; got {mean}, {std}")
    return _affine_cached(tuple(map(float, mean)), tuple(map(float, std)), device)


@lru_cache(maxsize=16)  # built once per device, not per batch (a host-to-device copy on GPUs)
def _affine_cached(
    mean: tuple[float, ...], std: tuple[float, ...], device: torch.device
) -> tuple[torch.Tensor, ...]:
    scale = [1.0 / (255.0 * s) for s in std]
    shift = [-m / s for m, s in zip(mean, std)]
    with torch.inference_mode(False):  # cached: must also serve calls outside inference mode
        return tuple(torch.tensor(v, dtype=torch.float32).view(3, 1, 1).to(device) for v in (scale, shift))


def _normalize_(
    x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """In place on a float32 tensor we own, then cast: pixel values 0..255 -> normalised."""
    return x.mul_(scale).add_(shift).to(dtype)


def normalize(
    images: torch.Tensor, mean: Sequence[float], std: Sequence[float], *, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """uint8 (B, 3, H, W) on any device -> ``dtype`` ``(images/255 - mean)/std``, same device.

    ``mean`` and ``std`` are per channel, in units of the 0..1 pixel range. Computed in float32.
    """
    _check_images(images)
    scale, shift = _affine(mean, std, images.device)
    return _normalize_(images.to(torch.float32), scale, shift, dtype)


def _crop_flip(
    images: torch.Tensor, padding: int, mode: str, flip: bool, generator: torch.Generator
) -> torch.Tensor:
    """Random (H, W) window of the padded batch, optionally mirrored: one gather, uint8 in and out.

    Per image, offsets ``dy, dx`` in ``0..2*padding`` pick the window; output pixel ``(i, j)`` is
    padded pixel ``(i + dy, j + dx)``, or ``(i + dy, W-1-j + dx)`` when the image is flipped.
    """
    b, c, h, w = images.shape
    device = images.device
    rows = torch.arange(h, device=device).expand(b, h)  # (B, H) in padded coordinates
    cols = torch.arange(w, device=device).expand(b, w)  # (B, W)
    if padding:
        offsets = torch.randint(0, 2 * padding + 1, (2, b, 1), generator=generator, device=device)
        rows, cols = rows + offsets[0], cols + offsets[1]
    if flip:  # reversing j + dx along j gives W-1-j + dx
        mirrored = torch.rand(b, 1, generator=generator, device=device) < 0.5
        cols = torch.where(mirrored, cols.flip(1), cols)
    source = images
    if padding and mode == "zero":
        source = F.pad(images, (padding, padding, padding, padding))  # black pixels, as RandomCrop
    elif padding:  # reflect: map padded coordinates back into the image, no padded copy needed
        rows, cols = _reflect(rows - padding, h), _reflect(cols - padding, w)
    width = source.shape[3]
    index = (rows[:, :, None] * width + cols[:, None, :]).view(b, 1, h * w).expand(b, c, h * w)
    return source.reshape(b, c, -1).gather(2, index).view(b, c, h, w)


def _reflect(coords: torch.Tensor, size: int) -> torch.Tensor:
    """Reflect out-of-range coordinates like ``F.pad(mode='reflect')`` (edge not repeated)."""
    coords = coords.abs()
    return torch.where(coords >= size, 2 * (size - 1) - coords, coords)


def _rotate(x: torch.Tensor, degrees: float, generator: torch.Generator) -> torch.Tensor:
    """Rotate each image of float (B, C, H, W) by U(-degrees, degrees); bilinear, zero fill.

    The sampling grid is what ``F.affine_grid`` gives for a pure rotation (pixel centres,
    ``align_corners=False``), built with broadcasting, which is several times faster on the CPU.
    """
    b, _, h, w = x.shape
    device = x.device
    angle = (torch.rand(b, 1, 1, generator=generator, device=device) * 2 - 1) * math.radians(degrees)
    cos, sin = angle.cos(), angle.sin()  # (B, 1, 1)
    xs = (torch.arange(w, device=device, dtype=x.dtype) * 2 + 1) / w - 1  # (W,) in [-1, 1]
    ys = ((torch.arange(h, device=device, dtype=x.dtype) * 2 + 1) / h - 1)[:, None]  # (H, 1)
    grid = torch.stack([cos * xs - sin * ys, sin * xs + cos * ys], dim=-1)  # (B, H, W, 2) as (x, y)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _cutout_(x: torch.Tensor, size: int, holes: int, generator: torch.Generator) -> torch.Tensor:
    """Zero ``holes`` squares of side ``size`` per image, centres anywhere, clipped at the borders."""
    b, _, h, w = x.shape
    device = x.device
    centre_y = torch.randint(0, h, (b, holes, 1), generator=generator, device=device)
    centre_x = torch.randint(0, w, (b, holes, 1), generator=generator, device=device)
    top, left = centre_y - size // 2, centre_x - size // 2
    ys, xs = torch.arange(h, device=device), torch.arange(w, device=device)
    in_rows = ((ys >= top) & (ys < top + size)).to(x.dtype)  # (B, holes, H)
    in_cols = ((xs >= left) & (xs < left + size)).to(x.dtype)  # (B, holes, W)
    # (B, H, W) number of holes covering each pixel: a batched outer product, far cheaper on the
    # CPU than building (B, holes, H, W) booleans; multiplying beats masked_fill_ too.
    covered = torch.matmul(in_rows.transpose(1, 2), in_cols)
    return x.mul_(1 - covered.clamp_(max=1).unsqueeze(1))


def _sample_beta(alpha: float, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """A 0-d float32 sample of Beta(alpha, alpha) on ``device`` (a Dirichlet of two)."""
    concentration = torch.full((2,), float(alpha), dtype=torch.float32, device=device)
    lam = torch._sample_dirichlet(concentration, generator=generator)[0]
    return torch.nan_to_num(lam, nan=0.5).clamp(0.0, 1.0)  # guards against 0/0 for tiny alpha


def _cutmix_box(
    lam: torch.Tensor, h: int, w: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """CutMix box (Yun et al., 2019) of area ~(1 - lam) * H * W at a uniform centre, clipped.

    Returns the (H, W) bool mask of the pasted box and lambda corrected to the box's actual area.
    Computed with tensors on the device (no host sync).
    """
    device = lam.device
    ratio = torch.sqrt(1.0 - lam)
    cut_h, cut_w = (h * ratio).floor().long(), (w * ratio).floor().long()
    centre_y = torch.randint(0, h, (), generator=generator, device=device)
    centre_x = torch.randint(0, w, (), generator=generator, device=device)
    top, left = centre_y - cut_h // 2, centre_x - cut_w // 2
    y0, y1 = top.clamp(0, h), (top + cut_h).clamp(0, h)
    x0, x1 = left.clamp(0, w), (left + cut_w).clamp(0, w)
    ys, xs = torch.arange(h, device=device), torch.arange(w, device=device)
    box = ((ys >= y0) & (ys < y1))[:, None] & ((xs >= x0) & (xs < x1))[None, :]
    area = (y1 - y0) * (x1 - x0)
    return box, 1.0 - area.float() / (h * w)


class Augmenter:
    """Training augmentation of a batch on its device: uint8 images -> normalised floats, targets.

    Order: random crop (zero or reflect padding) and horizontal flip, rotation, normalisation,
    cutout (holes set to 0 after normalisation), then mixup or cutmix on the whole batch. All
    randomness comes from the generator passed in, so a batch is a pure function of its images,
    labels and the generator's seed. ``mixes`` says whether the targets are probabilities.
    """

    def __init__(
        self, cfg: AugmentConfig, mean: Sequence[float], std: Sequence[float], num_classes: int = 10
    ) -> None:
        self.cfg = cfg
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.num_classes = num_classes
        _affine(self.mean, self.std, torch.device("cpu"))  # validate now, not at the first step
        self.mixes = cfg.mixup_alpha > 0 or cfg.cutmix_alpha > 0  # targets are probabilities

    def __call__(
        self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 (B, 3, H, W) and int64 (B,) on the device -> float32 (B, 3, H, W) and targets.

        Targets are the labels (int64 (B,)) unless mixup or cutmix is configured; then they are
        float32 (B, num_classes) probabilities for every batch, mixed or not.
        """
        _check_images(images)
        if generator.device.type != images.device.type:
            raise ValueError(f"the generator is on {generator.device}, the images on {images.device}")
        cfg = self.cfg
        if cfg.crop_padding or cfg.flip:
            images = _crop_flip(images, cfg.crop_padding, cfg.crop_mode, cfg.flip, generator)
        x = images.to(torch.float32)
        if cfg.rotation:
            x = _rotate(x, cfg.rotation, generator)
        scale, shift = _affine(self.mean, self.std, images.device)
        x = _normalize_(x, scale, shift, torch.float32)
        if cfg.cutout_size:
            x = _cutout_(x, cfg.cutout_size, cfg.cutout_holes, generator)
        if not self.mixes:
            return x, labels
        return self._mix(x, labels, generator)

    def _mix(
        self, x: torch.Tensor, labels: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mixup or cutmix with a shuffled copy of the batch, without syncing with the host.

        Both are ``lerp(x[perm], x, weight)``: weight = lambda everywhere for mixup, 0 inside the
        pasted box and 1 outside for cutmix, 1 for a batch the ``mix_prob`` coin leaves alone
        (``lerp`` is exact at 0 and 1). Targets are mixed with the same (area-corrected) lambda.
        """
        cfg = self.cfg
        b, _, h, w = x.shape
        device = x.device
        perm = torch.randperm(b, generator=generator, device=device)
        if cfg.mixup_alpha > 0:
            mixup_lam = _sample_beta(cfg.mixup_alpha, generator, device)
            weight, lam = mixup_lam, mixup_lam
        if cfg.cutmix_alpha > 0:
            box, cutmix_lam = _cutmix_box(_sample_beta(cfg.cutmix_alpha, generator, device), h, w, generator)
            box_weight = (~box).to(x.dtype)  # (H, W): 1 keeps the image, 0 takes the partner's pixel
            if cfg.mixup_alpha > 0:  # one of the two per batch, with equal probability
                use_cutmix = torch.rand((), generator=generator, device=device) < 0.5
                weight = torch.where(use_cutmix, box_weight, mixup_lam)
                lam = torch.where(use_cutmix, cutmix_lam, mixup_lam)
            else:
                weight, lam = box_weight, cutmix_lam
        if cfg.mix_prob < 1:
            mixed = torch.rand((), generator=generator, device=device) < cfg.mix_prob
            weight = torch.where(mixed, weight, 1.0)
            lam = torch.where(mixed, lam, 1.0)
        one_hot = torch.zeros(b, self.num_classes, dtype=x.dtype, device=device)
        one_hot.scatter_(1, labels.view(b, 1), 1.0)  # no host sync, unlike a range-checked one_hot
        return torch.lerp(x[perm], x, weight), torch.lerp(one_hot[perm], one_hot, lam)
