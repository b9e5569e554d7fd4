"""Renderables and files that present results: rich tables, plots, the torchinfo summary.

Builders return objects (rich renderables, strings, paths); only the CLI prints them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.table import Table

from cerberus.arch import STEM_KERNEL, count_params
from cerberus.errors import CerberusError

if TYPE_CHECKING:
    from cerberus.search import TrialRecord


def params_table(summary: dict[str, Any]) -> Table:
    """Per-part parameters and MACs of :func:`cerberus.arch.summarize`'s result."""
    arch = summary["architecture"]
    kind = ", max-pool downsampling" if arch.get("downsample") == "pool" else ""
    stem_kernel = arch.get("stem_kernel", STEM_KERNEL)
    if stem_kernel != STEM_KERNEL:
        kind += f", {stem_kernel}x{stem_kernel} stem"
    table = Table(title=f"ResNet {arch['blocks']} x {arch['channels']}{kind}", title_justify="left")
    table.add_column("part")
    table.add_column("blocks", justify="right")
    table.add_column("channels", justify="right")
    table.add_column("output", justify="right")
    table.add_column("params", justify="right")
    table.add_column("MACs", justify="right")
    stem_side = summary["stem_side"]
    table.add_row(
        "stem",
        "",
        str(arch["stem_channels"]),
        f"{stem_side}x{stem_side}",
        f"{summary['stem_params']:,}",
        f"{summary['stem_macs']:,}",
    )
    for stage in summary["stages"]:
        side = stage["side"]
        table.add_row(
            f"layer{stage['stage']}",
            str(stage["blocks"]),
            str(stage["channels"]),
            f"{side}x{side}",
            f"{stage['params']:,}",
            f"{stage['macs']:,}",
        )
    table.add_row(
        "head",
        "",
        f"pool {arch['pool_size']}",
        str(arch["num_classes"]),
        f"{summary['head_params']:,}",
        f"{summary['head_macs']:,}",
    )
    table.add_section()
    table.add_row("total", "", "", "", f"{summary['params']:,}", f"{summary['macs']:,}")
    return table


# The layer table builds the model and runs one image through it. Past this much memory for the
# weights alone (4 bytes a parameter) it is refused rather than risk the process being killed.
LAYER_TABLE_MAX_WEIGHT_BYTES = 10**9


def layer_summary(arch) -> str:
    """torchinfo's layer table for one 3x32x32 image (builds the model on the CPU).

    Raises :class:`CerberusError` when the model's weights alone would need more than
    :data:`LAYER_TABLE_MAX_WEIGHT_BYTES`, or when building the model or its forward pass runs
    out of memory; the analytic counts of :func:`cerberus.arch.summarize` never need either.
    """
    weight_bytes = 4 * count_params(arch)
    if weight_bytes > LAYER_TABLE_MAX_WEIGHT_BYTES:
        raise CerberusError(
            f"no layer table: building the model needs about {_readable_size(weight_bytes)} for its "
            f"weights alone, over the {_readable_size(LAYER_TABLE_MAX_WEIGHT_BYTES)} limit (the counts "
            "above do not need it)"
        )
    import torchinfo

    from cerberus.model import build_model

    try:
        stats = torchinfo.summary(
            build_model(arch),
            input_size=(1, 3, 32, 32),
            col_names=("output_size", "num_params", "mult_adds"),
            depth=3,
            verbose=0,
        )
    except (MemoryError, RuntimeError) as err:
        if isinstance(err, RuntimeError) and not re.search(r"alloc|memory", str(err), re.IGNORECASE):
            raise
        raise CerberusError(
            f"no layer table: building the model ran out of memory (its weights alone take about "
            f"{_readable_size(weight_bytes)}; the counts above do not need it)"
        ) from None
    return _readable_units(str(stats))


def _readable_size(num_bytes: int) -> str:
    """``180.0 GB``, ``1.0 GB``, ``6.0 kB`` (decimal units, as torchinfo's sizes)."""
    for unit, size in (("GB", 1e9), ("MB", 1e6)):
        if num_bytes >= size:
            return f"{num_bytes / size:,.1f} {unit}"
    return f"{num_bytes / 1e3:,.1f} kB"


def _readable_units(text: str) -> str:
    """``Total mult-adds (Units.MEGABYTES)`` -> ``Total mult-adds (M)``.

    torchinfo 1.8 formats its ``Units`` enum (a ``str`` mixin) with an f-string, which on
    Python 3.11+ gives the member's name instead of its value.
    """
    from torchinfo.enums import Units

    def value(match: re.Match[str]) -> str:
        member = Units.__members__.get(match[1])
        return match[0] if member is None else f"({member.value})"

    return re.sub(r"\(Units\.([A-Z]+)\)", value, text)


def plot_curves(metrics: list[dict[str, Any]], path) -> None:
    """Loss and accuracy against epoch (train, validation, EMA, and a labelled test curve)."""
    fig = new_figure((10, 4))
    epochs = [m["epoch"] for m in metrics]
    ax_loss, ax_acc = fig.subplots(1, 2)
    series = [
        ("train", "train_loss", "train_accuracy"),
        ("validation", "val_loss", "val_accuracy"),
        ("validation (EMA)", "ema_val_loss", "ema_val_accuracy"),
        ("test (curve only, not used for selection)", "curve_test_loss", "curve_test_accuracy"),
    ]
    for label, loss_key, acc_key in series:
        if loss_key in metrics[0]:
            ax_loss.plot(epochs, [m[loss_key] for m in metrics], marker=".", label=label)
            ax_acc.plot(epochs, [m[acc_key] for m in metrics], marker=".", label=label)
    ax_loss.set(xlabel="epoch", ylabel="loss", title="Loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="Accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def new_figure(size: tuple[float, float]):
    """A matplotlib figure on the Agg canvas, outside pyplot's global state (no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)
    return fig


def figure_png(fig) -> bytes:
    """A figure as PNG bytes."""
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def save_figure(fig, path) -> Path:
    """Write a figure as PNG, atomically; a failure is one :class:`CerberusError`."""
    from cerberus.files import atomic_write

    try:
        png = figure_png(fig)
    except OSError as err:
        raise CerberusError(f"could not write {path}: {err.strerror or err}") from None
    atomic_write(Path(path), png)
    return Path(path)


def plot_pareto(
    records: Sequence[TrialRecord], front: Sequence[TrialRecord], path: Path, budget: int
) -> Path:
    """Validation accuracy against parameters: every trial, the front, the budget."""
    fig = new_figure((7, 4.5))
    ax = fig.subplots()
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
    return save_figure(fig, path)
