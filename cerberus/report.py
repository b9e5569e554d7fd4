"""Renderables and files that present results: rich tables, plots, the torchinfo summary.

Builders return objects (rich renderables, strings, paths); only the CLI prints them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.table import Table

from cerberus.arch import STEM_KERNEL
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
        "stem", "", str(arch["stem_channels"]), f"{stem_side}x{stem_side}", f"{summary['stem_params']:,}", ""
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
        "",
    )
    table.add_section()
    table.add_row("total", "", "", "", f"{summary['params']:,}", f"{summary['macs']:,}")
    return table


def layer_summary(arch) -> str:
    """torchinfo's layer table for one 3x32x32 image (builds the model on the CPU)."""
    import torchinfo

    from cerberus.model import build_model

    stats = torchinfo.summary(
        build_model(arch),
        input_size=(1, 3, 32, 32),
        col_names=("output_size", "num_params", "mult_adds"),
        depth=3,
        verbose=0,
    )
    return str(stats)


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


def save_figure(fig, path) -> Path:
    """Write a figure as PNG, atomically; a failure is one :class:`CerberusError`."""
    import io

    from cerberus.files import atomic_write

    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", dpi=100)
    except OSError as err:
        raise CerberusError(f"could not write {path}: {err.strerror or err}") from None
    atomic_write(Path(path), buffer.getvalue())
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
