"""Evaluation: logits of a model on uint8 images, the classification report, checkpoint evaluation.

:func:`predict_logits` and :func:`classification_report` are the one implementation of
evaluation: the training loop computes its validation and test figures with them, so
``cerberus eval best.pt`` on the same machine reproduces a run's test accuracy exactly (same
weights, same placement, same batch size, same arithmetic). Nothing here prints; progress goes
through a callback.

Test-time augmentation (``tta=True``) averages the logits of six views of every image, after
airbench (Jordan, "94% on CIFAR-10 in 3.29 seconds on a single GPU", 2024), which translates
before mirroring where we mirror first (level in accuracy: benchmarks/RESULTS.md):

1. the image itself and 2. its horizontal mirror, weighted 1/4 each;
3. the image and 4. its mirror translated 1 pixel up and left, and 5. the image and 6. its mirror
   translated 1 pixel down and right (reflect-pad 1 pixel on every side, then take the 32x32 crop
   at offset (2, 2) or (0, 0)), weighted 1/8 each.

The translated views pair up in opposite directions, so the average favours no side of the image.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from cerberus.arch import architecture_from_record, count_params
from cerberus.checkpoint import (
    FORMAT,
    check_format,
    check_weights_fit,
    first_non_finite,
    infer_architecture,
    load_checkpoint,
    state_dict_from,
    unverified_note,
)
from cerberus.config import DEVICES, PRECISIONS
from cerberus.device import Placement
from cerberus.errors import CerberusError, CheckpointError, ConfigError, DataError

if TYPE_CHECKING:
    from cerberus.config import ExperimentConfig

TTA_VIEWS = (
    "identity",
    "flip",
    "translate up-left",
    "flip+translate up-left",
    "translate down-right",
    "flip+translate down-right",
)
TTA_WEIGHTS = (1 / 4, 1 / 4, 1 / 8, 1 / 8, 1 / 8, 1 / 8)  # of each view's logits; they sum to 1
TTA_SHIFT = 1  # pixels a translated view moves
# On the CPU the forward pass runs on slices of at most this many images, whatever the batch size:
# their activations stay in the caches. On a 2-core AVX2 EPYC, slices of 64 ran ResNet-24 1.3x and
# small nets 1.8x faster than batches of 1000 (benchmarks/RESULTS.md).
CPU_FORWARD_IMAGES = 64

Progress = Callable[[int, int], None]


# --------------------------------------------------------------------------------------------
# Logits


def _check_images(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8:
        kind = images.dtype if isinstance(images, torch.Tensor) else type(images).__name__
        raise DataError(f"images must be a uint8 tensor of pixel values, got {kind}")
    if images.dim() != 4 or images.shape[1] != 3:
        raise DataError(f"images must have shape (N, 3, H, W), got {list(images.shape)}")
    if images.shape[0] == 0:
        raise DataError("there are no images to evaluate")


def _views(x: torch.Tensor, tta: bool) -> list[tuple[torch.Tensor, float]]:
    """The views of a normalised batch (B, 3, H, W) and their weights (see the module docstring)."""
    if not tta:
        return [(x, 1.0)]
    flipped = x.flip(3)
    side_h, side_w = x.shape[-2:]
    pad = (TTA_SHIFT,) * 4
    padded = [F.pad(v, pad, mode="reflect") for v in (x, flipped)]
    up_left = [v[:, :, 2 * TTA_SHIFT :, 2 * TTA_SHIFT :] for v in padded]
    down_right = [v[:, :, :side_h, :side_w] for v in padded]
    return list(zip([x, flipped, *up_left, *down_right], TTA_WEIGHTS, strict=True))


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """An eval-mode copy of a Cerberus ResNet with each BatchNorm folded into the conv before it.

    In eval mode a BatchNorm is the per-channel affine map ``(x - mean) * g + beta`` with
    ``g = gamma / sqrt(var + eps)``, so conv then BatchNorm is one conv with weight ``W * g`` and bias
    ``beta - mean * g`` (``torch.nn.utils.fusion.fuse_conv_bn_eval``): the same logits up to float
    rounding, one pass fewer over every activation. Any other model (or one whose BatchNorms keep
    no running statistics) is returned as it is.
    """
    from torch.nn.modules.batchnorm import _BatchNorm
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    from cerberus.model import BasicBlock, ResNet

    if type(model) is not ResNet or any(
        isinstance(m, _BatchNorm) and m.running_mean is None for m in model.modules()
    ):
        return model
    folded = copy.deepcopy(model).eval()
    pairs = [(folded, "conv1", "bn1")]  # (owner, conv, the BatchNorm that follows it)
    for block in folded.modules():
        if isinstance(block, BasicBlock):
            if not block.pool:  # a max-pool between conv1 and bn1 does not commute with it
                pairs.append((block, "conv1", "bn1"))
            pairs.append((block, "conv2", "bn2"))
            if len(block.shortcut):
                pairs.append((block.shortcut, "0", "1"))
    for owner, conv_name, bn_name in pairs:
        setattr(owner, conv_name, fuse_conv_bn_eval(getattr(owner, conv_name), getattr(owner, bn_name)))
        setattr(owner, bn_name, nn.Identity())
    return folded


def predict_logits(
    model: nn.Module,
    images: torch.Tensor,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    placement: Placement,
    batch_size: int = 1000,
    tta: bool = False,
    progress: Progress | None = None,
) -> torch.Tensor:
    """Logits of ``model`` on ``images``: uint8 (N, 3, H, W) on the CPU -> float32 (N, C) on the CPU.

    The model is moved to ``placement``'s device and run in eval mode under
    ``torch.inference_mode`` and the placement's autocast, as a copy with its BatchNorms folded
    into the convs (:func:`fold_batchnorm`) in the placement's inference layout (a model that is
    not a Cerberus ResNet is run as it is, moved to that layout); its training mode is restored
    after. Batches of ``batch_size`` images are normalised with ``mean``/``std`` (per channel, on
    the 0-1 scale) on the device, one at a time; on the CPU the model sees slices of
    :data:`CPU_FORWARD_IMAGES` of them. ``tta`` averages the logits of the views in
    :data:`TTA_VIEWS` with the weights in :data:`TTA_WEIGHTS`.
    ``progress(done_images, total_images)`` is called after each batch.
    """
    _check_images(images)
    if batch_size < 1:
        raise ConfigError(f"batch_size must be positive, got {batch_size}")
    from cerberus.augment import normalize  # the same arithmetic training applies to its batches

    device, memory_format = placement.device, placement.inference_memory_format
    model.to(device=device)
    total = images.shape[0]
    outputs: list[torch.Tensor] = []
    was_training = model.training
    model.eval()
    slice_images = CPU_FORWARD_IMAGES if device.type == "cpu" else batch_size
    try:
        runner = fold_batchnorm(model).to(memory_format=memory_format)
        with torch.inference_mode():
            for start in range(0, total, batch_size):
                batch = images[start : start + batch_size].to(device, non_blocking=True)
                x = normalize(batch, mean, std)  # (B, 3, H, W) float32
                logits = None
                for view, weight in _views(x, tta):
                    parts = []
                    for part in view.split(slice_images):
                        with placement.autocast():
                            parts.append(runner(part.contiguous(memory_format=memory_format)).float())
                    out = torch.cat(parts) if len(parts) > 1 else parts[0]
                    out = out * weight if tta else out
                    logits = out if logits is None else logits + out
                outputs.append(logits.cpu())
                if progress is not None:
                    progress(min(start + batch_size, total), total)
    finally:
        model.train(was_training)
    return torch.cat(outputs)


# --------------------------------------------------------------------------------------------
# Report


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


def classification_report(
    logits: torch.Tensor, labels: torch.Tensor, classes: Sequence[str]
) -> dict[str, Any]:
    """Accuracy, mean cross-entropy, per-class figures and the confusion matrix.

    ``per_class`` rows hold ``accuracy`` (= ``recall``: correct among the images of that class),
    ``precision`` (correct among the images predicted as that class) and ``support``; a ratio
    whose denominator is zero is ``None``. ``confusion_matrix[t][p]`` counts images of true class
    ``t`` predicted as ``p``.
    """
    num_classes = len(classes)
    if logits.dim() != 2 or logits.shape[1] != num_classes:
        raise DataError(f"logits have shape {list(logits.shape)}; expected (N, {num_classes})")
    labels = torch.as_tensor(labels).long().cpu()
    if labels.dim() != 1 or labels.shape[0] != logits.shape[0]:
        raise DataError(f"{labels.shape[0] if labels.dim() else 0} labels for {logits.shape[0]} images")
    if labels.numel() == 0:
        raise DataError("there are no images to evaluate")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise DataError(f"labels must lie in 0..{num_classes - 1}, found {labels.min()}..{labels.max()}")
    logits = logits.float().cpu()
    predictions = logits.argmax(1)
    matrix = torch.bincount(labels * num_classes + predictions, minlength=num_classes**2)
    matrix = matrix.view(num_classes, num_classes)  # rows: true class, columns: predicted
    true_positive = matrix.diagonal()
    support = matrix.sum(1)
    predicted = matrix.sum(0)
    correct = int(true_positive.sum())
    per_class = []
    for c, name in enumerate(classes):
        recall = _ratio(int(true_positive[c]), int(support[c]))
        per_class.append(
            {
                "class": name,
                "accuracy": recall,
                "precision": _ratio(int(true_positive[c]), int(predicted[c])),
                "recall": recall,
                "support": int(support[c]),
            }
        )
    return {
        "accuracy": correct / labels.numel(),
        "loss": F.cross_entropy(logits, labels).item(),
        "images": labels.numel(),
        "correct": correct,
        "per_class": per_class,
        "confusion_matrix": matrix.tolist(),
    }


# --------------------------------------------------------------------------------------------
# Checkpoints


def _load_weights(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """``load_state_dict`` with a message that names the first missing, extra or misshapen key.

    BatchNorm's ``num_batches_tracked`` counters may be absent (older PyTorch, or filtered out):
    inference does not read them, so the model keeps its own.
    """
    expected = model.state_dict()
    counters = {k: v for k, v in expected.items() if k.endswith(".num_batches_tracked") and k not in state}
    state = {**state, **counters}
    check_weights_fit(expected, state, path)
    model.load_state_dict(state)


def _weights_slot(obj: dict[str, Any], use_ema: bool, path: Path) -> tuple[str, str]:
    """``(key, kind)``: the payload key to load and what it holds ("ema" | "model").

    ``obj["weights"]`` says what ``obj["model"]`` holds: best.pt of an EMA run keeps the EMA
    weights there (and no raw weights at all); older checkpoints lack the key and hold raw ones.
    """
    if use_ema and obj.get("ema") is not None:
        return "ema", "ema"
    held = obj.get("weights", "model")
    if not use_ema and held == "ema":
        raise CheckpointError(
            f"{path} holds the EMA weights only (best.pt of an EMA run keeps no raw weights); "
            "to evaluate the raw weights, use the run's last.pt with --no-ema"
        )
    return "model", held


def load_model(
    path: Path,
    *,
    trust_pickle: bool = False,
    use_ema: bool = True,
    overrides: dict[str, Any] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """A model (CPU, eval mode) with the weights in ``path``, and what is known about it.

    Cerberus checkpoints give their recorded architecture and, with ``use_ema``, the EMA weights
    when they hold them; best.pt of an EMA run holds only EMA weights, so ``use_ema=False`` on it
    raises :class:`CheckpointError`. Any other weights file (a state_dict, possibly wrapped or
    pickled) has its architecture inferred from names and shapes; ``overrides`` (Architecture
    fields) settle what the weights cannot show. ``info`` holds ``source`` ("cerberus" | "state_dict"),
    ``architecture``, ``weights`` ("ema" | "model"), ``config`` (dict or None), ``params`` and
    ``notes`` (sentences for the user, e.g. that the weights fit another design as well).
    """
    from cerberus.model import build_model

    path = Path(path)
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    obj = load_checkpoint(path, trust_pickle=trust_pickle)
    info: dict[str, Any] = {"checkpoint": str(path), "notes": []}
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        check_format(obj)
        if overrides:
            names = ", ".join(sorted(overrides))
            raise ConfigError(
                f"{path} records its architecture; design overrides ({names}) apply only to plain state_dicts"
            )
        use, weights = _weights_slot(obj, use_ema, path)
        state = state_dict_from(obj[use])
        state.pop("n_averaged", None)  # torch.optim.swa_utils.AveragedModel's counter
        arch_data = obj.get("architecture") or (obj.get("config") or {}).get("model")
        if not isinstance(arch_data, dict):
            raise CheckpointError(f"{path} records no architecture")
        try:
            arch = architecture_from_record(arch_data)
        except ConfigError as err:
            raise CheckpointError(f"{path}: the recorded architecture is invalid ({err})") from None
        info.update(
            source="cerberus",
            weights=weights,
            config=obj.get("config"),
            epoch=obj.get("epoch"),
            cerberus_version=obj.get("cerberus_version"),
        )
        note = unverified_note(path)  # copied alone: nothing to check it against
        if note is not None:
            info["notes"].append(note)
    else:
        state = None
        try:
            state = state_dict_from(obj)
            arch = infer_architecture(state, **overrides)
        except CheckpointError as err:  # what the weights lack or hold, and in which file
            if overrides and state is not None and _fits(state, {}):  # a design, not the one asked
                raise _overrides_misfit(overrides, err) from None
            message = str(err)
            raise CheckpointError(message if str(path) in message else f"{path}: {message}") from None
        info.update(source="state_dict", weights="model", config=None)
        if (
            "downsample" not in overrides
            and arch.downsample == "stride"
            and _fits(state, {**overrides, "downsample": "pool"})
        ):
            info["notes"].append(
                "these weights fit a strided and a max-pooling ResNet alike and were read as "
                "strided; if they were trained with downsample = 'pool', pass --downsample pool"
            )
    bad = first_non_finite(state)
    if bad is not None:
        raise CheckpointError(f"{path}: weight {bad!r} holds NaN or infinite values")
    model = build_model(arch)
    try:
        _load_weights(model, state, path)
    except CheckpointError as err:
        if not overrides:  # (only plain state_dicts take them)
            raise
        # The weights were read as the design the overrides asked for: the overrides are at fault.
        raise _overrides_misfit(overrides, err) from None
    model.eval()
    info.update(architecture=arch.to_dict(), params=count_params(arch))
    return model, info


def _overrides_misfit(overrides: dict[str, Any], err: Exception) -> ConfigError:
    """The error for design overrides that the weights do not fit, naming the override when one."""
    names = ", ".join(f"{key} = {value!r}" for key, value in overrides.items())
    detail = f"the weights do not fit the design with {names} ({err})"
    field = next(iter(overrides)) if len(overrides) == 1 else None
    return ConfigError(f"design overrides: {detail}", field=field, detail=detail)


def _fits(state: dict[str, torch.Tensor], overrides: dict[str, Any]) -> bool:
    """Whether the weights read as a design of the family with these overrides."""
    try:
        infer_architecture(state, **overrides)
    except CerberusError:
        return False
    return True


def check_placement_names(device: str | None, precision: str | None) -> None:
    """Refuse a misspelt device or precision before anything is loaded."""
    for name, value, choices in (("--device", device, DEVICES), ("--precision", precision, PRECISIONS)):
        if value is not None and value not in choices:
            raise ConfigError(f"{name}: choose one of {', '.join(choices)}, got {value!r}")


def eval_placement(config: ExperimentConfig | None, device: str | None, precision: str | None) -> Placement:
    """Where to evaluate: ``device``/``precision`` when given, else what the run trained with.

    A training setting this machine cannot honour (a CUDA run evaluated on a laptop) falls back to
    ``auto``; an explicit request that cannot be honoured raises :class:`ConfigError`.
    """
    from cerberus.device import resolve_placement

    check_placement_names(device, precision)
    train = config.train if config is not None else None
    channels_last = train.channels_last if train is not None else None
    wanted_device = device or (train.device if train is not None else "auto")
    wanted_precision = precision or (train.precision if train is not None else "auto")
    # errors name the flag when the value came from one, else the checkpoint's setting
    sources = (
        "--device" if device is not None else "train.device",
        "--precision" if precision is not None else "train.precision",
    )
    try:
        return resolve_placement(wanted_device, wanted_precision, channels_last, sources=sources)
    except ConfigError:
        if device is not None and precision is not None:
            raise  # asked for explicitly: say it cannot be had
        flags = ("--device", "--precision")
        return resolve_placement(device or "auto", precision or "auto", channels_last, sources=flags)


@dataclasses.dataclass(frozen=True)
class Inference:
    """A loaded model and the settings to run it with: what evaluation and prediction share."""

    path: Path  # the weights file
    model: nn.Module
    info: dict[str, Any]  # from load_model
    config: ExperimentConfig | None  # the run's config, for Cerberus checkpoints
    placement: Placement
    batch_size: int
    mean: Sequence[float]
    std: Sequence[float]

    def logits(self, images: torch.Tensor, *, tta: bool = False, progress: Progress | None = None):
        """:func:`predict_logits`; refused (:class:`CheckpointError`) where any is not finite."""
        logits = predict_logits(
            self.model,
            images,
            mean=self.mean,
            std=self.std,
            placement=self.placement,
            batch_size=self.batch_size,
            tta=tta,
            progress=progress,
        )
        bad = int((~torch.isfinite(logits).all(1)).sum())
        if bad:  # finite weights can still overflow: a diverged run's, say
            precision = self.placement.precision
            verdict = (
                "its weights are unusable"
                if precision == "fp32"
                else f"{precision}'s range may be too narrow for its weights: try --precision fp32"
            )
            raise CheckpointError(
                f"{self.path}: the model's outputs are not finite for {bad} of {len(logits)} images "
                f"(in {precision}): {verdict}; nothing was written"
            )
        return logits


def prepare_inference(
    path: Path,
    *,
    trust_pickle: bool = False,
    use_ema: bool = True,
    overrides: dict[str, Any] | None = None,
    device: str | None = None,
    precision: str | None = None,
    batch_size: int | None = None,
) -> Inference:
    """Load ``path`` and settle how to run it (see :func:`evaluate_checkpoint` for the defaults)."""
    from cerberus.config import DataConfig, config_from_dict

    check_placement_names(device, precision)
    model, info = load_model(path, trust_pickle=trust_pickle, use_ema=use_ema, overrides=overrides)
    config = None
    if info["config"] is not None:
        config = config_from_dict(info["config"], source=str(path), enforce_budget=False, stored=True)
    data_cfg = config.data if config is not None else DataConfig()
    placement = eval_placement(config, device, precision)  # a device this machine lacks: say so now
    if batch_size is None:
        batch_size = config.train.eval_batch_size if config is not None else 1000
    return Inference(Path(path), model, info, config, placement, batch_size, data_cfg.mean, data_cfg.std)


def run_tta(run: Inference) -> bool:
    """Whether the checkpoint's run tested with test-time augmentation (``train.test_tta``)."""
    return bool(run.config is not None and run.config.train.test_tta)


def evaluate_checkpoint(
    path: Path,
    *,
    data_dir: str | Path | None = None,
    test_subset: int | None = None,
    tta: bool | None = None,
    use_ema: bool = True,
    trust_pickle: bool = False,
    overrides: dict[str, Any] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    device: str | None = None,
    precision: str | None = None,
    batch_size: int | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Evaluate a weights file on the CIFAR-10 test set; see :func:`classification_report`.

    Settings left at ``None`` come from the checkpoint's own config for Cerberus checkpoints
    (data root, ``test_subset``, mean/std, device, precision, channels_last, eval batch size,
    test-time augmentation as ``train.test_tta``: what training used, so the figure matches the
    run's), and from the defaults for other weights (the seed project's mean/std, ``auto``
    placement, 1000 images per batch, no TTA).
    The result adds ``tta``, ``views``, ``seconds``, ``images_per_sec``, ``device``,
    ``precision``, ``channels_last``, ``batch_size``, ``checkpoint``, ``source``, ``weights``,
    ``architecture``, ``params``, ``data_root``, ``test_subset`` and ``notes``.
    """
    from cerberus.config import DataConfig
    from cerberus.data import load_cifar10, make_splits, resolve_data_root

    if test_subset is not None and test_subset < 0:
        raise ConfigError(f"--test-subset: must be 0 (all) or positive, got {test_subset}")
    run = prepare_inference(
        path,
        trust_pickle=trust_pickle,
        use_ema=use_ema,
        overrides=overrides,
        device=device,
        precision=precision,
        batch_size=batch_size,
    )
    if mean is not None or std is not None:
        run = dataclasses.replace(
            run, mean=run.mean if mean is None else mean, std=run.std if std is None else std
        )
    data_cfg = run.config.data if run.config is not None else DataConfig()

    recorded = (data_cfg.root or "").strip()
    if data_dir is None and recorded and not Path(recorded).expanduser().is_dir():
        # Falling back to $CERBERUS_DATA or the cache could start a download of another copy.
        raise DataError(
            f"data.root {recorded} recorded in the checkpoint does not exist here; pass --data-dir"
        )
    root = resolve_data_root(data_dir, recorded or None)
    data = load_cifar10(root, download=data_cfg.download, url=data_cfg.url, split="test")
    subset = data_cfg.test_subset if test_subset is None else test_subset
    available = len(data.test_labels)
    if test_subset is not None and test_subset > available:
        raise ConfigError(f"--test-subset: {test_subset} is more than the {available} test images")
    splits = make_splits(data, data_cfg.model_copy(update={"test_subset": subset}))  # the first N
    images, labels = splits.test_images, splits.test_labels
    classes = list(data.classes)
    info = run.info
    num_classes = info["architecture"]["num_classes"]
    if num_classes != len(classes):
        raise CheckpointError(
            f"{path}: the model has {num_classes} outputs but the dataset has {len(classes)} classes"
        )

    tta = run_tta(run) if tta is None else tta
    start = time.perf_counter()
    logits = run.logits(images, tta=tta, progress=progress)
    seconds = time.perf_counter() - start
    result = classification_report(logits, labels, classes)
    result.update(
        tta=tta,
        views=len(TTA_VIEWS) if tta else 1,
        seconds=seconds,
        images_per_sec=result["images"] / max(seconds, 1e-9),
        device=str(run.placement.device),
        precision=run.placement.precision,
        channels_last=run.placement.inference_layout,
        batch_size=run.batch_size,
        checkpoint=str(path),
        source=info["source"],
        weights=info["weights"],
        architecture=info["architecture"],
        params=info["params"],
        data_root=str(root),
        test_subset=subset,
        notes=info["notes"],
    )
    return result


# --------------------------------------------------------------------------------------------
# Plot


def confusion_plot(matrix: Sequence[Sequence[int]], classes: Sequence[str], path: Path) -> Path:
    """Write :func:`confusion_png` to ``path`` (a folder receives ``confusion.png``); return the
    file's path."""
    from cerberus.files import atomic_write

    path = Path(path)
    if path.is_dir():
        path = path / "confusion.png"
    atomic_write(path, confusion_png(matrix, classes))
    return path


def confusion_png(matrix: Sequence[Sequence[int]], classes: Sequence[str]) -> bytes:
    """The confusion matrix (rows true, columns predicted) drawn as a PNG.

    Colours show each row's fraction, so rare and common classes read alike; cells print the
    counts.
    """
    from cerberus.report import figure_png, new_figure

    counts = torch.tensor(matrix, dtype=torch.float64)
    rows = counts.sum(1, keepdim=True).clamp(min=1)
    fractions = (counts / rows).numpy()
    n = len(classes)
    fig = new_figure((1.0 + 0.6 * n, 0.8 + 0.6 * n))
    ax = fig.add_subplot()
    ax.imshow(fractions, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), labels=list(classes), rotation=45, ha="right")
    ax.set_yticks(range(n), labels=list(classes))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for t in range(n):
        for p in range(n):
            colour = "white" if fractions[t, p] > 0.5 else "black"
            ax.text(p, t, str(int(counts[t, p])), ha="center", va="center", fontsize=7, color=colour)
    fig.tight_layout()
    return figure_png(fig)


# --------------------------------------------------------------------------------------------
# Files


REPORT_FILES = ("confusion.png", "eval.json")  # what write_report puts in its folder


def check_report_dir(out_dir: Path) -> None:
    """Refuse a report folder that cannot be written, before any work is done."""

    from cerberus.files import check_can_write, creation_problem

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"{out_dir} is a file; give a folder for the report")
    for name in REPORT_FILES:
        if (out_dir / name).is_dir():
            raise ConfigError(f"{out_dir / name} is a folder; the report writes a file there")
    if out_dir.is_dir():  # each file where it lands (a link's target, a device as it is)
        for name in REPORT_FILES:
            problem = check_can_write(out_dir / name)
            if problem is not None:
                raise CerberusError(f"cannot write {out_dir / name}: {problem}")
        return
    existing = next(p for p in out_dir.absolute().parents if p.exists())  # the folder is made there
    problem = creation_problem(existing) if existing.is_dir() else None
    if problem is not None or not existing.is_dir():
        why = f" ({problem})" if problem else ""
        raise CerberusError(f"cannot write into {out_dir}: {existing} is not a writable folder{why}")


def write_report(result: dict[str, Any], out_dir: Path) -> list[Path]:
    """Write ``confusion.png`` and ``eval.json`` (the result, listing both files) into ``out_dir``.

    The folder is created if needed; each file is replaced atomically. Returns the two paths;
    a failure is one :class:`CerberusError` naming the folder or file.
    """

    from cerberus.files import atomic_write_all, to_json

    out_dir = Path(out_dir)
    classes = [row["class"] for row in result["per_class"]]
    png = confusion_png(result["confusion_matrix"], classes)
    plot, report = out_dir / "confusion.png", out_dir / "eval.json"
    files = [plot, report]
    text = to_json({**result, "files": [str(f) for f in files]}, indent=2) + "\n"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CerberusError(f"could not write into {out_dir}: {err.strerror or err}") from None
    atomic_write_all({plot: png, report: text})  # both or neither
    return files
