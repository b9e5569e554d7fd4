"""Dynamic data pruning in the manner of InfoBatch: skip part of the well-learned images each epoch.

Qin et al., "InfoBatch: Lossless Training Speed Up by Unbiased Dynamic Data Pruning" (ICLR 2024).
Every training image keeps its latest training loss, its score. At the start of an epoch the
images scored below the mean are the well-learned ones; a random ``ratio`` of them sit the epoch
out, and the losses of the others are scaled up so that the epoch's expected gradient is the full
epoch's. Epochs from ``until_epoch`` on train every image (InfoBatch's annealing), and so does
the first: every score starts at 1, and none is below the mean.

The images left out number a whole number of batches, so the epoch's last batch has the size it
has without pruning (what ``Run.check_shards`` checked). The epoch's order is the unpruned
epoch's order with the skipped images taken out; batch order stays a function of the seed, the
epoch and the scores. (Alternating flips go by the epoch, so an image that sat an epoch out comes
back mirrored the way it was last seen.)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from cerberus.data import _derive_seed, epoch_permutation


class DataPruner:
    """The scores of ``num_images`` training images and the plan of the epoch in progress."""

    def __init__(
        self,
        num_images: int,
        ratio: float,
        until_epoch: int,  # epochs from this one (0-based) train every image
        batch_size: int,
        seed: int,
        device: torch.device,
    ):
        if not 0 <= ratio < 1:
            raise ValueError(f"ratio must be in [0, 1), got {ratio}")
        self.num_images, self.ratio, self.until_epoch = num_images, ratio, until_epoch
        self.batch_size, self.seed, self.device = batch_size, seed, device
        self.scores = torch.ones(num_images, device=device)  # the latest training loss of each image
        # Losses of this epoch's images not yet folded into scores: one row of losses, one of
        # flags (a float, so that both rows sum in one all-reduce across ranks).
        self._pending = torch.zeros(2, num_images, device=device)
        self.epoch: int | None = None  # the epoch that order and weights belong to
        self.order = torch.arange(num_images, device=device)  # this epoch's images, in order
        self.weights = torch.ones(num_images, device=device)  # loss multiplier of each image

    @property
    def skipped(self) -> int:
        """Images left out of the planned epoch."""
        return self.num_images - len(self.order)

    def plan(self, epoch: int) -> None:
        """Choose ``epoch``'s images and weights from the scores; nothing changes if it is planned."""
        if epoch == self.epoch:
            return
        order = epoch_permutation(self.num_images, self.seed, epoch)
        weights = torch.ones(self.num_images)
        skip = torch.zeros(self.num_images, dtype=torch.bool)
        if epoch < self.until_epoch and self.ratio > 0:
            # fsum rounds the exact sum once: the mean does not depend on the order of a parallel
            # sum (threads), so every rank compares against the same value.
            scores = self.scores.cpu()
            mean = math.fsum(scores.tolist()) / len(scores)
            learned = (scores.double() < mean).nonzero().flatten()
            # A whole number of batches, so that the last batch keeps its size.
            count = int(self.ratio * len(learned)) // self.batch_size * self.batch_size
            if count:
                generator = torch.Generator().manual_seed(_derive_seed("prune", self.seed, epoch))
                chosen = learned[torch.randperm(len(learned), generator=generator)]
                skip[chosen[:count]] = True
                weights[chosen[count:]] = len(learned) / (len(learned) - count)
        self.order = order[~skip[order]].to(self.device)
        self.weights = weights.to(self.device)
        self.epoch = epoch

    def record(self, indices: torch.Tensor, losses: torch.Tensor) -> None:
        """Keep the training losses of the images ``indices`` (this rank's shard of a step)."""
        self._pending[0, indices] = losses.detach().float()
        self._pending[1, indices] = 1.0

    def merge(self, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        """Fold the recorded losses into the scores; under several ranks ``reduce`` (an all-reduce
        sum) gathers every rank's first, so that all ranks hold the same scores. Collective then."""
        pending = self._pending if reduce is None else reduce(self._pending)
        self.scores = torch.where(pending[1] > 0, pending[0], self.scores)
        self._pending.zero_()

    def state_dict(self) -> dict[str, Any]:
        """Scores and plan, merged: call :meth:`merge` first."""
        return {
            "scores": self.scores.cpu(),
            "epoch": self.epoch,
            "order": self.order.cpu(),
            "weights": self.weights.cpu(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        scores = state["scores"]
        if not isinstance(scores, torch.Tensor) or scores.shape != (self.num_images,):
            raise ValueError(f"the pruning scores are not {self.num_images} values, one per training image")
        self.scores = scores.to(self.device, torch.float32)
        self.epoch = state["epoch"]
        self.order = state["order"].to(self.device, torch.int64)
        self.weights = state["weights"].to(self.device, torch.float32)
        self._pending.zero_()
