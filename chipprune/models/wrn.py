"""Wide ResNets as the ChipNet authors define them (their `ResNetCifar(BasicBlock, [4, 4, 4],
width=12)`): a 3x3 16-channel stem with BN and ReLU, then three stages of POST-activation basic
blocks (conv3x3-BN-ReLU-conv3x3-BN, add, ReLU) at 16k / 32k / 64k channels, n = (depth - 2) / 6
blocks per stage, a 1x1 conv + BN shortcut (option B) wherever the width or the stride changes,
no dropout. WRN-26-12: n = 4, stage widths 192 / 384 / 768.

This is not Zagoruyko & Komodakis' pre-activation WRN (BN-ReLU-conv with dropout); it is the
network the ChipNet paper prunes, and its block is `resnet_cifar.BasicBlock`.
"""

from __future__ import annotations

from torch import Tensor, nn

from .base import GroupWidths, PrunableNet
from .registry import register_model
from .resnet_cifar import BasicBlock, describe_basic_block
from .spec import Branch, ModelSpec, PrunableConv


class WideResNet(PrunableNet):
    """Groups: one per stage stream `layer1..3` (conv2 of every block and the 1x1 shortcut
    convs), each block's `layerS.B.conv1` alone (removable: with width 0 the block computes
    relu(shortcut(x))), and the stem `conv1` alone when widen_factor > 1 (layer1.0 then has a
    1x1 shortcut); with widen_factor 1 the stem is in `layer1`, as in an option-B ResNet."""

    def __init__(
        self,
        depth: int = 26,
        widen_factor: int = 12,
        num_classes: int = 10,
        in_channels: int = 3,
        widths: dict[str, int] | None = None,
        kept: dict[str, list[int]] | None = None,
    ):
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"WRN depth must be 6n+2 with n >= 1, got {depth}")
        if widen_factor < 1:
            raise ValueError(f"widen_factor must be >= 1, got {widen_factor}")
        n, k = (depth - 2) // 6, widen_factor
        w = GroupWidths(widths, kept)

        stem = "conv1" if k > 1 else "layer1"  # 16 -> 16k needs a shortcut conv iff k > 1
        self.conv1 = nn.Conv2d(in_channels, w(stem, 16), 3, 1, 1, bias=False)  # (N, 16, H, W)
        self.bn1 = nn.BatchNorm2d(w(stem, 16))
        self.relu = nn.ReLU(inplace=True)
        convs = [PrunableConv("conv1", "bn1", stem, None, "relu")]
        branches: list[Branch] = []

        # the stream entering the next block: its group, dense and actual width
        in_group, in_dense, in_width = stem, 16, w(stem, 16)
        for s, (planes, stride) in enumerate(((16 * k, 1), (32 * k, 2), (64 * k, 2)), start=1):
            stage, blocks, width = f"layer{s}", [], w(f"layer{s}", planes)
            for b in range(n):
                p, st = f"{stage}.{b}.", stride if b == 0 else 1  # p: name prefix
                mid = w(f"{p}conv1", planes, may_vanish=True)
                if mid > 0:  # a removed branch has no convs to describe
                    block_convs, branch = describe_basic_block(p, in_group, stage)
                    convs += block_convs
                    branches.append(branch)
                if st != 1 or in_dense != planes:
                    sc: nn.Module = nn.Sequential(
                        nn.Conv2d(in_width, width, 1, st, bias=False), nn.BatchNorm2d(width)
                    )
                    # scored after the block's add and ReLU (relu2), like the block's conv2
                    convs.append(
                        PrunableConv(
                            f"{p}shortcut.0", f"{p}shortcut.1", stage, in_group, f"{p}relu2"
                        )
                    )
                else:
                    sc = nn.Identity()
                blocks.append(BasicBlock(in_width, mid, width, st, sc))
                in_group, in_dense, in_width = stage, planes, width
            self.add_module(stage, nn.Sequential(*blocks))

        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_width, num_classes)
        w.check_all_used()
        self._spec = ModelSpec(tuple(convs), (), "fc", "layer3", branches=tuple(branches))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))  # (N, 16, H, W)
        x = self.layer3(self.layer2(self.layer1(x)))  # (N, 64k, H/4, W/4)
        return self.fc(self.avgpool(x).flatten(1))


@register_model
def wrn26_12(**kw) -> WideResNet:
    """WRN-26-12, the ChipNet paper's wide ResNet (about 36M params)."""
    return WideResNet(26, 12, **kw)


@register_model
def wrn(depth: int = 14, widen_factor: int = 2, **kw) -> WideResNet:
    """Any WRN-depth-k of this family. The defaults (WRN-14-2: two blocks per stage, a
    separate stem group) are deliberately small, for tests and quick runs."""
    return WideResNet(depth, widen_factor, **kw)
