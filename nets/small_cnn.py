"""A small CNN of a user's own, with the structures a pruning tool has to get right: a residual
add, a concat of two branches, a depthwise conv and a squeeze-and-excitation block. It is not
one of chipprune's families: the pipeline describes it from its torch.fx graph.

    models:
      small_cnn:
        arch: nets.small_cnn:build
        kwargs: {width: 16}
"""

from __future__ import annotations

import torch
from torch import nn


def conv_bn_relu(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class SqueezeExcite(nn.Module):
    """x * sigmoid(W2 relu(W1 avgpool(x))): a per-channel scale computed from the map."""

    def __init__(self, channels: int, reduced: int):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reduce = nn.Conv2d(channels, reduced, 1)
        self.expand = nn.Conv2d(reduced, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.relu(self.reduce(self.pool(x)))
        return x * torch.sigmoid(self.expand(s))


class InvertedResidual(nn.Module):
    """1x1 expand, 3x3 depthwise, squeeze-and-excitation, 1x1 project, plus the input."""

    def __init__(self, channels: int, expand: int = 2):
        super().__init__()
        hidden = channels * expand
        self.expand = conv_bn_relu(channels, hidden, 1)
        self.depthwise = conv_bn_relu(hidden, hidden, 3, groups=hidden)
        self.se = SqueezeExcite(hidden, max(1, hidden // 4))
        self.project = nn.Sequential(nn.Conv2d(hidden, channels, 1, bias=False),
                                     nn.BatchNorm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.project(self.se(self.depthwise(self.expand(x))))


class TwoBranch(nn.Module):
    """A 3x3 and a 1x1 branch, concatenated, then mixed by a 1x1 conv (Inception-style)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.wide = conv_bn_relu(cin, cout // 2, 3, stride)
        self.narrow = conv_bn_relu(cin, cout // 2, 1, stride)
        self.mix = conv_bn_relu(cout, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mix(torch.cat([self.wide(x), self.narrow(x)], dim=1))


class SmallCNN(nn.Module):
    def __init__(self, num_classes: int, in_channels: int, width: int):
        super().__init__()
        self.stem = conv_bn_relu(in_channels, width)
        self.block1 = InvertedResidual(width)
        self.down = TwoBranch(width, 2 * width, stride=2)
        self.block2 = InvertedResidual(2 * width)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block2(self.down(self.block1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def build(num_classes: int = 10, in_channels: int = 3, width: int = 16) -> nn.Module:
    return SmallCNN(num_classes, in_channels, width)
