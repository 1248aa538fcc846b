"""Which tensors keeping some channels of each group slices, read from a model's description:
one plan for both surgery (`surgery.rebuild`, slicing a trained state dict) and the traced
models (`models.traced`, which build the dense network and slice it in place)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from .base import ChannelSelect, PrunableNet

Plan = dict[str, tuple[Tensor | None, ...]]  # state_dict key -> per-dim index (None: whole)

GROUPED = (
    "grouped convs are not supported, except depthwise ones (groups == in_channels == "
    "out_channels, described with in_group == group)"
)


def slice_plan(model: PrunableNet, pos: Mapping[str, Tensor]) -> Plan:
    """state_dict key -> per-dim index for every tensor that is sliced, where `pos[group]`
    holds the positions (in the model as it is) of the channels each group keeps."""
    spec = model.describe()
    plan: Plan = {}
    for c in spec.convs:
        conv = model.get_submodule(c.conv)
        out = pos[c.group]
        if isinstance(conv, ChannelSelect):  # no weight: the kwargs' kept indices rebuild it
            pass
        elif c.in_group == c.group and conv.groups == conv.in_channels == conv.out_channels:
            plan[f"{c.conv}.weight"] = (out,)  # depthwise (C, 1, k, k): channel i reads input i
        elif conv.groups != 1:
            raise ValueError(f"{c.conv}: {GROUPED}")
        else:  # weight (Cout, Cin, k, k): the image input (in_group None) is never sliced
            plan[f"{c.conv}.weight"] = (out, None if c.in_group is None else pos[c.in_group])
        plan[f"{c.conv}.bias"] = (out,)
        if c.bn != c.conv:  # a BN after it; without one the gate acts on the conv itself
            for k in ("weight", "bias", "running_mean", "running_var"):  # (C,) each
                plan[f"{c.bn}.{k}"] = (out,)
    for f in spec.fixed:  # outputs never pruned (a follower's follow its group)
        out = None if f.out_group is None else pos[f.out_group]
        inp = None if f.in_group is None else pos[f.in_group]
        if inp is not None:
            conv = model.get_submodule(f.conv)
            assert isinstance(conv, nn.Conv2d) and conv.groups == 1, f.conv
        if out is not None or inp is not None:
            plan[f"{f.conv}.weight"] = (out, inp)
        if out is not None:
            plan[f"{f.conv}.bias"] = (out,)
    # the classifier sees `classifier_repeat` features per channel of its group (channel
    # major, as a flattened (C, H, W) map): weight (classes, C * repeat)
    if spec.classifier_in_group is not None:
        idx = pos[spec.classifier_in_group]
        r = spec.classifier_repeat
        if r != 1:
            idx = (idx.view(-1, 1) * r + torch.arange(r, device=idx.device)).reshape(-1)
        plan[f"{spec.classifier}.weight"] = (None, idx)
    return plan


def slice_tensor(t: Tensor, index: tuple[Tensor | None, ...]) -> Tensor:
    for dim, idx in enumerate(index):
        if idx is not None:
            t = t.index_select(dim, idx.to(t.device))
    return t


@torch.no_grad()
def slice_in_place(model: nn.Module, plan: Plan) -> None:
    """Apply `plan` to the model's own parameters and buffers, then make every conv, BN and
    linear layer's size attributes agree with its tensors (a depthwise conv's groups too)."""
    state_keys = set(model.state_dict())  # the plan names biases and BN affines that
    touched: set[nn.Module] = set()
    for key, index in plan.items():
        if key not in state_keys:  # a layer may not have (bias=False, affine=False)
            continue
        owner, _, name = key.rpartition(".")
        module = model.get_submodule(owner)
        if name in module._parameters:
            old = module._parameters[name]
            module._parameters[name] = nn.Parameter(
                slice_tensor(old.data, index), requires_grad=old.requires_grad
            )
        else:
            module._buffers[name] = slice_tensor(module._buffers[name], index)
        touched.add(module)
    for module in touched:
        if isinstance(module, nn.Conv2d):
            depthwise = module.groups == module.in_channels == module.out_channels
            module.out_channels = module.weight.shape[0]
            if depthwise:
                module.groups = module.in_channels = module.out_channels
            else:
                module.in_channels = module.weight.shape[1] * module.groups
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.num_features = module.running_mean.shape[0]
        elif isinstance(module, nn.Linear):
            module.in_features = module.weight.shape[1]
