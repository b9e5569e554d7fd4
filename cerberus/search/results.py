"""What a search writes: designs as train configs, trial records, the Pareto front, results."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cerberus.arch import STEM_KERNEL, Architecture
from cerberus.config import ExperimentConfig, config_from_dict
from cerberus.errors import CerberusError
from cerberus.files import atomic_write, to_json
from cerberus.search.enumeration import Enumeration
from cerberus.search.space import SearchSpace

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
    slug = f"b{blocks}_c{widths}_f{arch.conv_kernel}k{arch.skip_kernel}p{arch.pool}s{arch.stem_width}"
    if arch.stem_kernel != STEM_KERNEL:
        slug += f"_stem{arch.stem_kernel}"
    return slug + "_maxpool" if arch.max_pool_downsampling else slug


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
    except OSError as err:
        raise CerberusError(f"could not write configs to {out_dir}: {err.strerror or err}") from None
    paths = []
    for name, comment, config in configs:
        path = out_dir / f"{name}.toml"
        atomic_write(path, f"# {comment}\n{config.to_toml()}")  # never a half-written config
        paths.append(path)
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
# Trial records, the Pareto front, the files a search writes


@dataclass
class TrialRecord:
    """One trial of a study, as the leaderboard shows it."""

    number: int
    state: str  # complete | pruned | rejected | failed | running | waiting (| skipped: not listed)
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
    trials_run: int  # trials this call finished (rejected designs included)
    leaderboard: list[TrialRecord]
    pareto: list[TrialRecord]
    configs: list[Path] = field(default_factory=list)
    plot: Path | None = None
    interrupted: bool = False
    trials_trained: int = 0  # trials this call trained: complete, pruned, or failed while training
    stopped: str = ""  # why this call trained fewer trials than asked ("" when it did not)

    def to_dict(self) -> dict[str, Any]:
        return {
            "study": self.study,
            "storage": self.storage,
            "out_dir": str(self.out_dir),
            "trials_run": self.trials_run,
            "trials_trained": self.trials_trained,
            "stopped": self.stopped,
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


def study_pareto(records: Sequence[TrialRecord]) -> list[TrialRecord]:
    """The completed trials on the front of validation accuracy against parameters."""
    done = [r for r in records if r.state == "complete" and r.val_accuracy is not None and r.params]
    return [done[i] for i in pareto_front([(r.params, r.val_accuracy) for r in done])]


def _arch_from_dict(design: dict[str, Any]) -> Architecture:
    return Architecture(
        **{**design, "blocks": tuple(design["blocks"]), "channels": tuple(design["channels"])}
    )


def write_results(result: SearchResult, space: SearchSpace, *, top: int, base, configs_dir) -> None:
    """Write the ``top`` completed designs as configs, pareto.png and leaderboard.json."""
    from cerberus.report import plot_pareto  # matplotlib and rich: only when writing

    best = [r for r in result.leaderboard if r.state == "complete" and r.design is not None][:top]
    designs = [
        (
            _arch_from_dict(r.design),
            f"trial {r.number} of study {result.study!r}: val accuracy {r.val_accuracy:.4f} after "
            f"{r.epochs} epoch{'' if r.epochs == 1 else 's'}; {r.params:,} parameters, {r.macs:,} MACs/image",
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
    atomic_write(result.out_dir / "leaderboard.json", to_json(result.to_dict(), indent=2) + "\n")
