"""The design of a CIFAR ResNet as plain data, and its exact cost.

This module does not import torch: it is what lets the CLI, the config loader and the
architecture search count parameters and multiply-accumulates (MACs) without allocating a
single weight. ``cerberus.model.build_model`` turns an :class:`Architecture` into modules whose
``numel()`` sum equals :func:`count_params` exactly (the tests check this on random designs).

Semantics (the seed project's ResNet family):

* input 3x32x32; stem: conv SxS (``stem_kernel``, 3 by default), stride 1, padding (S-1)//2, no
  bias, ``stem_channels`` outputs, then BatchNorm and ReLU; an odd S keeps the 32x32 map, an even
  one leaves 31x31 (``stem_kernel = 2``: the unpadded 2x2 stem of the fastest CIFAR trainers);
* stage i holds ``blocks[i]`` basic blocks of width ``channels[i]``; the first block of every
  stage after the first has stride 2 (so the feature map side halves per stage, rounding up);
* basic block: conv FxF (padding F//2, stride s) - BN - ReLU - conv FxF - BN, plus a shortcut
  that is the identity when s == 1 and widths match, else conv KxK (stride s, padding K//2) - BN;
* head: average pool with kernel = stride = P, flatten, linear with bias.

``downsample = "pool"`` is the variant that fast CIFAR trainers use (Page's ResNet-9, airbench):
*every* stage, the first included, halves the feature map, and its first block does so by
max-pooling (2x2, stride 2) after its first conv instead of striding it: conv FxF (stride 1, at the
incoming resolution) - max-pool - BN - ReLU - conv FxF - BN, plus a shortcut that max-pools the
input and projects it with conv KxK - BN only when the width changes (a pool rounds an odd side
down). The first conv sees the full-resolution map (about 4x the MACs of a strided conv) while
everything after it runs at half the side. Parameters are counted by the same formulas; only
where projections sit and the MACs differ.

MACs count the multiply-accumulates of convolutions and the linear layer for one image; BatchNorm,
ReLU, the residual additions and pooling are left out, as is usual.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from cerberus.errors import BudgetError, ConfigError

INPUT_SIDE = 32  # CIFAR images are 32x32
INPUT_CHANNELS = 3
STEM_KERNEL = 3  # the default stem conv side
MAX_STEM_KERNEL = 7
DEFAULT_BUDGET = 5_000_000  # parameters: the course's limit
MAX_STAGES = 6  # 32 -> 16 -> 8 -> 4 -> 2 -> 1: a seventh stage would have nothing to halve
DOWNSAMPLE_MODES = ("stride", "pool")


def default_channels(num_stages: int, base: int = 64) -> tuple[int, ...]:
    """Widths ``base * 2**i`` for each stage: 64, 128, 256, ... by default."""
    return tuple(base * 2**i for i in range(num_stages))


@dataclass(frozen=True)
class Architecture:
    """One ResNet design. ``None`` fields take their documented defaults."""

    blocks: tuple[int, ...] = (3, 5, 3)  # basic blocks per stage (B); N = len(blocks)
    channels: tuple[int, ...] | None = None  # width per stage (C); default 64 * 2**i
    conv_kernel: int = 3  # F: kernel side of the convs inside blocks, odd
    skip_kernel: int = 1  # K: kernel side of projection shortcuts, odd
    pool_size: int | None = None  # P: average-pool kernel and stride; default global pooling
    stem_channels: int | None = None  # stem conv width; default channels[0]
    num_classes: int = 10
    downsample: str = "stride"  # "stride": stages 2.. stride their first conv; "pool": see above
    stem_kernel: int = STEM_KERNEL  # S: stem conv side; padding (S-1)//2 (even S: a 31x31 map)

    def __post_init__(self) -> None:
        object.__setattr__(self, "blocks", tuple(int(b) for b in self.blocks))
        if self.channels is not None:
            object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))

    @property
    def widths(self) -> tuple[int, ...]:
        """Stage widths with the default applied."""
        return self.channels if self.channels is not None else default_channels(len(self.blocks))

    @property
    def stem_width(self) -> int:
        return self.stem_channels if self.stem_channels is not None else self.widths[0]

    @property
    def max_pool_downsampling(self) -> bool:
        """True when stages downsample by max-pooling (``downsample = "pool"``)."""
        return self.downsample == "pool"

    @property
    def stem_side(self) -> int:
        """Side of the stem's output map: 32 for an odd stem kernel, 31 for an even one."""
        return self.stem_side_for(INPUT_SIDE)

    def stem_side_for(self, input_side: int) -> int:
        """Side of the stem's output map for square inputs of side ``input_side``."""
        return input_side + 2 * ((self.stem_kernel - 1) // 2) - self.stem_kernel + 1

    def halve(self, side: int) -> int:
        """A halving stage's output side: a stride-2 conv rounds up, a 2x2 max-pool rounds down."""
        return side // 2 if self.max_pool_downsampling else (side + 1) // 2

    @property
    def max_stages(self) -> int:
        """Most stages the map allows: every halving must leave at least one pixel."""
        side, stages = self.stem_side, 0 if self.max_pool_downsampling else 1
        while side > 1:
            side, stages = self.halve(side), stages + 1
        return stages

    def stage_downsamples(self, stage: int) -> bool:
        """Whether the first block of stage ``stage`` (0-based) halves the feature map."""
        return self.max_pool_downsampling or stage > 0

    @property
    def final_side(self) -> int:
        """Side of the last stage's feature map."""
        return self.final_side_for(INPUT_SIDE)

    def final_side_for(self, input_side: int) -> int:
        """Side of the last stage's feature map for square inputs of side ``input_side`` (0: none)."""
        side = self.stem_side_for(input_side)
        for i in range(len(self.blocks)):
            if self.stage_downsamples(i):
                side = self.halve(side)
        return side

    @property
    def pool(self) -> int:
        """Average-pool size with the default (global pooling) applied."""
        return self.pool_size if self.pool_size is not None else self.final_side

    @property
    def head_features(self) -> int:
        """Inputs of the linear layer: channels[-1] * (side / P)**2."""
        return self.widths[-1] * (self.final_side // self.pool) ** 2

    def to_dict(self) -> dict:
        """The design with defaults resolved, as JSON-ready data."""
        data = asdict(self)
        data.update(
            blocks=list(self.blocks),
            channels=list(self.widths),
            pool_size=self.pool,
            stem_channels=self.stem_width,
        )
        return data

    def label(self) -> str:
        """A compact one-line name, e.g. ``B[3,5,3] C[64,128,256] F3 K1 P8`` (`` S2`` added for a
        stem kernel other than 3, `` maxpool`` for ``downsample = "pool"``, `` stem24`` last for a
        stem width other than the first stage's)."""
        blocks = ",".join(map(str, self.blocks))
        widths = ",".join(map(str, self.widths))
        label = f"B[{blocks}] C[{widths}] F{self.conv_kernel} K{self.skip_kernel} P{self.pool}"
        if self.stem_kernel != STEM_KERNEL:
            label += f" S{self.stem_kernel}"
        if self.max_pool_downsampling:
            label += " maxpool"
        if self.stem_width != self.widths[0]:
            label += f" stem{self.stem_width}"
        return label


def architecture_problems(arch: Architecture) -> list[tuple[str, str]]:
    """Every structural problem of a design, as ``(field, message)`` pairs; empty when sound."""
    problems: list[tuple[str, str]] = []
    n = len(arch.blocks)
    if n == 0:
        return [("blocks", "needs at least one stage")]
    if arch.downsample not in DOWNSAMPLE_MODES:
        return [("downsample", f"must be 'stride' or 'pool', got {arch.downsample!r}")]
    if not 1 <= arch.stem_kernel <= MAX_STEM_KERNEL:
        return [("stem_kernel", f"must be 1 to {MAX_STEM_KERNEL}, got {arch.stem_kernel}")]
    if n > arch.max_stages:
        halving = "every stage" if arch.max_pool_downsampling else "each stage after the first"
        problems.append(
            (
                "blocks",
                f"{n} stages do not fit a {arch.stem_side}-pixel map: {halving} "
                f"halves the feature map, so at most {arch.max_stages} stages",
            )
        )
    if any(b < 1 for b in arch.blocks):
        problems.append(("blocks", f"every stage needs at least 1 block, got {list(arch.blocks)}"))
    if arch.channels is not None:
        if len(arch.channels) != n:
            problems.append(
                (
                    "channels",
                    f"has {len(arch.channels)} entries but blocks has {n}: give one width per stage",
                )
            )
        if any(c < 1 for c in arch.channels):
            problems.append(("channels", f"widths must be positive, got {list(arch.channels)}"))
    for name, value in (("conv_kernel", arch.conv_kernel), ("skip_kernel", arch.skip_kernel)):
        if value < 1 or value % 2 == 0:
            problems.append((name, f"must be a positive odd number, got {value}"))
    if arch.stem_channels is not None and arch.stem_channels < 1:
        problems.append(("stem_channels", f"must be positive, got {arch.stem_channels}"))
    if arch.num_classes < 1:
        problems.append(("num_classes", f"must be positive, got {arch.num_classes}"))
    if arch.pool_size is not None and not problems:
        side = arch.final_side
        if arch.pool_size < 1 or arch.pool_size > side or side % arch.pool_size:
            divisors = [d for d in range(1, side + 1) if side % d == 0]
            problems.append(
                (
                    "pool_size",
                    f"{arch.pool_size} must divide the final {side}x{side} feature map "
                    f"(choose one of {divisors})",
                )
            )
    return problems


def check_architecture(arch: Architecture) -> Architecture:
    """Raise :class:`ConfigError` naming the first problem; return the design when sound."""
    problems = architecture_problems(arch)
    if problems:
        name, message = problems[0]
        raise ConfigError(f"model.{name}: {message}", field=name, detail=message)
    return arch


_RECORD_OPTIONAL = ("channels", "pool_size", "stem_channels")


def architecture_from_record(record: dict[str, Any]) -> Architecture:
    """The design a checkpoint records (the fields of an :class:`Architecture`), checked.

    A damaged or crafted record raises :class:`ConfigError` naming the field, where a string or a
    float would otherwise pass the dataclass and fail deep inside the model. Unknown keys are
    ignored; missing ones take their defaults.
    """

    def is_int(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    fields = {k: record[k] for k in Architecture.__dataclass_fields__ if k in record}
    for name, value in fields.items():
        if value is None and name in _RECORD_OPTIONAL:
            continue
        if name in ("blocks", "channels"):
            sound = isinstance(value, (list, tuple)) and all(is_int(v) for v in value)
            wanted = "a list of whole numbers"
        elif name == "downsample":
            sound, wanted = isinstance(value, str), "a string"
        else:
            sound, wanted = is_int(value), "a whole number"
        if not sound:
            raise ConfigError(f"model.{name}: must be {wanted}, got {value!r}", field=name)
    return check_architecture(Architecture(**fields))


# --------------------------------------------------------------------------------------------
# Counting. Each function mirrors one module of cerberus.model; keep them in step.


def _conv_bn_params(cin: int, cout: int, kernel: int) -> int:
    return kernel * kernel * cin * cout + 2 * cout  # conv without bias + BN weight and bias


def needs_projection(arch: Architecture, cin: int, cout: int, halves: bool) -> bool:
    """Whether a block's shortcut is a KxK conv + BN rather than the identity (or a bare pool)."""
    return cin != cout or (halves and not arch.max_pool_downsampling)


def _block_params(arch: Architecture, cin: int, cout: int, halves: bool) -> int:
    f = arch.conv_kernel
    params = _conv_bn_params(cin, cout, f) + _conv_bn_params(cout, cout, f)
    if needs_projection(arch, cin, cout, halves):
        params += _conv_bn_params(cin, cout, arch.skip_kernel)
    return params


def _stages(arch: Architecture):
    """Yield ``(stage_index, num_blocks, first, rest)`` for every stage: ``first`` is the first
    block's ``(cin, cout, halves, in_side, out_side)``, ``rest`` the same of each of the other
    ``num_blocks - 1``, which are all alike (the stage's width in and out, no halving). So the
    counts take no longer for a thousand blocks than for one."""
    cin, side = arch.stem_width, arch.stem_side
    for i, (num_blocks, width) in enumerate(zip(arch.blocks, arch.widths)):
        halves = arch.stage_downsamples(i)
        out_side = arch.halve(side) if halves else side
        yield i, num_blocks, (cin, width, halves, side, out_side), (width, width, False, out_side, out_side)
        cin, side = width, out_side


def stage_params(arch: Architecture) -> list[int]:
    """Parameters of each stage (its blocks, shortcuts included)."""
    return [
        _block_params(arch, *first[:3]) + (n - 1) * _block_params(arch, *rest[:3])
        for _, n, first, rest in _stages(arch)
    ]


def stem_params(arch: Architecture) -> int:
    return _conv_bn_params(INPUT_CHANNELS, arch.stem_width, arch.stem_kernel)


def head_params(arch: Architecture) -> int:
    return arch.head_features * arch.num_classes + arch.num_classes


def count_params(arch: Architecture) -> int:
    """Exact number of parameters, a stem fixed by ``train.whiten_stem`` included (it counts
    against the budget); BatchNorm running statistics are buffers, not counted."""
    return stem_params(arch) + sum(stage_params(arch)) + head_params(arch)


def _block_macs(arch: Architecture, cin: int, cout: int, halves: bool, in_side: int, side: int) -> int:
    pixels = side * side
    # a pooling block's first conv runs before the pool, at the incoming side
    first_pixels = in_side * in_side if (halves and arch.max_pool_downsampling) else pixels
    macs = arch.conv_kernel**2 * cout * (first_pixels * cin + pixels * cout)  # both convs
    if needs_projection(arch, cin, cout, halves):
        macs += pixels * arch.skip_kernel**2 * cin * cout
    return macs


def stage_macs(arch: Architecture) -> list[int]:
    """Multiply-accumulates per image for each stage."""
    return [
        _block_macs(arch, *first) + (n - 1) * _block_macs(arch, *rest) for _, n, first, rest in _stages(arch)
    ]


def stem_macs(arch: Architecture) -> int:
    return arch.stem_side**2 * arch.stem_kernel**2 * INPUT_CHANNELS * arch.stem_width


def head_macs(arch: Architecture) -> int:
    return arch.head_features * arch.num_classes


def count_macs(arch: Architecture) -> int:
    """Multiply-accumulates of one forward pass of one image (convs and the linear layer)."""
    return stem_macs(arch) + sum(stage_macs(arch)) + head_macs(arch)


def budget_verdict(params: int, budget: int) -> str:
    """``81,398 under the 5,000,000 budget`` or ``over the 5,000,000 budget by 6,173,962``."""
    if params <= budget:
        return f"{budget - params:,} under the {budget:,} budget"
    return f"over the {budget:,} budget by {params - budget:,}"


def check_budget(arch: Architecture, budget: int) -> int:
    """Return the parameter count, or raise :class:`BudgetError` when it exceeds ``budget``."""
    params = count_params(arch)
    if params > budget:
        raise BudgetError(f"model has {params:,} parameters, {budget_verdict(params, budget)}")
    return params


def summarize(arch: Architecture, budget: int) -> dict:
    """Parameters and MACs of a design, in total and per part, with the budget verdict."""
    params = count_params(arch)
    stages = []
    for (i, n, first, _), p, m in zip(_stages(arch), stage_params(arch), stage_macs(arch)):
        stages.append(
            {
                "stage": i + 1,
                "blocks": n,
                "channels": first[1],
                "side": first[4],
                "params": p,
                "macs": m,
            }
        )
    return {
        "architecture": arch.to_dict(),
        "params": params,
        "budget": budget,
        "within_budget": params <= budget,
        "headroom": budget - params,
        "verdict": budget_verdict(params, budget),
        "macs": count_macs(arch),
        "stem_params": stem_params(arch),
        "stem_macs": stem_macs(arch),
        "stem_side": arch.stem_side,
        "head_params": head_params(arch),
        "head_macs": head_macs(arch),
        "stages": stages,
    }


# --------------------------------------------------------------------------------------------
# Memory layout

# Below this many input channels a strided 1x1 convolution's backward pass in NHWC is unsafe in
# oneDNN on x86 CPUs: the channel block of its 1x1 kernels, 8 floats with AVX2, 16 with AVX-512.
NHWC_SAFE_CHANNELS = 16


def nhwc_backward_hazard(arch: Architecture) -> str | None:
    """The first layer of ``arch`` that oneDNN cannot train in channels_last on an x86 CPU, or None.

    oneDNN's 1x1 backward-weights kernel for a stride above 1 (its "reduce to unit stride" path)
    writes past its workspace when an NHWC input has fewer channels than the kernel's channel
    block, 8 floats with AVX2 and 16 with AVX-512 (reported as oneDNN issue #6035): the pass
    hangs, crashes or returns wrong weight gradients (here: hangs, and gradients wrong by several
    times their norm; ``benchmarks/probe_nhwc_backward.py``). In this family the strided convs
    are the first conv and the projection shortcut of the first block of every stage after the
    first under ``downsample = "stride"``; the named layer is a 1x1 one of those reading fewer
    than :data:`NHWC_SAFE_CHANNELS` channels, as ``layerI.0.conv1`` or ``layerI.0.shortcut.0``.
    ``downsample = "pool"`` strides no convolution. Pure: no torch, like the rest of this module.
    """
    if arch.downsample != "stride":
        return None
    for i in range(1, len(arch.blocks)):
        reads = arch.widths[i - 1]
        if reads >= NHWC_SAFE_CHANNELS:
            continue
        if arch.conv_kernel == 1:
            return f"layer{i + 1}.0.conv1 (a strided 1x1 conv reading {reads} channels)"
        if arch.skip_kernel == 1:
            return f"layer{i + 1}.0.shortcut.0 (a strided 1x1 conv reading {reads} channels)"
    return None
