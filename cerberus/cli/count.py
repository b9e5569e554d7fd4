"""``cerberus count-params``: exact parameter count, MACs and the budget verdict."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cerberus.cli._app import (
    FLAGS,
    MultiValueCommand,
    app,
    console,
    emit_json,
    fail,
    handle_errors,
    naming_flags,
)


@app.command("count-params", cls=MultiValueCommand)
@handle_errors
def count_params_command(
    config: Annotated[
        Path | None, typer.Argument(help="A config file to read [model] from, instead of flags.")
    ] = None,
    blocks: Annotated[list[int] | None, typer.Option(help="Blocks per stage, e.g. --blocks 3 5 3.")] = None,
    channels: Annotated[list[int] | None, typer.Option(help="Width per stage (default: 64 * 2**i).")] = None,
    conv_kernel: Annotated[
        int | None, typer.Option(help="Kernel side F of block convs (odd; default 3).")
    ] = None,
    skip_kernel: Annotated[
        int | None, typer.Option(help="Kernel side K of projection shortcuts (default 1).")
    ] = None,
    pool_size: Annotated[
        int | None, typer.Option(help="Average-pool size P (default: global pooling).")
    ] = None,
    stem_channels: Annotated[
        int | None, typer.Option(help="Stem width (default: the first stage's width).")
    ] = None,
    stem_kernel: Annotated[
        int | None,
        typer.Option(help="Stem conv side S (default 3; 2 is unpadded and leaves a 31x31 map)."),
    ] = None,
    num_classes: Annotated[int | None, typer.Option(help="Output classes (default 10).")] = None,
    downsample: Annotated[
        str | None,
        typer.Option(
            help="How stages halve the map: 'stride' (the seed's, default) or 'pool' (max-pool in "
            "every stage)."
        ),
    ] = None,
    max_params: Annotated[
        int | None, typer.Option(help="Parameter budget (default: 5,000,000 or the config's).")
    ] = None,
    summary: Annotated[
        bool,
        typer.Option(
            "--summary",
            help="Add torchinfo's layer table (with --json: layer_summary); not past 1 GB of weights.",
        ),
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Count a design's parameters exactly and check them against the budget.

    Nothing is allocated: the count is analytic and matches the built model exactly.

    Examples:

    \b
      cerberus count-params --blocks 3 5 3
      cerberus count-params --blocks 2 2 2 2 --channels 64 128 256 512 --json
      cerberus count-params --blocks 1 1 1 --channels 32 128 128 --downsample pool --stem-kernel 2
      cerberus count-params configs/resnet24.toml --summary
    """
    from cerberus.arch import DEFAULT_BUDGET, Architecture, check_architecture, summarize

    design = {
        "blocks": tuple(blocks) if blocks else None,
        "channels": tuple(channels) if channels else None,
        "conv_kernel": conv_kernel,
        "skip_kernel": skip_kernel,
        "pool_size": pool_size,
        "stem_channels": stem_channels,
        "stem_kernel": stem_kernel,
        "num_classes": num_classes,
        "downsample": downsample,
    }
    given = {name: value for name, value in design.items() if value is not None}
    if config is not None:
        if given:
            flags = ", ".join(FLAGS[name] for name in given)
            message = f"give either a config file or design flags ({flags}), not both"
            if not config.is_file():  # a flag's extra value, taken for the config file
                message += (
                    f"; {str(config)!r} was read as the config file (a flag other than --blocks "
                    "and --channels takes one value)"
                )
            raise fail(message, 2)
        from cerberus.config import load_config

        model = load_config(config, enforce_budget=False).model
        arch, budget = model.architecture(), model.max_params
    else:
        chosen = {"blocks": (3, 5, 3), **given}
        with naming_flags(chosen):  # a problem names its flag, --blocks too when left at its default
            arch = check_architecture(Architecture(**chosen))
        budget = DEFAULT_BUDGET
    if max_params is not None:
        if max_params <= 0:
            raise fail(f"--max-params: must be positive, got {max_params}", 2)
        budget = max_params

    result = summarize(arch, budget)
    table, missing = None, None
    if summary:
        from cerberus.errors import CerberusError
        from cerberus.report import layer_summary

        try:
            table = layer_summary(arch)
        except CerberusError as err:  # too large to build: the counts stand, the table is left out
            missing = str(err)
    if as_json:
        if summary:
            result["layer_summary"] = table
            result["notes"] = [missing] if missing else []
        emit_json(result)
        return
    from cerberus.report import params_table

    out = console()
    out.print(params_table(result))
    out.print(f"parameters: {result['params']:,}")
    out.print(f"MACs/image: {result['macs']:,}")
    mark = "[green]within budget[/]" if result["within_budget"] else "[red]OVER BUDGET[/]"
    out.print(f"budget:     {mark}: {result['verdict']}")
    if table is not None:
        out.print(table, markup=False)
    elif missing is not None:
        console(stderr=True).print(f"Note: {missing}", markup=False)
