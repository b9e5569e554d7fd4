"""cerberus.augment: batched augmentation and normalisation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cerberus import augment as aug  # ``augment`` is this file's helper that runs an Augmenter
from cerberus import data
from cerberus.config import AugmentConfig

IDENTITY = ((0.0, 0.0, 0.0), (1 / 255, 1 / 255, 1 / 255))  # mean, std that leave pixel values as they are


def random_images(b: int, seed: int = 0, low: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(low, 256, (b, 3, 32, 32), generator=g, dtype=torch.uint8)


def augment(cfg: AugmentConfig, images: torch.Tensor, seed: int = 0, labels: torch.Tensor | None = None):
    labels = torch.arange(len(images)) % 10 if labels is None else labels
    augmenter = aug.Augmenter(cfg, *IDENTITY)
    return augmenter(images, labels, torch.Generator().manual_seed(seed))


def test_normalize_values() -> None:
    images = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 3, 1, 1).expand(2, 3, 4, 4)
    out = aug.normalize(images, mean=(0.5, 0.2, 0.0), std=(0.25, 0.1, 2.0))
    assert out.dtype == torch.float32 and out.shape == (2, 3, 4, 4)
    expected = torch.tensor([-2.0, 0.0, 0.5]).view(1, 3, 1, 1).expand(2, 3, 4, 4)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    assert aug.normalize(images, (0.5,) * 3, (0.25,) * 3, dtype=torch.bfloat16).dtype == torch.bfloat16
    assert torch.equal(aug.normalize(images, *IDENTITY), images.float())  # exact for identity
    with pytest.raises(ValueError, match="uint8"):
        aug.normalize(images.float(), (0.5,) * 3, (0.25,) * 3)


def test_no_crop_no_flip_is_just_normalize() -> None:
    images, labels = random_images(16), torch.arange(16) % 10
    mean, std = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
    out, targets = aug.Augmenter(AugmentConfig(crop_padding=0, flip=False), mean, std)(
        images, labels, torch.Generator().manual_seed(0)
    )
    assert torch.equal(out, aug.normalize(images, mean, std))
    assert targets is labels


def _window_offsets(out: torch.Tensor, padded: torch.Tensor, pad: int) -> list[tuple[int, int]]:
    """(dy, dx) of the windows of ``padded`` (C, H+2p, W+2p) equal to ``out`` (C, H, W)."""
    return [
        (dy, dx)
        for dy in range(2 * pad + 1)
        for dx in range(2 * pad + 1)
        if torch.equal(padded[:, dy : dy + 32, dx : dx + 32], out)
    ]


def test_crop_is_a_window_of_the_zero_padded_image() -> None:
    images = random_images(32, low=1)  # no black pixel of its own
    out, _ = augment(AugmentConfig(crop_padding=4, flip=False), images, seed=11)
    padded = F.pad(images.float(), (4, 4, 4, 4))
    offsets = [_window_offsets(out[i], padded[i], 4) for i in range(32)]
    assert all(len(o) == 1 for o in offsets)
    assert len({o[0] for o in offsets}) > 10  # per-image offsets, not one for the batch
    assert (out == 0).any()  # the zero padding shows
    # the same offsets by hand: the first draw of the generator is randint(0, 9, (2, B, 1))
    expected = torch.randint(0, 9, (2, 32, 1), generator=torch.Generator().manual_seed(11))
    assert [o[0] for o in offsets] == list(zip(expected[0, :, 0].tolist(), expected[1, :, 0].tolist()))


def test_crop_and_flip_together() -> None:
    images = random_images(32, low=1)
    out, _ = augment(AugmentConfig(crop_padding=2), images, seed=4)
    padded = F.pad(images.float(), (2, 2, 2, 2))
    plain = [bool(_window_offsets(out[i], padded[i], 2)) for i in range(32)]
    mirrored = [bool(_window_offsets(out[i], padded[i].flip(-1), 2)) for i in range(32)]
    assert all(p != m for p, m in zip(plain, mirrored))  # each image is exactly one of the two
    assert 5 < sum(mirrored) < 27


def test_flip_flips_about_half() -> None:
    images = random_images(64)
    out, _ = augment(AugmentConfig(crop_padding=0, flip=True), images, seed=2)
    same = [torch.equal(out[i], images[i].float()) for i in range(64)]
    flipped = [torch.equal(out[i], images[i].flip(-1).float()) for i in range(64)]
    assert all(s != f for s, f in zip(same, flipped))
    assert 20 < sum(flipped) < 44


def test_given_flips_mirror_exactly_those_images() -> None:
    images = random_images(32)
    mirrored = torch.arange(32) % 3 == 0
    cfg = AugmentConfig(crop_padding=0, flip=True, flip_mode="alternate")
    out, _ = aug.Augmenter(cfg, *IDENTITY)(images, torch.arange(32) % 10, torch.Generator(), mirrored)
    expected = torch.where(mirrored.view(32, 1, 1, 1), images.flip(-1), images)
    assert torch.equal(out, expected.float())
    # with crops: the same windows (no coin is drawn for the flips), mirrored where the mask says
    cfg = AugmentConfig(crop_padding=2, crop_mode="reflect", flip=True)
    labels = torch.arange(32) % 10
    none = torch.zeros(32, dtype=torch.bool)
    plain, _ = aug.Augmenter(cfg, *IDENTITY)(images, labels, torch.Generator().manual_seed(4), none)
    both, _ = aug.Augmenter(cfg, *IDENTITY)(images, labels, torch.Generator().manual_seed(4), ~none)
    assert torch.equal(both, plain.flip(-1))
    assert not torch.equal(
        plain,
        aug.Augmenter(cfg.model_copy(update={"crop_padding": 0}), *IDENTITY)(
            images, labels, torch.Generator().manual_seed(4), none
        )[0],
    )  # the windows did move


def test_alternating_flips_are_a_seeded_half() -> None:
    flips = aug.alternating_flips(3, 10_000, torch.device("cpu"))
    assert flips.dtype == torch.bool and flips.shape == (10_000,)
    assert 4_800 < int(flips.sum()) < 5_200
    assert torch.equal(flips, aug.alternating_flips(3, 10_000, torch.device("cpu")))
    assert not torch.equal(flips, aug.alternating_flips(4, 10_000, torch.device("cpu")))


def test_alternating_flips_take_any_64_bit_seed() -> None:
    cpu = torch.device("cpu")
    for seed in (2**63 - 1, -(2**63)):  # seed * 1_000_003 would overflow the generator's seed
        assert aug.alternating_flips(seed, 1000, cpu).shape == (1000,)
    # Reduced modulo 2**64, which is how the generator reads a negative seed: the same draws as before.
    before = torch.rand(1000, generator=torch.Generator().manual_seed(-3 * 1_000_003 + 17)) < 0.5
    assert torch.equal(aug.alternating_flips(-3, 1000, cpu), before)


def test_crop_size_takes_a_smaller_window_of_the_padded_image() -> None:
    images = random_images(32, low=1)
    cfg = AugmentConfig(crop_padding=2, crop_mode="reflect", flip=False)
    labels = torch.arange(32) % 10
    out, _ = aug.Augmenter(cfg, *IDENTITY)(images, labels, torch.Generator().manual_seed(6), size=24)
    assert out.shape == (32, 3, 24, 24)
    padded = F.pad(images.float(), (2, 2, 2, 2), mode="reflect")
    # offsets 0..12 in each direction: 36 padded pixels less the 24 the window keeps
    expected = torch.randint(0, 13, (2, 32, 1), generator=torch.Generator().manual_seed(6))
    for i in range(32):
        dy, dx = expected[0, i, 0].item(), expected[1, i, 0].item()
        assert torch.equal(out[i], padded[i, :, dy : dy + 24, dx : dx + 24])
    assert len({(a, b) for a, b in zip(expected[0, :, 0].tolist(), expected[1, :, 0].tolist())}) > 10
    # flips mirror the window; a window of the whole image is the default crop, draw for draw
    flip_cfg = cfg.model_copy(update={"flip": True})
    none, every = torch.zeros(32, dtype=torch.bool), torch.ones(32, dtype=torch.bool)
    flipper = aug.Augmenter(flip_cfg, *IDENTITY)
    plain, _ = flipper(images, labels, torch.Generator().manual_seed(6), none, 24)
    mirrored, _ = flipper(images, labels, torch.Generator().manual_seed(6), every, 24)
    assert torch.equal(plain, out) and torch.equal(mirrored, out.flip(-1))
    whole, _ = flipper(images, labels, torch.Generator().manual_seed(6), size=32)
    default, _ = flipper(images, labels, torch.Generator().manual_seed(6))
    assert torch.equal(whole, default)
    # without padding or flips the window still moves: 0..8 offsets of the image itself
    bare, _ = aug.Augmenter(AugmentConfig(crop_padding=0, flip=False), *IDENTITY)(
        images, labels, torch.Generator().manual_seed(1), size=24
    )
    drawn = torch.randint(0, 9, (2, 32, 1), generator=torch.Generator().manual_seed(1))
    assert torch.equal(bare[5], images[5, :, drawn[0, 5, 0] :, drawn[1, 5, 0] :][:, :24, :24].float())
    with pytest.raises(ValueError, match="crop size 40"):
        aug.Augmenter(cfg, *IDENTITY)(images, labels, torch.Generator(), size=40)
    with pytest.raises(ValueError, match="square images"):
        aug.Augmenter(cfg, *IDENTITY)(images[:, :, :30], labels, torch.Generator(), size=24)
    # zero padding: windows of the black-bordered image, offsets drawn the same way
    zero_windows, _ = aug.Augmenter(AugmentConfig(crop_padding=2, flip=False), *IDENTITY)(
        images, labels, torch.Generator().manual_seed(6), size=24
    )
    black = F.pad(images.float(), (2, 2, 2, 2))
    for i in range(32):
        dy, dx = expected[0, i, 0].item(), expected[1, i, 0].item()
        assert torch.equal(zero_windows[i], black[i, :, dy : dy + 24, dx : dx + 24])
    assert (zero_windows == 0).any()


def test_crop_size_follows_the_configured_epochs() -> None:
    augmenter = aug.Augmenter(AugmentConfig(crop_sizes=[20, 24, 28]), *IDENTITY)
    assert [augmenter.crop_size(e) for e in range(5)] == [20, 24, 28, None, None]
    assert aug.Augmenter(AugmentConfig(), *IDENTITY).crop_size(0) is None


def test_reflect_padding_never_shows_zero_fill() -> None:
    images = random_images(64, low=1)
    zero_out, _ = augment(AugmentConfig(crop_padding=4, crop_mode="zero"), images, seed=3)
    reflect_cfg = AugmentConfig(crop_padding=4, crop_mode="reflect", flip=False)
    reflect_out, _ = augment(reflect_cfg, images, seed=3)
    assert (zero_out == 0).any() and not (reflect_out == 0).any()
    padded = F.pad(images.float(), (4, 4, 4, 4), mode="reflect")  # edge not repeated
    assert all(len(_window_offsets(reflect_out[i], padded[i], 4)) == 1 for i in range(64))
    # with flips too, still no zero anywhere
    flipped_out, _ = augment(AugmentConfig(crop_padding=4, crop_mode="reflect"), images, seed=3)
    assert not (flipped_out == 0).any()


def test_cutout_zeroes_a_clipped_square_per_image() -> None:
    images = random_images(64, low=1)  # identity normalisation: no pixel is 0 before cutout
    out, _ = augment(AugmentConfig(crop_padding=0, flip=False, cutout_size=8), images, seed=5)
    zero = out == 0
    assert torch.equal(zero, zero[:, :1].expand_as(zero))  # the same hole in every channel
    full = clipped = 0
    for i in range(64):
        rows = zero[i, 0].any(1).nonzero().flatten()
        cols = zero[i, 0].any(0).nonzero().flatten()
        height, width = len(rows), len(cols)
        assert 1 <= height <= 8 and 1 <= width <= 8
        assert int(zero[i, 0].sum()) == height * width  # a rectangle
        inside = rows.min() > 0 and rows.max() < 31 and cols.min() > 0 and cols.max() < 31
        if inside:
            assert height == width == 8 and int(zero[i].sum()) == 3 * 64
            full += 1
        clipped += height * width < 64
    assert full > 32 and clipped > 4  # centres anywhere: most holes inside, some clipped at a border
    torch.testing.assert_close(out[~zero], images.float()[~zero], atol=0, rtol=0)


def test_cutout_holes() -> None:
    images = random_images(32, low=1)
    out, _ = augment(AugmentConfig(crop_padding=0, flip=False, cutout_size=4, cutout_holes=3), images, 6)
    per_image = (out[:, 0] == 0).sum((1, 2))
    assert int(per_image.max()) <= 48 and int(per_image.max()) > 16


def constant_batch(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.uint8).view(-1, 1, 1, 1).expand(-1, 3, 32, 32).contiguous()


def test_mixup_images_and_targets_use_one_lambda() -> None:
    values = [10 * i + 5 for i in range(10)]
    images, labels = constant_batch(values), torch.arange(10)
    out, targets = augment(AugmentConfig(crop_padding=0, flip=False, mixup_alpha=1.0), images, 9, labels)
    assert targets.shape == (10, 10) and targets.dtype == torch.float32
    torch.testing.assert_close(targets.sum(1), torch.ones(10))
    lams = []
    for i in range(10):
        own = float(targets[i, i])
        partner = int(targets[i].masked_fill(torch.arange(10) == i, -1).argmax()) if own < 1 else i
        expected = own * values[i] + (1 - own) * values[partner]
        torch.testing.assert_close(out[i], torch.full((3, 32, 32), expected), atol=1e-4, rtol=0)
        if own < 1:
            lams.append(own)
    assert lams and max(lams) - min(lams) < 1e-6 and 0 < lams[0] < 1  # one lambda per batch


def test_cutmix_lambda_is_the_pasted_area() -> None:
    values = [10 * i + 5 for i in range(10)]
    images, labels = constant_batch(values), torch.arange(10)
    cfg = AugmentConfig(crop_padding=0, flip=False, cutmix_alpha=1.0)
    boxes = set()
    for seed in range(6):
        out, targets = augment(cfg, images, seed, labels)
        torch.testing.assert_close(targets.sum(1), torch.ones(10))
        pasted = out[:, 0] != torch.tensor(values, dtype=torch.float32).view(10, 1, 1)  # (B, H, W)
        box = pasted.any(0)
        for i in range(10):
            own_fraction = 1 - int(pasted[i].sum()) / 1024
            assert float(targets[i, i]) == pytest.approx(own_fraction, abs=1e-6)
            if own_fraction < 1:  # partner differs from i: the pasted area is visible
                assert torch.equal(pasted[i], box)  # one box for the whole batch
                assert float(targets[i].sum() - targets[i, i]) == pytest.approx(1 - own_fraction, abs=1e-6)
        boxes.add(int(box.sum()))
        rows, cols = box.any(1).nonzero(), box.any(0).nonzero()
        assert int(box.sum()) == len(rows) * len(cols)  # a rectangle
    assert len(boxes) > 2  # the area varies with lambda


def test_mix_prob_zero_leaves_images_but_gives_probabilities() -> None:
    images, labels = random_images(8), torch.arange(8)
    out, targets = augment(
        AugmentConfig(crop_padding=0, flip=False, mixup_alpha=0.4, mix_prob=0.0), images, 0
    )
    assert torch.equal(out, images.float())
    assert torch.equal(targets, F.one_hot(labels, 10).float())


def test_both_mixes_are_chosen() -> None:
    values = [10 * i + 5 for i in range(10)]
    images, labels = constant_batch(values), torch.arange(10)
    cfg = AugmentConfig(crop_padding=0, flip=False, mixup_alpha=1.0, cutmix_alpha=1.0)
    kinds = set()
    for seed in range(12):
        out, _ = augment(cfg, images, seed, labels)
        uniform = bool((out == out[:, :, :1, :1]).all())  # mixup keeps constant images constant
        kinds.add("mixup" if uniform else "cutmix")
    assert kinds == {"mixup", "cutmix"}


def test_rotation_fills_corners_with_black() -> None:
    images = torch.full((4, 3, 32, 32), 200, dtype=torch.uint8)
    out, _ = augment(AugmentConfig(crop_padding=0, flip=False, rotation=45), images, seed=1)
    torch.testing.assert_close(out[:, :, 12:20, 12:20], torch.full((4, 3, 8, 8), 200.0))  # centre kept
    assert bool((out[:, :, 0, 0] < 100).all())  # corners rotated in from outside: zero fill
    angles = (torch.rand(4, generator=torch.Generator().manual_seed(1)) * 2 - 1) * 45
    assert bool((angles.abs() > 5).all())  # (a turn of 1 degree would leave the corners > 100)
    assert not torch.equal(out[0], out[1])


def test_rotation_matches_affine_grid() -> None:
    images = random_images(16)
    out, _ = augment(AugmentConfig(crop_padding=0, flip=False, rotation=30), images, seed=8)
    angle = (torch.rand(16, generator=torch.Generator().manual_seed(8)) * 2 - 1) * math.radians(30)
    cos, sin, zero = angle.cos(), angle.sin(), torch.zeros(16)
    theta = torch.stack([cos, -sin, zero, sin, cos, zero], dim=1).view(16, 2, 3)
    grid = F.affine_grid(theta, [16, 3, 32, 32], align_corners=False)
    expected = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    torch.testing.assert_close(out, expected, atol=1e-3, rtol=0)
    assert float((out - images.float()).abs().mean()) > 10  # it did turn


@pytest.mark.parametrize("pruned", [False, True], ids=["plain", "pruner"])
@pytest.mark.parametrize(
    "cfg",
    [AugmentConfig(crop_padding=0, flip=False), AugmentConfig(flip=False, mixup_alpha=0.4, cutmix_alpha=1.0)],
    ids=["hard-labels", "mixed-targets"],
)
def test_a_training_step_descends_the_label_smoothed_loss(cfg: AugmentConfig, pruned: bool) -> None:
    """Trainer.train_step reports and descends cross-entropy against (1 - eps) * targets + eps / K,
    computed here by hand from the step's own batch and the model's logits before the step."""
    from cerberus.config import TrainConfig
    from cerberus.device import Placement
    from cerberus.engine import LRSchedule, Trainer
    from cerberus.prune import DataPruner

    n, batch, eps, cpu = 24, 8, 0.1, torch.device("cpu")
    images, labels = random_images(n, seed=3), torch.arange(n) % 10
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    train_cfg = TrainConfig(batch_size=batch, schedule="constant", lr=0.05, warmup_epochs=0)
    augmenter = aug.Augmenter(cfg, (0.5,) * 3, (0.25,) * 3)
    trainer = Trainer(
        model=model,
        optimizer=optimizer,
        schedule=LRSchedule(train_cfg, n // batch),
        augmenter=augmenter,
        placement=Placement(cpu, "fp32", False),
        cfg=train_cfg,
        seed=5,
        images=images,
        labels=labels,
        label_smoothing=eps,
        pruner=DataPruner(n, 0.5, 0, batch, 5, cpu) if pruned else None,  # nothing pruned: weights 1
    )
    epoch, step = 0, 1
    idx = trainer.batch_indices(epoch, step)
    x, targets = augmenter(images[idx], labels[idx], data.step_generator(5, epoch, step, "cpu"))
    soft = F.one_hot(targets, 10).float() if targets.ndim == 1 else targets
    assert (targets.ndim == 2) == augmenter.mixes
    if augmenter.mixes:
        assert bool((soft.max(dim=1).values < 0.99).any())  # some targets are really mixed

    before = [p.detach().clone() for p in model.parameters()]
    log_probs = torch.log_softmax(model(x), dim=1)
    per_image = -(((1 - eps) * soft + eps / 10) * log_probs).sum(dim=1)
    plain = -(soft * log_probs).sum(dim=1)
    grads = torch.autograd.grad(per_image.mean(), list(model.parameters()))
    per_image, plain = per_image.detach(), plain.detach()
    assert float((per_image - plain).abs().sum()) > 0.05  # smoothing makes a visible difference

    reported, _, trained, lr = trainer.train_step(epoch, step)
    assert trained == batch and lr == pytest.approx(0.05)
    assert float(reported) == pytest.approx(float(per_image.sum()), rel=1e-5)
    assert float(reported) != pytest.approx(float(plain.sum()), rel=1e-3)
    for after, old, grad in zip(model.parameters(), before, grads, strict=True):
        torch.testing.assert_close(after.detach(), old - lr * grad, rtol=1e-5, atol=1e-7)


def test_the_configured_label_smoothing_reaches_the_trainer(tmp_path, fake_cifar, monkeypatch) -> None:
    """train_run hands augment.label_smoothing to the Trainer (whose loss the test above checks)."""
    from test_train import tiny_config

    from cerberus import runner

    class Built(Exception):
        pass

    seen = []

    def spy(**kwargs):
        seen.append(kwargs["label_smoothing"])
        raise Built

    monkeypatch.setattr(runner, "Trainer", spy)
    for smoothing in (0.15, 0.0):
        cfg = tiny_config(tmp_path, f"augment.label_smoothing={smoothing}")
        with pytest.raises(Built):
            runner.train_run(cfg, out_dir=tmp_path / f"run-{smoothing}", data_dir=str(fake_cifar))
    assert seen == [0.15, 0.0]


def test_same_seed_same_batch_everything_on() -> None:
    cfg = AugmentConfig(crop_mode="reflect", rotation=10, cutout_size=8, cutout_holes=2, mixup_alpha=0.2,
                        cutmix_alpha=1.0, mix_prob=0.7)  # fmt: skip
    augmenter = aug.Augmenter(cfg, (0.49, 0.48, 0.45), (0.2, 0.2, 0.2))
    images, labels = random_images(64), torch.arange(64) % 10
    first = augmenter(images, labels, data.step_generator(0, 1, 2, "cpu"))
    second = augmenter(images, labels, data.step_generator(0, 1, 2, "cpu"))
    other = augmenter(images, labels, data.step_generator(0, 1, 3, "cpu"))
    assert first[0].dtype == torch.float32 and first[0].shape == (64, 3, 32, 32)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert not torch.equal(first[0], other[0])
    assert torch.equal(images, random_images(64))  # the input batch is not modified
