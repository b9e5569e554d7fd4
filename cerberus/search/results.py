"""What a search writes: designs as train configs, trial records, the Pareto front, results."""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cerberus.arch import STEM_KERNEL, Architecture
from cerberus.config import ExperimentConfig, config_from_dict
from cerberus.errors import CerberusError, ConfigError
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


# ``NN-<slug>.toml``, as :func:`write_configs` names its files: the only files it ever removes.
CONFIG_FILE = re.compile(
    r"\d{2,}-b\d+(?:-\d+)*_c\d+(?:-\d+)*_f\d+k\d+p\d+s\d+(?:_stem\d+)?(?:_maxpool)?\.toml"
)


@dataclass
class SkippedDesign:
    """A design of the top list left unwritten: the base config refuses it."""

    name: str  # the config it would have been, e.g. ``02-b1-1_c64-128_f3k1p16s64``
    reason: str  # the validation error, its lines joined by "; "

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class WrittenConfigs(list[Path]):
    """The configs written, best first, and the designs ``skipped`` because the base refuses them."""

    def __init__(self, paths: Sequence[Path] = (), skipped: Sequence[SkippedDesign] = ()):
        super().__init__(paths)
        self.skipped = list(skipped)


Planned = list[tuple[str, str, ExperimentConfig]]  # (name, comment, config), best first


def plan_configs(
    designs: Sequence[tuple[Architecture, str]], max_params: int, base: dict[str, Any] | None = None
) -> tuple[Planned, list[SkippedDesign]]:
    """Validate the configs of ``(design, comment)`` pairs, best first; nothing is written.

    Each is named ``NN-<slug>`` (NN = rank in ``designs``). A design that ``base`` refuses (its
    ``train.whiten_stem`` needs a stem width the design lacks, say) is skipped, and its number stays
    unused, so that a file's number is the design's rank in the list the user saw.
    """
    planned, skipped = [], []
    for rank, (arch, comment) in enumerate(designs, start=1):
        name = f"{rank:02d}-{design_slug(arch)}"
        try:
            planned.append((name, comment, design_config(arch, max_params, base, name=name)))
        except ConfigError as err:  # budget included: one design never stops the others
            reason = str(err).removeprefix(f"{name}: ").removeprefix("invalid config\n")
            skipped.append(SkippedDesign(name, "; ".join(reason.splitlines())))
    return planned, skipped


def check_configs_dir(path: str | Path, flag: str | None = None) -> None:
    """Raise :class:`ConfigError` when configs could not be written to the folder ``path``.

    Creates nothing: meant to run before a long job (a search's training) whose configs are
    written at its end. ``flag`` names the option that gave ``path``, for the message.
    """
    path = Path(path)
    where = f"{flag} {path}: cannot write configs there" if flag else f"cannot write configs to {path}"
    for folder in (path, *path.parents):  # the nearest one that exists must be a writable folder
        if os.path.isdir(folder):
            if not os.access(folder, os.W_OK | os.X_OK):
                raise ConfigError(f"{where}: {folder} is not writable")
            return
        if os.path.lexists(folder):  # a file, or a link to nothing
            raise ConfigError(f"{where}: {folder} is not a folder")


def stale_configs(out_dir: Path, keep: Sequence[str] = ()) -> list[Path]:
    """The files an earlier :func:`write_configs` left in ``out_dir`` (named as it names them),
    less the names in ``keep``; anything else there is the user's and never listed."""
    if not out_dir.is_dir():
        return []
    return sorted(
        path
        for path in out_dir.iterdir()
        if CONFIG_FILE.fullmatch(path.name)
        and path.name not in keep
        and path.is_file()
        and not path.is_symlink()
    )


def write_planned(planned: Planned, out_dir: str | Path) -> list[Path]:
    """Write :func:`plan_configs`' configs to ``out_dir``, comment first, after removing the
    configs an earlier write left there (their ranks are no longer this list's)."""
    out_dir = Path(out_dir)
    names = [f"{name}.toml" for name, _, _ in planned]
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        for path in stale_configs(out_dir, keep=names):
            path.unlink()
    except OSError as err:
        raise CerberusError(f"could not write configs to {out_dir}: {err.strerror or err}") from None
    paths = []
    for file_name, (_, comment, config) in zip(names, planned):
        path = out_dir / file_name
        atomic_write(path, f"# {comment}\n{config.to_toml()}")  # never a half-written config
        paths.append(path)
    return paths


def write_configs(
    designs: Sequence[tuple[Architecture, str]],
    out_dir: str | Path,
    max_params: int,
    base: dict[str, Any] | None = None,
) -> WrittenConfigs:
    """Write ``cerberus train`` configs for ``(design, comment)`` pairs, best first.

    Files are ``NN-<slug>.toml`` (NN = rank) with the comment as a first line; each config is
    validated (budget included) before anything is written, and a design ``base`` refuses is
    skipped (:func:`plan_configs`). Files of that name an earlier write left in ``out_dir`` are
    removed first; other files there are left alone.
    """
    planned, skipped = plan_configs(designs, max_params, base)
    return WrittenConfigs(write_planned(planned, out_dir), skipped)


def write_candidate_configs(
    enumeration: Enumeration, out_dir: str | Path, base: dict[str, Any] | None = None
) -> WrittenConfigs:
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
    signal_name: str = ""  # "SIGINT" or "SIGTERM" when a signal interrupted it
    skipped_configs: list[SkippedDesign] = field(default_factory=list)  # the base refuses them

    def to_dict(self) -> dict[str, Any]:
        return {
            "study": self.study,
            "storage": self.storage,
            "out_dir": str(self.out_dir),
            "trials_run": self.trials_run,
            "trials_trained": self.trials_trained,
            "stopped": self.stopped,
            "interrupted": self.interrupted,
            "signal": self.signal_name or None,
            "leaderboard": [r.to_dict() for r in self.leaderboard],
            "pareto": [r.to_dict() for r in self.pareto],
            "configs": [str(p) for p in self.configs],
            "skipped_configs": [s.to_dict() for s in self.skipped_configs],
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
    """Write pareto.png and leaderboard.json, then the ``top`` completed designs as configs.

    The results come first, so that a config that cannot be written loses nothing else; a design
    that ``base`` refuses is skipped (``result.skipped_configs``) and the others are written. The
    configs folder (default ``<out_dir>/configs``) is only touched when there is a top list.
    """
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
    planned, result.skipped_configs = plan_configs(designs, space.max_params, base)
    configs_dir = Path(configs_dir) if configs_dir is not None else result.out_dir / "configs"
    result.configs = [configs_dir / f"{name}.toml" for name, _, _ in planned]  # written next
    if any(r.val_accuracy is not None for r in result.leaderboard):
        result.plot = plot_pareto(
            result.leaderboard, result.pareto, result.out_dir / "pareto.png", space.max_params
        )
    write_leaderboard(result)
    if not best:
        return
    try:
        result.configs = write_planned(planned, configs_dir)
    except CerberusError as err:
        result.configs = []
        write_leaderboard(result)  # lists no config: which of them were written is unknown
        raise CerberusError(f"{err} ({result.out_dir / 'leaderboard.json'} was written)") from None


def write_leaderboard(result: SearchResult) -> None:
    """``<out_dir>/leaderboard.json``: the result as JSON, written atomically."""
    atomic_write(result.out_dir / "leaderboard.json", to_json(result.to_dict(), indent=2) + "\n")
