"""``cerberus eval`` and ``cerberus predict``: a weights file against the test set or a Kaggle file."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from cerberus.cli._app import (
    MultiValueCommand,
    app,
    console,
    emit_json,
    handle_errors,
    import_torch,
    is_stdout,
    naming_flags,
)

TrustPickle = Annotated[
    bool,
    typer.Option(
        "--trust-pickle",
        help="Load files that hold pickled Python objects (e.g. a whole nn.Module). "
        "This can run arbitrary code: only for files you trust.",
    ),
]
NoEma = Annotated[
    bool,
    typer.Option(
        "--no-ema",
        help="Use the raw weights even where EMA weights exist (last.pt holds both; best.pt of an EMA "
        "run holds only the EMA weights).",
    ),
]
Tta = Annotated[
    bool | None,
    typer.Option(
        "--tta/--no-tta",
        help="Weighted average of 6 views: the image and its mirror (1/4 each), both also shifted 1 "
        "pixel up-left and 1 down-right (1/8 each). Default: as the checkpoint's run tested "
        "(train.test_tta); off for other weights.",
        show_default=False,
    ),
]
Device = Annotated[
    str | None, typer.Option(help="auto, cpu, cuda or mps (default: the checkpoint's, else auto).")
]
Precision = Annotated[
    str | None, typer.Option(help="auto, fp32, bf16 or fp16 (default: the checkpoint's, else auto).")
]
BatchSize = Annotated[
    int | None, typer.Option(help="Images per batch (default: the checkpoint's, else 1000).", min=1)
]
AsJson = Annotated[bool, typer.Option("--json", help="Print one JSON object (no progress bar).")]
Quiet = Annotated[
    bool, typer.Option("--quiet", "-q", help="No progress bar (none either when not a terminal).")
]
# What the weights of a plain state_dict cannot show (Cerberus checkpoints record their design)
Blocks = Annotated[
    list[int] | None, typer.Option(help="Plain state_dicts: blocks per stage (default: inferred).")
]
ConvKernel = Annotated[int | None, typer.Option(help="Plain state_dicts: block conv kernel F.")]
SkipKernel = Annotated[
    int | None, typer.Option(help="Plain state_dicts: shortcut kernel K (default: inferred, else 1).")
]
PoolSize = Annotated[int | None, typer.Option(help="Plain state_dicts: average-pool size P.")]
Downsample = Annotated[
    str | None,
    typer.Option(help="Plain state_dicts: 'stride' or 'pool' (default: inferred, else stride)."),
]


def _design_overrides(blocks, conv_kernel, skip_kernel, pool_size, downsample) -> dict[str, Any]:
    return {
        "blocks": tuple(blocks) if blocks else None,
        "conv_kernel": conv_kernel,
        "skip_kernel": skip_kernel,
        "pool_size": pool_size,
        "downsample": downsample,
    }


def _print_notes(notes: list[str]) -> None:
    for note in notes:
        typer.echo(f"Note: {note}", err=True)


def _warn_trust(path: Path) -> None:
    typer.echo(
        f"Warning: --trust-pickle: loading {path} may run any code stored in it; "
        "use it only for files you trust.",
        err=True,
    )


@contextlib.contextmanager
def _progress_bar(enabled: bool, description: str) -> Iterator[Any]:
    """A rich progress bar on stderr; yields the ``progress(done, total)`` callback (or None).

    Only a terminal gets one: piped or redirected, stderr stays free of bar residue.
    """
    import sys

    if not enabled or not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(
        TextColumn(description),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    )
    task = None

    def update(done: int, total: int) -> None:
        nonlocal task
        if task is None:  # started on the first batch, so errors before it print nothing else
            bar.start()
            task = bar.add_task(description, total=total)
        bar.update(task, completed=done)

    try:
        yield update
    finally:
        if task is not None:
            bar.stop()


def _fraction(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _render_eval(result: dict[str, Any]) -> None:
    from rich.table import Table

    from cerberus.arch import Architecture

    out = console()
    label = Architecture(**result["architecture"]).label()
    out.print(
        f"{result['checkpoint']}: {result['params']:,} parameters, {result['weights']} weights ({label})"
    )
    views = f", TTA over {result['views']} views" if result["tta"] else ""
    out.print(
        f"[bold]accuracy {result['accuracy']:.4f}[/] ({result['correct']:,}/{result['images']:,}), "
        f"loss {result['loss']:.4f}{views}"
    )
    per_class = Table(title="per class", title_justify="left")
    for column in ("class", "accuracy", "precision", "recall", "support"):
        per_class.add_column(column, justify="left" if column == "class" else "right")
    for row in result["per_class"]:
        per_class.add_row(
            row["class"],
            _fraction(row["accuracy"]),
            _fraction(row["precision"]),
            _fraction(row["recall"]),
            str(row["support"]),
        )
    out.print(per_class)
    classes = [row["class"] for row in result["per_class"]]
    matrix = Table(title="confusion matrix (rows: true, columns: predicted)", title_justify="left")
    matrix.add_column("")
    for name in classes:
        matrix.add_column(name[:5], justify="right")
    for name, counts in zip(classes, result["confusion_matrix"]):
        matrix.add_row(name, *(str(c) for c in counts))
    out.print(matrix)
    layout = "channels_last" if result["channels_last"] else "NCHW"
    out.print(
        f"{result['images_per_sec']:,.0f} images/s ({result['seconds']:.2f}s) on {result['device']} "
        f"{result['precision']} {layout}, batch {result['batch_size']}"
    )


@app.command("eval", cls=MultiValueCommand)
@handle_errors
def eval_command(
    checkpoint: Annotated[Path, typer.Argument(help="A Cerberus checkpoint or a plain state_dict file.")],
    data_dir: Annotated[
        Path | None, typer.Option(help="Folder holding cifar-10-batches-py/ (default: config, env, cache).")
    ] = None,
    test_subset: Annotated[
        int | None, typer.Option(help="Only the first N test images; 0 = all (default: the checkpoint's).")
    ] = None,
    tta: Tta = None,
    no_ema: NoEma = False,
    trust_pickle: TrustPickle = False,
    out: Annotated[
        Path | None, typer.Option(help="Folder to write confusion.png and eval.json into.")
    ] = None,
    device: Device = None,
    precision: Precision = None,
    batch_size: BatchSize = None,
    blocks: Blocks = None,
    conv_kernel: ConvKernel = None,
    skip_kernel: SkipKernel = None,
    pool_size: PoolSize = None,
    downsample: Downsample = None,
    as_json: AsJson = False,
    quiet: Quiet = False,
) -> None:
    """Evaluate weights on the CIFAR-10 test set: accuracy, loss, per-class table, confusion matrix.

    A Cerberus checkpoint is evaluated as its run was (same data settings, normalisation,
    placement and batch size), so best.pt reproduces the run's test accuracy. Other weights files
    (a state_dict of this ResNet family, possibly wrapped or with `module.` prefixes) have their
    architecture inferred from the weights' shapes.

    Examples:

    \b
      cerberus eval runs/resnet24/best.pt
      cerberus eval weights.pt --data-dir data --tta --out eval/
      cerberus eval best.pt --test-subset 1000 --json
    """
    import_torch()
    from cerberus.evaluate import check_report_dir, evaluate_checkpoint, write_report

    if trust_pickle:
        _warn_trust(checkpoint)
    if out is not None:
        check_report_dir(out)
    overrides = _design_overrides(blocks, conv_kernel, skip_kernel, pool_size, downsample)
    with naming_flags(overrides), _progress_bar(not (as_json or quiet), "evaluating") as progress:
        result = evaluate_checkpoint(
            checkpoint,
            data_dir=data_dir,
            test_subset=test_subset,
            tta=tta,
            use_ema=not no_ema,
            trust_pickle=trust_pickle,
            overrides=overrides,
            device=device,
            precision=precision,
            batch_size=batch_size,
            progress=progress,
        )
    if out is not None:
        result["files"] = [str(path) for path in write_report(result, out)]
    if as_json:
        emit_json(result)
        return
    _print_notes(result["notes"])
    _render_eval(result)
    if out is not None:
        console().print(f"wrote {', '.join(result['files'])}")


@app.command("predict", cls=MultiValueCommand)
@handle_errors
def predict_command(
    checkpoint: Annotated[Path, typer.Argument(help="A Cerberus checkpoint or a plain state_dict file.")],
    input_path: Annotated[
        Path, typer.Option("--input", help="The Kaggle test pickle (cifar_test_nolabel(s).pkl).")
    ],
    output: Annotated[
        Path, typer.Option("--output", help="Submission CSV to write (ID,Labels); - for stdout.")
    ] = Path("submission.csv"),
    layout: Annotated[
        str | None,
        typer.Option(help="Pixel order of the input: chw (N x 3072 rows) or hwc (default: from the shape)."),
    ] = None,
    probs: Annotated[
        Path | None, typer.Option("--probs", help="Also write class probabilities to this CSV.")
    ] = None,
    tta: Tta = None,
    no_ema: NoEma = False,
    trust_pickle: TrustPickle = False,
    device: Device = None,
    precision: Precision = None,
    batch_size: BatchSize = None,
    blocks: Blocks = None,
    conv_kernel: ConvKernel = None,
    skip_kernel: SkipKernel = None,
    pool_size: PoolSize = None,
    downsample: Downsample = None,
    as_json: AsJson = False,
    quiet: Quiet = False,
) -> None:
    """Predict the Kaggle test images and write a submission CSV (ID,Labels; labels 0-9).

    Both course layouts are read: N x 3072 channel-major rows (cifar_test_nolabels.pkl, 2024)
    and N x 32 x 32 x 3 (cifar_test_nolabel.pkl, 2025). The pickle is read without running any
    code it may hold.

    Examples:

    \b
      cerberus predict runs/resnet24/best.pt --input cifar_test_nolabel.pkl
      cerberus predict best.pt --input test.pkl --output sub.csv --tta --probs probs.csv
      cerberus predict weights.pt --input test.pkl --downsample pool
    """
    if str(output) == "-":  # the usual name for standard output
        output = Path("/dev/stdout")
    import_torch()
    from cerberus.kaggle import predict_unlabeled

    if trust_pickle:
        _warn_trust(checkpoint)
    overrides = _design_overrides(blocks, conv_kernel, skip_kernel, pool_size, downsample)
    with (
        naming_flags({**overrides, "layout": layout}),
        _progress_bar(not (as_json or quiet), "predicting") as progress,
    ):
        result = predict_unlabeled(
            checkpoint,
            input_path,
            output,
            layout=layout,
            probs_path=probs,
            tta=tta,
            use_ema=not no_ema,
            trust_pickle=trust_pickle,
            overrides=overrides,
            device=device,
            precision=precision,
            batch_size=batch_size,
            progress=progress,
        )
    report_to_stderr = is_stdout(output) or is_stdout(probs)  # the CSV itself goes to stdout
    if as_json:
        emit_json(result, err=report_to_stderr)
        return
    _print_notes(result["notes"])
    out = console(stderr=report_to_stderr)
    views = f", TTA over {result['views']} views" if result["tta"] else ""
    out.print(
        f"wrote {result['images']:,} predictions to {result['output']} "
        f"(layout {result['layout']}{views}, {result['seconds']:.2f}s)"
    )
    if result["probs"]:
        out.print(f"wrote probabilities to {result['probs']}")
    counts = ", ".join(f"{name} {n}" for name, n in result["predicted_counts"].items())
    out.print(f"predicted: {counts}")
