"""CIFAR VGG-16-BN as in the CHIP / HRank code (biased convs, 512-512-classes head with
BatchNorm1d); module names match their checkpoints (`features.conv0`, `classifier.linear1`)."""

from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn

from .base import GroupWidths, PrunableNet
from .registry import register_model
from .spec import ModelSpec, PrunableConv

# output channels per conv, "M" = 2x2 max-pool; a conv's name is its index here (conv0 ...)
VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)


class VGG(PrunableNet):
    """Every conv is its own group, named by its qualified name (`features.conv0` ...)."""

    def __init__(
        self,
        cfg: tuple = VGG16_CFG,
        num_classes: int = 10,
        in_channels: int = 3,
        hidden: int = 512,
        widths: dict[str, int] | None = None,
        kept: dict[str, list[int]] | None = None,
    ):
        super().__init__()
        w = GroupWidths(widths, kept)
        self.features = nn.Sequential()
        convs, prev, c = [], None, in_channels
        for i, x in enumerate(cfg):
            if x == "M":
                self.features.add_module(f"pool{i}", nn.MaxPool2d(2, 2))
                continue
            name = f"features.conv{i}"
            width = w(name, x)
            self.features.add_module(f"conv{i}", nn.Conv2d(c, width, 3, padding=1))
            self.features.add_module(f"norm{i}", nn.BatchNorm2d(width))
            self.features.add_module(f"relu{i}", nn.ReLU(inplace=True))
            # CHIP's authors score a conv followed by a max-pool after the pool
            pooled = i + 1 < len(cfg) and cfg[i + 1] == "M"
            score_at = f"features.pool{i + 1}" if pooled else f"features.relu{i}"
            convs.append(PrunableConv(name, f"features.norm{i}", name, prev, score_at))
            prev, c = name, width
        # the authors use AvgPool2d(2) on the 2x2 map of a 32x32 image; adaptive pooling is the
        # same there and also accepts smaller images
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            OrderedDict(
                [
                    ("linear1", nn.Linear(c, hidden)),
                    ("norm1", nn.BatchNorm1d(hidden)),
                    ("relu1", nn.ReLU(inplace=True)),
                    ("linear2", nn.Linear(hidden, num_classes)),
                ]
            )
        )
        w.check_all_used()
        self._spec = ModelSpec(tuple(convs), (), "classifier.linear1", prev)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)  # (N, 512, H/16, W/16)
        return self.classifier(self.avgpool(x).flatten(1))


@register_model
def vgg16_bn(**kw) -> VGG:
    return VGG(VGG16_CFG, **kw)
