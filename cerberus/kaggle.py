"""The course's Kaggle test file (unlabeled images) in, a submission CSV out.

The file is a pickle of a dict with ``b"data"`` (or ``"data"``) and usually ``b"ids"``:

* ``cifar_test_nolabels.pkl`` (2024): ``data`` is N x 3072 uint8 rows in CIFAR's channel-major
  order (1024 red, 1024 green, 1024 blue values; layout ``chw``);
* ``cifar_test_nolabel.pkl`` (2025): ``data`` is N x 32 x 32 x 3 (channels last; layout ``hwc``).

The layout is detected from the shape; ``layout=`` overrides it (each image's 3072 values are
then read in that order). The file is read through a restricted unpickler that rebuilds numpy
arrays and plain data only, so a malicious file cannot run code. A ``.npy`` file of the images
alone is read too (``numpy.load`` without pickles).
"""

from __future__ import annotations

import csv
import io
import os
import pickle
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cerberus import safe_pickle
from cerberus.checkpoint import sidecar_path
from cerberus.data import CLASSES
from cerberus.errors import CerberusError, CheckpointError, ConfigError, DataError
from cerberus.files import atomic_write, atomic_write_all, check_can_write

LAYOUTS = ("chw", "hwc")
IMAGE_VALUES = 3 * 32 * 32


def _entry(payload: dict, key: str) -> Any:
    for candidate in (key.encode(), key):
        if candidate in payload:
            return payload[candidate]
    return None


def _key_names(payload: dict) -> str:
    names = [k.decode(errors="replace") if isinstance(k, bytes) else str(k) for k in payload]
    return ", ".join(repr(n) for n in names[:8]) or "none"


NPY_MAGIC = b"\x93NUMPY"  # what every .npy file starts with


def _read_pickle(path: Path) -> Any:
    """The pickle's contents; a ``.npy`` file (by its first bytes) gives its array."""
    try:
        with open(path, "rb") as file:
            if file.read(len(NPY_MAGIC)) == NPY_MAGIC:
                file.seek(0)
                return _read_npy(file, path)
            file.seek(0)
            return safe_pickle.load(file, encoding="bytes")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"{path} is a folder, not a pickle file") from None
    except OSError as err:
        raise DataError(f"cannot read {path}: {err.strerror or err}") from None
    except safe_pickle.UnsafePickleError as err:
        raise DataError(
            f"{path} holds Python objects other than numpy arrays ({err.name}); it was not loaded "
            "because that could run arbitrary code"
        ) from None
    except pickle.UnpicklingError as err:
        raise DataError(f"{path} is not a pickle file, or is corrupt ({err})") from None
    except EOFError:
        raise DataError(f"{path} is empty or truncated") from None
    except Exception as err:  # malformed pickles raise a zoo of types
        raise DataError(f"{path} is not a pickle file, or is corrupt ({type(err).__name__}: {err})") from None


def _read_npy(file, path: Path) -> np.ndarray:
    try:
        return np.load(file, allow_pickle=False)  # no object arrays: nothing to run
    except ValueError as err:
        raise DataError(f"{path}: a .npy file that is not an array of numbers ({err})") from None


def _check_layout(layout: str | None) -> None:
    if layout is not None and layout not in LAYOUTS:
        detail = f"choose {' or '.join(LAYOUTS)}, got {layout!r}"
        raise ConfigError(f"layout: {detail}", field="layout", detail=detail)


def _images_from(data: Any, path: Path, layout: str | None, name: str = "'data'") -> tuple[torch.Tensor, str]:
    if not isinstance(data, np.ndarray):
        raise DataError(f"{path}: {name} is a {type(data).__name__}, expected a numpy array of pixels")
    if data.dtype != np.uint8:
        integral = np.issubdtype(data.dtype, np.integer)
        if not (integral and data.size and data.min() >= 0 and data.max() <= 255):
            raise DataError(f"{path}: {name} has dtype {data.dtype}; expected uint8 pixel values 0-255")
        data = data.astype(np.uint8)
    shape = tuple(data.shape)
    if len(shape) == 2 and shape[1] == IMAGE_VALUES:
        detected = "chw"
    elif len(shape) == 4 and shape[1:] == (32, 32, 3):
        detected = "hwc"
    elif len(shape) == 4 and shape[1:] == (3, 32, 32):
        detected = "chw"
    else:
        raise DataError(
            f"{path}: {name} has shape {list(shape)}; expected N x 3072 (channel-major rows) "
            "or N x 32 x 32 x 3 (channels last)"
        )
    _check_layout(layout)
    layout = layout or detected
    n = shape[0]
    if n == 0:
        raise DataError(f"{path} holds no images")
    rows = np.ascontiguousarray(data).reshape(n, IMAGE_VALUES)
    if layout == "chw":
        images = rows.reshape(n, 3, 32, 32)
    else:
        images = rows.reshape(n, 32, 32, 3).transpose(0, 3, 1, 2)
    return torch.from_numpy(np.ascontiguousarray(images)), layout


def _ids_from(ids: Any, n: int, path: Path) -> list:
    if ids is None:
        return list(range(n))
    if isinstance(ids, np.ndarray):
        if ids.ndim != 1:
            raise DataError(f"{path}: 'ids' has shape {list(ids.shape)}; expected one id per image")
        ids = ids.tolist()
    if not isinstance(ids, (list, tuple)):
        raise DataError(f"{path}: 'ids' is a {type(ids).__name__}, expected a list or array")
    # numpy scalars (a list of np.int64, np.str_) become plain ints and strings
    ids = [i.decode() if isinstance(i, bytes) else i.item() if isinstance(i, np.generic) else i for i in ids]
    if any(not isinstance(i, (int, str)) or isinstance(i, bool) for i in ids):
        raise DataError(f"{path}: 'ids' must be integers or strings")
    if len(ids) != n:
        raise DataError(f"{path} has {len(ids)} ids but {n} images")
    # A submission needs one row per image, or Kaggle rejects it. Compare ids as the CSV writes
    # them: 1 and '1' are both written as 1.
    seen: dict[str, int | str] = {}
    for i in ids:
        text = str(i)
        if text in seen:
            first = seen[text]
            given = f" (given as {first!r} and {i!r})" if first != i else ""
            raise DataError(f"{path}: id {text} appears more than once{given}; every image needs its own id")
        seen[text] = i
    return ids


def read_unlabeled(path: Path, layout: str | None = None) -> tuple[list, torch.Tensor]:
    """``(ids, images)`` from a Kaggle test pickle; images are uint8 (N, 3, 32, 32).

    The file holds a dict with the images under ``data`` (``b'data'``) and optionally their ids
    under ``ids``, or the images' array alone. ``ids`` default to ``0..N-1`` when the file has
    none. Raises :class:`DataError` naming the
    problem for anything else: not a pickle, missing ``data``, wrong shape or dtype, ids and
    images of different lengths, or an id given twice.
    """
    ids, images, _ = _read_unlabeled(Path(path), layout)
    return ids, images


def _read_unlabeled(path: Path, layout: str | None) -> tuple[list, torch.Tensor, str]:
    payload = _read_pickle(path)
    if isinstance(payload, np.ndarray):  # the images alone: ids 0..N-1
        images, layout = _images_from(payload, path, layout, name="the array it holds")
        return list(range(images.shape[0])), images, layout
    if not isinstance(payload, dict):
        raise DataError(
            f"{path} holds a {type(payload).__name__}; expected a dict with 'data' (and optionally "
            "'ids'), or an array of images"
        )
    data = _entry(payload, "data")
    if data is None:
        raise DataError(f"{path} has no 'data' entry (found keys: {_key_names(payload)})")
    images, layout = _images_from(data, path, layout)
    ids = _ids_from(_entry(payload, "ids"), images.shape[0], path)
    return ids, images, layout


# --------------------------------------------------------------------------------------------
# Output files


def _is_binary(path: Path) -> bool:
    """Whether ``path`` starts with a NUL byte within 8 KiB, as no CSV does (a checkpoint does)."""
    try:
        with open(path, "rb") as file:
            return b"\0" in file.read(8192)
    except OSError:  # unreadable: writing it will say why
        return False


def _check_output(path: Path) -> None:
    """Refuse an output path whose folder is missing or read-only, or that would overwrite a file
    that is not a CSV (a checkpoint, say), before any work is done."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path} is a folder; give a file name for the CSV")
    if path.is_file() and _is_binary(path):
        raise ConfigError(f"{path} holds binary data (a checkpoint?), not a CSV; give another file name")
    problem = check_can_write(path)  # where it lands: a link's target, a device as it is
    if problem is not None:
        raise CerberusError(f"cannot write {path}: {problem}")


def _check_distinct(files: dict[str, Path | None]) -> None:
    """Refuse two options (``{"--input": path, ...}``) naming one file: one would overwrite the other."""
    given = [(flag, Path(path)) for flag, path in files.items() if path is not None]
    for n, (flag_a, a) in enumerate(given):
        for flag_b, b in given[n + 1 :]:
            resolved = a.resolve()
            if resolved == b.resolve():
                raise ConfigError(f"{flag_a} and {flag_b} both name {resolved}; give each its own file")
            if a.exists() and b.exists() and os.path.samefile(a, b):  # hard links
                raise ConfigError(
                    f"{flag_a} and {flag_b} name the same file ({resolved} and {b.resolve()}); "
                    "give each its own file"
                )


def _csv_text(header: Sequence[str], rows) -> str:
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return text.getvalue()


def submission_csv(ids: Sequence, labels: Sequence[int] | torch.Tensor) -> str:
    """``ID,Labels`` rows, one per image, label = class index."""
    labels = torch.as_tensor(labels).tolist()
    if len(ids) != len(labels):
        raise DataError(f"{len(ids)} ids but {len(labels)} labels")
    return _csv_text(("ID", "Labels"), zip(ids, labels))


def probabilities_csv(ids: Sequence, probs: torch.Tensor, classes: Sequence[str]) -> str:
    """``ID,<class>...`` rows of class probabilities (6 decimals), one per image."""
    probs = torch.as_tensor(probs, dtype=torch.float64)
    if probs.dim() != 2 or probs.shape != (len(ids), len(classes)):
        expected = f"({len(ids)}, {len(classes)})"
        raise DataError(f"probabilities have shape {list(probs.shape)}; expected {expected}")
    return _csv_text(
        ("ID", *classes), ([i, *(f"{p:.6f}" for p in row)] for i, row in zip(ids, probs.tolist()))
    )


def write_submission(path: Path, ids: Sequence, labels: Sequence[int] | torch.Tensor) -> None:
    """Write :func:`submission_csv` to ``path`` (atomic)."""
    atomic_write(Path(path), submission_csv(ids, labels))


def write_probabilities(path: Path, ids: Sequence, probs: torch.Tensor, classes: Sequence[str]) -> None:
    """Write :func:`probabilities_csv` to ``path`` (atomic)."""
    atomic_write(Path(path), probabilities_csv(ids, probs, classes))


# --------------------------------------------------------------------------------------------
# The whole prediction


def predict_unlabeled(
    checkpoint: Path,
    input_path: Path,
    output: Path,
    *,
    layout: str | None = None,
    probs_path: Path | None = None,
    tta: bool | None = None,
    use_ema: bool = True,
    trust_pickle: bool = False,
    overrides: dict[str, Any] | None = None,
    device: str | None = None,
    precision: str | None = None,
    batch_size: int | None = None,
    progress=None,
) -> dict[str, Any]:
    """Predict every image of a Kaggle test file and write the submission (and probabilities).

    Weights, normalisation, placement, test-time augmentation (``tta=None``) and ``overrides``
    (plain state_dicts) follow :func:`cerberus.evaluate.evaluate_checkpoint`: the checkpoint's
    own config for Cerberus checkpoints, the seed's constants otherwise. Cheap checks come
    first: the three files must be distinct, the model is loaded and verified (ten outputs, one
    per CIFAR-10 class) and the output folders checked before the input is read, and all of that
    before inference.
    """
    from cerberus.evaluate import TTA_VIEWS, prepare_inference, run_tta

    _check_layout(layout)
    _check_distinct(
        {
            "the checkpoint": checkpoint,
            "the checkpoint's checksum file": sidecar_path(Path(checkpoint)),
            "--input": input_path,
            "--output": output,
            "--probs": probs_path,
        }
    )
    run = prepare_inference(
        checkpoint,
        trust_pickle=trust_pickle,
        use_ema=use_ema,
        overrides=overrides,
        device=device,
        precision=precision,
        batch_size=batch_size,
    )
    num_classes = run.info["architecture"]["num_classes"]
    if num_classes != len(CLASSES):  # labels past 9 would make a submission Kaggle cannot score
        raise CheckpointError(
            f"{checkpoint}: the model has {num_classes} outputs but the dataset has {len(CLASSES)} classes"
        )
    for path in (output, probs_path):
        if path is not None:
            _check_output(path)
    ids, images, layout = _read_unlabeled(Path(input_path), layout)
    start = time.perf_counter()
    tta = run_tta(run) if tta is None else tta
    logits = run.logits(images, tta=tta, progress=progress)
    seconds = time.perf_counter() - start
    labels = logits.argmax(1)
    classes = list(CLASSES)
    files = {Path(output): submission_csv(ids, labels)}
    if probs_path is not None:
        files[Path(probs_path)] = probabilities_csv(ids, logits.softmax(1), classes)
    atomic_write_all(files)  # both or neither: a failed --probs keeps the previous submission
    counts = torch.bincount(labels, minlength=len(classes)).tolist()
    return {
        "images": len(ids),
        "output": str(output),
        "probs": str(probs_path) if probs_path is not None else None,
        "layout": layout,
        "predicted_counts": dict(zip(classes, counts)),
        "tta": tta,
        "views": len(TTA_VIEWS) if tta else 1,
        "seconds": seconds,
        "device": str(run.placement.device),
        "precision": run.placement.precision,
        "checkpoint": str(checkpoint),
        "source": run.info["source"],
        "weights": run.info["weights"],
        "architecture": run.info["architecture"],
        "notes": run.info["notes"],
    }
