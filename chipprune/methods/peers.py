"""Torch-Pruning's importance criteria (torch-pruning 1.6, `torch_pruning.importance`) as
channel scores over our coupling groups, so they go through our one thresholding and meet
our exact budgets:

- tp_magnitude: `GroupMagnitudeImportance()` (p=2): per coupled layer, the squared L2 norm
  of each channel's slice of its weight (a conv's output filter, a reader's input slice, a
  BN's |gamma|^2), averaged over the layers of the group, divided by the group's mean;
- tp_taylor: `GroupTaylorImportance()`: the same with |w * dL/dw| summed over the slice, the
  gradients summed over a few training batches (Molchanov et al. 2019);
- tp_bn_scale: `BNScaleImportance()`: |gamma| of the group's BNs (network slimming).

Torch-Pruning builds its groups from its dependency graph, which cannot follow our option-A
shortcuts (it takes their index_select for an element-wise op); we take the group's layers
from our description instead, which is the same set wherever Torch-Pruning's graph is right
(tests/test_peers.py checks the scores equal Torch-Pruning's own, on torchvision's ResNet-18,
MobileNet-V2 and EfficientNet-B0 and our option-B ResNet-56 and VGG-16). As a user of
torch-pruning 1.6 gets them, two quirks are kept: depthwise convs add nothing to the
magnitude and Taylor scores (their pruning function is not the one those criteria test for),
and Taylor ignores BN layers (it tests for GroupNorm's pruning function).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from chipprune.models import ChannelSelect, PrunableNet

PEER_CRITERIA = ("tp_magnitude", "tp_taylor", "tp_bn_scale")


@dataclass(frozen=True)
class Dependency:
    """One layer of a group as Torch-Pruning's group lists it."""

    role: str  # "out": a conv's output filters; "in": a reader's input slices; "bn": a BN
    module: str  # qualified name
    repeat: int = 1  # inputs per channel of a reader (a classifier over a flattened map)


def group_dependencies(model: PrunableNet) -> dict[str, list[Dependency]]:
    """Group -> the parameterised layers pruning its channels touches, in forward order."""
    spec = model.describe()
    deps: dict[str, list[Dependency]] = {g: [] for g in spec.widths()}
    for c in spec.convs:
        conv = model.get_submodule(c.conv)
        depthwise = c.in_group == c.group and not isinstance(conv, ChannelSelect) and (
            conv.groups == conv.in_channels == conv.out_channels)
        if not isinstance(conv, ChannelSelect) and not depthwise:
            deps[c.group].append(Dependency("out", c.conv))
        if c.bn != c.conv:
            deps[c.group].append(Dependency("bn", c.bn))
        if c.in_group is not None and not depthwise and not isinstance(conv, ChannelSelect):
            deps[c.in_group].append(Dependency("in", c.conv))
    for f in spec.fixed:
        if f.out_group is not None:  # a follower: an SE block's excitation conv
            deps[f.out_group].append(Dependency("out", f.conv))
        if f.in_group is not None:
            deps[f.in_group].append(Dependency("in", f.conv))
    if spec.classifier_in_group is not None:
        deps[spec.classifier_in_group].append(
            Dependency("in", spec.classifier, spec.classifier_repeat))
    return deps


def _local(module: nn.Module, dep: Dependency, value: Callable[[Tensor], Tensor]) -> Tensor:
    """(C,) one layer's share: value(weight) summed over each channel's slice."""
    w = value(module.weight)
    if dep.role == "bn":
        return w
    if dep.role == "out":
        return w.flatten(1).sum(1)
    per_input = w.transpose(0, 1).flatten(1).sum(1)  # (Cin,) or (C * repeat,)
    return per_input.view(-1, dep.repeat).sum(1)  # Torch-Pruning sums a channel's features


@torch.no_grad()
def tp_scores(model: PrunableNet, criterion: str) -> dict[str, Tensor]:
    """Group -> (C,) float64 scores of `criterion` (tp_taylor reads the weights' .grad,
    see `accumulate_gradients`): the mean over the group's layers, divided by its mean."""
    if criterion not in PEER_CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r}; allowed: {', '.join(PEER_CRITERIA)}")
    out = {}
    for group, deps in group_dependencies(model).items():
        shares = []
        for dep in deps:
            m = model.get_submodule(dep.module)
            if criterion == "tp_bn_scale":
                if dep.role == "bn":
                    shares.append(m.weight.detach().abs())
            elif criterion == "tp_magnitude":
                shares.append(_local(m, dep, lambda w: w.detach().pow(2)))
            elif dep.role != "bn":  # tp_taylor, which skips BNs as torch-pruning 1.6 does
                if m.weight.grad is None:
                    raise ValueError(f"tp_taylor needs gradients: {dep.module} has none")
                shares.append(_local(m, dep, lambda w: (w.detach() * w.grad).abs()))
        if not shares:
            raise ValueError(f"{criterion}: group {group!r} has no layer the criterion scores")
        imp = torch.stack([s.double() for s in shares]).mean(0)
        out[group] = (imp / imp.mean()).cpu()
    return out


def accumulate_gradients(
    model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]],
    normalise: Callable[[Tensor], Tensor],
) -> None:
    """Sum the cross-entropy gradients of `batches` (uint8 images, labels) into every
    parameter's .grad, in eval mode (BN statistics unchanged), as Torch-Pruning's Taylor
    examples do (backward per batch, no zeroing in between)."""
    was_training = model.training
    model.eval()
    model.zero_grad(set_to_none=True)
    try:
        with torch.enable_grad():
            for images, labels in batches:
                F.cross_entropy(model(normalise(images)), labels).backward()
    finally:
        model.train(was_training)
