"""The analytic counts of cerberus.arch against fixed references and against built models."""

from __future__ import annotations

import random
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cerberus.arch import (
    Architecture,
    architecture_problems,
    budget_verdict,
    check_architecture,
    check_budget,
    count_macs,
    count_params,
    summarize,
)
from cerberus.errors import BudgetError, ConfigError
from cerberus.model import BasicBlock, build_model, resnet24

RESNET24 = Architecture(blocks=(3, 5, 3), channels=(64, 128, 256))
RESNET18 = Architecture(blocks=(2, 2, 2, 2), channels=(64, 128, 256, 512))


def sides(num_stages: int, downsample: str, stem_kernel: int) -> list[int]:
    """The stem's output side, then each stage's: a stride-2 conv rounds an odd side up, a 2x2
    max-pool rounds it down; an even stem kernel (padding (S-1)//2) leaves 31 pixels."""
    side = 32 if stem_kernel % 2 else 31
    out = [side]
    for i in range(num_stages):
        if downsample == "pool":
            side //= 2
        elif i > 0:
            side = (side + 1) // 2
        out.append(side)
    return out


def random_design(rng: random.Random) -> Architecture:
    """A small, sound design drawn from the whole design space (kept small so building is fast)."""
    downsample = rng.choice(("stride", "pool"))
    stem_kernel = rng.choice((1, 2, 3, 3, 5))
    num_stages = rng.randint(1, 4 if downsample == "pool" and stem_kernel == 2 else 5)
    side = sides(num_stages, downsample, stem_kernel)[-1]
    return Architecture(
        downsample=downsample,
        blocks=tuple(rng.randint(1, 4) for _ in range(num_stages)),
        channels=tuple(rng.randint(4, 48) for _ in range(num_stages)),
        conv_kernel=rng.choice((1, 3, 5)),
        skip_kernel=rng.choice((1, 3)),
        pool_size=rng.choice([None] + [d for d in range(1, side + 1) if side % d == 0]),
        stem_channels=rng.choice((None, rng.randint(4, 32))),
        num_classes=rng.randint(2, 20),
        stem_kernel=stem_kernel,
    )


RANDOM_DESIGNS = [random_design(random.Random(seed)) for seed in range(40)]


def built_params(arch: Architecture) -> int:
    return sum(p.numel() for p in build_model(arch).parameters())


def measured_macs(arch: Architecture) -> int:
    """Multiply-accumulates of one image, summed by forward hooks on every conv and linear."""
    model = build_model(arch).eval()
    total = 0

    def on_conv(module: nn.Conv2d, inputs, output: torch.Tensor) -> None:
        nonlocal total
        kh, kw = module.kernel_size
        cin_per_group = module.in_channels // module.groups
        total += output.shape[2] * output.shape[3] * kh * kw * cin_per_group * module.out_channels

    def on_linear(module: nn.Linear, inputs, output: torch.Tensor) -> None:
        nonlocal total
        total += module.in_features * module.out_features

    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            module.register_forward_hook(on_conv)
        elif isinstance(module, nn.Linear):
            module.register_forward_hook(on_linear)
    with torch.no_grad():
        model(torch.zeros(1, 3, 32, 32))
    return total


# --------------------------------------------------------------------------------------------
# Reference counts


def test_seed_resnet24_count() -> None:
    assert count_params(RESNET24) == 4_918_602
    assert count_params(Architecture()) == 4_918_602  # the defaults are the seed design
    assert built_params(RESNET24) == 4_918_602
    assert sum(p.numel() for p in resnet24().parameters()) == 4_918_602


def test_cifar_resnet18_count() -> None:
    assert count_params(RESNET18) == 11_173_962
    assert built_params(RESNET18) == 11_173_962


def test_reference_macs() -> None:
    assert count_macs(RESNET24) == 798_689_792
    assert measured_macs(RESNET24) == 798_689_792
    assert count_macs(RESNET18) == 555_422_720
    assert measured_macs(RESNET18) == 555_422_720


def test_summary_parts_add_up() -> None:
    result = summarize(RESNET24, 5_000_000)
    assert result["params"] == 4_918_602
    assert result["stem_params"] == 1_856
    assert result["head_params"] == 2_570
    assert [s["params"] for s in result["stages"]] == [221_952, 1_411_840, 3_280_384]
    assert [s["side"] for s in result["stages"]] == [32, 16, 8]
    parts = result["stem_params"] + sum(s["params"] for s in result["stages"]) + result["head_params"]
    assert parts == result["params"]
    assert (result["stem_macs"], result["head_macs"]) == (64 * 9 * 3 * 32 * 32, 256 * 10)
    assert (
        result["stem_macs"] + sum(s["macs"] for s in result["stages"]) + result["head_macs"] == result["macs"]
    )
    assert result["within_budget"] is True
    assert result["headroom"] == 81_398
    assert result["architecture"]["pool_size"] == 8
    assert result["architecture"]["stem_channels"] == 64


def test_label_and_defaults() -> None:
    assert RESNET24.label() == "B[3,5,3] C[64,128,256] F3 K1 P8"
    assert Architecture(blocks=(2, 2, 2, 2)).widths == (64, 128, 256, 512)
    assert RESNET18.final_side == 4
    assert Architecture(blocks=(1,) * 6, channels=(8,) * 6).final_side == 1


# --------------------------------------------------------------------------------------------
# Analytic counts equal the built model


@pytest.mark.parametrize("arch", RANDOM_DESIGNS, ids=lambda a: a.label())
def test_count_params_matches_built_model(arch: Architecture) -> None:
    assert count_params(arch) == built_params(arch)


@pytest.mark.parametrize("arch", RANDOM_DESIGNS[:6], ids=lambda a: a.label())
def test_count_macs_matches_forward_hooks(arch: Architecture) -> None:
    assert count_macs(arch) == measured_macs(arch)


def test_six_stages_with_large_kernels_count_exactly() -> None:
    arch = Architecture(blocks=(1,) * 6, channels=(4, 6, 8, 10, 12, 14), conv_kernel=5, skip_kernel=3)
    assert architecture_problems(arch) == []
    assert count_params(arch) == built_params(arch)
    assert count_macs(arch) == measured_macs(arch)


@pytest.mark.parametrize("arch", RANDOM_DESIGNS[:5], ids=lambda a: a.label())
def test_forward_shape(arch: Architecture) -> None:
    model = build_model(arch).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, arch.num_classes)


POOLED = Architecture(blocks=(1, 1, 1), channels=(32, 128, 128), stem_channels=24, downsample="pool")


def test_pool_downsampling_reference_counts() -> None:
    # stem 3*24*9 + 48 = 696; layer1 24->32: convs 6,912 + 9,216, BNs 128, projection 768 + 64;
    # layer2 32->128: 36,864 + 147,456 + 512 + 4,096 + 256; layer3 128->128 (identity shortcut):
    # 2 * 147,456 + 512; head 128 * 10 + 10
    assert count_params(POOLED) == 503_682 == built_params(POOLED)
    # conv1 of each stage at the incoming side: 32^2*9*24*32 + 16^2*9*32*128 + 8^2*9*128*128
    assert count_macs(POOLED) == 41_231_616 == measured_macs(POOLED)
    assert POOLED.final_side == 4 and POOLED.pool == 4
    assert [s["side"] for s in summarize(POOLED, 5_000_000)["stages"]] == [16, 8, 4]
    assert POOLED.label() == "B[1,1,1] C[32,128,128] F3 K1 P4 maxpool stem24"


def test_an_unpadded_2x2_stem_reference_counts() -> None:
    small = Architecture(
        blocks=(1, 1, 1), channels=(32, 128, 128), stem_channels=24, downsample="pool", stem_kernel=2
    )
    # the stem loses 24 * 3 * (9 - 4) weights; the map is 31 -> 15 -> 7 -> 3
    assert count_params(small) == 503_322 == built_params(small)
    # stem 31^2*4*3*24 = 276,768; conv1s at 31, 15, 7: 31^2*9*24*32 + 15^2*9*32*128 + 7^2*9*128*128;
    # conv2s at 15, 7, 3; projections 15^2*24*32 + 7^2*32*128; head 1,280
    assert count_macs(small) == 33_439_776 == measured_macs(small)
    assert small.stem_side == 31 and small.final_side == 3 and small.pool == 3
    summary = summarize(small, 5_000_000)
    assert summary["stem_side"] == 31 and [s["side"] for s in summary["stages"]] == [15, 7, 3]
    assert small.label() == "B[1,1,1] C[32,128,128] F3 K1 P3 S2 maxpool stem24"
    model = build_model(small)
    assert model.conv1.kernel_size == (2, 2) and model.conv1.padding == (0, 0)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    # strided stages round an odd side up: 31 -> 16 -> 8
    strided = Architecture(blocks=(1, 1, 1), channels=(8, 16, 32), stem_kernel=2)
    assert [s["side"] for s in summarize(strided, 5_000_000)["stages"]] == [31, 16, 8]
    assert count_macs(strided) == measured_macs(strided) and strided.max_stages == 6


def test_pool_downsampling_blocks_pool_instead_of_striding() -> None:
    model = build_model(POOLED)
    first = model.layer1[0]
    assert first.pool and first.conv1.stride == (1, 1) and len(first.shortcut) == 2
    assert model.layer3[0].pool and len(model.layer3[0].shortcut) == 0  # same width: max-pool only
    stride_model = build_model(Architecture(blocks=(1, 1, 1), channels=(32, 128, 128)))
    assert not any(b.pool for b in stride_model.modules() if isinstance(b, BasicBlock))
    assert stride_model.layer2[0].conv1.stride == (2, 2)


def test_pool_downsampling_allows_five_stages() -> None:
    five = Architecture(blocks=(1,) * 5, channels=(8, 8, 8, 8, 8), downsample="pool")
    assert architecture_problems(five) == [] and five.final_side == 1
    assert count_macs(five) == measured_macs(five)


def test_non_global_pool_widens_the_linear_layer() -> None:
    # blocks [3,5,3] end on an 8x8 map: pool 4 leaves 2x2 per channel -> 256 * 4 inputs
    arch = Architecture(blocks=(3, 5, 3), channels=(64, 128, 256), pool_size=4)
    assert arch.head_features == 1024
    model = build_model(arch)
    assert model.linear.in_features == 1024
    assert count_params(arch) == 4_918_602 + (1024 - 256) * 10
    with torch.no_grad():
        assert model.eval()(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    pool1 = Architecture(blocks=(1, 1), channels=(8, 16), pool_size=1)
    assert build_model(pool1).linear.in_features == 16 * 16 * 16


def test_a_global_pool_takes_smaller_inputs_and_averages_their_last_map() -> None:
    small = Architecture(
        blocks=(1, 1, 1), channels=(32, 128, 128), stem_channels=24, downsample="pool", stem_kernel=2
    )
    # 24 -> 23 (stem) -> 11 -> 5 -> 2; 32 gives the nominal 3; 9 -> 8 -> 4 -> 2 -> 1 is the least
    assert [small.final_side_for(s) for s in (32, 24, 9, 8)] == [3, 2, 1, 0]
    assert Architecture(blocks=(3, 5, 3)).final_side_for(24) == 6  # 24 -> 12 -> 6 (strides round up)
    torch.manual_seed(0)
    model = build_model(small).eval()
    x = torch.randn(3, 3, 24, 24)
    with torch.no_grad():
        out = F.relu(model.bn1(model.conv1(x)))
        features = model.layer3(model.layer2(model.layer1(out)))
        assert features.shape == (3, 128, 2, 2)
        expected = model.linear(features.mean((2, 3)))
        torch.testing.assert_close(model(x), expected)
        whole = torch.randn(3, 3, 32, 32)  # whole images: the AvgPool2d(P) of the design, unchanged
        nominal = model.layer3(model.layer2(model.layer1(F.relu(model.bn1(model.conv1(whole))))))
        assert torch.equal(model(whole), model.linear(torch.flatten(model.pool(nominal), 1)))
    # a pool that is not global keeps its geometry: a smaller input does not fit the linear layer
    parted = build_model(Architecture(blocks=(3, 5, 3), channels=(8, 16, 32), pool_size=4)).eval()
    # 24 / 4 = 6 -> AvgPool2d(4) leaves 1 x 1 of 32 channels; the linear layer wants 32 x 2 x 2 = 128
    misfit = r"shapes cannot be multiplied \(1x32 and 128x10\)"
    with pytest.raises(RuntimeError, match=misfit), torch.no_grad():
        parted(torch.zeros(1, 3, 24, 24))


# --------------------------------------------------------------------------------------------
# Parameter names (the widely copied CIFAR ResNet layout)


def test_state_dict_names_follow_the_kuangliu_layout() -> None:
    keys = set(build_model(RESNET18).state_dict())
    for name in (
        "conv1.weight",
        "bn1.weight",
        "bn1.bias",
        "bn1.running_mean",
        "bn1.running_var",
        "layer1.0.conv1.weight",
        "layer1.0.bn1.weight",
        "layer1.1.conv2.weight",
        "layer1.1.bn2.bias",
        "layer2.0.shortcut.0.weight",
        "layer2.0.shortcut.1.weight",
        "layer2.0.shortcut.1.running_var",
        "layer4.1.conv2.weight",
        "linear.weight",
        "linear.bias",
    ):
        assert name in keys, name
    assert "layer5.0.conv1.weight" not in keys
    # identity blocks (stride 1, same width) have no shortcut parameters at all
    for block in ("layer1.0", "layer1.1", "layer2.1", "layer4.1"):
        assert not any(k.startswith(f"{block}.shortcut") for k in keys), block
    for block in ("layer2.0", "layer3.0", "layer4.0"):
        assert f"{block}.shortcut.0.weight" in keys
    assert build_model(RESNET18).layer2[0].shortcut[0].weight.shape == (128, 64, 1, 1)


def test_stem_width_differing_from_stage_one_gives_a_projection() -> None:
    arch = Architecture(blocks=(1, 1), channels=(16, 32), stem_channels=8, skip_kernel=3)
    keys = set(build_model(arch).state_dict())
    assert "layer1.0.shortcut.0.weight" in keys
    assert build_model(arch).layer1[0].shortcut[0].weight.shape == (16, 8, 3, 3)


# --------------------------------------------------------------------------------------------
# Problems and the budget


@pytest.mark.parametrize(
    ("arch", "expected"),
    [
        (
            Architecture(blocks=(3, 5, 3), channels=(64, 128)),
            ("channels", "has 2 entries but blocks has 3: give one width per stage"),
        ),
        (Architecture(conv_kernel=4), ("conv_kernel", "must be a positive odd number, got 4")),
        (Architecture(skip_kernel=2), ("skip_kernel", "must be a positive odd number, got 2")),
        (Architecture(conv_kernel=0), ("conv_kernel", "must be a positive odd number, got 0")),
        (
            Architecture(pool_size=3),
            ("pool_size", "3 must divide the final 8x8 feature map (choose one of [1, 2, 4, 8])"),
        ),
        (
            Architecture(pool_size=16),
            ("pool_size", "16 must divide the final 8x8 feature map (choose one of [1, 2, 4, 8])"),
        ),
        (
            Architecture(blocks=(2, 2, 2, 2), pool_size=3),
            ("pool_size", "3 must divide the final 4x4 feature map (choose one of [1, 2, 4])"),
        ),
        (
            Architecture(blocks=(1,) * 7),
            (
                "blocks",
                "7 stages do not fit a 32-pixel map: each stage after the first halves the "
                "feature map, so at most 6 stages",
            ),
        ),
        (
            Architecture(blocks=(1,) * 6, downsample="pool"),
            (
                "blocks",
                "6 stages do not fit a 32-pixel map: every stage halves the feature map, so at most 5 stages",
            ),
        ),
        (
            Architecture(downsample="avg"),
            ("downsample", "must be 'stride' or 'pool', got 'avg'"),
        ),
        (
            Architecture(blocks=(1,) * 5, downsample="pool", stem_kernel=2),
            (
                "blocks",
                "5 stages do not fit a 31-pixel map: every stage halves the feature map, so at most 4 stages",
            ),
        ),
        (Architecture(stem_kernel=0), ("stem_kernel", "must be 1 to 7, got 0")),
        (Architecture(stem_kernel=8), ("stem_kernel", "must be 1 to 7, got 8")),
        (Architecture(blocks=(3, 0, 3)), ("blocks", "every stage needs at least 1 block, got [3, 0, 3]")),
        (Architecture(blocks=()), ("blocks", "needs at least one stage")),
        (Architecture(channels=(64, 0, 256)), ("channels", "widths must be positive, got [64, 0, 256]")),
        (Architecture(stem_channels=0), ("stem_channels", "must be positive, got 0")),
        (Architecture(num_classes=0), ("num_classes", "must be positive, got 0")),
    ],
)
def test_architecture_problems(arch: Architecture, expected: tuple[str, str]) -> None:
    assert architecture_problems(arch) == [expected]
    with pytest.raises(ConfigError) as info:
        check_architecture(arch)
    assert str(info.value) == f"model.{expected[0]}: {expected[1]}"


def test_every_problem_is_listed() -> None:
    problems = architecture_problems(Architecture(channels=(8, 8), conv_kernel=2, skip_kernel=4))
    assert [name for name, _ in problems] == ["channels", "conv_kernel", "skip_kernel"]


def test_sound_designs_pass_and_unsound_ones_cannot_be_built() -> None:
    assert architecture_problems(RESNET24) == []
    assert check_architecture(RESNET24) is RESNET24
    with pytest.raises(ConfigError, match="conv_kernel"):
        build_model(Architecture(conv_kernel=4))


def test_budget_verdict_strings() -> None:
    assert budget_verdict(4_918_602, 5_000_000) == "81,398 under the 5,000,000 budget"
    assert budget_verdict(11_173_962, 5_000_000) == "over the 5,000,000 budget by 6,173,962"
    assert budget_verdict(5_000_000, 5_000_000) == "0 under the 5,000,000 budget"


def test_check_budget() -> None:
    assert check_budget(RESNET24, 5_000_000) == 4_918_602
    assert check_budget(RESNET24, 4_918_602) == 4_918_602  # the budget itself is allowed
    with pytest.raises(BudgetError) as info:
        check_budget(RESNET18, 5_000_000)
    assert str(info.value) == "model has 11,173,962 parameters, over the 5,000,000 budget by 6,173,962"
    assert info.value.exit_code == 2


def test_counting_does_not_import_torch() -> None:
    code = "import cerberus.arch, cerberus.config, cerberus.search, sys; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_counts_of_a_huge_design_are_instant() -> None:
    # closed form per stage: a billion blocks counts as fast as one (no list of blocks is built)
    arch = Architecture(blocks=(10**9, 1), channels=(16, 32))
    one = Architecture(blocks=(1, 1), channels=(16, 32))
    block = 2 * (9 * 16 * 16 + 2 * 16)  # each later block of stage 1: two 3x3 convs + BN
    assert count_params(arch) == count_params(one) + (10**9 - 1) * block
    assert count_macs(arch) == count_macs(one) + (10**9 - 1) * 2 * 9 * 16 * 16 * 32 * 32
