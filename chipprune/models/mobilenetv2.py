"""MobileNetV2 (Sandler et al. 2018) for 32x32 images.

The paper's network (torchvision's `mobilenet_v2` settings, width multiplier 1) with the CIFAR
change of kuangliu/pytorch-cifar: the first two stride-2 layers of the ImageNet network, the
3x3 stem and the first 24-channel block, run at stride 1, so a 32x32 image leaves the last
stage at 4x4 (overall stride 8 instead of 32). Otherwise the paper's blocks, unlike kuangliu's:
ReLU6, no expand conv in the t = 1 block, a residual add only where stride is 1 and the
block's input and output widths agree (no 1x1 shortcut convs), no dropout. About 2.24M params.

Inverted residual block: [1x1 expand conv-BN-ReLU6] (t != 1), 3x3 depthwise conv-BN-ReLU6,
1x1 project conv-BN (linear: no activation), plus the input where there is a residual add.
Head: 1x1 conv to 1280-BN-ReLU6, global average pool, linear classifier.
"""

from __future__ import annotations

from torch import Tensor, nn

from .base import GroupWidths, PrunableNet
from .registry import register_model
from .spec import Branch, ModelSpec, PrunableConv

# (expansion t, output channels c, blocks n, stride of the first block s); the paper's
# 24-channel stage has s = 2
CIFAR_SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                  (6, 160, 3, 2), (6, 320, 1, 1))  # fmt: skip


class InvertedResidual(nn.Module):
    """`hidden` 0 for a residual block removes its branch (orphan removal): the block is the
    identity. `out` is an nn.Identity tap on the block's output (after the add), where the
    stream's channels are scored: a linear bottleneck has no activation to score at."""

    def __init__(self, cin: int, hidden: int, cout: int, stride: int, expand: bool, residual: bool):
        super().__init__()
        self.residual, self.has_branch = residual, hidden > 0
        self.expand = expand
        if self.has_branch:
            if expand:
                self.conv1 = nn.Conv2d(cin, hidden, 1, bias=False)
                self.bn1 = nn.BatchNorm2d(hidden)
                self.relu1 = nn.ReLU6(inplace=True)
            # depthwise: channel i reads only input channel i, so its width is its input's
            self.conv2 = nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False)
            self.bn2 = nn.BatchNorm2d(hidden)
            self.relu2 = nn.ReLU6(inplace=True)
            self.conv3 = nn.Conv2d(hidden, cout, 1, bias=False)
            self.bn3 = nn.BatchNorm2d(cout)
        self.out = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        if not self.has_branch:
            return self.out(x)
        h = self.relu1(self.bn1(self.conv1(x))) if self.expand else x
        h = self.bn3(self.conv3(self.relu2(self.bn2(self.conv2(h)))))
        return self.out(x + h if self.residual else h)


class MobileNetV2(PrunableNet):
    """Groups: the stem `conv1` (with the t = 1 block's depthwise conv, which reads it), one
    per stage stream `layer1..7` (the project convs of its blocks, tied by the residual adds),
    each block's expand group `layerS.B.conv1` (the expand conv and the depthwise conv after
    it, coupled: a depthwise conv's output channels are its input channels), and the head
    `conv2`. Residual blocks (every block but a stage's first) are removable branches
    (expand, depthwise and project conv); a stage's first block is not, having no shortcut."""

    def __init__(
        self,
        settings: tuple[tuple[int, int, int, int], ...] = CIFAR_SETTINGS,
        num_classes: int = 10,
        in_channels: int = 3,
        stem_stride: int = 1,
        last_channels: int = 1280,
        widths: dict[str, int] | None = None,
        kept: dict[str, list[int]] | None = None,
    ):
        super().__init__()
        w = GroupWidths(widths, kept)
        self.conv1 = nn.Conv2d(in_channels, w("conv1", 32), 3, stem_stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(w("conv1", 32))
        self.relu = nn.ReLU6(inplace=True)
        convs = [PrunableConv("conv1", "bn1", "conv1", None, "relu")]
        branches: list[Branch] = []

        in_group, in_dense, in_width = "conv1", 32, w("conv1", 32)
        for s, (t, c, n, first_stride) in enumerate(settings, start=1):
            stage, blocks, width = f"layer{s}", [], w(f"layer{s}", c)
            for b in range(n):
                p, stride = f"{stage}.{b}.", first_stride if b == 0 else 1  # p: name prefix
                residual, expand = stride == 1 and in_dense == c, t != 1
                if expand:  # the expand conv starts a group the depthwise conv joins
                    hidden_group = f"{p}conv1"
                    hidden = w(hidden_group, in_dense * t, may_vanish=residual)
                else:  # the depthwise conv reads the stream and so is in its group
                    hidden_group, hidden = in_group, in_width
                if hidden > 0:  # a removed branch has no convs to describe
                    hg = hidden_group
                    if expand:
                        convs.append(
                            PrunableConv(f"{p}conv1", f"{p}bn1", hg, in_group, f"{p}relu1")
                        )
                    convs += [  # depthwise: in_group == group; project: joins the stream
                        PrunableConv(f"{p}conv2", f"{p}bn2", hg, hg, f"{p}relu2"),
                        PrunableConv(f"{p}conv3", f"{p}bn3", stage, hg, f"{p}out"),
                    ]
                    if residual and expand:  # else the stream is its only group
                        branch_convs = (f"{p}conv1", f"{p}conv2", f"{p}conv3")
                        branches.append(Branch(p[:-1], (hidden_group,), branch_convs))
                blocks.append(InvertedResidual(in_width, hidden, width, stride, expand, residual))
                in_group, in_dense, in_width = stage, c, width
            self.add_module(stage, nn.Sequential(*blocks))

        last = w("conv2", last_channels)
        self.conv2 = nn.Conv2d(in_width, last, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(last)
        self.relu2 = nn.ReLU6(inplace=True)
        convs.append(PrunableConv("conv2", "bn2", "conv2", in_group, "relu2"))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(last, num_classes)
        w.check_all_used()
        self._spec = ModelSpec(tuple(convs), (), "linear", "conv2", branches=tuple(branches))
        self.n_stages = len(settings)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))  # (N, 32, H, W)
        for s in range(1, self.n_stages + 1):
            x = getattr(self, f"layer{s}")(x)  # (N, 320, H/8, W/8) after the last stage
        x = self.relu2(self.bn2(self.conv2(x)))  # (N, 1280, H/8, W/8)
        return self.linear(self.avgpool(x).flatten(1))


@register_model
def mobilenetv2_cifar(**kw) -> MobileNetV2:
    return MobileNetV2(CIFAR_SETTINGS, **kw)
