"""CIFAR ResNets (He et al. 2016, 6n+2 layers: 16/32/64 planes), module names as in the
CHIP / HRank checkpoints; option-A (parameter-free) or option-B (1x1 conv) shortcuts."""

from __future__ import annotations

from torch import Tensor, nn

from .base import ChannelMapShortcut, GroupWidths, PrunableNet
from .registry import register_model
from .spec import Branch, ChannelMap, ModelSpec, PrunableConv


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut, then ReLU (relu2 = after the add).
    With `mid` 0 the branch is removed (orphan removal): relu2(shortcut(x))."""

    def __init__(self, in_planes: int, mid: int, planes: int, stride: int, shortcut: nn.Module):
        super().__init__()
        self.has_branch = mid > 0
        if self.has_branch:
            self.conv1 = nn.Conv2d(in_planes, mid, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(mid)
            self.relu1 = nn.ReLU(inplace=True)
            self.conv2 = nn.Conv2d(mid, planes, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = shortcut
        self.relu2 = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        if not self.has_branch:
            identity = self.shortcut(x)
            # in place on x itself would overwrite a tensor autograd saved: copy it
            return self.relu2(identity.clone() if identity is x else identity)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


def describe_basic_block(
    p: str, in_group: str, stage: str
) -> tuple[list[PrunableConv], Branch]:
    """The spec of a BasicBlock named `p` ("layer1.0."): conv1 alone in its group, conv2 in
    the stage stream, and the removable branch they form."""
    convs = [
        PrunableConv(f"{p}conv1", f"{p}bn1", f"{p}conv1", in_group, f"{p}relu1"),
        PrunableConv(f"{p}conv2", f"{p}bn2", stage, f"{p}conv1", f"{p}relu2"),
    ]
    return convs, Branch(p[:-1], (f"{p}conv1",), (f"{p}conv1", f"{p}conv2"))


class CifarResNet(PrunableNet):
    """Groups: the stem `conv1` (option A: its own group; option B: in `layer1`, since
    layer1.0 adds the stem output unchanged), one group per stage stream `layer1..3`
    (conv2 of every block + option-B downsample), and each block's `layerS.B.conv1` alone."""

    def __init__(
        self,
        depth: int,
        num_classes: int = 10,
        in_channels: int = 3,
        shortcut: str = "A",
        widths: dict[str, int] | None = None,
        kept: dict[str, list[int]] | None = None,
    ):
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        if shortcut not in ("A", "B"):
            raise ValueError(f"shortcut must be 'A' or 'B', got {shortcut!r}")
        n, option_a = (depth - 2) // 6, shortcut == "A"
        w = GroupWidths(widths, kept)

        stem = "conv1" if option_a else "layer1"
        self.conv1 = nn.Conv2d(in_channels, w(stem, 16), 3, 1, 1, bias=False)  # (N, 16, H, W)
        self.bn1 = nn.BatchNorm2d(w(stem, 16))
        self.relu = nn.ReLU(inplace=True)
        convs = [PrunableConv("conv1", "bn1", stem, None, "relu")]
        maps: list[ChannelMap] = []
        branches: list[Branch] = []

        # the stream entering the next block: its group, dense and actual width
        in_group, in_dense, in_width = stem, 16, w(stem, 16)
        for s, (planes, stride) in enumerate(((16, 1), (32, 2), (64, 2)), start=1):
            stage, blocks, width = f"layer{s}", [], w(f"layer{s}", planes)
            for b in range(n):
                p, st = f"{stage}.{b}.", stride if b == 0 else 1  # p: name prefix
                mid = w(f"{p}conv1", planes, may_vanish=True)
                if mid > 0:  # a removed branch has no convs to describe
                    block_convs, branch = describe_basic_block(p, in_group, stage)
                    convs += block_convs
                    branches.append(branch)
                if option_a:
                    # 16 -> 32 planes: the input lands at original channels 8..23 (planes // 4)
                    offset = (planes - in_dense) // 2
                    sc: nn.Module = ChannelMapShortcut(w.kept(in_group), w.kept(stage), offset, st)
                    maps.append(ChannelMap(f"{p}shortcut", in_group, stage, offset, st))
                elif st != 1 or in_dense != planes:
                    conv = nn.Conv2d(in_width, width, 1, st, bias=False)
                    sc = nn.Sequential(conv, nn.BatchNorm2d(width))
                    sc_bn, out_relu = f"{p}shortcut.1", f"{p}relu2"  # relu2: after the add
                    convs.append(PrunableConv(f"{p}shortcut.0", sc_bn, stage, in_group, out_relu))
                else:
                    sc = nn.Identity()
                blocks.append(BasicBlock(in_width, mid, width, st, sc))
                in_group, in_dense, in_width = stage, planes, width
            self.add_module(stage, nn.Sequential(*blocks))

        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(w("layer3", 64), num_classes)
        w.check_all_used()
        self._spec = ModelSpec(tuple(convs), tuple(maps), "fc", "layer3", branches=tuple(branches))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))  # (N, 16, H, W)
        x = self.layer3(self.layer2(self.layer1(x)))  # (N, 64, H/4, W/4)
        return self.fc(self.avgpool(x).flatten(1))


@register_model
def resnet20(**kw) -> CifarResNet:
    return CifarResNet(20, **kw)


@register_model
def resnet32(**kw) -> CifarResNet:
    return CifarResNet(32, **kw)


@register_model
def resnet56(**kw) -> CifarResNet:
    return CifarResNet(56, **kw)


@register_model
def resnet110(**kw) -> CifarResNet:
    return CifarResNet(110, **kw)
