"""ResNet-18/50 in torchvision's layout and module names (its state_dicts load into the dense
model), with one nn.ReLU per location and an optional CIFAR stem."""

from __future__ import annotations

from torch import Tensor, nn

from .base import GroupWidths, PrunableNet
from .registry import register_model
from .spec import Branch, ModelSpec, PrunableConv


def _conv_bn(cin: int, cout: int, k: int, stride: int) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    return nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(
        self, cin: int, mids: tuple[int, ...], cout: int, stride: int, downsample: nn.Module | None
    ):
        super().__init__()
        self.has_branch = min(mids) > 0  # else removed (orphan removal): relu(identity)
        if self.has_branch:
            self.conv1, self.bn1 = _conv_bn(cin, mids[0], 3, stride)
            self.relu1 = nn.ReLU(inplace=True)
            self.conv2, self.bn2 = _conv_bn(mids[0], cout, 3, 1)
        self.downsample = downsample
        self.relu2 = nn.ReLU(inplace=True)  # after the add

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        if not self.has_branch:
            # in place on x itself would overwrite a tensor autograd saved: copy it
            return self.relu2(identity.clone() if identity is x else identity)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + identity)


class Bottleneck(nn.Module):
    """torchvision's v1.5 bottleneck: the stride sits on the 3x3 conv."""

    expansion = 4

    def __init__(
        self, cin: int, mids: tuple[int, ...], cout: int, stride: int, downsample: nn.Module | None
    ):
        super().__init__()
        self.has_branch = min(mids) > 0  # else removed (orphan removal): relu(identity)
        if self.has_branch:
            self.conv1, self.bn1 = _conv_bn(cin, mids[0], 1, 1)
            self.relu1 = nn.ReLU(inplace=True)
            self.conv2, self.bn2 = _conv_bn(mids[0], mids[1], 3, stride)
            self.relu2 = nn.ReLU(inplace=True)
            self.conv3, self.bn3 = _conv_bn(mids[1], cout, 1, 1)
        self.downsample = downsample
        self.relu3 = nn.ReLU(inplace=True)  # after the add

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        if not self.has_branch:
            # in place on x itself would overwrite a tensor autograd saved: copy it
            return self.relu3(identity.clone() if identity is x else identity)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu3(out + identity)


class ResNet(PrunableNet):
    """Groups: one per stage stream (`layer1..4`: the block outputs and downsamples), the
    inner convs alone (`layer1.0.conv1`, ...), and the stem `conv1` alone unless layer1.0 has
    no downsample (ResNet-18), in which case the stem is in `layer1`."""

    def __init__(
        self,
        block: type[BasicBlock | Bottleneck],
        layers: tuple[int, int, int, int],
        num_classes: int = 1000,
        in_channels: int = 3,
        cifar_stem: bool = False,
        stem_pool: bool | None = None,
        widths: dict[str, int] | None = None,
        kept: dict[str, list[int]] | None = None,
    ):
        super().__init__()
        w, e = GroupWidths(widths, kept), block.expansion
        n_inner = 1 if block is BasicBlock else 2  # convs of a block before its last one

        stem = "layer1" if e == 1 else "conv1"  # 64 -> 64 * e needs a downsample iff e > 1
        # stem_pool: the 3x3/2 max-pool after the stem; None: ImageNet's stem has it, the CIFAR
        # stem not. The ChipNet authors' CIFAR ResNet-50/101 keep it (layer1 at 16x16).
        pooled = not cifar_stem if stem_pool is None else stem_pool
        if cifar_stem:  # 3x3 stride 1: (N, 64, H, W) for 32x32 images, H/2 pooled
            self.conv1, self.bn1 = _conv_bn(in_channels, w(stem, 64), 3, 1)
        else:  # (N, 64, H/2, W/2), H/4 pooled
            self.conv1 = nn.Conv2d(in_channels, w(stem, 64), 7, 2, 3, bias=False)
            self.bn1 = nn.BatchNorm2d(w(stem, 64))
        self.maxpool: nn.Module = nn.MaxPool2d(3, 2, 1) if pooled else nn.Identity()
        self.relu = nn.ReLU(inplace=True)
        # the CHIP authors score a pooled stem after its max-pool
        convs = [PrunableConv("conv1", "bn1", stem, None, "maxpool" if pooled else "relu")]
        branches: list[Branch] = []

        in_group, in_dense, in_width = stem, 64, w(stem, 64)
        for s, (planes, n) in enumerate(zip((64, 128, 256, 512), layers, strict=True), start=1):
            stage, blocks = f"layer{s}", []
            width = w(stage, planes * e)
            for b in range(n):
                p, stride = f"{stage}.{b}.", 2 if s > 1 and b == 0 else 1  # p: name prefix
                inner = tuple(f"{p}conv{i}" for i in range(1, n_inner + 1))
                mids = tuple(w(g, planes, may_vanish=True) for g in inner)
                if min(mids) > 0:  # a removed branch has no convs to describe
                    for i in range(1, n_inner + 2):  # the last conv joins the stage stream
                        feed = in_group if i == 1 else f"{p}conv{i - 1}"
                        group = f"{p}conv{i}" if i <= n_inner else stage
                        convs.append(
                            PrunableConv(f"{p}conv{i}", f"{p}bn{i}", group, feed, f"{p}relu{i}")
                        )
                    branch_convs = (*inner, f"{p}conv{n_inner + 1}")
                    branches.append(Branch(p[:-1], inner, branch_convs))
                downsample = None
                if stride != 1 or in_dense != planes * e:
                    downsample = nn.Sequential(*_conv_bn(in_width, width, 1, stride))
                    last_relu = f"{p}relu{n_inner + 1}"  # after the add
                    convs.append(
                        PrunableConv(
                            f"{p}downsample.0", f"{p}downsample.1", stage, in_group, last_relu
                        )
                    )
                blocks.append(block(in_width, mids, width, stride, downsample))
                in_group, in_dense, in_width = stage, planes * e, width
            self.add_module(stage, nn.Sequential(*blocks))

        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_width, num_classes)
        w.check_all_used()
        self._spec = ModelSpec(tuple(convs), (), "fc", "layer4", branches=tuple(branches))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(
            self.layer3(self.layer2(self.layer1(x)))
        )  # (N, 512 * e, H/32, W/32); H/8 with the CIFAR stem
        return self.fc(self.avgpool(x).flatten(1))


@register_model
def resnet18(**kw) -> ResNet:
    return ResNet(BasicBlock, (2, 2, 2, 2), **kw)


@register_model
def resnet50(**kw) -> ResNet:
    return ResNet(Bottleneck, (3, 4, 6, 3), **kw)


@register_model
def resnet101(**kw) -> ResNet:
    return ResNet(Bottleneck, (3, 4, 23, 3), **kw)
