"""A whole training run: run directory, data, model, epochs, checkpoints, resume, summary.

``train_run`` composes the parts (config -> data + model -> engine -> checkpoints/report) and
reports progress only through ``on_event``; it never prints. Events are dicts with an
``"event"`` key: ``start``, ``step``, ``epoch``, ``test``, ``done``, ``interrupted``, and
``note`` (``message``: something the user should know, e.g. an unverified checkpoint).

Run directory (``out_dir``): ``config.toml`` (resolved), ``metrics.jsonl`` (a line per epoch),
``last.pt`` and ``best.pt`` (+ ``.sha256`` sidecars), ``curves.png``, ``summary.json``.

Under torchrun every rank trains its shard of each global batch and rank 0 alone writes the run
directory and evaluates; the ranks agree through :class:`~cerberus.distributed.DistContext`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
import random
import re
import resource
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cerberus import __version__
from cerberus.arch import nhwc_backward_hazard
from cerberus.augment import Augmenter
from cerberus.checkpoint import (
    FORMAT,
    FORMAT_VERSION,
    all_finite,
    check_format,
    check_weights_fit,
    load_checkpoint,
    remove_stale_temporaries,
    unverified_note,
    verify_checkpoint,
)
from cerberus.checkpoint import save_checkpoint as _save_checkpoint
from cerberus.config import ExperimentConfig, config_from_dict
from cerberus.data import CLASSES, load_cifar10, make_splits, resolve_data_root, steps_per_epoch
from cerberus.device import Placement, resolve_placement, tune_backends
from cerberus.distributed import DistContext, lost_a_process
from cerberus.engine import EMA, EpochState, LRSchedule, Trainer, build_optimizer, whiten_stem_
from cerberus.errors import (
    CerberusError,
    CheckpointError,
    ConfigError,
    DivergenceError,
    Interrupted,
    LostProcessError,
    signal_exit_code,
    signal_name,
)
from cerberus.evaluate import classification_report, predict_logits
from cerberus.files import atomic_write, run_lock, to_json
from cerberus.model import build_model
from cerberus.prune import DataPruner

EventSink = Callable[[dict[str, Any]], None]

PLOT_EVERY_SECONDS = 30.0  # curves.png is redrawn at most this often while training runs


@dataclass
class RunResult:
    out_dir: Path
    summary: dict[str, Any]
    best_val_accuracy: float | None
    epochs_completed: int


def default_out_dir(config: ExperimentConfig) -> Path:
    return Path("runs") / f"{config.name}-{time.strftime('%Y%m%d-%H%M%S')}"


# --------------------------------------------------------------------------------------------
# Signals: finish the step, write last.pt, exit 130 (SIGINT) or 143 (SIGTERM)


class StopFlag:
    """Set by SIGINT/SIGTERM; the training loop checks it after every step.

    Within :meth:`at_once` (loading the data, the final test: work with nothing to save midway) a
    signal raises :class:`~cerberus.errors.Interrupted` at once instead.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self.stops_at: str | None = None  # while set, a signal stops now: "<where>; <what is kept>"

    def __call__(self) -> bool:
        return self.signum is not None

    @contextlib.contextmanager
    def at_once(self, where: str) -> Iterator[None]:
        if self.signum is not None:  # it came just before
            raise _interrupted(self.signum, where)
        self.stops_at = where
        try:
            yield
        except _StopNow as stop:
            raise _interrupted(stop.signum, where) from None
        finally:
            self.stops_at = None


class _StopNow(BaseException):
    """Raised by the signal handler within :meth:`StopFlag.at_once`, which turns it into
    :class:`~cerberus.errors.Interrupted`. A BaseException, so that the ``except Exception`` of
    the code it interrupts (a file read reporting corruption, say) lets it through, while
    ``finally`` and ``except BaseException`` clean-ups still run."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _interrupted(signum: int, where: str) -> Interrupted:
    return Interrupted(f"stopped by {signal_name(signum)} {where}", signal_exit_code(signum))


@contextlib.contextmanager
def stop_on_signals(flag: StopFlag) -> Iterator[None]:
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, _frame):
        if flag.stops_at is not None:
            flag.signum = signum
            flag.stops_at = None  # raised once: the cleanup it triggers is not interrupted again
            raise _StopNow(signum)
        if flag.signum is not None:  # a second signal: stop now
            signal.signal(signum, signal.SIG_DFL)
            raise KeyboardInterrupt
        flag.signum = signum

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


# --------------------------------------------------------------------------------------------
# The run


def _rng_state(device: torch.device) -> dict[str, Any]:
    """The global generators' states: the host's and, on a GPU, the training device's only (the
    GPUs a resumed run sees may be fewer, and a CPU run does not start CUDA to read them)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    cuda = state.get("cuda")
    if device.type != "cuda" or cuda is None:
        return
    if isinstance(cuda, list):  # earlier checkpoints kept every visible GPU's state
        index = device.index or 0
        if index >= len(cuda):
            return
        cuda = cuda[index]
    torch.cuda.set_rng_state(cuda, device)


# The losses an epoch's line may hold from evaluations, and what to call them in a message.
_EVALUATED_LOSSES = {
    "val_loss": "validation loss",
    "ema_val_loss": "EMA weights' validation loss",
    "curve_test_loss": "test loss of train.test_every_epoch",
}


def _peak_rss_mb() -> float:
    """This process's peak resident set size in megabytes (10^6 bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak * (1 if sys.platform == "darwin" else 1024) / 1e6


class Run:
    """State of one training run; ``train_run`` below is its only public entry."""

    def __init__(
        self,
        config: ExperimentConfig,
        out_dir: Path,
        on_event: EventSink | None,
        save_checkpoints: bool,
        dist: DistContext,
    ):
        self.config = config
        self.out_dir = out_dir
        self.emit = on_event or (lambda event: None)
        self.save_checkpoints = save_checkpoints
        self.dist = dist
        self.metrics: list[dict[str, Any]] = []
        self.best_val: float | None = None
        self.best_epoch: int | None = None
        self.best_state: dict[str, torch.Tensor] | None = None  # when checkpoints are off
        self.pending_best: dict[str, Any] | None = None  # best.pt not written yet (save_every_epochs)
        self.plotted: tuple[int, float] = (0, 0.0)  # (epochs in curves.png, when it was drawn)
        self.wall_start = time.perf_counter()

    # -- setup ---------------------------------------------------------------------------------

    def load_data(self) -> None:
        """Read the images (no collective calls: under torchrun this may fail on one rank only)."""
        cfg = self.config
        if cfg.model.num_classes != len(CLASSES):  # before reading (or downloading) anything
            raise ConfigError(
                f"model.num_classes: the model has {cfg.model.num_classes} outputs but CIFAR-10 has "
                f"{len(CLASSES)} classes; set model.num_classes = {len(CLASSES)}"
            )
        data = load_cifar10(Path(cfg.data.root), download=cfg.data.download, url=cfg.data.url)
        self.classes = data.classes
        self.splits = make_splits(data, cfg.data)
        if len(self.splits.train_labels) == 0:
            raise ConfigError("data: no training images left after data.train_subset and data.val_size")
        self.check_shards()

    def place(self) -> None:
        """Settle device, precision and layout (an unavailable one is refused before any work)."""
        cfg = self.config
        self.placement: Placement = resolve_placement(
            cfg.train.device if self.dist.device is None else self.dist.device.type,
            cfg.train.precision,
            cfg.train.channels_last,
            arch=cfg.model.architecture(),
        )
        if self.dist.device is not None:
            self.placement = dataclasses.replace(self.placement, device=self.dist.device)
        if cfg.train.sync_bn:
            self.dist.check_sync_bn()

    def setup(self) -> None:
        cfg = self.config
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        device = self.placement.device
        tune_backends(self.placement)

        torch.manual_seed(cfg.seed)  # the initial weights depend on the seed alone
        random.seed(cfg.seed)
        model = build_model(cfg.model.architecture()).to(device, memory_format=self.placement.memory_format)
        if cfg.train.whiten_stem:  # from the training split only; the same on every rank
            whiten_stem_(model, self.splits.train_images, cfg.data.mean, cfg.data.std)
        if cfg.train.sync_bn:
            model = self.dist.convert_sync_bn(model)
        self.model = model
        self.eval_model = copy.deepcopy(model)  # holds EMA or best weights for evaluation
        wrapped = self.dist.wrap(model)
        if cfg.train.compile:
            wrapped = torch.compile(wrapped)

        steps = steps_per_epoch(len(self.splits.train_labels), cfg.train.batch_size)
        self.optimizer = build_optimizer(model, cfg.train)
        self.schedule = LRSchedule(cfg.train, steps)
        self.ema = EMA(model, cfg.train.ema_decay) if cfg.train.ema_decay > 0 else None
        scaler = torch.amp.GradScaler(device.type) if self.placement.precision == "fp16" else None
        self.trainer = Trainer(
            model=wrapped,
            base_model=model,
            optimizer=self.optimizer,
            schedule=self.schedule,
            augmenter=Augmenter(cfg.augment, cfg.data.mean, cfg.data.std, cfg.model.num_classes),
            placement=self.placement,
            cfg=cfg.train,
            seed=cfg.seed,
            images=self.splits.train_images.to(device),
            labels=self.splits.train_labels.to(device),
            label_smoothing=cfg.augment.label_smoothing,
            ema=self.ema,
            scaler=scaler,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
            reduce=self.dist.all_reduce_sum if self.dist.world_size > 1 else None,
            pruner=self.make_pruner(),
        )
        self.params = sum(p.numel() for p in model.parameters())

    def make_pruner(self) -> DataPruner | None:
        t = self.config.train
        if t.prune_ratio == 0:
            return None
        n = len(self.splits.train_labels)
        return DataPruner(
            n, t.prune_ratio, t.prune_until_epoch, t.batch_size, self.config.seed, self.placement.device
        )

    def check_shards(self) -> None:
        """Every rank needs an image of every global batch (the last one may be short)."""
        n, batch, ranks = len(self.splits.train_labels), self.config.train.batch_size, self.dist.world_size
        smallest = min(batch, n - (steps_per_epoch(n, batch) - 1) * batch)
        # BatchNorm needs two values per channel: on a 1x1 final map, two images per shard
        # (also where a smaller training window of augment.crop_sizes leaves 1x1).
        arch = self.config.model.architecture()
        sides = [arch.final_side_for(s) for s in self.config.augment.crop_sizes] + [arch.final_side]
        per_shard = 2 if min(sides) == 1 else 1
        if smallest < ranks * per_shard:
            raise ConfigError(
                f"train.batch_size: a batch of {smallest} image(s) cannot be shared by {ranks} "
                f"process(es) with at least {per_shard} image(s) each ({n} training images in "
                f"batches of {batch}); change train.batch_size by a few"
            )

    def restore(self, ckpt: dict[str, Any]) -> tuple[int, int, EpochState]:
        _check_world_size(ckpt.get("world_size", 1), self.dist.world_size)
        try:
            self.model.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            if self.ema is not None and ckpt.get("ema") is not None:
                self.ema.load_state_dict(ckpt["ema"])
            if self.trainer.scaler is not None and ckpt.get("scaler") is not None:
                self.trainer.scaler.load_state_dict(ckpt["scaler"])
            _set_rng_state(ckpt["rng"], self.placement.device)
            if self.trainer.pruner is not None:
                if ckpt.get("pruner") is None:
                    raise ValueError("it holds no data-pruning scores (train.prune_ratio was 0)")
                self.trainer.pruner.load_state_dict(ckpt["pruner"])
            for key in ("epoch", "step"):
                if not isinstance(ckpt[key], int) or isinstance(ckpt[key], bool) or ckpt[key] < 0:
                    raise ValueError(f"its {key} is {ckpt[key]!r}, not a count")
            metrics = list(ckpt.get("metrics", []))
            if not all(isinstance(m, dict) and m.keys() >= _METRIC_KEYS for m in metrics):
                raise ValueError(
                    f"its metrics are not epoch records (each has {', '.join(sorted(_METRIC_KEYS))})"
                )
            state = EpochState(**ckpt.get("epoch_state", {}))
        except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as err:
            # The weights were checked before anything was written; the rest of the state is
            # only known to fit when PyTorch loads it.
            raise CheckpointError(
                f"the training state in last.pt does not fit this run ({type(err).__name__}: "
                f"{str(err).splitlines()[0] if str(err) else 'no details'}); it cannot be resumed"
            ) from None
        self.metrics = metrics
        self.best_val = ckpt.get("best_val_accuracy")
        self.best_epoch = ckpt.get("best_epoch")
        self.wall_start -= ckpt.get("elapsed_seconds", 0.0)  # elapsed time continues
        return ckpt["epoch"], ckpt["step"], state

    def adopt_newer_best(self) -> None:
        """After a restore: take best.pt's record of the best epoch when it is newer than last.pt's.

        best.pt is written just before last.pt, so a kill between the two leaves best.pt one save
        ahead. On the CPU the resumed run would reproduce it exactly; on a GPU (cuDNN autotuning)
        it need not, and the summary must describe the weights best.pt actually holds.
        """

        def newer() -> tuple[float | None, int] | None:
            path = self.out_dir / "best.pt"
            if not (self.save_checkpoints and path.exists()):
                return None
            try:
                best = load_checkpoint(path)
            except CerberusError:  # damaged: the next improvement rewrites it
                return None
            epoch = best.get("best_epoch") if isinstance(best, dict) else None
            if isinstance(epoch, int) and (self.best_epoch is None or epoch > self.best_epoch):
                return best.get("best_val_accuracy"), epoch
            return None

        found = self.dist.from_main(newer)
        if found is not None:
            self.best_val, self.best_epoch = found

    # -- checkpoints ---------------------------------------------------------------------------

    def payload(self, epoch: int, step: int, state: EpochState) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            # The learning rate is a pure function of (epoch, step), so the position is the
            # scheduler's whole state; batch order and augmentation derive from (seed, epoch, step),
            # and the global RNG states are kept for code outside the step that may draw from them.
            "scheduler": {"kind": self.config.train.schedule, "epoch": epoch, "step": step},
            "scaler": self.trainer.scaler.state_dict() if self.trainer.scaler is not None else None,
            # train.prune_ratio: every image's latest loss and the epoch's plan (the batch order
            # depends on them as well as on the seed)
            "pruner": self.trainer.pruner.state_dict() if self.trainer.pruner is not None else None,
            "rng": _rng_state(self.placement.device),
            "role": "last",
            "weights": "model",
            "threads": torch.get_num_threads(),  # CPU kernels' results depend on it
            "world_size": self.dist.world_size,
            "elapsed_seconds": time.perf_counter() - self.wall_start,
            "epoch": epoch,  # the epoch in progress (== epochs when finished)
            "step": step,  # the next step to run within that epoch
            "epoch_state": state.as_dict(),
            "config": self.config.to_dict(),
            "architecture": self.config.model.architecture().to_dict(),
            "metrics": self.metrics,
            "best_val_accuracy": self.best_val,
            "best_epoch": self.best_epoch,
            "cerberus_version": __version__,
            "torch_version": str(torch.__version__),
        }

    def save_last(self, payload: dict[str, Any]) -> None:
        """Write last.pt, after the best.pt that its ``best_epoch`` names if that is still pending."""
        if self.pending_best is not None:
            self.save("best.pt", self.pending_best)
            self.pending_best = None
        self.save("last.pt", payload)

    def save(self, name: str, payload: dict[str, Any]) -> None:
        """Write a checkpoint on rank 0; every rank calls this, so a failure stops all of them."""
        with self.dist.agreement():
            if not (self.save_checkpoints and self.dist.is_main):
                return
            # A step can leave NaN weights (or BatchNorm statistics) behind a still-finite loss;
            # say that training diverged rather than only that the save was refused.
            for key in ("model", "ema"):
                if payload.get(key) is not None and not all_finite(payload[key]):
                    where = f"epoch {payload['epoch'] + 1}, step {payload['step']}"
                    if not payload["step"]:
                        where = f"the end of epoch {payload['epoch']}"
                    raise DivergenceError(
                        f"the {key} weights became non-finite at {where}: lower train.lr, add "
                        "train.warmup_epochs or train.grad_clip"
                    )
            _save_checkpoint(self.out_dir / name, payload)

    def checkpoint_state(self) -> str:
        """What a user has left after a failed run, for the error message."""
        if (self.out_dir / "last.pt").exists():
            return "the last good checkpoint was kept"
        return "no checkpoint had been written yet"

    def write_metrics(self, plot: bool = False) -> None:
        """metrics.jsonl, and curves.png when ``plot``, at the first epoch, or when the last
        drawing is :data:`PLOT_EVERY_SECONDS` old (drawing takes longer than a fast GPU epoch)."""
        with self.dist.agreement():
            if not self.dist.is_main:
                return
            lines = "".join(to_json(m) + "\n" for m in self.metrics)
            atomic_write(self.out_dir / "metrics.jsonl", lines)
            self.plot(force=plot)

    def plot(self, force: bool = True) -> None:
        """Draw curves.png (rank 0) if it lacks epochs and ``force`` or it is old or empty."""
        epochs, drawn_at = self.plotted
        if not self.dist.is_main or epochs == len(self.metrics):
            return
        if force or epochs == 0 or time.perf_counter() - drawn_at >= PLOT_EVERY_SECONDS:
            from cerberus.report import plot_curves

            plot_curves(self.metrics, self.out_dir / "curves.png")
            self.plotted = (len(self.metrics), time.perf_counter())

    # -- evaluation ----------------------------------------------------------------------------

    def evaluate(
        self, state: dict[str, torch.Tensor] | None, images, labels, tta: bool = False
    ) -> dict[str, Any]:
        """Loss and accuracy of ``state`` (or of the live model when None) on a split."""
        model = self.model
        if state is not None:
            self.eval_model.load_state_dict(state)
            model = self.eval_model
        logits = predict_logits(
            model,
            images,
            mean=self.config.data.mean,
            std=self.config.data.std,
            placement=self.placement,
            batch_size=self.config.train.eval_batch_size,
            tta=tta,
        )
        return classification_report(logits, labels, self.classes)

    # -- the loop ------------------------------------------------------------------------------

    def train(self, start_epoch: int, start_step: int, state: EpochState, stop: StopFlag) -> None:
        cfg = self.config
        steps = self.trainer.steps_in(start_epoch)
        has_val = len(self.splits.val_labels) > 0
        self.emit(
            {
                "event": "start",
                "params": self.params,
                "device": str(self.placement.device),
                "precision": self.placement.precision,
                "channels_last": self.placement.channels_last,
                "inference_channels_last": self.placement.inference_layout,
                "epochs": cfg.train.epochs,
                "start_epoch": start_epoch,
                "start_step": start_step,
                "steps_per_epoch": steps,
                "train_images": len(self.splits.train_labels),
                "val_images": len(self.splits.val_labels),
                "test_images": len(self.splits.test_labels),
                "world_size": self.dist.world_size,
                "out_dir": str(self.out_dir),
            }
        )

        every = cfg.train.checkpoint_every

        def on_step(step: int, st: EpochState, lr: float) -> None:
            self.emit(
                {
                    "event": "step",
                    "epoch": epoch + 1,
                    "step": step,
                    "steps": steps,
                    "loss": st.loss_sum / max(st.images, 1),
                    "accuracy": st.correct / max(st.images, 1),
                    "lr": lr,
                    **self.muon_lr(lr),
                    "images_per_sec": st.images / max(st.seconds, 1e-9),
                }
            )
            # train.checkpoint_every: at steps N, 2N, ... of each epoch (the trainer reads its
            # sums back there, so on_step comes). The epoch's last step and interrupts save below.
            if every and step < steps and step % every == 0:
                self.save_last(self.payload(epoch, step, st))

        if start_epoch >= cfg.train.epochs:  # resuming a finished run: a kill may have come
            self.write_metrics(plot=True)  # between its last last.pt and metrics.jsonl
        # A divergence anywhere in the epochs (the loss, the weights at a save, the evaluations)
        # says what the user has left, once.
        try:
            for epoch in range(start_epoch, cfg.train.epochs):
                steps = self.trainer.steps_in(epoch)  # fewer where data pruning skips images
                state, step = self.trainer.run_epoch(
                    epoch, state, start_step if epoch == start_epoch else 0, on_step, stop
                )
                if step < steps:  # interrupted mid-epoch
                    self.save_last(self.payload(epoch, step, state))
                    with self.dist.agreement():
                        self.plot()
                    self.interrupted(stop, epoch, step)
                # Rank 0 evaluates (its weights and BatchNorm statistics are what it saves) and every
                # rank takes its line, so all of them select the same best epoch.
                line = self.dist.from_main(self.epoch_line, epoch, state, has_val)
                self.check_finite_evaluations(line, epoch)
                self.metrics.append(line)
                improved = self.best_val is None or not has_val or line["selection_accuracy"] > self.best_val
                if improved:
                    self.best_val = line["selection_accuracy"] if has_val else None
                    self.best_epoch = epoch + 1
                payload = self.payload(epoch + 1, 0, EpochState())
                # train.save_every_epochs: last.pt every N epochs and at the last; best.pt is written
                # just before the next last.pt, so that once both are written they name the same best
                # epoch.
                save_now = (epoch + 1) % cfg.train.save_every_epochs == 0 or epoch + 1 == cfg.train.epochs
                if improved:
                    # best.pt holds the selected weights (the EMA's when on) under "model", and what
                    # describes them as of this epoch; it cannot be resumed, so no optimizer state.
                    best = {**payload, "model": self.selected_weights(), "ema": None, "role": "best"}
                    best.update(optimizer=None, pruner=None, metrics=list(self.metrics))
                    best["weights"] = "ema" if self.ema is not None else "model"
                    # Training goes on before these weights are written or evaluated: rank 0, the
                    # only one that does either, keeps a copy; the others keep the live references.
                    if self.dist.is_main and (not save_now or not self.save_checkpoints):
                        best["model"] = {k: v.detach().clone() for k, v in best["model"].items()}
                    if self.save_checkpoints:
                        self.pending_best = best
                    else:
                        self.best_state = best["model"]
                if save_now:
                    self.save_last(payload)
                self.write_metrics(plot=epoch + 1 == cfg.train.epochs)
                self.emit({"event": "epoch", **line})
                state = EpochState()
                if self.dist.any_rank(stop()):
                    if not save_now:
                        self.save_last(self.payload(epoch + 1, 0, EpochState()))
                    with self.dist.agreement():
                        self.plot()
                    self.interrupted(stop, epoch + 1, 0)
        except DivergenceError as err:
            if not self.save_checkpoints:  # a search trial: it never writes any
                raise
            raise DivergenceError(f"{err}; {self.checkpoint_state()}") from None

    def check_finite_evaluations(self, line: dict[str, Any], epoch: int) -> None:
        """Finite weights can still give non-finite outputs (BatchNorm statistics that overflow in
        evaluation, say): such an epoch is divergence, and neither best.pt nor last.pt takes it."""
        for key, name in _EVALUATED_LOSSES.items():
            if key in line and not math.isfinite(line[key]):
                raise DivergenceError(
                    f"the {name} became non-finite at the end of epoch {epoch + 1}: lower train.lr, "
                    "add train.warmup_epochs or train.grad_clip"
                )

    def selected_weights(self) -> dict[str, torch.Tensor]:
        """The weights that model selection compares: the EMA when on, else the model."""
        return self.ema.state_dict() if self.ema is not None else self.model.state_dict()

    def muon_lr(self, lr: float) -> dict[str, float]:
        """``{"muon_lr": ...}``, the Muon steps' rate when ``lr`` is the SGD part's; else ``{}``."""
        t = self.config.train
        return {"muon_lr": lr * t.muon_lr / t.lr} if t.optimizer == "muon" else {}

    def epoch_line(self, epoch: int, state: EpochState, has_val: bool) -> dict[str, Any]:
        cfg = self.config
        images = max(state.images, 1)
        steps = self.trainer.steps_in(epoch)
        lr = self.schedule.lr_at(epoch, steps - 1, steps)
        line: dict[str, Any] = {
            "epoch": epoch + 1,
            "lr": lr,
            **self.muon_lr(lr),
            "train_loss": state.loss_sum / images,
            "train_accuracy": state.correct / images,
            "train_images_per_sec": state.images / max(state.seconds, 1e-9),
        }
        size = self.trainer.augmenter.crop_size(epoch)
        if size is not None:  # progressive resizing: this epoch trained on (size, size) windows
            line["crop_size"] = size
        if self.trainer.pruner is not None:  # data pruning: images this epoch left out
            line["pruned_images"] = self.trainer.pruner.skipped
        if has_val:
            val = self.evaluate(None, self.splits.val_images, self.splits.val_labels)
            line.update(val_loss=val["loss"], val_accuracy=val["accuracy"])
            line["selection_accuracy"] = val["accuracy"]
            if self.ema is not None:
                ema_val = self.evaluate(self.ema.state_dict(), self.splits.val_images, self.splits.val_labels)
                line.update(ema_val_loss=ema_val["loss"], ema_val_accuracy=ema_val["accuracy"])
                line["selection_accuracy"] = ema_val["accuracy"]
        if cfg.train.test_every_epoch:  # a curve for plots only; never used for selection
            test = self.evaluate(self.selected_weights(), self.splits.test_images, self.splits.test_labels)
            line.update(curve_test_loss=test["loss"], curve_test_accuracy=test["accuracy"])
        line["seconds"] = time.perf_counter() - self.wall_start
        return line

    def interrupted(self, stop: StopFlag, epoch: int, step: int) -> None:
        # Under torchrun also a barrier (no rank exits before rank 0 wrote last.pt), and a rank
        # stopped by another's signal exits with that signal's code.
        signum = self.dist.max_over_ranks(stop.signum or 0)
        name, code = signal_name(signum), signal_exit_code(signum)
        where = f"epoch {epoch + 1}, step {step}" if step else f"the end of epoch {epoch}"
        resume = self.out_dir / "last.pt"
        self.emit({"event": "interrupted", "signal": name, "epoch": epoch, "step": step})
        raise Interrupted(
            f"stopped by {name} at {where}; last.pt is written. "
            f"Resume with: {self.dist.launcher} train --resume {resume}",
            code,
        )

    def evaluate_best_on_test(self) -> dict[str, Any]:
        """The test set, evaluated once with the weights best.pt holds (read back from disk, so
        that `cerberus eval best.pt` reproduces the figure exactly, with ``train.test_tta``'s views
        too)."""
        if self.save_checkpoints:
            best = load_checkpoint(self.out_dir / "best.pt")["model"]
        else:
            best = self.best_state
        report = self.evaluate(
            best, self.splits.test_images, self.splits.test_labels, tta=self.config.train.test_tta
        )
        return {"accuracy": report["accuracy"], "loss": report["loss"]}

    def finish(
        self, evaluate_test: bool, test_window: contextlib.AbstractContextManager | None = None
    ) -> dict[str, Any]:
        """Test best.pt (within ``test_window``: where a signal stops the test) and write the summary."""
        summary: dict[str, Any] = {
            "name": self.config.name,
            "params": self.params,
            "epochs": self.config.train.epochs,
            "best_epoch": self.best_epoch,
            "best_val_accuracy": self.best_val,
            "test_accuracy": None,
            "test_loss": None,
            "test_images": len(self.splits.test_labels) if evaluate_test else 0,  # images evaluated
            "test_tta": self.config.train.test_tta,
        }
        if evaluate_test and len(self.splits.test_labels):
            with test_window or contextlib.nullcontext():
                test = self.dist.from_main(self.evaluate_best_on_test)
            summary.update(test_accuracy=test["accuracy"], test_loss=test["loss"])
            self.emit({"event": "test", "test_accuracy": test["accuracy"], "test_loss": test["loss"]})
        rates = [m["train_images_per_sec"] for m in self.metrics]
        summary.update(
            wall_seconds=time.perf_counter() - self.wall_start,
            train_images_per_sec=sum(rates) / len(rates) if rates else None,
            device=str(self.placement.device),
            precision=self.placement.precision,
            channels_last=self.placement.channels_last,
            inference_channels_last=self.placement.inference_layout,
            world_size=self.dist.world_size,
            peak_rss_mb=round(_peak_rss_mb(), 1),
            cerberus_version=__version__,
            torch_version=str(torch.__version__),
        )
        if self.dist.is_main:
            atomic_write(self.out_dir / "summary.json", to_json(summary, indent=2) + "\n")
        if summary["test_loss"] is not None and not math.isfinite(summary["test_loss"]):
            raise DivergenceError(
                "the test loss of best.pt is non-finite: its weights give non-finite outputs, so "
                "training diverged; lower train.lr, add train.warmup_epochs or train.grad_clip"
            )
        self.emit({"event": "done", "summary": summary})
        return summary


def _lost_process_message(err: RuntimeError, out_dir: Path | str | None, dist: DistContext) -> str:
    """What a process says when another one of the run is gone: what it saw, and what is kept."""
    seen = re.sub(r"^\[[^\]]*\]\s*", "", str(err).strip().splitlines()[0] if str(err).strip() else "")
    message = (
        f"another process of this run stopped, so process {dist.rank} cannot go on "
        f"({seen or type(err).__name__}); torchrun's report names the process that failed"
    )
    last = Path(out_dir) / "last.pt" if out_dir is not None else None
    if last is not None and last.is_file():
        return f"{message}; {last} is kept. Resume with: {dist.launcher} train --resume {last}"
    return f"{message}; no checkpoint had been written yet"


# What every epoch's line in last.pt's metrics holds, that the run reads back.
_METRIC_KEYS = frozenset({"epoch", "train_loss", "train_accuracy", "train_images_per_sec"})

RUN_FILES = ("last.pt", "best.pt", "summary.json", "metrics.jsonl")  # a fresh run would replace them


def _check_out_dir(out_dir: Path, resuming: bool, launcher: str = "cerberus") -> None:
    """A new run never writes over another's results (a best.pt kept after deleting last.pt).
    ``launcher`` starts the command that would continue it (:attr:`DistContext.launcher`)."""
    if resuming:
        return
    if (out_dir / "last.pt").exists():
        raise ConfigError(
            f"{out_dir} already holds a run; continue it with "
            f"`{launcher} train --resume {out_dir / 'last.pt'}` or choose another --out"
        )
    held = [name for name in RUN_FILES if (out_dir / name).exists()]
    if held:
        raise ConfigError(
            f"{out_dir} already holds a run's results ({', '.join(held)}); choose another --out"
        )


_MAX_SAME_SECOND = 1000  # default run folders numbered for runs started in one second


def _make_out_dir(out_dir: Path, new: bool = False) -> Path:
    """Create the run directory and return it. ``new`` (the default ``runs/<name>-<time>``): always
    a folder of its own, ``<name>-<time>-2``, ``-3``, ... where runs started in the same second."""
    try:
        if not new:
            out_dir.mkdir(parents=True, exist_ok=True)
            return out_dir
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        for number in range(1, _MAX_SAME_SECOND + 1):  # only the folder itself may exist already
            folder = out_dir if number == 1 else out_dir.with_name(f"{out_dir.name}-{number}")
            try:
                folder.mkdir()
                return folder
            except FileExistsError:
                continue
    except OSError as err:
        raise ConfigError(f"cannot create the run directory {out_dir}: {err.strerror or err}") from None
    raise ConfigError(
        f"cannot create the run directory {out_dir}: it and {_MAX_SAME_SECOND - 1} numbered ones exist; "
        "choose another --out"
    )


def _check_world_size(saved: Any, now: int) -> None:
    """A run resumes with as many processes as trained it: the data shards and augmentation
    depend on the number."""
    if saved == now:
        return
    if saved == 1:
        how = "resume it without torchrun"
    else:
        how = f"resume it under torchrun with {saved} processes in all"
    raise ConfigError(
        f"this run was trained by {saved} process{'es' if saved != 1 else ''} (now {now}); {how}, "
        "or the data shards and augmentation would change"
    )


# What a last.pt must hold for a run to continue from it.
_RESUME_KEYS = ("config", "model", "optimizer", "rng", "epoch", "step")


def train_run(
    config: ExperimentConfig | None = None,
    *,
    out_dir: Path | None = None,
    data_dir: str | None = None,
    resume: Path | None = None,
    on_event: EventSink | None = None,
    evaluate_test: bool = True,
    save_checkpoints: bool = True,
    handle_signals: bool = True,
) -> RunResult:
    """Train ``config`` (or continue the run whose ``last.pt`` is ``resume``) to its epochs.

    Raises :class:`~cerberus.errors.Interrupted` after writing ``last.pt`` when SIGINT or
    SIGTERM arrives, :class:`~cerberus.errors.DivergenceError` on a non-finite loss (nothing is
    written then), and other :class:`~cerberus.errors.CerberusError` subclasses for bad input.
    """
    ckpt = None
    if resume is not None:
        resume = Path(resume)
        ckpt = load_checkpoint(resume, trust_hint=None)
        if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
            raise ConfigError(f"{resume}: not a cerberus training checkpoint; cannot resume from it")
        check_format(ckpt, resume)
        if ckpt.get("role") == "best":
            raise ConfigError(
                f"{resume} holds the best epoch's weights only; resume from "
                f"{resume.with_name('last.pt')}, which holds the whole training state"
            )
        absent = [key for key in _RESUME_KEYS if key not in ckpt]
        if absent:
            raise CheckpointError(
                f"{resume}: the training checkpoint has no {', '.join(map(repr, absent))}; "
                "cannot resume from it"
            )
        config = config_from_dict(ckpt["config"], source=str(resume), stored=True)
        # Nothing is written before the weights are known to fit the recorded design.
        with torch.device("meta"):
            expected = build_model(config.model.architecture()).state_dict()
        check_weights_fit(expected, ckpt["model"], resume)
        note = unverified_note(resume)
        if note is not None and on_event is not None:
            on_event({"event": "note", "message": note})
        if ckpt.get("ema") is not None:
            check_weights_fit(expected, ckpt["ema"], resume)
        out_dir = resume.parent
        _check_world_size(ckpt.get("world_size", 1), int(os.environ.get("WORLD_SIZE", "1")))
        if ckpt.get("best_epoch") is not None:  # its weights are in best.pt alone: checked now
            best = out_dir / "best.pt"
            if not best.is_file():
                raise CheckpointError(
                    f"{best} is missing: {resume.name} names epoch {ckpt['best_epoch']} as the best "
                    f"so far, whose weights only best.pt holds; put it back beside {resume.name} to "
                    "resume"
                )
            try:
                verify_checkpoint(best)
            except CheckpointError as err:
                raise CheckpointError(
                    f"{err}: {resume.name} names epoch {ckpt['best_epoch']} as the best so far, whose "
                    f"weights only best.pt holds; put back an intact copy beside {resume.name} to "
                    "resume"
                ) from None
        recorded = config.data.root
        if data_dir is None and recorded is not None and not Path(recorded).expanduser().is_dir():
            raise ConfigError(
                f"data.root {recorded} recorded in {resume} does not exist here; "
                "pass --data-dir with the folder that holds cifar-10-batches-py/"
            )
        if config.train.threads == 0 and ckpt.get("threads"):
            # CPU kernels split work by thread count, and their sums round differently: the
            # same count as before keeps the resumed run bitwise identical.
            torch.set_num_threads(ckpt["threads"])
    if config is None:
        raise ConfigError("train_run needs a config or a checkpoint to resume")
    # The resolved config names the data folder as an absolute path, so that --resume and
    # `cerberus eval` of this run's checkpoints read the same images from any working folder.
    root = resolve_data_root(data_dir, config.data.root).absolute()
    config = config.model_copy(update={"data": config.data.model_copy(update={"root": str(root)})})

    # Under torchrun every rank trains; rank 0 alone owns the run directory (lock, files).
    dist = DistContext.from_env(config.train.device)
    try:
        new_dir = out_dir is None  # runs/<name>-<time>, made new (numbered) by rank 0
        if new_dir:  # one timestamp for all ranks
            out_dir = dist.from_main(default_out_dir, config)
        out_dir = Path(out_dir)
        stop = StopFlag()
        signals = stop_on_signals(stop) if handle_signals else contextlib.nullcontext()
        # Loading the data and the final test have nothing to save midway: a signal stops them at
        # once (one process only: under torchrun the others would wait in a collective call).
        at_once = stop.at_once if not dist.active else lambda where: contextlib.nullcontext()
        with contextlib.ExitStack() as lock, signals:
            run = Run(config, out_dir, on_event, save_checkpoints, dist)
            with dist.agreement():  # what may fail on one rank only fails on all
                try:
                    run.place()
                except ConfigError as err:
                    if resume is None or err.field != "train.channels_last":
                        raise
                    # A run that trained so is not worth continuing: --resume cannot change its config.
                    raise ConfigError(
                        f"{resume}: this run trains in channels_last, and oneDNN trains "
                        f"{nhwc_backward_hazard(config.model.architecture())} wrongly so on this CPU; "
                        "its weights may come from wrong gradients: start a new run with "
                        "train.channels_last = false",
                        field="train.channels_last",
                    ) from None
                if dist.is_main and not new_dir:
                    _check_out_dir(out_dir, resuming=ckpt is not None, launcher=dist.launcher)
                with at_once("while the data loaded, before anything was written"):
                    run.load_data()  # data problems are refused before anything is written
                if dist.is_main:
                    out_dir = run.out_dir = _make_out_dir(out_dir, new=new_dir)
                    busy = "wait for it to finish" + (" or choose another --out" if ckpt is None else "")
                    lock.enter_context(run_lock(out_dir, hint=busy))
                    # Again under the lock: a run may have finished there while the data loaded.
                    _check_out_dir(out_dir, resuming=ckpt is not None, launcher=dist.launcher)
                    remove_stale_temporaries(out_dir)
                    atomic_write(out_dir / "config.toml", config.to_toml())
            if new_dir and dist.active:  # the folder rank 0 made
                out_dir = run.out_dir = Path(dist.from_main(str, out_dir))
            run.setup()
            start_epoch, start_step, state = 0, 0, EpochState()
            if ckpt is not None:
                start_epoch, start_step, state = run.restore(ckpt)
                del ckpt
                run.adopt_newer_best()
            run.train(start_epoch, start_step, state, stop)
            epochs = config.train.epochs
            test_window = at_once(
                f"during the final test; last.pt and best.pt hold all {epochs} "
                f"epoch{'s' if epochs != 1 else ''}. Finish the run (the test and summary.json) "
                f"with: cerberus train --resume {out_dir / 'last.pt'}"
            )
            summary = run.finish(evaluate_test, test_window if save_checkpoints else None)
    except torch.OutOfMemoryError:
        raise CerberusError(
            "the device ran out of memory: lower train.batch_size or train.eval_batch_size"
        ) from None
    except RuntimeError as err:
        if not (dist.active and lost_a_process(err)):
            raise
        raise LostProcessError(_lost_process_message(err, out_dir, dist)) from None
    finally:
        dist.close()
    return RunResult(
        out_dir=out_dir,
        summary=summary,
        best_val_accuracy=run.best_val,
        epochs_completed=len(run.metrics),
    )
