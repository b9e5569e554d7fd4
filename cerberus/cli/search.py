"""``cerberus search``: enumerate a design space under the budget, or train trials with Optuna.

Without ``--trials`` every design of the space is counted analytically and the best are listed
(nothing is trained). With ``--trials N`` this process trains N short trials of a study kept in
an Optuna storage: by default ``sqlite:///<out>/study.db``, resumable by running the same command
again. Several processes or machines share one study through one storage, e.g. PostgreSQL::

    cerberus search space.toml --trials 20 --study wide --storage postgresql://user:pw@dbhost/cerberus
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from cerberus.cli._app import MultiValueCommand, app, console, emit_json, fail, handle_errors, import_torch


class SortBy(str, Enum):
    params = "params"
    macs = "macs"


class PrunerChoice(str, Enum):
    hyperband = "hyperband"
    halving = "halving"
    none = "none"


def count(n: int, noun: str) -> str:
    """``n`` and ``noun``, singular for 1: "1 trial", "2,000 designs"."""
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def note_skipped(skipped, base_given: bool) -> None:
    """Say on stderr which designs of the top list were not written as configs, and why."""
    if not skipped:
        return
    source = "the --config base" if base_given else "the default train config"
    head = f"skipped {count(len(skipped), 'design')} that {source} refuses:"
    reasons = [f"{s.name}: {s.reason}" for s in skipped]
    typer.echo(f"{head} {reasons[0]}" if len(reasons) == 1 else "\n  ".join([head, *reasons]), err=True)


# --------------------------------------------------------------------------------------------
# Enumeration


def candidates_table(enumeration):
    from rich.table import Table

    shown = len(enumeration.candidates)
    table = Table(
        title=f"Top {shown} of {count(enumeration.within_budget, 'design')} within "
        f"{enumeration.bounds()} (by {enumeration.sort})",
        title_justify="left",
    )
    for name in ("#", "params", "MACs/image", "blocks", "channels", "F", "K", "P", "S", "stem", "down"):
        table.add_column(name, justify="left" if name in ("blocks", "channels", "down") else "right")
    for rank, c in enumerate(enumeration.candidates, start=1):
        a = c.architecture
        table.add_row(
            str(rank),
            f"{c.params:,}",
            f"{c.macs:,}",
            " ".join(map(str, a.blocks)),
            " ".join(map(str, a.widths)),
            str(a.conv_kernel),
            str(a.skip_kernel),
            str(a.pool),
            str(a.stem_kernel),
            str(a.stem_width),
            a.downsample,
        )
    return table


LONG_COUNT = 5_000_000  # designs: counting more takes long enough to say so


def run_enumeration(space, top, sort, as_json, write_dir, base) -> None:
    from cerberus.search import count_designs, enumerate_designs, write_candidate_configs
    from cerberus.search.enumeration import smallest_params
    from cerberus.search.results import check_configs_dir

    if write_dir is not None:  # before counting, which can take minutes
        check_configs_dir(write_dir, "--write-configs")
    err = console(stderr=True)
    on_progress, progress = None, None
    total = count_designs(space)
    if total > LONG_COUNT and not err.is_terminal:  # no live bar to show that work goes on
        err.print(f"counting {total:,} designs (tens of millions a second; Ctrl-C stops)")
    elif total > LONG_COUNT:
        from rich.progress import Progress

        progress = Progress(console=err, transient=True)
        task = progress.add_task("counting designs", total=None)
        progress.start()

        def on_progress(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

    try:
        enumeration = enumerate_designs(space, top=top, sort=sort, on_progress=on_progress)
    except KeyboardInterrupt:
        typer.echo("Interrupted while counting designs; nothing was written.", err=True)
        raise typer.Exit(130) from None
    finally:
        if progress is not None:
            progress.stop()
    paths = write_candidate_configs(enumeration, write_dir, base) if write_dir is not None else []
    skipped = paths.skipped if write_dir is not None else []
    if as_json:
        written = {}
        if write_dir is not None:  # and the designs of the list that the base config refuses
            written = {
                "configs": [str(path) for path in paths],
                "skipped_configs": [s.to_dict() for s in skipped],
            }
        emit_json({**enumeration.to_dict(), **written})
        note_skipped(skipped, base is not None)
        return
    out = console()
    if enumeration.candidates:
        out.print(candidates_table(enumeration))
    rate = enumeration.total / max(enumeration.seconds, 1e-9)
    line = (
        f"{count(enumeration.total, 'design')} counted in {enumeration.seconds:.2f}s ({rate:,.0f}/s); "
        f"{enumeration.within_budget:,} within {enumeration.bounds()}"
    )
    smallest = smallest_params(space) if not enumeration.within_budget else 0
    if smallest > enumeration.max_params:
        line += f"; the smallest design has {smallest:,}"
    out.print(line)
    if paths:
        out.print(f"wrote {count(len(paths), 'train config')} to {write_dir}/")
    note_skipped(skipped, base is not None)


# --------------------------------------------------------------------------------------------
# Trials


class TrialsDisplay:
    """Renders search events on stderr: a live line per running trial, a line per finished one."""

    def __init__(self) -> None:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self.console = console(stderr=True)
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(bar_width=20),
            TextColumn("epoch {task.fields[epoch]}/{task.fields[epochs]}"),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            console=self.console,
            transient=True,
        )
        self.tasks: dict[int, Any] = {}
        self.started = False

    def __call__(self, event: dict[str, Any]) -> None:
        handler = getattr(self, f"on_{event['event']}", None)
        if handler is not None:
            handler(event)

    def on_study(self, e: dict[str, Any]) -> None:
        self.console.print(
            f"study [bold]{e['study']}[/] ({e['storage']}): {count(e['existing_trials'], 'trial')} so far; "
            f"running {e['trials']} more"
        )
        if self.console.is_terminal:  # to a file or pipe the finished-trial lines say it all
            self.progress.start()
            self.started = True

    def on_trial_start(self, e: dict[str, Any]) -> None:
        from rich.markup import escape

        self.tasks[e["trial"]] = self.progress.add_task(
            escape(f"trial {e['trial']} {e['design']} {e['params']:,}"),
            total=e["epochs"],
            epoch=0,
            epochs=e["epochs"],
            info="",
        )

    def on_trial_step(self, e: dict[str, Any]) -> None:
        task = self.tasks.get(e["trial"])
        if task is not None:
            self.progress.update(task, completed=e["epoch"] - 1 + e["step"] / e["steps"])

    def on_trial_epoch(self, e: dict[str, Any]) -> None:
        task = self.tasks.get(e["trial"])
        if task is not None:
            info = f"val acc {e['val_accuracy']:.4f} (best {e['best_val_accuracy']:.4f})"
            self.progress.update(task, completed=e["epoch"], epoch=e["epoch"], info=info)

    def on_trial_end(self, e: dict[str, Any]) -> None:
        from rich.markup import escape

        task = self.tasks.pop(e["number"], None)
        if task is not None:
            self.progress.remove_task(task)
        colour = {"complete": "green", "pruned": "yellow", "rejected": "yellow"}.get(e["state"], "red")
        accuracy = f"val acc {e['val_accuracy']:.4f}" if e["val_accuracy"] is not None else "no val acc"
        params = f"{e['params']:,} params" if e["params"] is not None else ""
        line = (
            f"trial {e['number']:>3} [{colour}]{e['state']:<8}[/] {escape(e['label'])}  {params}  "
            f"{accuracy}  epochs {e['epochs']}/{e['epochs_planned']}"
        )
        note = " ".join(e["note"].split())  # one line a trial, whatever the note's lines
        self.console.print(line + (f"  ({escape(note)})" if note else ""))

    def stop(self) -> None:
        if self.started:  # rich writes a blank line when stopping a display it never showed
            self.progress.stop()


def _accuracy(value: float | None) -> str:
    return f"{value:.4f}" if value is not None else "-"


def trials_table(records, title: str, limit: int | None = None):
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for name in ("trial", "val acc", "epochs", "state", "params", "MACs/image", "design"):
        table.add_column(name, justify="left" if name in ("state", "design") else "right")
    for r in records[:limit]:
        table.add_row(
            str(r.number),
            _accuracy(r.val_accuracy),
            f"{r.epochs}/{r.epochs_planned}" if r.epochs_planned else "-",
            r.state,
            f"{r.params:,}" if r.params is not None else "-",
            f"{r.macs:,}" if r.macs is not None else "-",
            r.label,
        )
    return table


def show_results(result) -> None:
    out = console()
    limit = 20
    title = f"Leaderboard of study {result.study!r} ({count(len(result.leaderboard), 'trial')})"
    out.print(trials_table(result.leaderboard, title, limit))
    if len(result.leaderboard) > limit:
        out.print(f"... {len(result.leaderboard) - limit} more in {result.out_dir / 'leaderboard.json'}")
    if result.pareto:
        out.print(trials_table(result.pareto, "Pareto front: validation accuracy against parameters"))
    for label, path in (("plot", result.plot), ("leaderboard", result.out_dir / "leaderboard.json")):
        if path is not None:
            out.print(f"{label}: {path}")
    if result.configs:
        out.print(f"best designs as train configs: {result.configs[0].parent}/ ({len(result.configs)})")


def run_search_trials(space, *, as_json: bool, trials: int, **kwargs) -> None:
    import_torch()
    import optuna

    from cerberus.search import run_trials

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # the display reports every trial
    display = TrialsDisplay()
    try:
        result = run_trials(space, trials=trials, on_event=display, **kwargs)
    finally:
        display.stop()
    if as_json:
        emit_json(result.to_dict())
    else:
        show_results(result)
    note_skipped(result.skipped_configs, kwargs.get("base") is not None)
    if result.interrupted:
        typer.echo(
            f"Interrupted: the running trial is marked failed. Run the same command again to continue "
            f"study {result.study!r} ({result.storage}).",
            err=True,
        )
        raise typer.Exit(143 if result.signal_name == "SIGTERM" else 130)
    if trials and not result.trials_trained:  # never a silent success that trained nothing
        raise fail(f"no trial trained: {result.stopped}", 1)
    if result.stopped:
        typer.echo(
            f"Trained {result.trials_trained} of {count(trials, 'trial')}: {result.stopped}.", err=True
        )


# --------------------------------------------------------------------------------------------
# The command


@app.command("search", cls=MultiValueCommand)
@handle_errors
def search_command(
    space_file: Annotated[
        Path | None,
        typer.Argument(
            metavar="SPACE.toml",
            help="Search space (default: 3-4 stages, 1-16 blocks each, base width 16-128).",
        ),
    ] = None,
    max_params: Annotated[
        int | None, typer.Option(help="Parameter budget (default: the space's, 5,000,000).")
    ] = None,
    min_params: Annotated[
        int | None, typer.Option(help="List only designs with at least this many parameters.")
    ] = None,
    top: Annotated[
        int, typer.Option(help="Designs to list, or (with --trials) best trial designs to write.")
    ] = 10,
    sort: Annotated[
        SortBy, typer.Option(help="params: closest under the budget first; macs: fewest MACs first.")
    ] = SortBy.params,
    write_configs: Annotated[
        Path | None,
        typer.Option(help="Write the top designs as train configs here (trials: OUT/configs)."),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(
            help="Base train config of written configs and trials; its model is replaced, and trials "
            "train 10 epochs whatever it says (--set train.epochs=N changes that)."
        ),
    ] = None,
    trials: Annotated[
        int | None, typer.Option(help="Train this many trials in this process (0: report only).")
    ] = None,
    storage: Annotated[
        str | None, typer.Option(help="Optuna storage URL (default: sqlite:///OUT/study.db).")
    ] = None,
    study: Annotated[str, typer.Option(help="Study name; one storage holds many.")] = "default",
    data_dir: Annotated[
        Path | None, typer.Option(help="Folder holding cifar-10-batches-py/ (overrides data.root).")
    ] = None,
    overrides: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override the trial config: --set train.epochs=3 data.train_subset=10000"),
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Search folder (default: runs/search-STUDY).")] = None,
    pruner: Annotated[
        PrunerChoice, typer.Option(help="Stops poor trials early, on validation accuracy per epoch.")
    ] = PrunerChoice.hyperband,
    seed: Annotated[
        int | None, typer.Option(help="Sampler seed, 0 to 2**32 - 1 (reproducible single process).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Search ResNet designs under the parameter budget: list them, or train trials.

    Without --trials, every design in the space is counted exactly (nothing is
    trained or allocated) and the best within the budget are listed: closest
    under the budget first, then fewer MACs.

    With --trials N, this process trains N short trials (10 epochs unless
    --set train.epochs=...) on designs that Optuna samples among those within
    the budget, never one the study already holds (it stops early once the
    study holds them all; a space with none within the budget is refused).
    Poor trials are pruned after an epoch on validation accuracy (the test set
    is never used). The study lives in --storage (default
    sqlite:///OUT/study.db): run the command again, with the same space, --config
    and --set, to continue it, or point several processes or machines at one
    storage to share the study, e.g.
    --storage postgresql://user:password@dbhost/cerberus. Results: a
    leaderboard, the Pareto front of accuracy against parameters (pareto.png)
    and the best designs as train configs. Ctrl-C or SIGTERM stops cleanly (exit 130 or 143).

    Examples:

    \b
      cerberus search --max-params 2000000 --top 5
      cerberus search configs/search-space.toml --json --write-configs found/
      cerberus search configs/search-space.toml --trials 20 --set train.epochs=5
    """
    from cerberus.config import config_from_dict, read_toml
    from cerberus.search import default_out_dir, load_space
    from cerberus.search.results import check_configs_dir

    if top < 0:
        raise fail(f"--top: must be 0 or more, got {top}", 2)
    if max_params is not None and max_params <= 0:
        raise fail(f"--max-params: must be positive, got {max_params}", 2)
    if min_params is not None and min_params < 0:
        raise fail(f"--min-params: must be 0 or more, got {min_params}", 2)
    if seed is not None and not 0 <= seed < 2**32:
        raise fail(f"--seed: must be in 0..{2**32 - 1} (Optuna's sampler), got {seed}", 2)
    space = load_space(space_file)
    if min_params is not None and min_params >= (max_params or space.max_params):
        budget = "--max-params" if max_params is not None else "the space's max_params"
        raise fail(
            f"--min-params: {min_params:,} must be below {budget} ({max_params or space.max_params:,})", 2
        )
    if max_params is not None and min_params is None and space.min_params >= max_params:
        raise fail(
            f"--max-params: {max_params:,} must be above the space's min_params ({space.min_params:,})", 2
        )
    if max_params is not None or min_params is not None:
        space = space.with_budget(max_params, min_params)
    base = None
    if config is not None:
        base = read_toml(config)  # a bad base is refused before any work (its model is replaced)
        config_from_dict(base, source=str(config), enforce_budget=False, model_replaced=True)
    if trials is None:
        trial_only = {
            "--storage": storage is not None,
            "--study": study != "default",
            "--data-dir": data_dir is not None,
            "--set": bool(overrides),
            "--out": out is not None,
            "--pruner": pruner != PrunerChoice.hyperband,
            "--seed": seed is not None,
        }
        given = [flag for flag, used in trial_only.items() if used]
        if given:
            verb = "applies" if len(given) == 1 else "apply"
            raise fail(f"{', '.join(given)} only {verb} to trials: add --trials N", 2)
        run_enumeration(space, top, sort.value, as_json, write_configs, base)
        return
    if trials < 0:
        raise fail(f"--trials: must be 0 or more, got {trials}", 2)
    enumeration_only = {"--sort": sort != SortBy.params, "--min-params": min_params is not None}
    given = [flag for flag, used in enumeration_only.items() if used]
    if given:
        verb = "applies" if len(given) == 1 else "apply"
        raise fail(f"{', '.join(given)} only {verb} to enumeration: drop --trials", 2)
    if top:  # the configs are written after the trials: a folder that cannot be one fails now
        if write_configs is not None:
            check_configs_dir(write_configs, "--write-configs")
        else:
            check_configs_dir((out if out is not None else default_out_dir(study)) / "configs")
    run_search_trials(
        space,
        as_json=as_json,
        trials=trials,
        out_dir=out,
        study_name=study,
        storage=storage,
        base=base,
        overrides=overrides or [],
        data_dir=str(data_dir) if data_dir is not None else None,
        pruner=pruner.value,
        seed=seed,
        top=top,
        configs_dir=write_configs,
    )
