"""torch.distributed, as torchrun sets it up: one process per device, DDP, gloo or nccl.

``torchrun --nproc-per-node N -m cerberus train CONFIG.toml`` sets RANK, LOCAL_RANK and
WORLD_SIZE; :meth:`DistContext.from_env` reads them and joins the process group (nccl on CUDA,
gloo on the CPU). Without them, it is a single-process context whose methods cost nothing.

Every collective call must be made by every rank, in the same order, or the ranks that made it
wait forever. So the ranks take decisions together (:meth:`DistContext.any_rank`), rank 0 alone
does what only it needs and hands the result on (:meth:`DistContext.from_main`), and a failure that
may strike one rank only (a locked run directory, data missing on one node) is announced to all
of them (:meth:`DistContext.agreement`) instead of leaving them waiting.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from cerberus.device import resolve_device
from cerberus.errors import CerberusError, ConfigError, RankFailedError

T = TypeVar("T")


def is_main_process() -> bool:
    """True unless torchrun started this process with a rank other than 0."""
    return int(os.environ.get("RANK", "0")) == 0


# What gloo and nccl say when the process at the other end is gone (not a mistake of this one).
_PEER_GONE = re.compile(
    r"connection (reset|closed) by peer|broken pipe|remote process exited|socket closed", re.IGNORECASE
)


def lost_a_process(err: BaseException) -> bool:
    """Whether ``err``, raised by a collective call, means another process of the run is gone."""
    network = tuple(
        getattr(dist, name) for name in ("DistNetworkError", "DistStoreError") if hasattr(dist, name)
    )
    return isinstance(err, network) or _PEER_GONE.search(str(err)) is not None


def _failure(err: BaseException) -> tuple[str, int]:
    """(message, exit code) of an error, to send to the other ranks."""
    if isinstance(err, CerberusError):
        return str(err), err.exit_code
    if isinstance(err, KeyboardInterrupt):
        return "interrupted", 130
    return f"{type(err).__name__}: {err}", 1


@dataclass
class DistContext:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device | None = None  # the device this process must use (None: config's choice)
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def launcher(self) -> str:
        """How to start this command again, for the hints that say how to resume."""
        return "torchrun <same options> -m cerberus" if self.active else "cerberus"

    @property
    def active(self) -> bool:
        """True with several processes (only then do the methods below communicate)."""
        return self.world_size > 1

    @classmethod
    def from_env(cls, device_choice: str = "auto") -> DistContext:
        """The context torchrun's environment describes; joins the process group if needed.

        ``device_choice`` is ``train.device``: ``auto`` takes this process's GPU (LOCAL_RANK)
        when CUDA is available and the CPU otherwise; ``cuda`` insists on the GPU, ``cpu`` on gloo.
        """
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size <= 1:
            return cls()
        rank = int(os.environ["RANK"])
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device_choice == "mps":
            raise ConfigError("train.device: torchrun trains on CUDA GPUs (nccl) or on the CPU, not 'mps'")
        if device_choice == "cuda":
            resolve_device("cuda")  # a clear ConfigError when there is no GPU
        use_cuda = torch.cuda.is_available() and device_choice in ("auto", "cuda")
        if use_cuda:
            gpus = torch.cuda.device_count()
            if local_rank >= gpus:
                raise ConfigError(
                    f"this machine has {gpus} CUDA GPU(s) but torchrun started local rank {local_rank}: "
                    f"use --nproc-per-node {gpus} or fewer"
                )
            torch.cuda.set_device(local_rank)
            device = torch.device("cuda", local_rank)
        else:
            device = torch.device("cpu")
        initialized_here = False
        if not dist.is_initialized():
            if use_cuda:  # binding the GPU lets nccl connect eagerly, on the right device
                dist.init_process_group(backend="nccl", device_id=device)
            else:
                dist.init_process_group(backend="gloo")
            initialized_here = True
        return cls(rank, local_rank, world_size, device, initialized_here)

    # -- the model -----------------------------------------------------------------------------

    def convert_sync_bn(self, model: nn.Module) -> nn.Module:
        """BatchNorm -> SyncBatchNorm (statistics over the global batch) with several processes.

        The state_dict keys stay those of BatchNorm, so checkpoints load into a plain model.
        """
        if not self.active:
            return model
        self.check_sync_bn()
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)

    def check_sync_bn(self) -> None:
        """Refuse ``train.sync_bn`` where SyncBatchNorm cannot run: several processes off CUDA."""
        if self.active and (self.device is None or self.device.type != "cuda"):
            raise ConfigError("train.sync_bn needs CUDA GPUs (nccl); on the CPU set train.sync_bn = false")

    def wrap(self, model: nn.Module) -> nn.Module:
        """DistributedDataParallel around ``model`` when there are several processes.

        DDP broadcasts rank 0's weights here and its buffers (BatchNorm statistics) before every
        forward pass, and averages the gradients over the ranks in ``backward``.
        """
        if not self.active:
            return model
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.device.index] if self.device is not None and self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)

    # -- collective calls (every rank must make each of them) ----------------------------------

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    def any_rank(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is True on any of them."""
        return self.max_over_ranks(int(flag)) > 0

    def max_over_ranks(self, value: int) -> int:
        """The largest of every rank's ``value``, on every rank."""
        if not self.active:
            return value
        values = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
        return int(values.item())

    def from_main(self, compute: Callable[..., T], *args: Any) -> T:
        """``compute(*args)`` run on rank 0 only; its (picklable) result is returned on every rank.

        If it raises on rank 0, the error propagates there and the other ranks raise
        :class:`RankFailedError` with its message instead of waiting for a result.
        """
        if not self.active:
            return compute(*args)
        box: list[Any] = [None]
        if self.is_main:
            try:
                result = compute(*args)
            except BaseException as err:
                box[0] = ("error", *_failure(err))
                dist.broadcast_object_list(box, src=0, device=self.device)
                raise
            box[0] = ("ok", result)
            dist.broadcast_object_list(box, src=0, device=self.device)
            return result
        dist.broadcast_object_list(box, src=0, device=self.device)
        if box[0][0] == "error":
            raise RankFailedError(f"rank 0 failed: {box[0][1]}", box[0][2])
        return box[0][1]

    @contextlib.contextmanager
    def agreement(self) -> Iterator[None]:
        """Run a block that may fail on some ranks only; if it fails on any, it fails on all.

        The ranks compare outcomes when the block ends: one that failed re-raises its own error,
        the others raise :class:`RankFailedError` with the message of the first that failed. The
        block itself must make no collective call (a failing rank would not make it).
        """
        if not self.active:
            yield
            return
        try:
            yield
        except BaseException as err:
            self._exchange_failures(_failure(err))
            raise
        failures = self._exchange_failures(None)
        for rank, failure in enumerate(failures):
            if failure is not None:
                raise RankFailedError(f"rank {rank} failed: {failure[0]}", failure[1])

    def _exchange_failures(self, mine: tuple[str, int] | None) -> list[tuple[str, int] | None]:
        everyone: list[Any] = [None] * self.world_size
        dist.all_gather_object(everyone, mine)
        return everyone

    def close(self) -> None:
        if self.initialized_here and dist.is_initialized():
            dist.destroy_process_group()
