"""The search space: a Cartesian product of designs read from TOML, validated with pydantic."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cerberus.arch import DEFAULT_BUDGET, MAX_STAGES, MAX_STEM_KERNEL, STEM_KERNEL, Architecture
from cerberus.config import format_validation_error, read_toml
from cerberus.errors import ConfigError

MAX_BLOCKS = 256  # blocks per stage a space may ask for (a 256-block stage is already absurd)

# What fixes the feature-map sides of a design: its way of downsampling and its stem kernel
# (an even stem leaves 31x31). Stage limits and usable pool sizes depend on both.
Geometry = tuple[str, int]  # (downsample, stem_kernel)
DEFAULT_GEOMETRY: Geometry = ("stride", STEM_KERNEL)


def final_side(num_stages: int, downsample: str = "stride", stem_kernel: int = STEM_KERNEL) -> int:
    """Side of the last stage's feature map for a 32x32 input (see cerberus.arch)."""
    arch = Architecture(blocks=(1,) * num_stages, downsample=downsample, stem_kernel=stem_kernel)
    return arch.final_side


def stages_limit(downsample: str, stem_kernel: int = STEM_KERNEL) -> int:
    """The most stages a 32x32 input allows with this way of downsampling and stem."""
    return Architecture(downsample=downsample, stem_kernel=stem_kernel).max_stages


class SearchSpace(BaseModel):
    """A Cartesian product of designs, read from TOML (all keys optional, unknown keys errors).

    The default covers what the seed project explored: 3 and 4 stages, 1-16 blocks per stage,
    base widths 16-128 doubling per stage, 3x3 convs, 1x1 shortcuts, global pooling, the 3x3
    stem, strided downsampling.
    """

    model_config = ConfigDict(extra="forbid")

    stages: list[int] = Field(default=[3, 4], min_length=1, description="Numbers of stages (N) to try, 1-6.")
    blocks: list[int] | list[list[int]] = Field(
        default=[1, 16],
        description="Blocks per stage (B), an inclusive range: [min, max] for every stage, or one "
        f"[min, max] per stage (as many as the largest stage count); max <= {MAX_BLOCKS}.",
    )
    base_width: list[int] = Field(
        default=[16, 32, 48, 64, 96, 128],
        min_length=1,
        description="Channels of the first stage; stage i has round(base_width * growth**i).",
    )
    growth: list[float] = Field(
        default=[2.0], min_length=1, description="Factor between the widths of consecutive stages."
    )
    channels: list[list[int]] | None = Field(
        default=None,
        description="Explicit widths per stage instead of base_width x growth; each list's length "
        "is its number of stages (then leave stages, base_width and growth out).",
    )
    conv_kernel: list[int] = Field(
        default=[3], min_length=1, description="Kernel sides F of the convs in blocks (odd)."
    )
    skip_kernel: list[int] = Field(
        default=[1], min_length=1, description="Kernel sides K of projection shortcuts (odd)."
    )
    pool_size: list[int] = Field(
        default=[0],
        min_length=1,
        description="Average-pool sizes P, pixels; 0 = global. Other sizes are used only with the "
        "stage counts whose final feature map they divide.",
    )
    stem_channels: list[int] = Field(
        default=[0], min_length=1, description="Stem conv widths; 0 = the first stage's width."
    )
    downsample: list[Literal["stride", "pool"]] = Field(
        default=["stride"],
        min_length=1,
        description="How stages halve the map: 'stride' (the seed's) and/or 'pool' (max-pool in "
        "every stage, at most 5 stages, 4 from an even stem; larger stage counts are used with "
        "'stride' only).",
    )
    stem_kernel: list[int] = Field(
        default=[STEM_KERNEL],
        min_length=1,
        description=f"Stem conv sides S, 1-{MAX_STEM_KERNEL}; an even S is unpadded and leaves a "
        "31x31 map (2 = the fastest CIFAR trainers' stem), which allows one stage fewer with 'pool'.",
    )
    max_params: int = Field(default=DEFAULT_BUDGET, gt=0, description="Parameter budget.")
    min_params: int = Field(
        default=0, ge=0, description="Enumeration lists only designs with at least this many parameters."
    )

    @model_validator(mode="after")
    def _check(self) -> SearchSpace:
        problems = []
        if self.channels is not None:
            both = {"stages", "base_width", "growth"} & self.model_fields_set
            if both:
                problems.append(
                    f"channels: give explicit channel lists or {', '.join(sorted(both))}, not both"
                )
            if not self.channels or any(not c or min(c) < 1 for c in self.channels):
                problems.append("channels: every list needs one positive width per stage")
        counts = self.stage_counts() if not problems else self.stages
        bad_counts = any(n < 1 or n > MAX_STAGES for n in counts)
        if bad_counts:
            problems.append(f"stages: each count must be 1-{MAX_STAGES}, got {sorted(set(counts))}")
        if any(s < 1 or s > MAX_STEM_KERNEL for s in self.stem_kernel):
            problems.append(f"stem_kernel: sides must be 1-{MAX_STEM_KERNEL}, got {self.stem_kernel}")
        elif not bad_counts and not any(self.geometries(n) for n in counts):
            limits = ", ".join(f"{stages_limit(*g)} with {g[0]!r} and stem {g[1]}" for g in self.geometries())
            problems.append(
                f"stages: {sorted(set(counts))} do not fit downsample {self.downsample} and stem_kernel "
                f"{self.stem_kernel} (at most {limits})"
            )
        problems += self._check_blocks(counts)
        if min(self.base_width) < 1:
            problems.append(f"base_width: widths must be positive, got {self.base_width}")
        if min(self.growth) <= 0:
            problems.append(f"growth: factors must be positive, got {self.growth}")
        for name in ("conv_kernel", "skip_kernel"):
            values = getattr(self, name)
            if any(v < 1 or v % 2 == 0 for v in values):
                problems.append(f"{name}: kernel sides must be positive odd numbers, got {values}")
        if min(self.stem_channels) < 0:
            problems.append(
                f"stem_channels: must be 0 (first stage's width) or positive, got {self.stem_channels}"
            )
        if min(self.pool_size) < 0:
            problems.append(f"pool_size: must be 0 (global) or positive, got {self.pool_size}")
        elif not problems:
            sides = {final_side(n, *g) for n in counts for g in self.geometries(n)}
            unused = [p for p in self.pool_size if p and not any(s % p == 0 for s in sides)]
            if unused:
                problems.append(
                    f"pool_size: {unused} divide(s) no final feature map side of these stage counts "
                    f"(sides {sorted(sides)})"
                )
        if self.min_params >= self.max_params:
            problems.append(
                f"min_params ({self.min_params:,}) must be below max_params ({self.max_params:,})"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def _check_blocks(self, counts: Sequence[int]) -> list[str]:
        ranges = self.blocks if self.blocks and isinstance(self.blocks[0], list) else [self.blocks]
        if any(len(r) != 2 for r in ranges):
            return ["blocks: expected [min, max] or a list of [min, max], one per stage"]
        if any(r[0] < 1 or r[0] > r[1] for r in ranges):
            return [f"blocks: each range needs 1 <= min <= max, got {self.blocks}"]
        if any(r[1] > MAX_BLOCKS for r in ranges):
            return [f"blocks: at most {MAX_BLOCKS} blocks per stage, got {self.blocks}"]
        if isinstance(self.blocks[0], list) and len(self.blocks) < max(counts):
            return [f"blocks: {len(self.blocks)} ranges given but designs have up to {max(counts)} stages"]
        return []

    def stage_counts(self, geometry: Geometry | None = None) -> list[int]:
        """The distinct numbers of stages, in the order first given; with a ``(downsample,
        stem_kernel)`` geometry, only those it allows that also have a usable pool size."""
        if self.channels is not None:
            counts = list(dict.fromkeys(len(c) for c in self.channels))
        else:
            counts = list(dict.fromkeys(self.stages))
        if geometry is None:
            return counts
        return [n for n in counts if n <= stages_limit(*geometry) and self.pools(n, geometry)]

    def geometries(self, num_stages: int | None = None) -> list[Geometry]:
        """Every ``(downsample, stem_kernel)`` pair of the space; with ``num_stages``, those that
        allow that many stages."""
        pairs = [(m, s) for m in dict.fromkeys(self.downsample) for s in dict.fromkeys(self.stem_kernel)]
        if num_stages is None:
            return pairs
        return [g for g in pairs if num_stages <= stages_limit(*g)]

    def block_ranges(self, num_stages: int) -> list[tuple[int, int]]:
        """Inclusive ``(min, max)`` blocks of each stage of an ``num_stages``-stage design."""
        if isinstance(self.blocks[0], list):
            return [(r[0], r[1]) for r in self.blocks[:num_stages]]
        return [(self.blocks[0], self.blocks[1])] * num_stages

    def widths(self, num_stages: int) -> list[tuple[int, ...]]:
        """Distinct stage widths for ``num_stages`` stages, from explicit lists or base x growth."""
        if self.channels is not None:
            options = [tuple(c) for c in self.channels if len(c) == num_stages]
        else:
            options = [
                tuple(max(1, round(base * growth**i)) for i in range(num_stages))
                for base in self.base_width
                for growth in self.growth
            ]
        return list(dict.fromkeys(options))

    def pools(self, num_stages: int, geometry: Geometry = DEFAULT_GEOMETRY) -> list[int]:
        """Pool sizes (resolved: 0 becomes the final side) usable with ``num_stages`` stages."""
        side = final_side(num_stages, *geometry)
        return list(dict.fromkeys(p or side for p in self.pool_size if side % (p or side) == 0))

    def with_budget(self, max_params: int | None = None, min_params: int | None = None) -> SearchSpace:
        """A copy with another budget (validated again)."""
        data = self.model_dump(exclude_unset=True)
        if max_params is not None:
            data["max_params"] = max_params
        if min_params is not None:
            data["min_params"] = min_params
        return space_from_dict(data, source="search space")


def space_from_dict(data: dict[str, Any], *, source: str = "search space") -> SearchSpace:
    try:
        return SearchSpace.model_validate(data, strict=True)
    except ValidationError as err:
        raise ConfigError(f"{source}: invalid search space\n{format_validation_error(err)}") from None


def load_space(path: str | Path | None = None) -> SearchSpace:
    """Read a search space from TOML; ``None`` gives the default space."""
    if path is None:
        return SearchSpace()
    return space_from_dict(read_toml(path, kind="search space"), source=str(path))
