"""Experiment configs: a pydantic schema, TOML loading, ``--set`` overrides, the budget check.

A TOML file becomes one :class:`ExperimentConfig`. Every field has a default, a unit where one
applies, and a description; unknown keys are errors that name the key. Cross-field checks (stage
lengths, odd kernels, pool size, the parameter budget) run when the config is loaded, before any
data is read or any weight allocated. This module does not import torch.
"""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from cerberus.arch import (
    DEFAULT_BUDGET,
    INPUT_SIDE,
    STEM_KERNEL,
    Architecture,
    architecture_problems,
    check_budget,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

from cerberus.errors import BudgetError, ConfigError

Device = Literal["auto", "cpu", "cuda", "mps"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]
DEVICES: tuple[str, ...] = get_args(Device)
PRECISIONS: tuple[str, ...] = get_args(Precision)


def _stored(info: ValidationInfo) -> bool:
    """Whether the config is read back from a checkpoint (see :func:`config_from_dict`)."""
    return bool(info.context and info.context.get("stored"))


def _model_replaced(info: ValidationInfo) -> bool:
    """Whether [model] is a placeholder that search trials replace (see :func:`config_from_dict`)."""
    return bool(info.context and info.context.get("model_replaced"))


CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)  # the seed project's normalisation constants
CIFAR10_STD = (0.2023, 0.1994, 0.2010)
CIFAR10_TRAIN_IMAGES = 50_000  # size of the official training set
CIFAR10_TEST_IMAGES = 10_000  # and of the test set


def _no_nul(value: Any) -> Any:
    """Text settings name folders, files and addresses, none of which can hold a NUL character."""
    if isinstance(value, str) and "\x00" in value:
        raise ValueError(f"{value!r} holds a NUL character")
    return value


class Section(BaseModel):
    # inf/nan are valid TOML floats but never a usable setting (lr = inf, mean = [nan, ...])
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*")
    @classmethod
    def _check_text(cls, value: Any) -> Any:
        return _no_nul(value)


class ModelConfig(Section):
    """``[model]``: the architecture (see cerberus.arch for exact semantics) and its budget."""

    blocks: list[int] = Field(
        default=[3, 5, 3], min_length=1, description="Basic blocks per stage (B); N = len(blocks)."
    )
    channels: list[int] | None = Field(
        default=None, description="Width of each stage (C). Default: 64 * 2**i."
    )
    conv_kernel: int = Field(default=3, description="Kernel side F of the convs in blocks (odd).")
    skip_kernel: int = Field(default=1, description="Kernel side K of projection shortcuts (odd).")
    pool_size: int | None = Field(
        default=None,
        description="Average-pool kernel and stride P, pixels. Default: the final map's side.",
    )
    stem_channels: int | None = Field(
        default=None, description="Output channels of the stem conv. Default: channels[0]."
    )
    num_classes: int = Field(default=10, gt=0, description="Number of output classes.")
    downsample: Literal["stride", "pool"] = Field(
        default="stride",
        description=(
            "How stages halve the map: 'stride' (the seed's: stages after the first stride their "
            "first conv) or 'pool' (every stage max-pools after its first conv)."
        ),
    )
    stem_kernel: int = Field(
        default=STEM_KERNEL,
        description="Kernel side S of the stem conv, padding (S-1)//2: 3 keeps the 32x32 map, 2 "
        "(unpadded) leaves 31x31, as the fastest CIFAR trainers do.",
    )
    max_params: int = Field(
        default=DEFAULT_BUDGET, gt=0, description="Parameter budget: larger models are refused."
    )

    def architecture(self) -> Architecture:
        return Architecture(
            blocks=tuple(self.blocks),
            channels=tuple(self.channels) if self.channels is not None else None,
            conv_kernel=self.conv_kernel,
            skip_kernel=self.skip_kernel,
            pool_size=self.pool_size,
            stem_channels=self.stem_channels,
            num_classes=self.num_classes,
            downsample=self.downsample,
            stem_kernel=self.stem_kernel,
        )

    @model_validator(mode="after")
    def _check_design(self) -> ModelConfig:
        problems = architecture_problems(self.architecture())
        if problems:
            raise ValueError("; ".join(f"{name}: {message}" for name, message in problems))
        return self


class DataConfig(Section):
    """``[data]``: where CIFAR-10 lives, and which images train, validate and test."""

    root: str | None = Field(
        default=None,
        description="Folder holding cifar-10-batches-py/. Default: $CERBERUS_DATA, then a "
        "per-user cache folder.",
    )
    download: bool = Field(default=True, description="Download CIFAR-10 when it is absent.")
    url: str | None = Field(
        default=None,
        description="Mirror of cifar-10-python.tar.gz (file:// allowed). Default: "
        "$CERBERUS_CIFAR10_URL, then the official address.",
    )
    val_size: int = Field(
        default=5000,
        ge=0,
        description="Training images held out for validation (stratified, fixed seed); 0 = none.",
    )
    split_seed: int = Field(
        default=0, description="Seed of the validation split, independent of the training seed."
    )
    train_subset: int = Field(
        default=0,
        ge=0,
        description="Use only the first N training images, before the validation split; 0 = all.",
    )
    test_subset: int = Field(default=0, ge=0, description="Use only the first N test images; 0 = all.")
    mean: list[float] = Field(
        default=list(CIFAR10_MEAN), min_length=3, max_length=3, description="Per-channel mean."
    )
    std: list[float] = Field(
        default=list(CIFAR10_STD), min_length=3, max_length=3, description="Per-channel std."
    )

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std: every entry must be positive, got {self.std}")
        if self.train_subset and self.val_size >= self.train_subset:
            raise ValueError(
                f"val_size ({self.val_size}) must be smaller than train_subset "
                f"({self.train_subset}): nothing would be left to train on"
            )
        if self.val_size >= CIFAR10_TRAIN_IMAGES:
            raise ValueError(
                f"val_size ({self.val_size}) must be smaller than the {CIFAR10_TRAIN_IMAGES:,} "
                "training images: nothing would be left to train on"
            )
        for name, count, split in (
            ("train_subset", CIFAR10_TRAIN_IMAGES, "training"),
            ("test_subset", CIFAR10_TEST_IMAGES, "test"),
        ):
            asked = getattr(self, name)
            if asked > count:
                raise ValueError(f"{name} ({asked}) is larger than the {count:,} {split} images")
        return self


class AugmentConfig(Section):
    """``[augment]``: batched augmentation on the training device. Default: crop 4 + flip."""

    crop_padding: int = Field(
        default=4,
        ge=0,
        le=16,
        description="Random crop after padding by this many pixels; 0 = off.",
    )
    crop_mode: Literal["zero", "reflect"] = Field(
        default="zero", description="How the crop padding is filled."
    )
    crop_sizes: list[Annotated[int, Field(ge=8, le=INPUT_SIDE)]] = Field(
        default_factory=list,
        description="Progressive resizing: the side of the random training window (of the padded "
        "image) in each epoch from the first, e.g. [24, 24, 28]; later epochs train on whole images. "
        "Needs the global average pool.",
    )
    flip: bool = Field(default=True, description="Random horizontal flip (probability 0.5).")
    flip_mode: Literal["random", "alternate"] = Field(
        default="random",
        description="'random': each image flips with probability 0.5 every epoch; 'alternate': a "
        "random half in the first epoch, then each image the other way from its previous epoch.",
    )
    rotation: float = Field(
        default=0.0,
        ge=0,
        le=45,
        description="Random rotation up to +/- this many degrees; 0 = off.",
    )
    cutout_size: int = Field(default=0, ge=0, le=32, description="Cutout square side, pixels; 0 = off.")
    cutout_holes: int = Field(default=1, ge=1, description="Cutout squares per image.")
    mixup_alpha: float = Field(default=0.0, ge=0, description="Mixup Beta(alpha, alpha); 0 = off.")
    cutmix_alpha: float = Field(default=0.0, ge=0, description="CutMix Beta(alpha, alpha); 0 = off.")
    mix_prob: float = Field(
        default=1.0, ge=0, le=1, description="Probability that a batch gets mixup or cutmix."
    )
    label_smoothing: float = Field(
        default=0.0, ge=0, lt=1, description="Label smoothing of the training loss."
    )

    @model_validator(mode="after")
    def _check(self, info: ValidationInfo) -> AugmentConfig:
        if _stored(info):
            return self
        if self.mix_prob < 1 and self.mixup_alpha == 0 and self.cutmix_alpha == 0:
            raise ValueError("mix_prob applies to mixup and cutmix: set mixup_alpha or cutmix_alpha too")
        if self.flip_mode != "random" and not self.flip:
            raise ValueError(f"flip_mode = {self.flip_mode!r} needs flip = true")
        if self.cutout_holes != type(self).model_fields["cutout_holes"].default and self.cutout_size == 0:
            raise ValueError("cutout_holes applies to cutout: set cutout_size too")
        return self


class TrainConfig(Section):
    """``[train]``: optimisation, schedule, precision and device."""

    epochs: int = Field(default=30, gt=0, description="Passes over the training images.")
    batch_size: int = Field(default=128, gt=0, description="Global batch size, images per step.")
    eval_batch_size: int = Field(default=1000, gt=0, description="Images per evaluation batch.")
    optimizer: Literal["sgd", "adamw", "muon"] = Field(
        default="sgd",
        description="sgd, adamw or muon. muon: Muon steps (orthogonalised momentum) for the conv "
        "filters, SGD with lr, momentum, nesterov and weight_decay for everything else.",
    )
    lr: float = Field(default=0.1, gt=0, description="Peak learning rate (per step).")
    muon_lr: float = Field(
        default=0.05, gt=0, description="Peak learning rate of the Muon steps; follows lr's schedule."
    )
    muon_momentum: float = Field(default=0.6, ge=0, lt=1, description="Momentum of the Muon steps.")
    momentum: float = Field(default=0.9, ge=0, lt=1, description="SGD momentum / AdamW beta1.")
    nesterov: bool = Field(default=False, description="Nesterov momentum (SGD and Muon).")
    weight_decay: float = Field(
        default=5e-4, ge=0, description="Weight decay (L2 for SGD; Muon's filters take none)."
    )
    decay_bn_and_bias: bool = Field(
        default=True, description="Apply weight decay to BatchNorm and bias parameters too."
    )
    schedule: Literal["constant", "cosine", "step", "onecycle", "seed"] = Field(
        default="cosine",
        description="LR schedule: constant (lr throughout, after any warmup); cosine to min_lr; "
        "step (milestones, gamma); onecycle (linear up then down); seed (cosine with period t_max "
        "combined with x gamma steps).",
    )
    warmup_epochs: float = Field(default=0.0, ge=0, description="Linear warmup, epochs.")
    milestones: list[int] = Field(default=[], description="Epochs at which step/seed multiply by gamma.")
    gamma: float = Field(default=0.1, gt=0, description="Factor applied at each milestone.")
    t_max: int | None = Field(
        default=None, gt=0, description="Cosine period in epochs (seed schedule). Default: epochs."
    )
    min_lr: float = Field(
        default=0.0, ge=0, description="Final LR of the cosine and onecycle schedules (the others ignore it)."
    )
    onecycle_peak: float = Field(
        default=0.25, gt=0, lt=1, description="Fraction of training at which onecycle peaks."
    )
    ema_decay: float = Field(default=0.0, ge=0, lt=1, description="EMA of the weights per step; 0 = off.")
    prune_ratio: float = Field(
        default=0.0,
        ge=0,
        lt=1,
        description="Data pruning (InfoBatch): each epoch skips this fraction of the images whose "
        "last training loss is below the mean, at random (whole batches of them), and scales up the "
        "loss of the rest of those; 0 = off.",
    )
    prune_until: float = Field(
        default=0.875,
        gt=0,
        le=1,
        description="Data pruning stops at epoch floor(prune_until x epochs); from there every epoch "
        "trains every image, as does the first.",
    )
    whiten_stem: bool = Field(
        default=False,
        description="Set the stem conv to patch-whitening filters of the training images (and "
        "their negatives) and keep it fixed; needs an even stem_channels of at most 6 * S**2.",
    )
    grad_clip: float = Field(default=0.0, ge=0, description="Clip gradient norm to this; 0 = off.")
    precision: Precision = Field(
        default="auto", description="Autocast precision; auto picks the fastest the device has."
    )
    device: Device = Field(default="auto", description="Device.")
    channels_last: bool | None = Field(
        default=None,
        description="channels_last memory format. Default: on where it is faster (CUDA, bf16/fp16, "
        "x86-64 CPUs), except for CPU training of designs with a strided 1x1 conv reading fewer "
        "than 16 channels (refused when set: oneDNN trains those wrongly).",
    )
    compile: bool = Field(default=False, description="torch.compile the model (opt-in).")
    threads: int = Field(default=0, ge=0, description="CPU threads for torch; 0 = torch's default.")
    sync_bn: bool = Field(default=False, description="SyncBatchNorm under torch.distributed.")
    test_tta: bool = Field(
        default=False,
        description="Evaluate the final test with test-time augmentation (6 views, as "
        "`cerberus eval --tta`).",
    )
    test_every_epoch: bool = Field(
        default=False,
        description="Also evaluate the test set each epoch (a curve only; never used to select).",
    )
    checkpoint_every: int = Field(
        default=0,
        ge=0,
        description="Also write last.pt at steps N, 2N, ... of each epoch; 0 = off.",
    )
    save_every_epochs: int = Field(
        default=1,
        gt=0,
        description="Write last.pt (and a new best.pt) every N epochs, at the last and on a stop.",
    )

    @property
    def prune_until_epoch(self) -> int:
        """The first epoch (from 0) that data pruning leaves whole again: floor(prune_until x epochs)."""
        return math.floor(self.prune_until * self.epochs + 1e-9)  # 0.58 * 50 is 28.999999999999996

    @model_validator(mode="after")
    def _check(self, info: ValidationInfo) -> TrainConfig:
        if self.warmup_epochs >= self.epochs:
            raise ValueError(f"warmup_epochs ({self.warmup_epochs}) must be less than epochs ({self.epochs})")
        if self.milestones != sorted(self.milestones) or any(m <= 0 for m in self.milestones):
            raise ValueError(f"milestones must be positive and increasing, got {self.milestones}")
        if _stored(info):
            return self
        # settings the chosen schedule or optimizer would silently ignore are refused
        if self.milestones and self.schedule not in ("step", "seed"):
            raise ValueError(
                f"milestones apply to the step and seed schedules, not {self.schedule!r}: "
                'set schedule = "step" or remove them'
            )
        if self.t_max is not None and self.schedule != "seed":
            raise ValueError(f"t_max applies to the seed schedule only, not {self.schedule!r}")
        fields = type(self).model_fields
        if self.gamma != fields["gamma"].default and self.schedule not in ("step", "seed"):
            raise ValueError(f"gamma applies to the step and seed schedules, not {self.schedule!r}")
        if self.onecycle_peak != fields["onecycle_peak"].default and self.schedule != "onecycle":
            raise ValueError(f"onecycle_peak applies to the onecycle schedule only, not {self.schedule!r}")
        if self.prune_until != fields["prune_until"].default and self.prune_ratio == 0:
            raise ValueError("prune_until applies to data pruning only: set prune_ratio too")
        if self.prune_ratio > 0 and self.prune_until_epoch < 2:
            raise ValueError(
                f"prune_ratio prunes no epoch of {self.epochs}: the first trains every image, and "
                f"pruning stops at epoch floor(prune_until x epochs) = {self.prune_until_epoch} "
                "(counting from 0); raise prune_until or epochs"
            )
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) must not exceed lr ({self.lr})")
        if self.nesterov and self.optimizer == "adamw":
            raise ValueError("nesterov applies to the sgd and muon optimizers only")
        if self.nesterov and self.momentum == 0:
            raise ValueError("nesterov needs a momentum above 0")
        # compared with the defaults, not model_fields_set: a run folder's config.toml lists every
        # field, and an SGD run's must load again as it is
        muon_settings = [k for k in ("muon_lr", "muon_momentum") if getattr(self, k) != fields[k].default]
        if muon_settings and self.optimizer != "muon":
            verb = "applies" if len(muon_settings) == 1 else "apply"
            raise ValueError(f"{' and '.join(muon_settings)} {verb} to the muon optimizer only")
        return self


def _check_crop_sizes(arch: Architecture, sizes: list[int]) -> None:
    """Smaller training windows need a global average pool and a map left after the last stage."""
    if arch.pool != arch.final_side:
        raise ValueError(
            f"augment.crop_sizes trains on smaller images, which needs the global average pool: "
            f"model.pool_size = {arch.pool_size} pools a {arch.final_side}x{arch.final_side} map "
            "in parts; leave pool_size unset"
        )
    smallest = min(sizes)
    if arch.final_side_for(smallest) < 1:
        fits = next(s for s in range(smallest, INPUT_SIDE + 1) if arch.final_side_for(s) >= 1)
        raise ValueError(
            f"augment.crop_sizes: a {smallest}x{smallest} window leaves no map after the last "
            f"stage of this model; the smallest it takes is {fits}"
        )


class ExperimentConfig(BaseModel):
    """One experiment: a name, a seed, and the four sections."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(
        default="cerberus",
        min_length=1,
        description="Run name (run folder prefix; no '/', '\\', control characters or leading '.').",
    )
    seed: int = Field(
        default=0,
        ge=-(2**63),
        le=2**63 - 1,
        description="Seed of initialisation, shuffling and augmentation (a 64-bit signed integer).",
    )
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)

    @field_validator("name")
    @classmethod
    def _check_name(cls, name: str, info: ValidationInfo) -> str:
        _no_nul(name)
        # A checkpoint's stored config predates the rule: it still loads (its folder exists).
        if _stored(info):
            return name
        if "/" in name or "\\" in name:
            raise ValueError(f"{name!r} holds a path separator; the run folder is named after it")
        if any(ord(c) < 32 or ord(c) == 127 for c in name):
            raise ValueError(f"{name!r} holds a control character; the run folder is named after it")
        if name.startswith("."):
            raise ValueError(f"{name!r} starts with '.': the run folder, named after it, would be hidden")
        return name

    @model_validator(mode="after")
    def _check_sections(self, info: ValidationInfo) -> ExperimentConfig:
        if self.train.whiten_stem and not _model_replaced(info):
            arch = self.model.architecture()
            most = 2 * 3 * arch.stem_kernel**2  # every patch direction and its negative
            if arch.stem_width % 2 or not 2 <= arch.stem_width <= most:
                raise ValueError(
                    f"train.whiten_stem fills the stem with whitening filters and their negatives: "
                    f"it needs an even number of stem channels from 2 to {most} (for stem_kernel = "
                    f"{arch.stem_kernel}), got {arch.stem_width}; set model.stem_channels"
                )
        if self.augment.crop_sizes and not _model_replaced(info):
            _check_crop_sizes(self.model.architecture(), self.augment.crop_sizes)
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain data for TOML/JSON: fields left at ``None`` are omitted (TOML has no null)."""
        return self.model_dump(mode="json", exclude_none=True)

    def to_toml(self) -> str:
        import tomli_w

        return tomli_w.dumps(self.to_dict())


# --------------------------------------------------------------------------------------------
# Loading


def _set_origin(loc: str, unknown: bool, set_by: dict[str, str]) -> str | None:
    """The ``--set`` text behind an error at ``loc``: one whose key is at or above it or, for an
    unknown key (``nope`` of ``nope.x=1``), below it."""
    for key, text in set_by.items():
        if f"{loc}.".startswith(f"{key}.") or (unknown and f"{key}.".startswith(f"{loc}.")):
            return text
    return None


def format_validation_error(err: ValidationError, set_by: dict[str, str] | None = None) -> str:
    """One ``loc: msg`` line per error.

    ``set_by`` maps dotted keys to the ``--set`` text that gave them: an error at or below such a
    key ends with ``(from --set KEY=VALUE)``, so the culprit is not sought in the file.
    """
    lines = []
    for item in err.errors():
        loc = ".".join(str(part) for part in item["loc"])
        msg = item["msg"]
        if item["type"] == "extra_forbidden":
            msg = "unknown key"
        msg = msg.removeprefix("Value error, ")
        line = f"{loc}: {msg}" if loc else msg
        origin = _set_origin(loc, item["type"] == "extra_forbidden", set_by or {})
        if origin:
            line = f"{line} (from --set {origin})"
        elif item["type"] == "value_error":  # a check across a section's fields: name the --set in it
            inside = [text for key, text in (set_by or {}).items() if not loc or key.startswith(f"{loc}.")]
            if inside:
                line = f"{line} (with {', '.join(f'--set {text}' for text in inside)})"
        lines.append(line)
    return "\n".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.lr=0.05"`` -> ``(["train", "lr"], 0.05)``; values are TOML, bare words strings."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or not re.fullmatch(r"[A-Za-z_][\w-]*(\.[A-Za-z_][\w-]*)*", key):
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE with a dotted key, e.g. train.lr=0.05")
    raw = raw.strip()
    try:
        parsed = tomllib.loads(f"v = {raw}")
        if list(parsed) != ["v"]:  # e.g. "1\n[x]": more than one value; never drop the rest silently
            raise ConfigError(f"--set {text!r}: {raw!r} is not a single TOML value")
        value = parsed["v"]
    except tomllib.TOMLDecodeError:
        if not re.fullmatch(r"[\w.\-/:+]*", raw) or raw == "":
            raise ConfigError(f"--set {text!r}: {raw!r} is not a valid TOML value") from None
        value = raw  # a bare word such as a run name or a path
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``KEY=VALUE`` overrides to nested config data (a copy is returned).

    An inline table sets the keys it lists and keeps the section's others:
    ``train={epochs=1, lr=0.1}`` is ``train.epochs=1 train.lr=0.1``.
    """
    import copy

    def merge(node: dict[str, Any], key: str, value: Any) -> None:
        if isinstance(value, dict) and isinstance(node.get(key), dict):
            for inner, item in value.items():
                merge(node[key], inner, item)
        else:
            node[key] = value

    data = copy.deepcopy(data)
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {text!r}: {part!r} is not a section")
            node = child
        merge(node, path[-1], value)
    return data


def override_keys(overrides: list[str]) -> dict[str, str]:
    """Dotted key -> the ``--set`` text that sets it (the last one wins, as in apply_overrides).

    An inline table for a section counts for the keys it lists (``train={epochs=1}`` sets
    ``train.epochs``, not the rest of ``[train]``); one anywhere else replaces that value whole.
    """
    keys: dict[str, str] = {}
    sections = {
        name
        for name, field in ExperimentConfig.model_fields.items()
        if isinstance(field.annotation, type) and issubclass(field.annotation, Section)
    }

    def add(key: str, value: Any, text: str) -> None:
        if isinstance(value, dict) and value and key in sections:
            for inner, item in value.items():
                add(f"{key}.{inner}", item, text)
        else:
            keys[key] = text

    for text in overrides:
        path, value = parse_override(text)
        add(".".join(path), value, text)
    return keys


def _is_search_space(err: ValidationError, data: dict[str, Any]) -> bool:
    """Whether the refused data is a ``cerberus search`` space: unknown top-level keys only, all
    of them a search space's, some of them a search space's alone (``blocks`` and ``channels``
    without a ``[model]`` header are a config that lost its header)."""
    from cerberus.search.space import SearchSpace

    errors = err.errors()
    top = all(item["type"] == "extra_forbidden" and len(item["loc"]) == 1 for item in errors)
    space = set(SearchSpace.model_fields)
    return top and set(data) <= space and bool(set(data) - set(ModelConfig.model_fields))


def config_from_dict(
    data: dict[str, Any],
    *,
    source: str = "config",
    enforce_budget: bool = True,
    set_by: dict[str, str] | None = None,
    stored: bool = False,
    model_replaced: bool = False,
) -> ExperimentConfig:
    """Validate plain data into a config; the budget is checked too unless told otherwise.

    ``set_by`` (dotted key -> ``--set`` text) marks the errors of overridden values. ``stored``
    marks a config read back from a checkpoint: the checks that refuse settings an earlier
    version accepted and ignored (milestones with onecycle, say) are skipped, so that its
    checkpoints still evaluate and resume. ``model_replaced`` marks the base of search trials,
    whose [model] each trial replaces: checks of other sections against the model wait for the
    trial's own config.
    """
    try:
        # strict: TOML values are typed, so "30" for epochs or ["3"] for blocks is a mistake
        context = {"stored": stored, "model_replaced": model_replaced}
        config = ExperimentConfig.model_validate(data, strict=True, context=context)
    except ValidationError as err:
        if _is_search_space(err, data):
            raise ConfigError(
                f"{source}: this is a search space, not an experiment config: "
                f"explore it with `cerberus search {source}`"
            ) from None
        raise ConfigError(f"{source}: invalid config\n{format_validation_error(err, set_by)}") from None
    if not enforce_budget:
        return config
    try:
        check_budget(config.model.architecture(), config.model.max_params)
    except BudgetError as err:
        raise BudgetError(f"{source}: {err}") from None
    return config


def read_toml(path: str | Path, kind: str = "config") -> dict[str, Any]:
    """Parse a TOML file; errors name the file (a ``kind`` file: "config", "search space") and the line."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8-sig")  # Windows editors may start with a BOM
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such {kind} file") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder, not a {kind} file") from None
    except PermissionError:
        raise ConfigError(f"{path}: cannot read the {kind} file (permission denied)") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (expected UTF-8 TOML)") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the {kind} file ({err.strerror})") from None
    if not text.strip():
        raise ConfigError(f"{path}: the {kind} file is empty")
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        message = str(err)
        match = re.search(r"\(at line (\d+), column (\d+)\)", message)
        line = getattr(err, "lineno", None) or (int(match.group(1)) if match else None)
        message = re.sub(r"\s*\(at line \d+, column \d+\)", "", message)
        message = message if message else "invalid TOML"
        where = f"{path}:{line}" if line else f"{path}"
        raise ConfigError(f"{where}: TOML syntax error: {message}") from None


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    *,
    enforce_budget: bool = True,
) -> ExperimentConfig:
    """Read, override and validate a config. ``path=None`` starts from the defaults.

    With a file, errors in overridden values say they came from ``--set`` (without one, every
    value that can be wrong came from ``--set``).
    """
    data = read_toml(path) if path is not None else {}
    data = apply_overrides(data, overrides or [])
    source = str(path) if path is not None else "config"
    set_by = override_keys(overrides or []) if path is not None else None
    return config_from_dict(data, source=source, enforce_budget=enforce_budget, set_by=set_by)
