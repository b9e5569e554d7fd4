"""``cerberus train``: a validated config in, a run directory out, with a live display."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from cerberus.cli._app import MultiValueCommand, app, handle_errors, import_torch, silence_stdout
from cerberus.errors import ConfigError
from cerberus.files import to_json


def _layout(channels_last: bool, inference: bool | None) -> str:
    """', channels_last', or how evaluation's layout differs from training's."""
    if inference is None or inference == channels_last:
        return ", channels_last" if channels_last else ""
    return ", channels_last for evaluation" if inference else ", channels_last, NCHW for evaluation"


class TrainDisplay:
    """Renders the runner's events: rich progress bars on a terminal, plain lines elsewhere.

    Piped or redirected output gets one line per event, never wrapped (soft_wrap) and with no
    progress bars, which would only leave stale frames such as "steps 0/8" in a log file.
    """

    def __init__(self, quiet: bool):
        from rich.console import Console

        class Display(Console):
            def on_broken_pipe(self) -> None:  # rich would exit: the run goes on, unseen
                self.quiet = True
                silence_stdout()

        self.console = Display(stderr=False, highlight=False, soft_wrap=True)
        self.quiet = quiet or not self.console.is_terminal
        self.progress = None
        self.epoch_task = self.batch_task = None

    def __call__(self, event: dict[str, Any]) -> None:
        kind = event["event"]
        handler = getattr(self, f"on_{kind}", None)
        if handler is not None:
            handler(event)

    def on_start(self, e: dict[str, Any]) -> None:
        out = self.console
        out.print(
            f"[bold]{e['params']:,}[/] parameters on {e['device']} ({e['precision']}"
            f"{_layout(e['channels_last'], e.get('inference_channels_last'))}); "
            f"{e['train_images']:,} train / {e['val_images']:,} val / {e['test_images']:,} test images; "
            f"world size {e['world_size']}"
        )
        out.print(f"run directory: {e['out_dir']}")
        if e["start_epoch"] >= e["epochs"]:
            out.print(f"all {e['epochs']} epochs were already trained; finishing the run")
        elif e["start_epoch"] or e["start_step"]:
            out.print(f"resuming at epoch {e['start_epoch'] + 1}, step {e['start_step']}")
        if self.quiet:
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )
        self.progress.start()
        self.epoch_task = self.progress.add_task(
            "epochs", total=e["epochs"], completed=e["start_epoch"], info=""
        )
        self.batch_task = self.progress.add_task(
            "steps", total=e["steps_per_epoch"], completed=e["start_step"], info=""
        )

    def on_step(self, e: dict[str, Any]) -> None:
        if self.progress is not None:
            self.progress.update(
                self.batch_task,
                completed=e["step"],
                total=e["steps"],  # pruned epochs are shorter
                info=f"loss {e['loss']:.3f} acc {e['accuracy']:.3f} {e['images_per_sec']:,.0f} img/s",
            )

    def on_epoch(self, e: dict[str, Any]) -> None:
        parts = [
            f"epoch {e['epoch']:>3}",
            f"lr {e['lr']:.4g}" + (f" (muon {e['muon_lr']:.4g})" if "muon_lr" in e else ""),
            f"train loss {e['train_loss']:.4f} acc {e['train_accuracy']:.4f}"
            + (f" ({e['crop_size']}x{e['crop_size']} windows)" if "crop_size" in e else "")
            + (f" ({e['pruned_images']:,} images skipped)" if e.get("pruned_images") else ""),
        ]
        if "val_accuracy" in e:
            parts.append(f"val loss {e['val_loss']:.4f} acc {e['val_accuracy']:.4f}")
        if "ema_val_accuracy" in e:
            parts.append(f"ema val acc {e['ema_val_accuracy']:.4f}")
        if "curve_test_accuracy" in e:
            parts.append(f"(test curve acc {e['curve_test_accuracy']:.4f})")
        parts.append(f"{e['train_images_per_sec']:,.0f} img/s")
        parts.append(f"{e['seconds']:.0f}s")
        self.console.print(" | ".join(parts))
        if self.progress is not None:
            self.progress.update(self.epoch_task, completed=e["epoch"])
            self.progress.reset(self.batch_task, info="")

    def on_note(self, e: dict[str, Any]) -> None:
        typer.echo(f"Note: {e['message']}", err=True)

    def on_done(self, e: dict[str, Any]) -> None:
        self.stop()
        s = e["summary"]
        out = self.console
        if s.get("test_accuracy") is not None:
            out.print(
                f"[bold]test accuracy {s['test_accuracy']:.4f}[/] (loss {s['test_loss']:.4f}, "
                f"{s['test_images']:,} images{', TTA' if s.get('test_tta') else ''}, "
                f"weights of epoch {s['best_epoch']})"
            )
        if s.get("best_val_accuracy") is not None:
            out.print(f"best val accuracy {s['best_val_accuracy']:.4f} at epoch {s['best_epoch']}")
        out.print(
            f"{s['params']:,} parameters, {s['wall_seconds']:.1f}s wall, "
            f"{s['device']} {s['precision']}, peak RSS {s['peak_rss_mb']:,.0f} MB"
        )

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def json_lines(event: dict[str, Any]) -> None:
    if event["event"] != "step":
        typer.echo(to_json(event))


# How long the other processes of a torchrun machine wait for its first to report an error that
# all of them meet (a bad config) before they report it too.
REPORT_WAIT_SECONDS = 3.0


def survive_closed_stdout(sink: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
    """``sink``, silenced once the reader of stdout goes away (``| head``, a closed pipe) rather
    than ending the run there: training goes on and writes its checkpoints and files."""
    closed = False

    def emit(event: dict[str, Any]) -> None:
        nonlocal closed
        if closed:
            return
        try:
            sink(event)
        except BrokenPipeError:
            closed = True
            silence_stdout()

    return emit


@app.command("train", cls=MultiValueCommand)
@handle_errors
def train_command(
    config: Annotated[
        Path | None, typer.Argument(help="Experiment config (TOML). Not needed with --resume.")
    ] = None,
    overrides: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a config value: --set train.lr=0.05 data.val_size=0"),
    ] = None,
    data_dir: Annotated[
        Path | None, typer.Option(help="Folder holding cifar-10-batches-py/ (overrides data.root).")
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="Run directory (default: runs/<name>-<timestamp>).")
    ] = None,
    resume: Annotated[
        Path | None, typer.Option(help="Continue the run of this last.pt, in its own directory.")
    ] = None,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="No progress bars (none either when not a terminal).")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines of events, for scripts.")] = False,
) -> None:
    """Train a ResNet on CIFAR-10 from a validated config.

    The config is checked in full (schema, architecture, parameter budget) before any data is
    read. The run directory gets config.toml, metrics.jsonl, last.pt, best.pt (chosen on the
    validation split), curves.png and summary.json. Ctrl-C finishes the step, writes last.pt and
    exits 130; resume exactly where it stopped with --resume.

    Examples:

    \b
      cerberus train configs/cpu-quick.toml
      cerberus train configs/resnet24.toml --set train.epochs=50 --out runs/r24
      cerberus train --resume runs/r24/last.pt
      torchrun --nproc-per-node 2 -m cerberus train configs/resnet24.toml
    """
    from cerberus.config import load_config
    from cerberus.errors import CerberusError

    try:
        if resume is not None:
            if config is not None or overrides:
                raise ConfigError("--resume takes the config from the checkpoint: drop CONFIG and --set")
            if out is not None:
                raise ConfigError("--resume continues in the checkpoint's own folder: drop --out")
            cfg = None
        else:
            if config is None:
                raise ConfigError("give a CONFIG file (see configs/), or --resume LAST_PT")
            cfg = load_config(config, overrides or [])
    except CerberusError:
        # Under torchrun every process reads the same command line and files. The first process
        # of each machine says what is wrong at once; the others wait, and torchrun stops them
        # when that one exits. A process that is not stopped says it itself: never no message.
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and os.environ.get("LOCAL_RANK", "0") != "0":
            with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C: say it now
                time.sleep(REPORT_WAIT_SECONDS)
        raise

    import_torch()
    from cerberus.distributed import is_main_process
    from cerberus.runner import train_run

    main_process = is_main_process()
    display = None
    if as_json:
        sink = json_lines if main_process else None
    else:
        display = TrainDisplay(quiet=quiet) if main_process else None
        sink = display
    if sink is not None:
        sink = survive_closed_stdout(sink)
    try:
        train_run(
            cfg,
            out_dir=out,
            data_dir=str(data_dir) if data_dir is not None else None,
            resume=resume,
            on_event=sink,
        )
    except BaseException as err:
        if display is not None:
            display.stop()
        from cerberus.errors import Interrupted, LostProcessError

        if isinstance(err, Interrupted):
            if main_process:
                typer.echo(str(err), err=True)
            raise typer.Exit(err.exit_code) from None
        if isinstance(err, CerberusError) and not main_process and not isinstance(err, LostProcessError):
            # Under torchrun, rank 0 reports every rank's error: one message, not one per process.
            # A process that finds another gone says so itself: that one may be rank 0.
            raise typer.Exit(err.exit_code) from None
        if isinstance(err, CerberusError) and as_json and sink is not None:
            # the event stream says how it ends, as stderr's Error: line does
            sink({"event": "error", "message": str(err), "exit_code": err.exit_code})
        raise
