"""CIFAR-10 on disk -> uint8 tensors in memory; download; splits; batch order.

* Files: a folder that already holds ``cifar-10-batches-py/`` in the official layout is used as it
  is (no checksums: re-encoded mirrors load too). When it is absent it is downloaded and extracted;
  the MD5 is checked only for the official address. Every problem is one :class:`DataError` that
  names the file, the folder or the URL, and says what to do.
* Memory: all 60,000 images live in memory as uint8 tensors (~180 MB), read once with pickle and
  numpy; nothing is decoded per step and there are no worker processes.
* Order: the batch order is a pure function of ``(seed, epoch, step)`` and the augmentation
  randomness of ``(seed, epoch, step, rank)``, so a run resumed mid-epoch is bitwise identical to
  an uninterrupted one with no generator state to save.
* Augmentation of the batches is in :mod:`cerberus.augment`.
"""

from __future__ import annotations

import hashlib
import http.client
import os
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

from cerberus import safe_pickle
from cerberus.config import DataConfig
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


def _unpickle(path: Path, folder: Path) -> object:
    try:
        with open(path, "rb") as f:
            return safe_pickle.load(f, encoding="latin1")
    except FileNotFoundError:
        raise DataError(
            f"{path} is missing: the CIFAR-10 folder is incomplete. Restore the file, or delete "
            f"{folder} to download it again."
        ) from None
    except OSError as err:
        raise DataError(f"{path}: cannot read the file ({err.strerror or err})") from None
    except safe_pickle.UnsafePickleError as err:
        raise DataError(
            f"{path}: not a CIFAR-10 file: it refers to {err.name}, which could run code, so it was "
            f"not loaded. Delete {folder} to download it again."
        ) from None
    except Exception as err:  # pickle raises many types on a truncated or corrupt stream
        reason = str(err) or type(err).__name__
        raise DataError(
            f"{path}: not a readable CIFAR-10 file, truncated or corrupt ({reason}). Delete {folder} "
            "to download it again."
        ) from None


def _str_keys(obj: object) -> object:
    """A dict's bytes keys (a file pickled from Python 3 with ``b"data"``) as the official str."""
    if isinstance(obj, dict):
        return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}
    return obj


def _read_batch(path: Path, folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """One batch file -> (images uint8 (N, 3, 32, 32) view, labels int64 (N,)), checked."""
    batch = _str_keys(_unpickle(path, folder))
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
    meta = _str_keys(_unpickle(path, folder))
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
    created = [p for p in (root, *root.absolute().parents) if not p.exists()]  # deepest first
    try:
        _download_into(root, folder, url)
    except BaseException:
        for path in created:  # a failed download leaves no empty folders of ours behind
            try:
                path.rmdir()
            except OSError:
                break
        raise


def _download_into(root: Path, folder: Path, url: str) -> None:
    try:
        for attempt in (1, 2):  # twice: another process's failed download may remove a new root
            root.mkdir(parents=True, exist_ok=True)
            try:
                staging = Path(tempfile.mkdtemp(prefix=".cerberus-download-", dir=root))
                break
            except FileNotFoundError:
                if attempt == 2:
                    raise
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


def check_available(root: str | Path, download: bool) -> tuple[Path, Path]:
    """``(root, folder)``: where CIFAR-10 is, or is to be downloaded to (``root`` may be the
    ``cifar-10-batches-py`` folder itself). Raises the :class:`DataError` that loading would,
    without reading anything, when it is not there and ``download`` is off, or when a file
    stands where a folder should."""
    root = Path(root).expanduser()
    folder = root / FOLDER
    if not folder.exists() and (root / META_FILE).is_file():  # pointed at the batches folder itself
        root, folder = root.parent, root
    if not folder.is_dir():
        if root.exists() and not root.is_dir():
            raise DataError(f"{root.absolute()} is a file, not a folder holding {FOLDER}/")
        if folder.exists():
            raise DataError(f"{folder.absolute()} is a file, not the CIFAR-10 folder")
        if not download:
            raise DataError(_not_found(folder))
    return root, folder


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
    root, folder = check_available(root, download)
    if not folder.is_dir():
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


@lru_cache(maxsize=4)  # the current epoch's order is reused by every step of the epoch
def _permutation(n: int, seed: int, epoch: int, device: torch.device | None = None) -> torch.Tensor:
    if device is not None and device.type != "cpu":
        # Copied once per epoch: copying each step's indices from host memory would make the host
        # wait for the device at every step (a synchronising copy).
        return _permutation(n, seed, epoch).to(device)
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
    n: int,
    batch_size: int,
    seed: int,
    epoch: int,
    step: int,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Indices (int64, on ``device``, default the CPU) of global batch ``step`` of ``epoch``, this
    rank's shard of it only; the same values on every device.

    The global batch is split by ``torch.tensor_split`` into ``world_size`` nearly equal parts, so
    the shards of ranks ``0..world_size-1`` concatenate to the global batch. The last batch of an
    epoch may be smaller than ``batch_size``.
    """
    steps = steps_per_epoch(n, batch_size)
    if not 0 <= step < steps:
        raise IndexError(f"step {step} is outside the epoch's {steps} steps")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
    batch = _permutation(n, seed, epoch, device)[step * batch_size : (step + 1) * batch_size]
    return torch.tensor_split(batch, world_size)[rank].clone()


def step_generator(
    seed: int, epoch: int, step: int, device: torch.device | str, rank: int = 0
) -> torch.Generator:
    """A fresh generator on ``device`` for one step's augmentation, seeded from all four numbers."""
    generator = torch.Generator(device=torch.device(device))
    return generator.manual_seed(_derive_seed("augment", seed, epoch, step, rank))
