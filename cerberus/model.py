"""The ResNet family as torch modules. Pure: no device choice, no I/O, no printing.

Parameter names follow the widely copied CIFAR ResNet layout (``conv1``, ``bn1``,
``layer1``..``layerN``, blocks with ``conv1/bn1/conv2/bn2/shortcut.0/shortcut.1``, ``linear``), so
state_dicts written by that code load into these modules unchanged. The semantics are documented
in :mod:`cerberus.arch`, which counts the same parameters without building anything.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cerberus.arch import INPUT_CHANNELS, Architecture, check_architecture


def conv(cin: int, cout: int, kernel: int, stride: int = 1) -> nn.Conv2d:
    """Square conv, 'same' padding for odd kernels, no bias (a BatchNorm follows)."""
    return nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False)


class BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus a shortcut; ReLU after the sum (He et al., 2016).

    With ``pool=True`` the block halves the map by a 2x2 max-pool after ``conv1`` (before ``bn1``)
    and on the shortcut's input, instead of a stride: the parameter names stay the same.
    """

    def __init__(
        self, cin: int, cout: int, stride: int, conv_kernel: int, skip_kernel: int, pool: bool = False
    ):
        super().__init__()
        self.pool = pool
        self.conv1 = conv(cin, cout, conv_kernel, stride)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = conv(cout, cout, conv_kernel)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()  # identity; an empty Sequential keeps the usual names
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(conv(cin, cout, skip_kernel, stride), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, cin, H, W) -> (B, cout, H/s, W/s)
        out = self.conv1(x)
        if self.pool:
            out = F.max_pool2d(out, 2)
            x = F.max_pool2d(x, 2)
        out = F.relu(self.bn1(out))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """Stem, ``len(arch.blocks)`` stages of basic blocks, average pool, linear classifier.

    Built for 32x32 inputs; with global pooling (the default ``P``) it also takes smaller square
    inputs (``augment.crop_sizes`` trains on them), pooling whatever map the last stage leaves.
    """

    def __init__(self, arch: Architecture):
        super().__init__()
        check_architecture(arch)
        self.arch = arch
        self.num_stages = len(arch.blocks)
        stem = arch.stem_width
        k = arch.stem_kernel  # padding (k-1)//2: an even kernel leaves a 31x31 map
        self.conv1 = nn.Conv2d(INPUT_CHANNELS, stem, k, padding=(k - 1) // 2, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        cin = stem
        for i, (num_blocks, width) in enumerate(zip(arch.blocks, arch.widths)):
            blocks = []
            for j in range(num_blocks):
                halves = j == 0 and arch.stage_downsamples(i)
                pool = halves and arch.max_pool_downsampling
                stride = 2 if (halves and not pool) else 1
                blocks.append(BasicBlock(cin, width, stride, arch.conv_kernel, arch.skip_kernel, pool=pool))
                cin = width
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.pool = nn.AvgPool2d(arch.pool)
        # the last stage's side on whole images where the pool is global, else None
        self.global_side = arch.final_side if arch.pool == arch.final_side else None
        self.linear = nn.Linear(arch.head_features, arch.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, 32, 32) -> (B, num_classes)
        out = F.relu(self.bn1(self.conv1(x)))
        for i in range(self.num_stages):
            out = getattr(self, f"layer{i + 1}")(out)
        if self.global_side is not None and out.shape[-1] != self.global_side:
            out = out.mean((2, 3), keepdim=True)  # smaller training crops: still the global average
        else:
            out = self.pool(out)  # (B, C, side/P, side/P)
        return self.linear(torch.flatten(out, 1))


def build_model(arch: Architecture) -> ResNet:
    """A freshly initialised model for ``arch`` (on the CPU, fp32, PyTorch's default init)."""
    return ResNet(arch)


def resnet24(**overrides) -> ResNet:
    """The seed project's ResNet-24: blocks [3, 5, 3], channels [64, 128, 256], 4,918,602 params."""
    return build_model(Architecture(**{"blocks": (3, 5, 3), "channels": (64, 128, 256), **overrides}))
