"""Architecture search under the parameter budget: enumerate a design space, or train trials.

**Enumeration** (:func:`enumerate_designs`) counts every design of a :class:`SearchSpace`
analytically, keeps those within the budget and ranks them, without training or allocating a
weight. A space can hold millions of designs, so they are not counted one by one: for a fixed
choice of widths and kernels, every stage's cost is linear in its number of blocks (the first
block, which may downsample and project, plus ``b - 1`` identical repeated blocks), so

    params(b_1..b_N) = const + sum_i b_i * a_i        (and likewise for MACs)

The coefficients come from :func:`cerberus.arch.count_params` / :func:`~cerberus.arch.count_macs`
evaluated at a few block vectors (arch stays the single source of truth), and the whole blocks
grid is then counted with numpy in chunks of at most :data:`CHUNK_DESIGNS` designs. Only the
best ``top`` designs ever become Python objects.

**Trials** (:func:`run_trials`) train designs sampled from the space with Optuna, for a few
epochs each, and keep the best by validation accuracy (the test set is never evaluated). Every
epoch reports validation accuracy to a Hyperband (or successive-halving) pruner, which stops poor
trials early. Designs over the budget never start training: the sampler narrows each stage's
block range to what the budget leaves (so sampled designs fit), and a combination of widths that
cannot fit even with one block per stage is recorded as a cheap trial in state ``rejected``
(Optuna state PRUNED, user attribute ``rejected``) that counts towards ``--trials``.

The study lives in any Optuna storage; the default is an SQLite file in the search folder
(``sqlite:///<out>/study.db``): embedded, and resumable - running the same search again adds
``trials`` more trials to the same study. Several processes or machines pointed at one storage
and study name share the study; each runs its own ``trials`` trials. For many machines use a
server database, e.g. PostgreSQL (``pip install psycopg2-binary``)::

    createdb cerberus
    cerberus search space.toml --trials 20 --study wide \\
        --storage postgresql://user:password@dbhost/cerberus          # on every machine

Trials that die with their process (kill -9, power loss) are marked failed by the next process
that starts a trial in the study (Optuna heartbeats, :data:`HEARTBEAT_SECONDS`).
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cerberus.arch import MAX_STAGES, Architecture, count_macs, count_params
from cerberus.config import (
    ExperimentConfig,
    _format_validation_error,
    apply_overrides,
    config_from_dict,
    read_toml,
)
from cerberus.errors import BudgetError, CerberusError, ConfigError, DivergenceError, Interrupted
from cerberus.files import atomic_write

CHUNK_DESIGNS = 1 << 20  # designs counted per numpy pass (two int64 arrays: 16 MiB)
HEARTBEAT_SECONDS = 60  # a running trial writes a heartbeat this often...
GRACE_SECONDS = 300  # ...and counts as dead (failed) after this long without one

SortKey = Literal["params", "macs"]
PrunerName = Literal["hyperband", "halving", "none"]
EventSink = Callable[[dict[str, Any]], None]


def final_side(num_stages: int) -> int:
    """Side of the last stage's feature map for a 32x32 input (see cerberus.arch)."""
    return Architecture(blocks=(1,) * num_stages).final_side


# --------------------------------------------------------------------------------------------
# The search space


class SearchSpace(BaseModel):
    """A Cartesian product of designs, read from TOML (all keys optional, unknown keys errors).

    The default covers what the seed project explored: 3 and 4 stages, 1-16 blocks per stage,
    base widths 16-128 doubling per stage, 3x3 convs, 1x1 shortcuts, global pooling.
    """

    model_config = ConfigDict(extra="forbid")

    stages: list[int] = Field(default=[3, 4], min_length=1, description="Numbers of stages (N) to try, 1-6.")
    blocks: list[int] | list[list[int]] = Field(
        default=[1, 16],
        description="Blocks per stage (B), an inclusive range: [min, max] for every stage, or one "
        "[min, max] per stage (as many as the largest stage count).",
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
    max_params: int = Field(default=5_000_000, gt=0, description="Parameter budget.")
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
        if any(n < 1 or n > MAX_STAGES for n in counts):
            problems.append(f"stages: each count must be 1-{MAX_STAGES}, got {sorted(set(counts))}")
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
            sides = {final_side(n) for n in counts}
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
        if isinstance(self.blocks[0], list) and len(self.blocks) < max(counts):
            return [f"blocks: {len(self.blocks)} ranges given but designs have up to {max(counts)} stages"]
        return []

    def stage_counts(self) -> list[int]:
        """The distinct numbers of stages, in the order first given."""
        if self.channels is not None:
            return list(dict.fromkeys(len(c) for c in self.channels))
        return list(dict.fromkeys(self.stages))

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

    def pools(self, num_stages: int) -> list[int]:
        """Pool sizes (resolved: 0 becomes the final side) usable with ``num_stages`` stages."""
        side = final_side(num_stages)
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
        raise ConfigError(f"{source}: invalid search space\n{_format_validation_error(err)}") from None


def load_space(path: str | Path | None = None) -> SearchSpace:
    """Read a search space from TOML; ``None`` gives the default space."""
    if path is None:
        return SearchSpace()
    return space_from_dict(read_toml(path), source=str(path))


# --------------------------------------------------------------------------------------------
# Enumeration


@dataclass(frozen=True)
class _Family:
    """Designs that differ only in their blocks: cost = const + blocks . coef (exact)."""

    widths: tuple[int, ...]
    conv_kernel: int
    skip_kernel: int
    pool_size: int
    stem_channels: int
    const_params: int
    coef_params: tuple[int, ...]
    const_macs: int
    coef_macs: tuple[int, ...]

    def architecture(self, blocks: Sequence[int]) -> Architecture:
        return Architecture(
            blocks=tuple(int(b) for b in blocks),
            channels=self.widths,
            conv_kernel=self.conv_kernel,
            skip_kernel=self.skip_kernel,
            pool_size=self.pool_size,
            stem_channels=self.stem_channels,
        )


def _family(widths: tuple[int, ...], f: int, k: int, pool: int, stem: int) -> _Family:
    """Linear cost coefficients from arch's own counts at blocks (1,..,1) and each e_i + 1."""
    n = len(widths)

    def costs(blocks: tuple[int, ...]) -> tuple[int, int]:
        arch = Architecture(blocks, widths, f, k, pool, stem)
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
        ones_params - sum(coef_params),
        tuple(coef_params),
        ones_macs - sum(coef_macs),
        tuple(coef_macs),
    )


def _families(space: SearchSpace) -> Iterator[_Family]:
    """Every distinct (widths, kernels, pool, stem) combination, defaults resolved."""
    seen = set()
    for n in space.stage_counts():
        for widths, f, k, pool, stem in itertools.product(
            space.widths(n), space.conv_kernel, space.skip_kernel, space.pools(n), space.stem_channels
        ):
            key = (widths, f, k, pool, stem or widths[0])
            if key not in seen:
                seen.add(key)
                yield _family(*key)


def count_designs(space: SearchSpace) -> int:
    """Number of distinct designs in the space."""
    return sum(
        math.prod(hi - lo + 1 for lo, hi in space.block_ranges(len(fam.widths))) for fam in _families(space)
    )


@dataclass(frozen=True)
class Candidate:
    """One design with its exact parameter and MAC counts."""

    architecture: Architecture
    params: int
    macs: int

    def to_dict(self) -> dict[str, Any]:
        arch = self.architecture.to_dict()
        keys = ("blocks", "channels", "conv_kernel", "skip_kernel", "pool_size", "stem_channels")
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

    def to_dict(self) -> dict[str, Any]:
        return {
            "candidates": [c.to_dict() for c in self.candidates],
            "total": self.total,
            "within_budget": self.within_budget,
        }


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
    for family_index, fam in enumerate(families):
        n = len(fam.widths)
        values = [np.arange(lo, hi + 1, dtype=np.int64) for lo, hi in space.block_ranges(n)]
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
    )


# --------------------------------------------------------------------------------------------
# Designs as train configs


def design_config(
    arch: Architecture, max_params: int, base: dict[str, Any] | None = None, *, name: str | None = None
) -> ExperimentConfig:
    """``base`` config data with its [model] replaced by ``arch``; validated, budget enforced."""
    data = copy.deepcopy(base or {})
    data["model"] = {**arch.to_dict(), "max_params": max_params}
    if name is not None:
        data["name"] = name
    return config_from_dict(data, source=name or "design")


def design_slug(arch: Architecture) -> str:
    """A file-name-safe name, e.g. ``b3-5-3_c64-128-256_f3k1p8s64``."""
    blocks = "-".join(map(str, arch.blocks))
    widths = "-".join(map(str, arch.widths))
    return f"b{blocks}_c{widths}_f{arch.conv_kernel}k{arch.skip_kernel}p{arch.pool}s{arch.stem_width}"


def write_configs(
    designs: Sequence[tuple[Architecture, str]],
    out_dir: str | Path,
    max_params: int,
    base: dict[str, Any] | None = None,
) -> list[Path]:
    """Write ``cerberus train`` configs for ``(design, comment)`` pairs, best first.

    Files are ``NN-<slug>.toml`` (NN = rank) with the comment as a first line; each config is
    validated (budget included) before anything is written.
    """
    out_dir = Path(out_dir)
    configs = []
    for rank, (arch, comment) in enumerate(designs, start=1):
        name = f"{rank:02d}-{design_slug(arch)}"
        configs.append((name, comment, design_config(arch, max_params, base, name=name)))
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = []
        for name, comment, config in configs:
            path = out_dir / f"{name}.toml"
            path.write_text(f"# {comment}\n{config.to_toml()}")
            paths.append(path)
    except OSError as err:
        raise CerberusError(f"could not write configs to {out_dir}: {err.strerror or err}") from None
    return paths


def write_candidate_configs(
    enumeration: Enumeration, out_dir: str | Path, base: dict[str, Any] | None = None
) -> list[Path]:
    """The enumeration's candidates as train configs (see :func:`write_configs`)."""
    designs = [
        (c.architecture, f"{c.params:,} parameters, {c.macs:,} MACs/image (cerberus search)")
        for c in enumeration.candidates
    ]
    return write_configs(designs, out_dir, enumeration.max_params, base)


# --------------------------------------------------------------------------------------------
# Trials: results


@dataclass
class TrialRecord:
    """One trial of a study, as the leaderboard shows it."""

    number: int
    state: str  # complete | pruned | rejected | failed | running
    design: dict[str, Any] | None  # Architecture.to_dict(), None before the design was drawn
    label: str
    params: int | None
    macs: int | None
    val_accuracy: float | None  # best validation accuracy reached (pruned: before stopping)
    epochs: int  # epochs trained
    epochs_planned: int | None
    note: str = ""  # why it was rejected or pruned, or the error

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SearchResult:
    """The study after this process's trials: leaderboard, Pareto front, written files."""

    study: str
    storage: str
    out_dir: Path
    trials_run: int  # trials this call finished
    leaderboard: list[TrialRecord]
    pareto: list[TrialRecord]
    configs: list[Path] = field(default_factory=list)
    plot: Path | None = None
    interrupted: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "study": self.study,
            "storage": self.storage,
            "out_dir": str(self.out_dir),
            "trials_run": self.trials_run,
            "interrupted": self.interrupted,
            "leaderboard": [r.to_dict() for r in self.leaderboard],
            "pareto": [r.to_dict() for r in self.pareto],
            "configs": [str(p) for p in self.configs],
            "plot": str(self.plot) if self.plot else None,
        }


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the ``(params, accuracy)`` points no other point dominates, by params.

    A point is dominated when another has accuracy >= and params <=, one of them strictly.
    """
    front = [
        i
        for i, (p, a) in enumerate(points)
        if not any(q <= p and b >= a and (q < p or b > a) for q, b in points)
    ]
    return sorted(front, key=lambda i: (points[i][0], -points[i][1]))


def _record(trial) -> TrialRecord:
    import optuna

    attrs = trial.user_attrs
    state = {
        optuna.trial.TrialState.COMPLETE: "complete",
        optuna.trial.TrialState.PRUNED: "pruned",
        optuna.trial.TrialState.FAIL: "failed",
        optuna.trial.TrialState.RUNNING: "running",
        optuna.trial.TrialState.WAITING: "waiting",
    }[trial.state]
    if state == "pruned" and "rejected" in attrs:
        state = "rejected"
    accuracy = attrs.get("best_val_accuracy")
    if trial.state == optuna.trial.TrialState.COMPLETE and trial.value is not None:
        accuracy = trial.value
    return TrialRecord(
        number=trial.number,
        state=state,
        design=attrs.get("design"),
        label=attrs.get("label", ""),
        params=attrs.get("params"),
        macs=attrs.get("macs"),
        val_accuracy=accuracy,
        epochs=attrs.get("epochs", 0),
        epochs_planned=attrs.get("epochs_planned"),
        note=attrs.get("rejected") or attrs.get("pruned") or attrs.get("error", ""),
    )


def leaderboard(study) -> list[TrialRecord]:
    """Every trial, the best validation accuracy first; trials without one last, by number."""
    records = [_record(t) for t in study.get_trials(deepcopy=False)]
    return sorted(records, key=lambda r: (r.val_accuracy is None, -(r.val_accuracy or 0.0), r.number))


def study_pareto(records: Sequence[TrialRecord]) -> list[TrialRecord]:
    """The completed trials on the front of validation accuracy against parameters."""
    done = [r for r in records if r.state == "complete" and r.val_accuracy is not None and r.params]
    return [done[i] for i in pareto_front([(r.params, r.val_accuracy) for r in done])]


def plot_pareto(
    records: Sequence[TrialRecord], front: Sequence[TrialRecord], path: Path, budget: int
) -> Path:
    """Validation accuracy against parameters: every trial, the front, the budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for state, style in (
        ("pruned", dict(color="0.6", marker="x")),
        ("complete", dict(color="C0", marker="o")),
    ):
        shown = [r for r in records if r.state == state and r.val_accuracy is not None and r.params]
        if shown:
            label = f"{state} ({len(shown)})" + (" - accuracy when stopped" if state == "pruned" else "")
            ax.scatter([r.params for r in shown], [r.val_accuracy for r in shown], label=label, **style)
    if front:
        ax.step(
            [r.params for r in front],
            [r.val_accuracy for r in front],
            where="post",
            color="C3",
            marker="o",
            label="Pareto front",
        )
        for r in front:
            ax.annotate(
                f"#{r.number}",
                (r.params, r.val_accuracy),
                fontsize=7,
                xytext=(3, 3),
                textcoords="offset points",
            )
    ax.axvline(budget, color="k", linestyle="--", linewidth=1, label=f"budget {budget:,}")
    ax.set(xlabel="parameters", ylabel="validation accuracy", title="Search: accuracy vs parameters")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------
# Trials: running


def default_out_dir(study_name: str) -> Path:
    return Path("runs") / f"search-{study_name}"


def default_storage(out_dir: Path) -> str:
    return f"sqlite:///{Path(out_dir).resolve() / 'study.db'}"


def trial_base(
    base: dict[str, Any] | None = None, overrides: Sequence[str] = (), *, epochs: int = 10
) -> dict[str, Any]:
    """Config data of every trial: ``base``, then ``train.epochs=<epochs>``, then ``overrides``.

    The test set stays out of trials (``train.test_every_epoch`` is forced off) and they need a
    validation split. The [model] section is replaced per trial, so overrides may not set it.
    """
    if any(text.strip().startswith("model.") for text in overrides):
        raise ConfigError("--set model.*: the model comes from the search space; change the space instead")
    data = apply_overrides(base or {}, [f"train.epochs={epochs}", *overrides])
    data.setdefault("train", {})["test_every_epoch"] = False
    config = config_from_dict(data, source="trial config", enforce_budget=False)
    if config.data.val_size == 0:
        raise ConfigError(
            "trial config: data.val_size is 0, but trials are ranked by validation accuracy "
            "(the test set is never used to select designs); set data.val_size > 0"
        )
    return data


def _suggest_design(trial, space: SearchSpace) -> tuple[Architecture, bool]:
    """Draw a design; block ranges narrow to what the budget leaves. ``(design, fits)``."""
    n = trial.suggest_categorical("stages", space.stage_counts())
    if space.channels is not None:
        options = {"-".join(map(str, w)): w for w in space.widths(n)}
        widths = options[trial.suggest_categorical(f"channels_{n}", list(options))]
    else:
        base = trial.suggest_categorical("base_width", space.base_width)
        growth = trial.suggest_categorical("growth", space.growth)
        widths = tuple(max(1, round(base * growth**i)) for i in range(n))
    f = trial.suggest_categorical("conv_kernel", space.conv_kernel)
    k = trial.suggest_categorical("skip_kernel", space.skip_kernel)
    pool = trial.suggest_categorical(f"pool_size_{n}", space.pools(n))
    stem = trial.suggest_categorical("stem_channels", space.stem_channels) or widths[0]
    fam = _family(widths, f, k, pool, stem)
    ranges = space.block_ranges(n)
    # Budget left for stage i = max - const - chosen stages before i - the minimum of those after.
    spent = fam.const_params + sum(lo * a for (lo, _), a in zip(ranges, fam.coef_params))
    if spent > space.max_params:
        return fam.architecture([lo for lo, _ in ranges]), False
    blocks = []
    for i, ((lo, hi), a) in enumerate(zip(ranges, fam.coef_params)):
        most = lo + (space.max_params - spent) // a
        b = trial.suggest_int(f"blocks_{i}", lo, min(hi, most))
        spent += (b - lo) * a
        blocks.append(b)
    return fam.architecture(blocks), True


def _make_pruner(name: PrunerName, epochs: int):
    import optuna

    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=epochs, reduction_factor=3)
    if name == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)
    if name == "none":
        return optuna.pruners.NopPruner()
    raise ConfigError(f"pruner: expected hyperband, halving or none, got {name!r}")


@contextlib.contextmanager
def _creation_lock(url: str) -> Iterator[None]:
    """Serialise opening a SQLite storage: processes creating one new file at once would race."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        fcntl = None
    database = None
    if url.startswith("sqlite") and fcntl is not None:
        from sqlalchemy.engine import make_url

        database = make_url(url).database
    if not database or database == ":memory:":
        yield
        return
    lock = Path(database).with_name(f".{Path(database).name}.lock")
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise ConfigError(
            f"--storage {url}: cannot open the study storage in {lock.parent}: {err.strerror}"
        ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # released by close, or by the kernel if we die
        yield
    finally:
        os.close(fd)


def _open_storage(url: str):
    import optuna
    import sqlalchemy.exc

    engine_kwargs = {}
    if url.startswith("sqlite"):
        engine_kwargs["connect_args"] = {"timeout": 60}  # wait for other processes' writes
    for attempt in range(1, 4):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(
                    url,
                    engine_kwargs=engine_kwargs,
                    heartbeat_interval=HEARTBEAT_SECONDS,
                    grace_period=GRACE_SECONDS,
                )
        except ImportError as err:
            raise ConfigError(f"--storage {url}: the database driver is not installed ({err})") from None
        except Exception as err:  # sqlalchemy's: bad URL, unreachable server, unreadable file
            # Two processes creating the tables of a new server database at once: one loses, and
            # finds them created when it tries again.
            if attempt < 3 and isinstance(err, sqlalchemy.exc.DBAPIError) and not url.startswith("sqlite"):
                time.sleep(attempt)
                continue
            detail = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ConfigError(f"--storage {url}: cannot open the study storage: {detail}") from None


def _space_fingerprint(space: SearchSpace) -> dict[str, Any]:
    return json.loads(space.model_dump_json(exclude={"min_params"}))


def open_study(
    space: SearchSpace,
    *,
    study_name: str,
    storage: str,
    pruner: PrunerName = "hyperband",
    epochs: int = 10,
    seed: int | None = None,
    create: bool = True,
):
    """Create or load the study (maximising validation accuracy) and check it is this space's."""
    import optuna

    sampler = optuna.samplers.TPESampler(seed=seed)
    fingerprint = _space_fingerprint(space)
    with _creation_lock(storage):
        store = _open_storage(storage)
        try:
            if create:
                study = optuna.create_study(
                    storage=store,
                    study_name=study_name,
                    direction="maximize",
                    sampler=sampler,
                    pruner=_make_pruner(pruner, epochs),
                    load_if_exists=True,
                )
            else:
                study = optuna.load_study(
                    study_name=study_name, storage=store, sampler=sampler, pruner=_make_pruner(pruner, epochs)
                )
        except KeyError:
            raise ConfigError(f"no study named {study_name!r} in {storage}") from None
        recorded = study.user_attrs.get("space")
        if recorded is None:
            study.set_user_attr("space", fingerprint)
    if recorded is not None and recorded != fingerprint:
        differ = sorted(key for key in fingerprint if recorded.get(key) != fingerprint[key])
        raise ConfigError(
            f"study {study_name!r} in {storage} was created with another search space "
            f"(it differs in: {', '.join(differ)}); use the same space, or a new --study name"
        )
    return study


class _Objective:
    """One Optuna trial: draw a design, refuse it if over budget, train it, report each epoch."""

    def __init__(self, space, base, out_dir, data_dir, train_fn, emit):
        self.space, self.base, self.out_dir, self.data_dir = space, base, out_dir, data_dir
        self.train_fn, self.emit = train_fn, emit
        self.epochs = base["train"]["epochs"]

    def __call__(self, trial) -> float:
        import optuna

        arch, fits = _suggest_design(trial, self.space)
        params, macs = count_params(arch), count_macs(arch)
        info = dict(design=arch.to_dict(), label=arch.label(), params=params, macs=macs)
        for key, value in {**info, "epochs": 0, "epochs_planned": self.epochs}.items():
            trial.set_user_attr(key, value)
        try:
            if not fits:  # over even with the fewest blocks: say so rather than train
                raise BudgetError(f"{params:,} parameters, over the {self.space.max_params:,} budget")
            config = design_config(arch, self.space.max_params, self.base, name=f"trial-{trial.number:04d}")
        except BudgetError as err:
            trial.set_user_attr("rejected", f"over budget: {err}")
            raise optuna.TrialPruned(f"rejected before training: {err}") from None
        self.emit(
            {
                "event": "trial_start",
                "trial": trial.number,
                "design": info["label"],
                "params": params,
                "macs": macs,
                "epochs": self.epochs,
            }
        )
        progress = {"epochs": 0, "best": None}
        try:
            result = self.train_fn(
                config,
                out_dir=self.out_dir / "trials" / f"{trial.number:04d}",
                data_dir=self.data_dir,
                on_event=lambda event: self.on_run_event(trial, progress, event),
                evaluate_test=False,
                save_checkpoints=False,
                handle_signals=False,  # Ctrl-C stops the search now, not after a checkpoint
            )
        except DivergenceError as err:
            trial.set_user_attr("error", str(err))
            raise
        if result.best_val_accuracy is None:
            raise ConfigError("trial config: the run reported no validation accuracy")
        return float(result.best_val_accuracy)

    def on_run_event(self, trial, progress: dict[str, Any], event: dict[str, Any]) -> None:
        """Forward the runner's progress; report each epoch's accuracy and maybe prune."""
        import optuna

        kind = event.get("event")
        if kind == "step":
            self.emit({**event, "event": "trial_step", "trial": trial.number, "epochs": self.epochs})
        if kind != "epoch":
            return
        accuracy = float(event.get("selection_accuracy", event["val_accuracy"]))  # EMA when on
        epoch = progress["epochs"] = progress["epochs"] + 1
        best = progress["best"] = max(accuracy, progress["best"] or accuracy)
        trial.set_user_attr("epochs", epoch)
        trial.set_user_attr("best_val_accuracy", best)
        trial.report(accuracy, epoch)
        self.emit(
            {
                "event": "trial_epoch",
                "trial": trial.number,
                "epoch": epoch,
                "epochs": self.epochs,
                "val_accuracy": accuracy,
                "best_val_accuracy": best,
            }
        )
        if epoch < self.epochs and trial.should_prune():
            reason = f"pruned after epoch {epoch} (val accuracy {accuracy:.4f})"
            trial.set_user_attr("pruned", reason)
            raise optuna.TrialPruned(reason)  # propagates out of the runner, which cleans up


def _arch_from_dict(design: dict[str, Any]) -> Architecture:
    return Architecture(
        **{**design, "blocks": tuple(design["blocks"]), "channels": tuple(design["channels"])}
    )


def write_results(result: SearchResult, space: SearchSpace, *, top: int, base, configs_dir) -> None:
    """Write the ``top`` completed designs as configs, pareto.png and leaderboard.json."""
    best = [r for r in result.leaderboard if r.state == "complete" and r.design is not None][:top]
    designs = [
        (
            _arch_from_dict(r.design),
            f"trial {r.number} of study {result.study!r}: val accuracy {r.val_accuracy:.4f} after "
            f"{r.epochs} epochs; {r.params:,} parameters, {r.macs:,} MACs/image",
        )
        for r in best
    ]
    if designs:
        result.configs = write_configs(
            designs, configs_dir or result.out_dir / "configs", space.max_params, base
        )
    if any(r.val_accuracy is not None for r in result.leaderboard):
        result.plot = plot_pareto(
            result.leaderboard, result.pareto, result.out_dir / "pareto.png", space.max_params
        )
    atomic_write(result.out_dir / "leaderboard.json", json.dumps(result.to_dict(), indent=2) + "\n")


def run_trials(
    space: SearchSpace,
    *,
    trials: int,
    out_dir: str | Path | None = None,
    study_name: str = "default",
    storage: str | None = None,
    base: dict[str, Any] | None = None,
    overrides: Sequence[str] = (),
    data_dir: str | None = None,
    pruner: PrunerName = "hyperband",
    seed: int | None = None,
    top: int = 5,
    configs_dir: str | Path | None = None,
    on_event: EventSink | None = None,
    train_fn: Callable[..., Any] | None = None,
) -> SearchResult:
    """Run ``trials`` more trials of the study, then write its results.

    ``base`` is config data for the written configs (the defaults when None); trials train on
    ``base`` with ``train.epochs=10`` and then ``overrides`` (``["train.epochs=3", ...]``). The
    study lives in ``storage`` (default ``sqlite:///<out_dir>/study.db``) under ``study_name``;
    ``trials=0`` only reports on an existing study. Writes ``<out_dir>/pareto.png``, the ``top``
    completed designs as train configs in ``configs_dir`` (default ``<out_dir>/configs``) and
    ``<out_dir>/leaderboard.json``. ``train_fn`` defaults to :func:`cerberus.runner.train_run`.

    Progress goes to ``on_event`` as dicts: ``study``, ``trial_start``, ``trial_step``,
    ``trial_epoch``, ``trial_end`` (a :class:`TrialRecord` as a dict). Ctrl-C
    (KeyboardInterrupt) marks the running trial failed and returns with ``interrupted=True``;
    running the search again continues the study.
    """
    if trials < 0:
        raise ConfigError(f"--trials: must be 0 or more, got {trials}")
    trial_data = trial_base(base, overrides)
    epochs = trial_data["train"]["epochs"]
    out_dir = Path(out_dir) if out_dir is not None else default_out_dir(study_name)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"--out {out_dir}: cannot create the search folder ({err.strerror})") from None
    storage = storage or default_storage(out_dir)
    study = open_study(
        space,
        study_name=study_name,
        storage=storage,
        pruner=pruner,
        epochs=epochs,
        seed=seed,
        create=trials > 0,
    )
    emit = on_event or (lambda event: None)
    emit(
        {
            "event": "study",
            "study": study_name,
            "storage": storage,
            "out_dir": str(out_dir),
            "existing_trials": len(study.get_trials(deepcopy=False)),
            "trials": trials,
        }
    )
    if train_fn is None and trials:
        from cerberus.runner import train_run as train_fn

    finished: list[TrialRecord] = []

    def after_trial(study, trial) -> None:
        finished.append(_record(trial))
        emit({"event": "trial_end", **finished[-1].to_dict()})

    interrupted = False
    try:
        study.optimize(
            _Objective(space, trial_data, out_dir, data_dir, train_fn, emit),
            n_trials=trials,
            catch=(DivergenceError,),  # that trial fails; the search goes on
            callbacks=[after_trial],
        )
    except (KeyboardInterrupt, Interrupted):
        interrupted = True
    records = leaderboard(study)
    result = SearchResult(
        study_name, storage, out_dir, len(finished), records, study_pareto(records), interrupted=interrupted
    )
    write_results(result, space, top=top, base=base, configs_dir=configs_dir)
    return result
