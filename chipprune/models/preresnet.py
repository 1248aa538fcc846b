"""Pre-activation ResNet-164 for CIFAR (He et al. 2016, "Identity mappings"), in the layout
and module names of network slimming (Liu et al. 2017, `models/preresnet.py`), which the
ChipNet paper prunes: 9n+2 layers, n = 18 bottlenecks per stage at 16 / 32 / 64 planes,
expansion 4 (streams of 64 / 128 / 256 channels), BN-ReLU-conv ordering, a 1x1 projection conv
without BN on the raw input of each stage's first block, a final BN-ReLU before pooling.
About 1.70M params on CIFAR-10. (Network slimming's `channel_selection` layers are left out:
they only matter for its own pruning; every other state_dict key matches.)

What is prunable (`select_inputs=True`, the default: the ChipNet authors' model, which gates
every BN, 12,112 gates on CIFAR). Inside a bottleneck conv1 -> bn2 and conv2 -> bn3 pair up, so
the inner groups `layerS.B.conv1` and `layerS.B.conv2` are prunable as usual. A block's bn1 and
the final bn normalise the stream for one reader each (the block's conv1, the classifier):
gating them chooses which stream channels that reader sees, network slimming's
`channel_selection`. Each is a group of its own (`layerS.B.select`, `select`): a
`ChannelSelect` (a parameter-free selection, seen by the spec as a conv with an unpruned
input) picks the kept channels in front of the BN, and the reader's input shrinks with it.
Pruning a selection saves the BN's and the reader's share, not the stream: the stream (the
stem conv, every conv3, the projection convs) has no BN of its own after its convs, so it
is never pruned; those convs are `FixedConv`s (a conv3 still loses the input channels its
conv2 group drops).

`select_inputs=False` is our earlier variant: only the inner groups (4,032 gates), the
blocks' conv1 and the classifier read the whole stream.

Orphan removal: a block whose selection, conv1 or conv2 group keeps no channel is built
without its branch (select, bn1, conv1 .. conv3) and computes shortcut(x): the identity, or
the projection conv.
"""

from __future__ import annotations

from torch import Tensor, nn

from .base import ChannelSelect, GroupWidths, PrunableNet
from .registry import register_model
from .spec import Branch, FixedConv, ModelSpec, PrunableConv


class PreActBottleneck(nn.Module):
    """[select]-bn1-relu1-conv1(1x1)-bn2-relu2-conv2(3x3, stride)-bn3-relu3-conv3(1x1), plus
    the input or its projection (`downsample`, applied to the raw input); no ReLU after the
    add. `selected`: the stream channels conv1 reads (None: all, no selection module)."""

    expansion = 4

    def __init__(
        self, cin: int, selected: list[int] | None, mids: tuple[int, int], cout: int,
        stride: int, downsample: nn.Module | None,
    ):
        super().__init__()
        reads = cin if selected is None else len(selected)
        self.has_branch = min(reads, *mids) > 0  # else removed (orphan removal): shortcut(x)
        if self.has_branch:
            # nn.Identity without a selection: one forward path, no attribute probing
            self.select = nn.Identity() if selected is None else ChannelSelect(cin, selected)
            self.bn1 = nn.BatchNorm2d(reads)
            self.relu1 = nn.ReLU(inplace=True)
            self.conv1 = nn.Conv2d(reads, mids[0], 1, bias=False)
            self.bn2 = nn.BatchNorm2d(mids[0])
            self.relu2 = nn.ReLU(inplace=True)
            self.conv2 = nn.Conv2d(mids[0], mids[1], 3, stride, 1, bias=False)
            self.bn3 = nn.BatchNorm2d(mids[1])
            self.relu3 = nn.ReLU(inplace=True)
            self.conv3 = nn.Conv2d(mids[1], cout, 1, bias=False)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        if not self.has_branch:
            return residual
        out = self.conv1(self.relu1(self.bn1(self.select(x))))
        out = self.conv2(self.relu2(self.bn2(out)))
        out = self.conv3(self.relu3(self.bn3(out)))
        return out + residual


class PreResNet(PrunableNet):
    """Groups: each bottleneck's `layerS.B.conv1` and `layerS.B.conv2`, and with
    `select_inputs` each block's `layerS.B.select` and the final `select` (see the module
    docstring)."""

    def __init__(
        self,
        depth: int = 164,
        num_classes: int = 10,
        in_channels: int = 3,
        select_inputs: bool = True,
        widths: dict[str, int] | None = None,
        kept: dict[str, list[int]] | None = None,
    ):
        super().__init__()
        if depth < 11 or (depth - 2) % 9 != 0:
            raise ValueError(f"pre-activation ResNet depth must be 9n+2 with n >= 1, got {depth}")
        n, e = (depth - 2) // 9, PreActBottleneck.expansion
        w = GroupWidths(widths, kept)

        def selection(group: str, cin: int, may_vanish: bool) -> list[int] | None:
            if not select_inputs:
                return None
            w(group, cin, may_vanish=may_vanish)
            return w.kept(group)

        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)  # (N, 16, H, W)
        fixed = [FixedConv("conv1", None)]
        convs: list[PrunableConv] = []
        branches: list[Branch] = []

        cin = 16
        for s, (planes, stride) in enumerate(((16, 1), (32, 2), (64, 2)), start=1):
            stage, blocks = f"layer{s}", []
            for b in range(n):
                p, st = f"{stage}.{b}.", stride if b == 0 else 1  # p: name prefix
                inner = (f"{p}conv1", f"{p}conv2")
                selected = selection(f"{p}select", cin, may_vanish=True)
                mids = (w(inner[0], planes, may_vanish=True), w(inner[1], planes, may_vanish=True))
                reads = cin if selected is None else len(selected)
                if min(reads, *mids) > 0:  # a removed branch has no convs to describe
                    own = inner if selected is None else (f"{p}select", *inner)
                    if selected is not None:
                        convs.append(
                            PrunableConv(f"{p}select", f"{p}bn1", own[0], None, f"{p}relu1")
                        )
                    convs += [
                        PrunableConv(f"{p}conv1", f"{p}bn2", inner[0],
                                     None if selected is None else own[0], f"{p}relu2"),
                        PrunableConv(f"{p}conv2", f"{p}bn3", inner[1], inner[0], f"{p}relu3"),
                    ]
                    fixed.append(FixedConv(f"{p}conv3", inner[1]))
                    also = (f"{p}conv3",) if selected is not None else (f"{p}bn1", f"{p}conv3")
                    branches.append(Branch(p[:-1], own, own, also))
                downsample = None
                if st != 1 or cin != planes * e:
                    downsample = nn.Sequential(nn.Conv2d(cin, planes * e, 1, st, bias=False))
                    fixed.append(FixedConv(f"{p}downsample.0", None))
                blocks.append(PreActBottleneck(cin, selected, mids, planes * e, st, downsample))
                cin = planes * e
            self.add_module(stage, nn.Sequential(*blocks))

        selected = selection("select", cin, may_vanish=False)
        self.select: nn.Module = nn.Identity()
        if selected is not None:  # the classifier's own choice of stream channels
            self.select = ChannelSelect(cin, selected)
            convs.append(PrunableConv("select", "bn", "select", None, "relu"))
        self.bn = nn.BatchNorm2d(cin if selected is None else len(selected))
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(self.bn.num_features, num_classes)
        w.check_all_used()
        self._spec = ModelSpec(
            tuple(convs), (), "fc", None if selected is None else "select",
            branches=tuple(branches), fixed=tuple(fixed),
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)  # (N, 16, H, W)
        x = self.layer3(self.layer2(self.layer1(x)))  # (N, 256, H/4, W/4)
        x = self.relu(self.bn(self.select(x)))  # select: (N, kept, H/4, W/4)
        return self.fc(self.avgpool(x).flatten(1))


@register_model
def preresnet164(**kw) -> PreResNet:
    return PreResNet(164, **kw)
