"""The training step and its parts: optimizer, learning-rate schedule, stem whitening, weight EMA.

Everything random or time-dependent in a step is a pure function of ``(seed, epoch, step)``: the
batch order (:func:`cerberus.data.batch_indices`), the augmentation (:func:`cerberus.data.step_generator`)
and the learning rate (:class:`LRSchedule`). That is what makes a run resumed mid-epoch end with
the same weights, bit for bit, as one that was never interrupted: the checkpoint only needs the
weights, the optimizer and EMA state and the position ``(epoch, step)`` (and, with data pruning,
every image's latest loss and the epoch's plan, :class:`cerberus.prune.DataPruner`).
"""

from __future__ import annotations

import math
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from cerberus.augment import Augmenter, alternating_flips, normalize
from cerberus.config import TrainConfig
from cerberus.data import batch_indices, step_generator, steps_per_epoch
from cerberus.device import Placement
from cerberus.errors import ConfigError, DivergenceError
from cerberus.optim import MuonSGD
from cerberus.prune import DataPruner

# --------------------------------------------------------------------------------------------
# Optimizer and schedule


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD, AdamW or Muon; BatchNorm weights and biases skip weight decay if ``decay_bn_and_bias`` is off.

    With ``muon`` the trainable filter banks (4-D weights) take Muon steps at ``muon_lr`` with
    ``muon_momentum``, everything else SGD steps at ``lr`` (see :class:`cerberus.optim.MuonSGD`).
    A group's ``lr_scale`` is its peak learning rate over ``lr``: the schedule multiplies it in.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    filters = [p for p in trainable if p.ndim == 4] if cfg.optimizer == "muon" else []
    taken = {id(p) for p in filters}
    decay, no_decay = [], []
    for param in trainable:
        if id(param) not in taken:
            (no_decay if param.ndim <= 1 and not cfg.decay_bn_and_bias else decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    if cfg.optimizer == "muon":
        muon = {
            "params": filters,
            "muon": True,
            "momentum": cfg.muon_momentum,
            "lr_scale": cfg.muon_lr / cfg.lr,
        }
        return MuonSGD(
            [*groups, muon] if filters else groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov
        )
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.momentum, 0.999))


def _epoch_in_progress(t: float) -> int:
    """The 0-based epoch that position ``t`` (epochs done, fractional) lies in; ``t`` = 2.0 is the
    end of epoch 1's last step, so it still belongs to epoch 1."""
    return max(math.ceil(t) - 1, 0)


def chained_seed_factors(epochs: int, t_max: int, milestones: list[int], gamma: float) -> list[float]:
    """The multiplier of the base learning rate in each epoch under torch's
    ``CosineAnnealingLR(T_max=t_max)`` and ``MultiStepLR(milestones, gamma)`` on one optimizer,
    each stepped once per epoch (cosine first), as the seed project trained.

    Chained, each scheduler updates the rate the other left (torch's recursive forms), so this is
    not the closed form ``(1 + cos(pi e / t_max)) / 2 * gamma**k``: where the cosine comes back up
    from zero (epoch ``t_max + 1``, then every ``2 t_max``) torch adds a step of the *base* rate,
    which the milestones' factors do not scale, and the cycle goes on from there.
    """
    factors, lr = [1.0], 1.0
    for e in range(1, epochs):
        if (e - 1 - t_max) % (2 * t_max) == 0:
            lr = lr + (1 - math.cos(math.pi / t_max)) / 2
        else:
            lr = (1 + math.cos(math.pi * e / t_max)) / (1 + math.cos(math.pi * (e - 1) / t_max)) * lr
        lr *= gamma ** milestones.count(e)
        factors.append(lr)
    return factors


class LRSchedule:
    """The learning rate as a pure function of the position in training.

    ``t`` is the number of epochs completed, fractional within an epoch. Schedules:
    constant; cosine (from lr to min_lr after the warmup); step (x gamma at each milestone);
    onecycle (linear from lr/25 up to lr at ``onecycle_peak`` of training, then linear down to
    min_lr); seed (the seed project's CosineAnnealingLR with period ``t_max`` chained with
    MultiStepLR, both stepped once per epoch: :func:`chained_seed_factors`). Linear warmup from 0
    over ``warmup_epochs`` multiplies any of them.
    """

    def __init__(self, cfg: TrainConfig, steps_per_epoch: int):
        self.cfg = cfg
        self.steps_per_epoch = steps_per_epoch
        self._seed: list[float] = []  # chained_seed_factors, computed once when used

    def factor(self, t: float) -> float:
        """Multiplier of ``cfg.lr`` at ``t`` epochs."""
        cfg = self.cfg
        epochs, floor = cfg.epochs, cfg.min_lr / cfg.lr
        if cfg.schedule == "constant":
            value = 1.0
        elif cfg.schedule == "cosine":
            span = max(epochs - cfg.warmup_epochs, 1e-9)
            progress = min(max((t - cfg.warmup_epochs) / span, 0.0), 1.0)
            value = floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        elif cfg.schedule == "step":
            value = cfg.gamma ** sum(1 for m in cfg.milestones if m <= _epoch_in_progress(t))
        elif cfg.schedule == "onecycle":
            peak = cfg.onecycle_peak * epochs
            if t < peak:
                value = 0.04 + 0.96 * t / peak
            else:
                value = 1 - (1 - floor) * min((t - peak) / max(epochs - peak, 1e-9), 1.0)
        else:  # "seed": stepped once per epoch, as torch's epoch-wise schedulers are
            if not self._seed:
                self._seed = chained_seed_factors(epochs, cfg.t_max or epochs, cfg.milestones, cfg.gamma)
            value = self._seed[min(_epoch_in_progress(t), epochs - 1)]
        if cfg.warmup_epochs > 0 and t < cfg.warmup_epochs:
            value *= t / cfg.warmup_epochs
        return value

    def lr_at(self, epoch: int, step: int, steps: int | None = None) -> float:
        """Learning rate of step ``step`` of epoch ``epoch`` (the step's end, so never 0); ``steps``
        is that epoch's number of steps when it differs from ``steps_per_epoch`` (data pruning)."""
        return self.cfg.lr * self.factor(epoch + (step + 1) / (steps or self.steps_per_epoch))

    def apply(
        self, optimizer: torch.optim.Optimizer, epoch: int, step: int, steps: int | None = None
    ) -> float:
        lr = self.lr_at(epoch, step, steps)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        return lr


# --------------------------------------------------------------------------------------------
# Stem whitening

WHITEN_IMAGES = 5000  # images whose patches estimate the covariance (enough for 27 dimensions)
WHITEN_EPS = 5e-4  # added to the eigenvalues, so that near-empty directions are not blown up


@torch.no_grad()
def whitening_filters(
    images: torch.Tensor,
    kernel: int,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    chunk: int = 500,
) -> torch.Tensor:
    """Patch-whitening filters, (3 * kernel**2, 3, kernel, kernel), strongest direction first.

    Row i is ``v_i / sqrt(lambda_i + eps)`` for the eigenpairs of the covariance of every
    ``kernel x kernel`` patch of the normalised ``images`` (uint8, at most :data:`WHITEN_IMAGES`
    of them, read ``chunk`` at a time so that memory stays small): convolving with all of them
    makes the patches' covariance the identity.
    """
    images = images[:WHITEN_IMAGES]
    dim = 3 * kernel * kernel
    total = torch.zeros(dim, dtype=torch.float64)
    outer = torch.zeros(dim, dim, dtype=torch.float64)
    count = 0
    for start in range(0, len(images), chunk):
        x = normalize(images[start : start + chunk].cpu(), mean, std)
        patches = F.unfold(x, kernel).transpose(1, 2).reshape(-1, dim).double()  # (N * L, dim)
        total += patches.sum(0)
        outer += patches.T @ patches
        count += len(patches)
    centred = total / count
    covariance = outer / count - torch.outer(centred, centred)
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)  # ascending
    order = eigenvalues.argsort(descending=True)
    filters = eigenvectors[:, order].T / torch.sqrt(eigenvalues[order].clamp(min=0) + WHITEN_EPS)[:, None]
    return filters.reshape(dim, 3, kernel, kernel).float()


@torch.no_grad()
def whiten_stem_(model: nn.Module, images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> None:
    """Set the stem conv (``model.conv1``) to patch-whitening filters and freeze it.

    With ``n`` output channels (even, at most ``2 * 3 * S**2``; the config checks) the stem gets
    the ``n // 2`` strongest whitening filters and their negatives, so that the ReLU after it
    keeps both signs. The weights then stay fixed (``requires_grad = False``), as in the fastest
    CIFAR trainers; the BatchNorm after the stem still learns.
    """
    conv = model.conv1
    filters = whitening_filters(images, conv.kernel_size[0], mean, std)
    k = conv.out_channels // 2
    if conv.out_channels % 2 or k > len(filters):
        raise ConfigError(
            f"a whitened stem needs an even number of channels, at most {2 * len(filters)}; "
            f"got {conv.out_channels}"
        )
    conv.weight[:k] = filters[:k].to(conv.weight)
    conv.weight[k : 2 * k] = -filters[:k].to(conv.weight)
    conv.weight.requires_grad_(False)


# --------------------------------------------------------------------------------------------
# Weight EMA


class EMA:
    """Exponential moving average of a model's parameters and buffers, updated every step.

    The first :meth:`update` with a model pairs each of its tensors with the average's, and later
    updates with that same model reuse the pairing: a step then costs two multi-tensor kernels and
    no walk over the modules (which took ~0.6 ms of host time a step for ResNet-24 on the CPU).
    The model's tensors must therefore change in place, as optimizers and ``load_state_dict``
    change them. A model whose tensors are replaced after its first update (``.to()`` to another
    device or memory format) needs a new EMA: this one would go on, silently, averaging the
    tensors it was paired with.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self._model: weakref.ref[nn.Module] | None = None  # the model the pairing belongs to
        self._pairs: tuple[list[torch.Tensor], ...] = ([], [], [], [])

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        if self._model is None or self._model() is not model:
            pairs: tuple[list[torch.Tensor], ...] = ([], [], [], [])
            for name, value in model.state_dict().items():
                kind = 0 if value.is_floating_point() else 2  # num_batches_tracked: copied
                pairs[kind].append(self.state[name])
                pairs[kind + 1].append(value)
            self._model, self._pairs = weakref.ref(model), pairs
        averages, floats, counters, counts = self._pairs
        torch._foreach_lerp_(averages, floats, 1.0 - self.decay)
        if counters:
            torch._foreach_copy_(counters, counts)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name, value in state.items():
            self.state[name].copy_(value)


# --------------------------------------------------------------------------------------------
# One epoch


@dataclass
class EpochState:
    """Running sums of the epoch in progress (saved in checkpoints written mid-epoch)."""

    loss_sum: float = 0.0  # sum over images of the training loss
    correct: float = 0.0  # images whose argmax matches the (majority) target
    images: int = 0
    seconds: float = 0.0  # time spent in training steps

    def as_dict(self) -> dict:
        return {
            "loss_sum": self.loss_sum,
            "correct": self.correct,
            "images": self.images,
            "seconds": self.seconds,
        }


@dataclass
class Trainer:
    """Everything one training step needs. ``model`` may be wrapped (DDP, torch.compile)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: LRSchedule
    augmenter: Augmenter
    placement: Placement
    cfg: TrainConfig
    seed: int
    images: torch.Tensor  # uint8 (N, 3, 32, 32) on the training device
    labels: torch.Tensor  # int64 (N,) on the training device
    label_smoothing: float = 0.0
    ema: EMA | None = None
    scaler: torch.amp.GradScaler | None = None
    rank: int = 0
    world_size: int = 1
    base_model: nn.Module | None = None  # the unwrapped model (what EMA and checkpoints see)
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None  # all-reduce sum across ranks
    pruner: DataPruner | None = None  # train.prune_ratio: the images each epoch trains
    _sync_every: int = field(default=1)
    _flips: torch.Tensor | None = field(default=None)  # flip_mode = "alternate": even epochs' flips

    def __post_init__(self) -> None:
        if self.base_model is None:
            self.base_model = self.model
        self._sync_every = 1 if self.placement.device.type == "cpu" else 20
        aug = self.augmenter.cfg if self.augmenter is not None else None
        if aug is not None and aug.flip and aug.flip_mode == "alternate":
            self._flips = alternating_flips(self.seed, len(self.labels), self.images.device)

    def batch_indices(self, epoch: int, step: int) -> torch.Tensor:
        """This rank's indices of global batch ``step`` of ``epoch``, on the images' device."""
        n, batch, ranks = len(self.labels), self.cfg.batch_size, self.world_size
        if self.pruner is None:
            return batch_indices(n, batch, self.seed, epoch, step, self.rank, ranks, self.images.device)
        self.pruner.plan(epoch)
        global_batch = self.pruner.order[step * batch : (step + 1) * batch]
        return torch.tensor_split(global_batch, ranks)[self.rank].clone()

    @property
    def steps_per_epoch(self) -> int:
        """Steps of an epoch of every training image (pruned epochs have fewer: :meth:`steps_in`)."""
        return steps_per_epoch(len(self.labels), self.cfg.batch_size)

    def images_in(self, epoch: int) -> int:
        """Training images that ``epoch`` trains (all of them unless data pruning skips some)."""
        if self.pruner is None:
            return len(self.labels)
        self.pruner.plan(epoch)
        return len(self.pruner.order)

    def steps_in(self, epoch: int) -> int:
        """Steps of ``epoch``."""
        return steps_per_epoch(self.images_in(epoch), self.cfg.batch_size)

    def train_step(self, epoch: int, step: int) -> tuple[torch.Tensor, torch.Tensor, int, float]:
        """One optimisation step; returns (loss sum, correct count, images, lr) of this rank."""
        n = self.images_in(epoch)
        idx = self.batch_indices(epoch, step)
        generator = step_generator(self.seed, epoch, step, self.placement.device, self.rank)
        mirrored = None if self._flips is None else self._flips[idx] ^ (epoch % 2 == 1)
        size = self.augmenter.crop_size(epoch)
        x, targets = self.augmenter(self.images[idx], self.labels[idx], generator, mirrored, size)
        x = x.contiguous(memory_format=self.placement.memory_format)
        lr = self.schedule.apply(self.optimizer, epoch, step, self.steps_in(epoch))
        with self.placement.autocast():
            logits = self.model(x)
        # The loss in fp32: mean over this rank's shard, scaled so that DDP's gradient average
        # over ranks equals the gradient of the global batch's mean loss.
        if self.pruner is None:
            loss = F.cross_entropy(logits.float(), targets, label_smoothing=self.label_smoothing)
            reported = loss.detach() * len(idx)
        else:  # each image's loss is its score; the kept well-learned ones weigh more
            smoothing = self.label_smoothing
            losses = F.cross_entropy(logits.float(), targets, label_smoothing=smoothing, reduction="none")
            self.pruner.record(idx, losses)
            loss = (losses * self.pruner.weights[idx]).mean()
            reported = losses.detach().sum()
        self.optimizer.zero_grad(set_to_none=True)
        global_batch = min(self.cfg.batch_size, n - step * self.cfg.batch_size)  # the last may be short
        scale = len(idx) * self.world_size / global_batch
        if self.scaler is not None:
            self.scaler.scale(loss * scale).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            (loss * scale).backward()
        if self.cfg.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        if self.ema is not None:
            self.ema.update(self.base_model)
        hard = targets if targets.ndim == 1 else targets.argmax(dim=1)
        correct = (logits.argmax(dim=1) == hard).sum()
        return reported, correct, len(idx), lr

    def run_epoch(
        self,
        epoch: int,
        state: EpochState,
        start_step: int = 0,
        on_step: Callable[[int, EpochState, float], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> tuple[EpochState, int]:
        """Train steps ``start_step..`` of ``epoch``, adding to ``state``.

        ``on_step(step, state, lr)`` is called after each step whose sums were read back from the
        device: every step on the CPU, every 20th on GPUs, and every ``cfg.checkpoint_every``-th
        step of the epoch (where a checkpoint is due). ``should_stop()`` is asked after every
        step; True ends the epoch early (an interrupt). Returns the state and the next step to run
        (``steps_per_epoch`` when the epoch is complete).

        With several ranks (``reduce`` set) the stop is decided together: each rank's answer is
        all-reduced with the sums at the next sync point, and all ranks stop after that same step
        (a rank stopping alone would leave the others waiting in the next gradient all-reduce).
        """
        self.model.train()
        steps = self.steps_in(epoch)
        collective = self.reduce is not None
        # loss sum, correct count (and under DDP, how many ranks want to stop)
        pending = torch.zeros(3 if collective else 2, device=self.placement.device)
        every = self.cfg.checkpoint_every
        step = start_step
        while step < steps:
            t0 = time.perf_counter()
            loss_sum, correct, _, lr = self.train_step(epoch, step)
            pending[0] += loss_sum
            pending[1] += correct
            step += 1
            stop = should_stop is not None and should_stop()
            due = step % self._sync_every == 0 or step == steps or (every and step % every == 0)
            if due or (stop and not collective):
                if collective:
                    pending[2] = float(stop)
                    loss_value, correct_value, stop_votes = self.reduce(pending).tolist()
                    stop = stop_votes > 0
                else:
                    loss_value, correct_value = pending.tolist()
                if self.pruner is not None and (step == steps or stop or (every and step % every == 0)):
                    self.pruner.merge(self.reduce)  # the scores are whole where a checkpoint may come
                if not math.isfinite(loss_value):
                    raise DivergenceError(
                        f"the training loss became non-finite at epoch {epoch + 1}, step {step}: "
                        "lower train.lr, add train.warmup_epochs or train.grad_clip"
                    )
                state.loss_sum += loss_value
                state.correct += correct_value
                pending.zero_()
                state.images = min(step * self.cfg.batch_size, self.images_in(epoch))
                state.seconds += time.perf_counter() - t0
                if on_step is not None:
                    on_step(step, state, lr)
            else:
                state.seconds += time.perf_counter() - t0
                stop = False  # under DDP the ranks vote at the next sync point (alone, stop syncs)
            if stop:
                break
        return state, step
