"""Training augmentation of uint8 batches on their device; the normalisation evaluation shares.

* :class:`Augmenter` runs on whole batches on the training device (crop, flip, rotation, cutout,
  mixup, cutmix) with index arithmetic, no PIL and no per-image Python loop; a disabled option
  costs nothing.
* :func:`normalize` is the same arithmetic for evaluation: uint8 -> ``(x/255 - mean)/std``.
* All randomness comes from the generator passed in (see :func:`cerberus.data.step_generator`), so
  a batch is a pure function of its images, labels and the generator's seed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import torch
import torch.nn.functional as F

from cerberus.config import AugmentConfig


def _check_images(images: torch.Tensor) -> None:
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected uint8 images (B, 3, H, W), got {images.dtype} {tuple(images.shape)}")


def _affine(mean: Sequence[float], std: Sequence[float], device: torch.device) -> tuple[torch.Tensor, ...]:
    """(x/255 - mean)/std as x*scale + shift: float32 (3, 1, 1) scale and shift on ``device``."""
    if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
        raise ValueError(f"mean and std need 3 entries each, std positive; got {mean}, {std}")
    return _affine_cached(tuple(map(float, mean)), tuple(map(float, std)), device)


@lru_cache(maxsize=16)  # built once per device, not per batch (a host-to-device copy on GPUs)
def _affine_cached(
    mean: tuple[float, ...], std: tuple[float, ...], device: torch.device
) -> tuple[torch.Tensor, ...]:
    scale = [1.0 / (255.0 * s) for s in std]
    shift = [-m / s for m, s in zip(mean, std)]
    with torch.inference_mode(False):  # cached: must also serve calls outside inference mode
        return tuple(torch.tensor(v, dtype=torch.float32).view(3, 1, 1).to(device) for v in (scale, shift))


def _normalize_(
    x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """In place on a float32 tensor we own, then cast: pixel values 0..255 -> normalised."""
    return x.mul_(scale).add_(shift).to(dtype)


def normalize(
    images: torch.Tensor, mean: Sequence[float], std: Sequence[float], *, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """uint8 (B, 3, H, W) on any device -> ``dtype`` ``(images/255 - mean)/std``, same device.

    ``mean`` and ``std`` are per channel, in units of the 0..1 pixel range. Computed in float32.
    """
    _check_images(images)
    scale, shift = _affine(mean, std, images.device)
    return _normalize_(images.to(torch.float32), scale, shift, dtype)


def _crop_flip(
    images: torch.Tensor,
    padding: int,
    mode: str,
    flip: bool,
    generator: torch.Generator,
    mirrored: torch.Tensor | None = None,
    size: int | None = None,
) -> torch.Tensor:
    """Random window of the padded batch, optionally mirrored: one gather, uint8 in and out.

    The window is (S, S) for ``size`` S, else (H, W). Per image, offsets ``dy, dx`` in
    ``0..H+2*padding-S`` (``0..2*padding`` for whole images) pick it; output pixel ``(i, j)`` is
    padded pixel ``(i + dy, j + dx)``, or ``(i + dy, S-1-j + dx)`` when the image is flipped:
    with probability 0.5, or where ``mirrored`` (bool (B,)) says when it is given.
    """
    b, c, h, w = images.shape
    device = images.device
    out_h, out_w = (h, w) if size is None else (size, size)
    rows = torch.arange(out_h, device=device).expand(b, out_h)  # (B, S) in padded coordinates
    cols = torch.arange(out_w, device=device).expand(b, out_w)  # (B, S)
    slack = 2 * padding + h - out_h  # square images: the same in both directions
    if slack:
        offsets = torch.randint(0, slack + 1, (2, b, 1), generator=generator, device=device)
        rows, cols = rows + offsets[0], cols + offsets[1]
    if flip:  # reversing j + dx along j gives S-1-j + dx
        if mirrored is None:
            mirrored = torch.rand(b, generator=generator, device=device) < 0.5
        cols = torch.where(mirrored.view(b, 1), cols.flip(1), cols)
    source = images
    if padding and mode == "zero":
        source = F.pad(images, (padding, padding, padding, padding))  # black pixels, as RandomCrop
    elif padding:  # reflect: map padded coordinates back into the image, no padded copy needed
        rows, cols = _reflect(rows - padding, h), _reflect(cols - padding, w)
    width, area = source.shape[3], out_h * out_w
    index = (rows[:, :, None] * width + cols[:, None, :]).view(b, 1, area).expand(b, c, area)
    return source.reshape(b, c, -1).gather(2, index).view(b, c, out_h, out_w)


def _reflect(coords: torch.Tensor, size: int) -> torch.Tensor:
    """Reflect out-of-range coordinates like ``F.pad(mode='reflect')`` (edge not repeated)."""
    coords = coords.abs()
    return torch.where(coords >= size, 2 * (size - 1) - coords, coords)


def _rotate(x: torch.Tensor, degrees: float, generator: torch.Generator) -> torch.Tensor:
    """Rotate each image of float (B, C, H, W) by U(-degrees, degrees); bilinear, zero fill.

    The sampling grid is what ``F.affine_grid`` gives for a pure rotation (pixel centres,
    ``align_corners=False``), built with broadcasting, which is several times faster on the CPU.
    """
    b, _, h, w = x.shape
    device = x.device
    angle = (torch.rand(b, 1, 1, generator=generator, device=device) * 2 - 1) * math.radians(degrees)
    cos, sin = angle.cos(), angle.sin()  # (B, 1, 1)
    xs = (torch.arange(w, device=device, dtype=x.dtype) * 2 + 1) / w - 1  # (W,) in [-1, 1]
    ys = ((torch.arange(h, device=device, dtype=x.dtype) * 2 + 1) / h - 1)[:, None]  # (H, 1)
    grid = torch.stack([cos * xs - sin * ys, sin * xs + cos * ys], dim=-1)  # (B, H, W, 2) as (x, y)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _cutout_(x: torch.Tensor, size: int, holes: int, generator: torch.Generator) -> torch.Tensor:
    """Zero ``holes`` squares of side ``size`` per image, centres anywhere, clipped at the borders."""
    b, _, h, w = x.shape
    device = x.device
    centre_y = torch.randint(0, h, (b, holes, 1), generator=generator, device=device)
    centre_x = torch.randint(0, w, (b, holes, 1), generator=generator, device=device)
    top, left = centre_y - size // 2, centre_x - size // 2
    ys, xs = torch.arange(h, device=device), torch.arange(w, device=device)
    in_rows = ((ys >= top) & (ys < top + size)).to(x.dtype)  # (B, holes, H)
    in_cols = ((xs >= left) & (xs < left + size)).to(x.dtype)  # (B, holes, W)
    # (B, H, W) number of holes covering each pixel: a batched outer product, far cheaper on the
    # CPU than building (B, holes, H, W) booleans; multiplying beats masked_fill_ too.
    covered = torch.matmul(in_rows.transpose(1, 2), in_cols)
    return x.mul_(1 - covered.clamp_(max=1).unsqueeze(1))


def _sample_beta(alpha: float, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """A 0-d float32 sample of Beta(alpha, alpha) on ``device`` (a Dirichlet of two)."""
    concentration = torch.full((2,), float(alpha), dtype=torch.float32, device=device)
    lam = torch._sample_dirichlet(concentration, generator=generator)[0]
    return torch.nan_to_num(lam, nan=0.5).clamp(0.0, 1.0)  # guards against 0/0 for tiny alpha


def _cutmix_box(
    lam: torch.Tensor, h: int, w: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """CutMix box (Yun et al., 2019) of area ~(1 - lam) * H * W at a uniform centre, clipped.

    Returns the (H, W) bool mask of the pasted box and lambda corrected to the box's actual area.
    Computed with tensors on the device (no host sync).
    """
    device = lam.device
    ratio = torch.sqrt(1.0 - lam)
    cut_h, cut_w = (h * ratio).floor().long(), (w * ratio).floor().long()
    centre_y = torch.randint(0, h, (), generator=generator, device=device)
    centre_x = torch.randint(0, w, (), generator=generator, device=device)
    top, left = centre_y - cut_h // 2, centre_x - cut_w // 2
    y0, y1 = top.clamp(0, h), (top + cut_h).clamp(0, h)
    x0, x1 = left.clamp(0, w), (left + cut_w).clamp(0, w)
    ys, xs = torch.arange(h, device=device), torch.arange(w, device=device)
    box = ((ys >= y0) & (ys < y1))[:, None] & ((xs >= x0) & (xs < x1))[None, :]
    area = (y1 - y0) * (x1 - x0)
    return box, 1.0 - area.float() / (h * w)


def alternating_flips(seed: int, num_images: int, device: torch.device) -> torch.Tensor:
    """Which images are mirrored in even epochs under ``flip_mode = "alternate"``: bool (N,).

    A random half, drawn once from the run's seed (the same on every process); odd epochs mirror
    the other images, so every image is seen both ways in every two epochs (airbench's
    alternating flip). Epoch ``e`` mirrors ``flips[idx] ^ (e % 2 == 1)``.
    """
    # Apart from batch orders; modulo 2**64, as the generator takes a negative seed, so any int works.
    generator = torch.Generator().manual_seed((seed * 1_000_003 + 17) % 2**64)
    return (torch.rand(num_images, generator=generator) < 0.5).to(device)


class Augmenter:
    """Training augmentation of a batch on its device: uint8 images -> normalised floats, targets.

    Order: random crop (zero or reflect padding) and horizontal flip, rotation, normalisation,
    cutout (holes set to 0 after normalisation), then mixup or cutmix on the whole batch. All
    randomness comes from the generator passed in, so a batch is a pure function of its images,
    labels and the generator's seed. ``mixes`` says whether the targets are probabilities.
    """

    def __init__(
        self, cfg: AugmentConfig, mean: Sequence[float], std: Sequence[float], num_classes: int = 10
    ) -> None:
        self.cfg = cfg
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.num_classes = num_classes
        _affine(self.mean, self.std, torch.device("cpu"))  # validate now, not at the first step
        self.mixes = cfg.mixup_alpha > 0 or cfg.cutmix_alpha > 0  # targets are probabilities

    def __call__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        generator: torch.Generator,
        mirrored: torch.Tensor | None = None,
        size: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 (B, 3, H, W) and int64 (B,) on the device -> float32 (B, 3, H, W) and targets.

        Targets are the labels (int64 (B,)) unless mixup or cutmix is configured; then they are
        float32 (B, num_classes) probabilities for every batch, mixed or not. ``mirrored`` (bool
        (B,)) decides the flips instead of a coin per image (``flip_mode = "alternate"``, see
        :func:`alternating_flips`). ``size`` S < H crops a random (S, S) window of each padded
        image instead (progressive resizing, :meth:`crop_size`); the output is (B, 3, S, S).
        """
        _check_images(images)
        if generator.device.type != images.device.type:
            raise ValueError(f"the generator is on {generator.device}, the images on {images.device}")
        cfg = self.cfg
        if size is not None and not (images.shape[2] == images.shape[3] and 0 < size <= images.shape[2]):
            raise ValueError(
                f"crop size {size} needs square images of at least that side, got {tuple(images.shape[2:])}"
            )
        if size == images.shape[2] == images.shape[3]:
            size = None
        if cfg.crop_padding or cfg.flip or size is not None:
            images = _crop_flip(images, cfg.crop_padding, cfg.crop_mode, cfg.flip, generator, mirrored, size)
        x = images.to(torch.float32)
        if cfg.rotation:
            x = _rotate(x, cfg.rotation, generator)
        scale, shift = _affine(self.mean, self.std, images.device)
        x = _normalize_(x, scale, shift, torch.float32)
        if cfg.cutout_size:
            x = _cutout_(x, cfg.cutout_size, cfg.cutout_holes, generator)
        if not self.mixes:
            return x, labels
        return self._mix(x, labels, generator)

    def crop_size(self, epoch: int) -> int | None:
        """The side of epoch ``epoch``'s (0-based) training windows, or None for whole images."""
        sizes = self.cfg.crop_sizes
        return sizes[epoch] if epoch < len(sizes) else None

    def _mix(
        self, x: torch.Tensor, labels: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mixup or cutmix with a shuffled copy of the batch, without syncing with the host.

        Both are ``lerp(x[perm], x, weight)``: weight = lambda everywhere for mixup, 0 inside the
        pasted box and 1 outside for cutmix, 1 for a batch the ``mix_prob`` coin leaves alone
        (``lerp`` is exact at 0 and 1). Targets are mixed with the same (area-corrected) lambda.
        """
        cfg = self.cfg
        b, _, h, w = x.shape
        device = x.device
        perm = torch.randperm(b, generator=generator, device=device)
        if cfg.mixup_alpha > 0:
            mixup_lam = _sample_beta(cfg.mixup_alpha, generator, device)
            weight, lam = mixup_lam, mixup_lam
        if cfg.cutmix_alpha > 0:
            box, cutmix_lam = _cutmix_box(_sample_beta(cfg.cutmix_alpha, generator, device), h, w, generator)
            box_weight = (~box).to(x.dtype)  # (H, W): 1 keeps the image, 0 takes the partner's pixel
            if cfg.mixup_alpha > 0:  # one of the two per batch, with equal probability
                use_cutmix = torch.rand((), generator=generator, device=device) < 0.5
                weight = torch.where(use_cutmix, box_weight, mixup_lam)
                lam = torch.where(use_cutmix, cutmix_lam, mixup_lam)
            else:
                weight, lam = box_weight, cutmix_lam
        if cfg.mix_prob < 1:
            mixed = torch.rand((), generator=generator, device=device) < cfg.mix_prob
            weight = torch.where(mixed, weight, 1.0)
            lam = torch.where(mixed, lam, 1.0)
        one_hot = torch.zeros(b, self.num_classes, dtype=x.dtype, device=device)
        one_hot.scatter_(1, labels.view(b, 1), 1.0)  # no host sync, unlike a range-checked one_hot
        return torch.lerp(x[perm], x, weight), torch.lerp(one_hot[perm], one_hot, lam)
