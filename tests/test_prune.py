"""Data pruning (train.prune_ratio): which images an epoch skips, their weights, ranks, resume."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from test_train import TINY, bare_trainer, write_config

from cerberus.augment import Augmenter
from cerberus.config import AugmentConfig, load_config
from cerberus.data import epoch_permutation
from cerberus.device import Placement
from cerberus.engine import LRSchedule, Trainer
from cerberus.errors import ConfigError
from cerberus.prune import DataPruner
from cerberus.runner import train_run

CPU = torch.device("cpu")


def pruner(n: int = 100, ratio: float = 0.5, until: int = 5, batch: int = 8, seed: int = 7) -> DataPruner:
    return DataPruner(n, ratio, until, batch, seed, CPU)


def scored(p: DataPruner, scores: torch.Tensor) -> DataPruner:
    p.record(torch.arange(len(scores)), scores)
    p.merge()
    return p


def test_the_first_epoch_trains_every_image_in_the_usual_order():
    p = pruner()
    p.plan(0)
    assert torch.equal(p.order, epoch_permutation(100, 7, 0))
    assert p.skipped == 0 and torch.equal(p.weights, torch.ones(100))


def test_whole_batches_of_well_learned_images_sit_out_and_the_rest_of_them_weigh_more():
    # 60 images below the mean loss (0.1 against 0.76): int(0.5 * 60) = 30, rounded down to
    # whole batches of 8 -> 24 skipped; the 36 others weigh 60 / 36.
    scores = torch.cat([torch.full((60,), 0.1), torch.full((40,), 1.75)])[epoch_permutation(100, 1, 0)]
    p = scored(pruner(), scores)
    p.plan(1)
    learned = scores < scores.mean()
    in_epoch = torch.zeros(100, dtype=torch.bool)
    in_epoch[p.order] = True
    skipped = ~in_epoch
    assert p.skipped == int(skipped.sum()) == 24
    assert not (skipped & ~learned).any()  # only well-learned images are skipped
    assert torch.equal(p.order, epoch_permutation(100, 7, 1)[in_epoch[epoch_permutation(100, 7, 1)]])
    assert torch.allclose(p.weights[learned & in_epoch], torch.tensor(60 / 36))
    assert torch.equal(p.weights[~learned], torch.ones(40))
    # The epoch's expected gradient is the full epoch's: the weights of the well-learned images
    # in the epoch sum to their number.
    assert float(p.weights[learned & in_epoch].sum()) == pytest.approx(60)


def test_the_choice_is_a_function_of_seed_epoch_and_scores():
    scores = torch.linspace(0, 1, 100) ** 2
    a, b = scored(pruner(), scores), scored(pruner(), scores)
    a.plan(2)
    b.plan(2)
    assert torch.equal(a.order, b.order)
    c = scored(pruner(seed=8), scores)
    c.plan(2)
    a.plan(3)
    assert a.skipped == c.skipped == b.skipped  # the same count: the scores are the same
    assert not torch.equal(b.order, c.order) and not torch.equal(b.order, a.order)


def test_epochs_from_until_train_every_image():
    p = scored(pruner(until=3), torch.linspace(0, 1, 100))
    p.plan(2)
    assert p.skipped > 0
    p.plan(3)
    assert p.skipped == 0 and torch.equal(p.order, epoch_permutation(100, 7, 3))
    assert torch.equal(p.weights, torch.ones(100))


def test_images_not_trained_keep_their_score():
    p = scored(pruner(), torch.linspace(0, 1, 100))
    p.record(torch.tensor([3, 50]), torch.tensor([9.0, 8.0]))
    p.merge()
    expected = torch.linspace(0, 1, 100)
    expected[3], expected[50] = 9.0, 8.0
    assert torch.equal(p.scores, expected)


def test_two_ranks_merged_hold_the_scores_one_process_would():
    losses = torch.rand(100, generator=torch.Generator().manual_seed(0))
    alone = scored(pruner(), losses)
    ranks = [pruner(), pruner()]
    ranks[0].record(torch.arange(0, 100, 2), losses[0::2])  # disjoint shards of the epoch
    ranks[1].record(torch.arange(1, 100, 2), losses[1::2])
    summed = ranks[0]._pending + ranks[1]._pending  # what an all-reduce sum hands every rank
    for p in ranks:
        p.merge(lambda _: summed.clone())
        assert torch.equal(p.scores, alone.scores)


def test_the_state_round_trips_scores_and_the_plan_in_progress():
    # Mid-epoch, as at a checkpoint: epoch 1 was planned, then its first 5 steps' losses (2 to 3,
    # above every other score) were merged, so a plan made from these scores would differ.
    p = scored(pruner(), torch.linspace(0, 1, 100))
    p.plan(1)
    p.record(p.order[:40], torch.linspace(2, 3, 40))
    p.merge()
    replanned = scored(pruner(), p.scores)
    replanned.plan(1)
    assert not torch.equal(replanned.order, p.order) and not torch.equal(replanned.weights, p.weights)

    q = pruner()
    q.load_state_dict(p.state_dict())
    assert q.epoch == 1 and torch.equal(q.scores, p.scores)
    # A resumed run's trainer walks the rest of the epoch as planned: the saved order and weights.
    trainer = bare_trainer(torch.zeros(100, 3, 32, 32, dtype=torch.uint8), 8, pruner=q)
    assert trainer.steps_in(1) == -(-(100 - p.skipped) // 8)
    drawn = torch.cat([trainer.batch_indices(1, s) for s in range(trainer.steps_in(1))])
    assert torch.equal(drawn, p.order) and torch.equal(q.weights, p.weights)
    assert q.skipped == p.skipped == 24
    with pytest.raises(ValueError, match="one per training image"):
        pruner(n=99).load_state_dict(p.state_dict())


def test_the_trainer_walks_the_pruned_order_and_schedules_over_the_shorter_epoch():
    n, batch = 100, 8
    p = scored(pruner(n, batch=batch, seed=5), torch.linspace(0, 1, n))
    trainer = bare_trainer(torch.zeros(n, 3, 32, 32, dtype=torch.uint8), batch, pruner=p)
    assert trainer.steps_in(1) == -(-(n - p.skipped) // batch) < trainer.steps_per_epoch
    drawn = torch.cat([trainer.batch_indices(1, s) for s in range(trainer.steps_in(1))])
    assert torch.equal(drawn, p.order)
    schedule = LRSchedule(load_config(None, ["train.schedule=onecycle", "train.epochs=2"]).train, 13)
    steps = trainer.steps_in(1)
    assert schedule.lr_at(1, steps - 1, steps) == schedule.lr_at(1, 12)  # both end the epoch


def test_prune_until_without_prune_ratio_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="prune_until applies to data pruning only"):
        load_config(write_config(tmp_path), ["train.prune_until=0.5"])


def test_pruning_ends_at_a_whole_epoch_and_a_config_that_prunes_none_is_refused(tmp_path):
    def until(*overrides):
        return load_config(
            write_config(tmp_path), ["train.prune_ratio=0.5", *overrides]
        ).train.prune_until_epoch

    assert until("train.epochs=10") == 8  # 8.75 rounds down: epochs 1-7 (from 0) are pruned
    assert until("train.epochs=50", "train.prune_until=0.58") == 29  # 28.999999999999996 in floats
    assert until("train.epochs=3") == 2  # epoch 1 alone
    # epochs = 2: the first trains every image and floor(1.75) = 1 ends pruning before the second
    with pytest.raises(ConfigError, match=r"prunes no epoch of 2.*raise prune_until or epochs"):
        until("train.epochs=2")
    with pytest.raises(ConfigError, match="prunes no epoch of 10"):
        until("train.epochs=10", "train.prune_until=0.15")


def test_a_pruned_run_reports_the_skipped_images_and_the_last_epochs_train_all(tmp_path, fake_cifar):
    cfg = load_config(write_config(tmp_path, TINY), ["train.prune_ratio=0.5", "train.epochs=4"])
    run = train_run(cfg, out_dir=tmp_path / "run", data_dir=str(fake_cifar), evaluate_test=False)
    lines = [json.loads(x) for x in (run.out_dir / "metrics.jsonl").read_text().splitlines()]
    skipped = [line["pruned_images"] for line in lines]
    # 400 training images in batches of 64; until = int(0.875 * 4) = 3, so epoch 4 trains all.
    assert skipped[0] == 0 and skipped[3] == 0
    assert all(s % 64 == 0 for s in skipped) and max(skipped[1:3]) > 0
    assert lines[-1]["lr"] == pytest.approx(0.0, abs=1e-12)  # the cosine schedule still ends at 0
    last = torch.load(run.out_dir / "last.pt", weights_only=True)
    assert last["pruner"]["scores"].shape == (400,) and last["pruner"]["epoch"] == 3
    assert (last["pruner"]["scores"] != 1).all()  # every image was scored by its loss (from 1)
    assert torch.load(run.out_dir / "best.pt", weights_only=True)["pruner"] is None  # not resumable


def test_a_pruned_step_descends_the_weighted_loss_at_the_shorter_epochs_learning_rate():
    n, batch = 40, 8
    images = torch.randint(
        0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    labels = torch.arange(n) % 10
    # 20 images below the mean score: int(0.5 * 20) = 10, rounded down to a batch -> 8 skipped,
    # 32 left in 4 steps; the 12 kept below-mean images weigh 20 / 12.
    p = scored(pruner(n, batch=batch, seed=5), torch.linspace(0, 1, n))
    p.plan(1)
    assert p.skipped == 8
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10))
    cfg = load_config(None, ["train.schedule=onecycle", "train.epochs=3", f"train.batch_size={batch}"]).train
    schedule = LRSchedule(cfg, n // batch)
    augmenter = Augmenter(AugmentConfig(crop_padding=0, flip=False), (0.5,) * 3, (0.25,) * 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    trainer = Trainer(
        model=model,
        optimizer=optimizer,
        schedule=schedule,
        augmenter=augmenter,
        placement=Placement(CPU, "fp32", False),
        cfg=cfg,
        seed=5,
        images=images,
        labels=labels,
        pruner=p,
    )
    step = 1
    idx = trainer.batch_indices(1, step)
    weights = p.weights[idx]
    assert weights.min() == 1 and weights.max() == pytest.approx(20 / 12)  # both kinds in the batch

    # by hand: the gradient of the weighted mean loss of this batch, and the 4-step epoch's lr
    x, targets = augmenter(images[idx], labels[idx], torch.Generator())  # no randomness to draw
    before = [w.detach().clone() for w in model.parameters()]
    losses = F.cross_entropy(model(x), targets, reduction="none")
    grads = torch.autograd.grad((losses * weights).mean(), list(model.parameters()), retain_graph=True)
    plain = torch.autograd.grad(losses.mean(), list(model.parameters()))
    lr = schedule.lr_at(1, step, 4)
    assert trainer.steps_in(1) == 4 and lr != pytest.approx(schedule.lr_at(1, step, n // batch))

    _, _, trained, used = trainer.train_step(1, step)
    assert (
        trained == batch
        and used == pytest.approx(lr)
        and optimizer.param_groups[0]["lr"] == pytest.approx(lr)
    )
    for after, old, grad, unweighted in zip(model.parameters(), before, grads, plain, strict=True):
        torch.testing.assert_close(after.detach(), old - lr * grad, rtol=1e-5, atol=1e-7)
        assert not torch.allclose(after.detach(), old - lr * unweighted, rtol=1e-5, atol=1e-7)
