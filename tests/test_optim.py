"""The Muon optimizer: its orthogonalisation, its steps, and how build_optimizer splits a model."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from cerberus.arch import Architecture
from cerberus.config import TrainConfig
from cerberus.engine import LRSchedule, build_optimizer, whiten_stem_
from cerberus.model import build_model
from cerberus.optim import MuonSGD, orthogonalize


@pytest.mark.parametrize("shape", [(16, 144), (144, 16), (32, 32)])
def test_orthogonalize_brings_every_singular_value_near_one(shape):
    torch.manual_seed(0)
    # a badly conditioned matrix: singular values spread over three decades
    u, _ = torch.linalg.qr(torch.randn(shape[0], shape[0]))
    v, _ = torch.linalg.qr(torch.randn(shape[1], shape[1]))
    k = min(shape)
    s = torch.logspace(0, -3, k)
    matrix = u[:, :k] @ torch.diag(s) @ v[:, :k].T
    out = orthogonalize(matrix)
    assert out.shape == matrix.shape
    singular = torch.linalg.svdvals(out)
    assert singular.max() < 1.5
    assert singular[: k // 2].min() > 0.5  # the stronger half lands in [0.5, 1.5]
    # the singular vectors stay those of the input: out ~ U f(S) V^T with f increasing
    assert torch.allclose(
        u[:, :k].T @ out @ v[:, :k], torch.diag(torch.diag(u[:, :k].T @ out @ v[:, :k])), atol=1e-4
    )


def test_sgd_groups_step_exactly_as_torch_sgd():
    torch.manual_seed(1)
    a = [torch.randn(5, 3, requires_grad=True), torch.randn(7, requires_grad=True)]
    b = [p.detach().clone().requires_grad_(True) for p in a]
    ours = MuonSGD(
        [{"params": [a[0]], "weight_decay": 0.01}, {"params": [a[1]], "weight_decay": 0.0}],
        lr=0.1,
        momentum=0.9,
        nesterov=True,
    )
    ref = torch.optim.SGD(
        [{"params": [b[0]], "weight_decay": 0.01}, {"params": [b[1]], "weight_decay": 0.0}],
        lr=0.1,
        momentum=0.9,
        nesterov=True,
    )
    for _ in range(4):
        grads = [torch.randn_like(p) for p in a]
        for p, q, g in zip(a, b, grads):
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
        for p, q in zip(a, b):
            assert torch.equal(p, q)


def test_a_muon_step_rescales_the_filters_then_subtracts_the_orthogonalised_momentum():
    torch.manual_seed(2)
    w = torch.randn(8, 4, 3, 3) * 3
    p = w.clone().requires_grad_(True)
    opt = MuonSGD([{"params": [p], "muon": True}], lr=0.05, momentum=0.6, nesterov=True)
    g1, g2 = torch.randn_like(w), torch.randn_like(w)
    p.grad = g1.clone()
    opt.step()
    expected = w * (8**0.5 / w.norm()) - 0.05 * orthogonalize((g1 + 0.6 * g1).reshape(8, -1)).view_as(w)
    torch.testing.assert_close(p.detach(), expected)
    p.grad = g2.clone()
    opt.step()
    buf = 0.6 * g1 + g2
    expected = expected * (8**0.5 / expected.norm()) - 0.05 * orthogonalize(
        (g2 + 0.6 * buf).reshape(8, -1)
    ).view_as(w)
    torch.testing.assert_close(p.detach(), expected)


def test_muon_groups_refuse_vectors():
    with pytest.raises(ValueError, match="not vectors"):
        MuonSGD(
            [{"params": [torch.zeros(3, requires_grad=True)], "muon": True}],
            lr=0.1,
            momentum=0.0,
            nesterov=False,
        )


def test_build_optimizer_gives_the_trainable_filters_to_muon_and_the_rest_to_sgd():
    arch = Architecture(blocks=(1, 1), channels=(8, 16), stem_channels=6, stem_kernel=2)
    model = build_model(arch)
    whiten_stem_(model, torch.randint(0, 256, (50, 3, 32, 32), dtype=torch.uint8), (0.5,) * 3, (0.25,) * 3)
    cfg = TrainConfig(
        optimizer="muon",
        lr=0.2,
        muon_lr=0.05,
        momentum=0.9,
        nesterov=True,
        weight_decay=5e-4,
        decay_bn_and_bias=False,
    )
    opt = build_optimizer(model, cfg)
    assert isinstance(opt, MuonSGD)
    names = {id(p): n for n, p in model.named_parameters()}
    by_kind = {}
    for group in opt.param_groups:
        kind = "muon" if group["muon"] else f"sgd wd={group['weight_decay']}"
        by_kind[kind] = sorted(names[id(p)] for p in group["params"])
    conv_weights = sorted(n for n, p in model.named_parameters() if p.ndim == 4 and n != "conv1.weight")
    assert by_kind["muon"] == conv_weights  # the frozen whitening stem is left out
    assert by_kind["sgd wd=0.0005"] == ["linear.weight"]
    assert by_kind["sgd wd=0.0"] == sorted(
        ["bn1.weight", "bn1.bias", "linear.bias"]
        + [
            f"layer{i}.0.{bn}.{kind}"
            for i in (1, 2)
            for bn in ("bn1", "bn2", "shortcut.1")
            for kind in ("weight", "bias")
        ]
    )
    muon = next(g for g in opt.param_groups if g["muon"])
    assert muon["momentum"] == 0.6 and muon["nesterov"] is True
    schedule = LRSchedule(cfg.model_copy(update={"schedule": "constant"}), steps_per_epoch=10)
    assert schedule.apply(opt, 0, 0) == 0.2
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.2, 0.2, 0.05])


@pytest.mark.parametrize(
    "settings,message",
    [
        ({"muon_lr": 0.02}, "muon_lr applies to the muon optimizer only"),
        ({"muon_momentum": 0.8, "optimizer": "adamw"}, "muon_momentum applies to the muon optimizer only"),
        ({"nesterov": True, "optimizer": "adamw"}, "nesterov applies to the sgd and muon optimizers only"),
        (
            {"muon_lr": 0.02, "muon_momentum": 0.8},
            "muon_lr and muon_momentum apply to the muon optimizer only",
        ),
    ],
)
def test_muon_settings_without_muon_are_refused(settings, message):
    with pytest.raises(ValidationError, match=message):
        TrainConfig(**settings)
    TrainConfig(**{**settings, "optimizer": "muon"})


def test_a_stack_is_orthogonalised_matrix_by_matrix():
    torch.manual_seed(3)
    stack = torch.randn(3, 16, 72) * torch.tensor([0.01, 1.0, 100.0]).view(3, 1, 1)
    together = orthogonalize(stack)
    for matrix, out in zip(stack, together):
        torch.testing.assert_close(out, orthogonalize(matrix), rtol=1e-4, atol=1e-5)


def test_build_optimizer_decays_vectors_when_asked_and_drops_muon_when_no_filter_trains():
    model = build_model(Architecture(blocks=(1,), channels=(8,)))
    cfg = TrainConfig(optimizer="muon", lr=0.2, nesterov=True, weight_decay=1e-3, decay_bn_and_bias=True)
    groups = build_optimizer(model, cfg).param_groups
    assert [(g["muon"], g["weight_decay"], len(g["params"])) for g in groups] == [
        (False, 1e-3, 8),
        (True, 0.0, 3),
    ]
    for p in model.parameters():
        if p.ndim == 4:
            p.requires_grad_(False)
    groups = build_optimizer(model, cfg).param_groups
    assert [(g["muon"], len(g["params"])) for g in groups] == [(False, 8)]


def test_a_muon_step_does_not_depend_on_the_memory_layout():
    torch.manual_seed(4)
    w, g = torch.randn(16, 8, 3, 3), torch.randn(16, 8, 3, 3)
    results = []
    for layout in (torch.contiguous_format, torch.channels_last):
        p = w.clone().to(memory_format=layout).requires_grad_(True)
        opt = MuonSGD([{"params": [p], "muon": True}], lr=0.1, momentum=0.6, nesterov=True)
        for _ in range(2):
            p.grad = g.clone().to(memory_format=layout)
            opt.step()
        assert p.is_contiguous(memory_format=layout)
        results.append(p.detach().contiguous())
    assert torch.equal(results[0], results[1])


def test_muon_groups_refuse_weight_decay():
    p = torch.zeros(4, 4, requires_grad=True)
    with pytest.raises(ValueError, match="no weight decay"):
        MuonSGD([{"params": [p], "muon": True, "weight_decay": 0.1}], lr=0.1, momentum=0.6, nesterov=True)


def test_zero_padding_leaves_the_orthogonalisation_of_the_matrix_as_it_was():
    torch.manual_seed(5)
    matrix = torch.randn(16, 40)
    padded = orthogonalize(torch.nn.functional.pad(matrix, (0, 32)))
    assert torch.equal(padded[:, 40:], torch.zeros(16, 32))
    torch.testing.assert_close(padded[:, :40], orthogonalize(matrix), rtol=1e-4, atol=1e-5)


def test_filter_banks_of_every_shape_step_as_they_would_alone():
    # shapes that share a row count once transposed (the 1x1 shortcut is tall) or not at all
    torch.manual_seed(6)
    shapes = [(8, 4, 3, 3), (8, 8, 3, 3), (16, 8, 1, 1), (8, 2, 1, 1), (16, 16, 3, 3)]
    weights = [torch.randn(s) for s in shapes]
    grads = [torch.randn(s) for s in shapes]
    together = [w.clone().requires_grad_(True) for w in weights]
    opt = MuonSGD([{"params": together, "muon": True}], lr=0.1, momentum=0.6, nesterov=True)
    for p, g in zip(together, grads):
        p.grad = g.clone()
    opt.step()
    for w, g, p in zip(weights, grads, together):
        alone = w.clone().requires_grad_(True)
        solo = MuonSGD([{"params": [alone], "muon": True}], lr=0.1, momentum=0.6, nesterov=True)
        alone.grad = g.clone()
        solo.step()
        torch.testing.assert_close(p.detach(), alone.detach(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("nesterov", [True, False])
def test_a_tall_filter_bank_steps_by_the_formula(nesterov):
    # a 1x1 shortcut has more filters than inputs: its update is orthogonalised on the short side
    torch.manual_seed(7)
    w, g1, g2 = torch.randn(16, 8, 1, 1) * 2, torch.randn(16, 8, 1, 1), torch.randn(16, 8, 1, 1)
    p = w.clone().requires_grad_(True)
    opt = MuonSGD([{"params": [p], "muon": True}], lr=0.05, momentum=0.6, nesterov=nesterov)
    p.grad = g1.clone()
    opt.step()
    p.grad = g2.clone()
    opt.step()
    expected = w
    buf = torch.zeros_like(w)
    for g in (g1, g2):
        buf = 0.6 * buf + g
        update = g + 0.6 * buf if nesterov else buf
        expected = expected * (16**0.5 / expected.norm()) - 0.05 * orthogonalize(
            update.reshape(16, 8)
        ).view_as(w)
    torch.testing.assert_close(p.detach(), expected)


def test_build_optimizer_gives_adamw_its_betas_and_decays_only_matrices_and_filters():
    model = build_model(Architecture(blocks=(1,), channels=(8,)))
    cfg = TrainConfig(optimizer="adamw", lr=0.002, momentum=0.85, weight_decay=0.05, decay_bn_and_bias=False)
    opt = build_optimizer(model, cfg)
    assert type(opt) is torch.optim.AdamW
    assert [(g["weight_decay"], g["betas"], g["lr"], len(g["params"])) for g in opt.param_groups] == [
        (0.05, (0.85, 0.999), 0.002, 4),  # three conv filter banks and the classifier's matrix
        (0.0, (0.85, 0.999), 0.002, 7),  # BatchNorm weights and biases, the classifier's bias
    ]
    assert all(p.ndim >= 2 for p in opt.param_groups[0]["params"])
    assert all(p.ndim == 1 for p in opt.param_groups[1]["params"])
