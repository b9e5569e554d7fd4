"""Enumeration: count every design of a space analytically, keep the best within the budget.

:func:`enumerate_designs` counts every design of a :class:`SearchSpace` without training or
allocating a weight. A space can hold millions of designs, so they are not counted one by one:
for a fixed choice of widths and kernels, every stage's cost is linear in its number of blocks
(the first block, which may downsample and project, plus ``b - 1`` identical repeated blocks), so

    params(b_1..b_N) = const + sum_i b_i * a_i        (and likewise for MACs)

The coefficients come from :func:`cerberus.arch.count_params` / :func:`~cerberus.arch.count_macs`
evaluated at a few block vectors (arch stays the single source of truth). Each stage's block
range is first cut to what the budget allows (the rest is over it), and the remaining blocks
grid is counted with numpy in chunks of at most :data:`CHUNK_DESIGNS` designs. Only the best
``top`` designs ever become Python objects.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from cerberus.arch import MAX_STAGES, STEM_KERNEL, Architecture, count_macs, count_params
from cerberus.errors import ConfigError
from cerberus.search.space import SearchSpace

CHUNK_DESIGNS = 1 << 20  # designs counted per numpy pass (two int64 arrays: 16 MiB)

SortKey = Literal["params", "macs"]


@dataclass(frozen=True)
class _Family:
    """Designs that differ only in their blocks: cost = const + blocks . coef (exact)."""

    widths: tuple[int, ...]
    conv_kernel: int
    skip_kernel: int
    pool_size: int
    stem_channels: int
    downsample: str
    stem_kernel: int
    const_params: int
    coef_params: tuple[int, ...]
    const_macs: int
    coef_macs: tuple[int, ...]

    def params(self, blocks: Sequence[int]) -> int:
        """Exact parameters of the design with these blocks."""
        return self.const_params + sum(b * a for b, a in zip(blocks, self.coef_params))

    def label(self) -> str:
        """:meth:`Architecture.label` less the blocks, with the stem's width, e.g.
        ``C[16,32,64] F3 K1 P8 stem16``: a stable name for a sampler's choice."""
        design = self.architecture([1] * len(self.widths)).label()  # "B[1,1,1] C[...] ..."
        rest, stem = design.split(" ", 1)[1], f" stem{self.stem_channels}"
        return rest if rest.endswith(stem) else rest + stem  # the same names as before stem widths showed

    def architecture(self, blocks: Sequence[int]) -> Architecture:
        return Architecture(
            blocks=tuple(int(b) for b in blocks),
            channels=self.widths,
            conv_kernel=self.conv_kernel,
            skip_kernel=self.skip_kernel,
            pool_size=self.pool_size,
            stem_channels=self.stem_channels,
            downsample=self.downsample,
            stem_kernel=self.stem_kernel,
        )


def _family(
    widths: tuple[int, ...],
    f: int,
    k: int,
    pool: int,
    stem: int,
    downsample: str = "stride",
    stem_kernel: int = STEM_KERNEL,
) -> _Family:
    """Linear cost coefficients from arch's own counts at blocks (1,..,1) and each e_i + 1."""
    n = len(widths)

    def costs(blocks: tuple[int, ...]) -> tuple[int, int]:
        arch = Architecture(blocks, widths, f, k, pool, stem, downsample=downsample, stem_kernel=stem_kernel)
        return count_params(arch), count_macs(arch)

    ones_params, ones_macs = costs((1,) * n)
    coef_params, coef_macs = [], []
    for i in range(n):
        params, macs = costs(tuple(2 if j == i else 1 for j in range(n)))
        coef_params.append(params - ones_params)
        coef_macs.append(macs - ones_macs)
    return _Family(
        widths,
        f,
        k,
        pool,
        stem,
        downsample,
        stem_kernel,
        ones_params - sum(coef_params),
        tuple(coef_params),
        ones_macs - sum(coef_macs),
        tuple(coef_macs),
    )


def _family_keys(space: SearchSpace) -> Iterator[tuple[tuple[int, ...], int, int, int, int, str, int]]:
    """Every distinct (widths, F, K, pool, stem, downsample, stem kernel) combination, defaults
    resolved."""
    seen = set()
    for n in space.stage_counts():
        for geometry in space.geometries(n):
            for widths, f, k, pool, stem in itertools.product(
                space.widths(n),
                space.conv_kernel,
                space.skip_kernel,
                space.pools(n, geometry),
                space.stem_channels,
            ):
                key = (widths, f, k, pool, stem or widths[0], *geometry)
                if key not in seen:
                    seen.add(key)
                    yield key


def _families(space: SearchSpace) -> Iterator[_Family]:
    return (_family(*key) for key in _family_keys(space))


def count_designs(space: SearchSpace) -> int:
    """Number of distinct designs in the space: a product of range lengths per family (no counting)."""
    return sum(
        math.prod(hi - lo + 1 for lo, hi in space.block_ranges(len(key[0]))) for key in _family_keys(space)
    )


def _ranges_within_budget(
    fam: _Family, ranges: Sequence[tuple[int, int]], max_params: int
) -> list[tuple[int, int]] | None:
    """``ranges`` with each stage's maximum lowered to what the budget allows; None if nothing fits.

    Every block adds parameters (``coef > 0``), so stage ``i`` can hold at most
    ``(max_params - const - sum_{j != i} lo_j * coef_j) // coef_i`` blocks: any design beyond
    that is over the budget whatever the other stages hold. Without this, wide ranges would be
    counted design by design even where the budget rules out nearly all of them.
    """
    coef = fam.coef_params
    if any(a <= 0 for a in coef):  # cannot happen for this family of networks; never clip then
        return list(ranges)
    least = fam.const_params + sum(lo * a for (lo, _), a in zip(ranges, coef))  # all at minimum
    if least > max_params:
        return None
    return [(lo, min(hi, lo + (max_params - least) // a)) for (lo, hi), a in zip(ranges, coef)]


def smallest_params(space: SearchSpace) -> int:
    """Parameters of the smallest design of the space (every stage at its fewest blocks)."""
    return min(f.params([lo for lo, _ in space.block_ranges(len(f.widths))]) for f in _families(space))


def families_within_budget(space: SearchSpace) -> list[tuple[_Family, list[tuple[int, int]]]]:
    """Every family with a design within ``space.max_params``, with its block ranges cut to the
    budget (see :func:`_ranges_within_budget`); ``min_params`` is not applied. In the order of
    :func:`_family_keys`, so the same space always lists them alike."""
    fitting = []
    for fam in _families(space):
        ranges = _ranges_within_budget(fam, space.block_ranges(len(fam.widths)), space.max_params)
        if ranges is not None:
            fitting.append((fam, ranges))
    return fitting


@dataclass(frozen=True)
class Candidate:
    """One design with its exact parameter and MAC counts."""

    architecture: Architecture
    params: int
    macs: int

    def to_dict(self) -> dict[str, Any]:
        arch = self.architecture.to_dict()
        keys = (
            "blocks",
            "channels",
            "conv_kernel",
            "skip_kernel",
            "pool_size",
            "stem_channels",
            "downsample",
            "stem_kernel",
        )
        return {**{key: arch[key] for key in keys}, "params": self.params, "macs": self.macs}


@dataclass
class Enumeration:
    """The best ``len(candidates)`` designs, and how many were counted and fit the budget."""

    candidates: list[Candidate]
    total: int  # designs in the space
    within_budget: int  # designs with min_params <= params <= max_params
    max_params: int
    sort: SortKey
    seconds: float  # time spent counting
    min_params: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "candidates": [c.to_dict() for c in self.candidates],
            "total": self.total,
            "within_budget": self.within_budget,
            "max_params": self.max_params,
            "min_params": self.min_params,
            "sort": self.sort,
        }

    def bounds(self) -> str:
        """What ``within_budget`` counts, in words: "the 5,000,000-parameter budget", or a range."""
        if self.min_params:
            return f"{self.min_params:,} to {self.max_params:,} parameters"
        return f"the {self.max_params:,}-parameter budget"


def _outer_sum(vectors: Sequence[np.ndarray]) -> np.ndarray:
    """Flattened ``v0[i] + v1[j] + ...`` over the grid of all index tuples (C order)."""
    total = np.zeros(1, dtype=np.int64)
    for v in vectors:
        total = np.add.outer(total, v).ravel()
    return total


class _TopK:
    """Keeps the ``k`` best rows seen, ordered by (primary, secondary, family, order), all ascending."""

    def __init__(self, k: int):
        self.k = k
        self.columns: list[np.ndarray] | None = None  # primary, secondary, family, order, blocks...

    def add(self, primary, secondary, family: int, order, blocks: np.ndarray) -> None:
        if self.k == 0 or len(primary) == 0:
            return
        if len(primary) > self.k:  # a cheap pre-selection that keeps every tie of the k-th value
            kth = np.partition(primary, self.k - 1)[self.k - 1]
            keep = primary <= kth
            primary, secondary, order, blocks = primary[keep], secondary[keep], order[keep], blocks[keep]
        padded = np.zeros((len(primary), MAX_STAGES), dtype=np.int64)
        padded[:, : blocks.shape[1]] = blocks
        new = [primary, secondary, np.full(len(primary), family, dtype=np.int64), order, padded]
        if self.columns is not None:
            new = [np.concatenate([old, part]) for old, part in zip(self.columns, new)]
        best = np.lexsort((new[3], new[2], new[1], new[0]))[: self.k]
        self.columns = [column[best] for column in new]

    def rows(self) -> Iterator[tuple[int, np.ndarray]]:
        if self.columns is not None:
            yield from zip(self.columns[2].tolist(), self.columns[4])


def enumerate_designs(
    space: SearchSpace,
    *,
    top: int = 10,
    sort: SortKey = "params",
    on_progress: Callable[[int, int], None] | None = None,
) -> Enumeration:
    """Count every design of ``space``; return the ``top`` best within the budget.

    ``sort="params"``: most parameters first (closest under the budget), then fewer MACs.
    ``sort="macs"``: fewest MACs first, then more parameters. ``on_progress(done, total)`` is
    called after each chunk of designs.
    """
    if sort not in ("params", "macs"):
        raise ConfigError(f"sort: expected 'params' or 'macs', got {sort!r}")
    if top < 0:
        raise ConfigError(f"top: must be 0 or more, got {top}")
    start = time.perf_counter()
    families = list(_families(space))
    sizes = [math.prod(hi - lo + 1 for lo, hi in space.block_ranges(len(f.widths))) for f in families]
    grand_total, done, within = sum(sizes), 0, 0
    best = _TopK(top)
    for family_index, (fam, size) in enumerate(zip(families, sizes)):
        n = len(fam.widths)
        ranges = _ranges_within_budget(fam, space.block_ranges(n), space.max_params)
        if ranges is None:  # even the smallest design of this family is over the budget
            done += size
            if on_progress is not None:
                on_progress(done, grand_total)
            continue
        done += size - math.prod(hi - lo + 1 for lo, hi in ranges)  # skipped: over the budget
        values = [np.arange(lo, hi + 1, dtype=np.int64) for lo, hi in ranges]
        # Vectorise over the trailing stages (at most CHUNK_DESIGNS designs); loop over the rest.
        split, trailing = n, 1
        while split > 0 and trailing * len(values[split - 1]) <= CHUNK_DESIGNS:
            split -= 1
            trailing *= len(values[split])
        shape = [len(v) for v in values[split:]]
        trail_params = _outer_sum([fam.coef_params[i] * values[i] for i in range(split, n)])
        trail_macs = _outer_sum([fam.coef_macs[i] * values[i] for i in range(split, n)])
        for lead_index, lead in enumerate(itertools.product(*(v.tolist() for v in values[:split]))):
            params = trail_params + (fam.const_params + sum(b * a for b, a in zip(lead, fam.coef_params)))
            fits = params <= space.max_params
            if space.min_params:
                fits &= params >= space.min_params
            index = np.flatnonzero(fits)
            within += len(index)
            done += trailing
            if len(index) and top:
                params = params[index]
                macs = trail_macs[index] + (fam.const_macs + sum(b * a for b, a in zip(lead, fam.coef_macs)))
                primary, secondary = (-params, macs) if sort == "params" else (macs, -params)
                coords = np.unravel_index(index, shape)
                blocks = np.empty((len(index), n), dtype=np.int64)
                blocks[:, :split] = lead
                for j, c in enumerate(coords):
                    blocks[:, split + j] = values[split + j][c]
                best.add(primary, secondary, family_index, lead_index * trailing + index, blocks)
            if on_progress is not None:
                on_progress(done, grand_total)
    candidates = []
    for family_index, blocks in best.rows():
        fam = families[family_index]
        arch = fam.architecture(blocks[: len(fam.widths)].tolist())
        candidates.append(Candidate(arch, count_params(arch), count_macs(arch)))
    return Enumeration(
        candidates=candidates,
        total=grand_total,
        within_budget=within,
        max_params=space.max_params,
        sort=sort,
        seconds=time.perf_counter() - start,
        min_params=space.min_params,
    )
