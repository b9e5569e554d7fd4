"""Device, precision and memory layout: the fastest the hardware has, or what the config says.

* device ``auto``: CUDA, then Apple MPS, then the CPU.
* precision ``auto``: bf16 autocast on CUDA GPUs with bf16 and on CPUs with AVX512-BF16 or AMX;
  fp16 with a gradient scaler on GPUs with fp16 but no bf16; fp32 otherwise.
* channels_last (NHWC) for the convolutions on CUDA and wherever a reduced precision is used
  (cuDNN and oneDNN pick their fastest kernels for it), unless the config says otherwise. On
  x86-64 CPUs in fp32 NHWC trained 1.15-1.75x faster on an AVX2-only EPYC and evaluated 1.3x
  faster (benchmarks/RESULTS.md), so it is the default there too, with one exception: oneDNN's
  backward pass of a strided 1x1 convolution that reads fewer channels than its kernel's channel
  block hangs or computes wrong gradients in NHWC (oneDNN issue #6035; see
  :func:`cerberus.arch.nhwc_backward_hazard`). A design with such a layer trains in NCHW when the layout is
  left to ``auto``, and asking for channels_last is refused. Other CPUs, where NHWC was not
  measured, keep NCHW.
"""

from __future__ import annotations

import contextlib
import functools
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from cerberus.arch import nhwc_backward_hazard
from cerberus.errors import ConfigError

if TYPE_CHECKING:
    from cerberus.arch import Architecture


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags the kernel reports (empty where /proc/cpuinfo does not exist)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def _x86_64() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def cpu_has_fast_bf16() -> bool:
    """AVX512-BF16 or AMX: oneDNN runs bf16 convolutions natively on these."""
    flags = cpu_flags()
    return bool({"avx512_bf16", "amx_bf16"} & flags)


def resolve_device(name: str = "auto", *, source: str = "train.device") -> torch.device:
    """The torch device for ``name``; ``source`` names the setting in errors (a key or a flag)."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{source}: 'cuda' was asked for, but no CUDA GPU is available")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError(f"{source}: 'mps' was asked for, but Apple MPS is not available")
    return torch.device(name)


def resolve_precision(name: str, device: torch.device, *, source: str = "train.precision") -> str:
    """``fp32``, ``bf16`` or ``fp16`` for ``device``; ``auto`` picks the fastest available.

    ``source`` names the setting in errors (a config key or a flag).
    """
    if name != "auto":
        if name == "fp16" and device.type == "cpu":
            raise ConfigError(f"{source}: fp16 is not supported on the CPU; use bf16 or fp32")
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type == "mps":
        return "fp16"
    return "bf16" if cpu_has_fast_bf16() else "fp32"


_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _layout(channels_last: bool) -> str:
    return "channels_last" if channels_last else "NCHW"


@dataclass(frozen=True)
class Placement:
    """Where and how a model runs: device, autocast precision, memory layout."""

    device: torch.device
    precision: str  # "fp32" | "bf16" | "fp16"
    channels_last: bool  # the layout for training
    inference_channels_last: bool | None = None  # the layout for forward-only passes; None: the same

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    @property
    def inference_layout(self) -> bool:
        """Whether forward-only passes (evaluation, prediction) run in channels_last."""
        return self.channels_last if self.inference_channels_last is None else self.inference_channels_last

    @property
    def inference_memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.inference_layout else torch.contiguous_format

    def describe(self) -> str:
        """E.g. ``cpu fp32 NCHW (inference channels_last)``."""
        text = f"{self.device.type} {self.precision} {_layout(self.channels_last)}"
        if self.inference_layout != self.channels_last:
            text += f" (inference {_layout(self.inference_layout)})"
        return text

    def autocast(self) -> contextlib.AbstractContextManager:
        """Autocast for the forward pass (a no-op context in fp32)."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=_DTYPES[self.precision])


def x86_cpu(device: torch.device) -> bool:
    """Whether ``device`` is the CPU of an x86-64 machine (where oneDNN's NHWC kernels were measured)."""
    return device.type == "cpu" and _x86_64()


def resolve_placement(
    device: str = "auto",
    precision: str = "auto",
    channels_last: bool | None = None,
    *,
    sources: tuple[str, str] = ("train.device", "train.precision"),
    arch: Architecture | None = None,
) -> Placement:
    """Resolve the config's ``auto`` choices for this machine; ``sources`` name the two settings.

    ``arch`` is the design to be trained: on an x86-64 CPU, training then runs in channels_last
    unless :func:`~cerberus.arch.nhwc_backward_hazard` names a layer (checked in bf16 too, to be
    safe, though only fp32 was probed), and ``channels_last=True`` with such a layer is a
    :class:`ConfigError`. Without ``arch`` (evaluation, prediction only) an fp32 CPU placement
    trains in NCHW and infers in channels_last.
    """
    dev = resolve_device(device, source=sources[0])
    prec = resolve_precision(precision, dev, source=sources[1])
    on_x86 = x86_cpu(dev)
    hazard = nhwc_backward_hazard(arch) if arch is not None and on_x86 else None
    if channels_last and hazard is not None:
        raise ConfigError(
            f"train.channels_last: oneDNN trains {hazard} wrongly in channels_last on this CPU "
            "(it hangs or returns wrong gradients); set train.channels_last = false, or widen "
            "the stage before it to at least 16 channels",
            field="train.channels_last",
        )
    if channels_last is not None:
        return Placement(dev, prec, channels_last, channels_last)
    train_layout = prec != "fp32" or dev.type == "cuda" or (on_x86 and arch is not None)
    return Placement(dev, prec, train_layout and hazard is None, train_layout or on_x86)


def tune_backends(placement: Placement) -> None:
    """Process-wide kernel choices for training on ``placement``.

    On CUDA, cuDNN benchmarks its convolution algorithms once per shape and keeps the fastest
    (training shapes repeat every step); fp32 matrix products may use TF32 tensor cores. Neither
    changes anything on the CPU, where results stay bitwise reproducible.
    """
    if placement.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
