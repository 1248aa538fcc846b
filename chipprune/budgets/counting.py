"""Parameter and MAC counts of a model, under the one convention that reproduces the published
CHIP / ChipNet tables.

Convention, per image:
- Conv2d: Cout * Hout * Wout * (Cin / groups * kh * kw) MACs, plus Cout * Hout * Wout bias adds
  when it has a bias.
- Linear: in * out MACs (no bias add; the thop / fvcore convention).
- Everything else (ReLU, pooling, shortcuts, the add) is free.
- `macs_with_bn` adds 2 per BatchNorm output element (normalise and affine fold into one
  multiply and one add in eval mode); this is what turns CHIP's pruned ResNet-56 from 65.17M
  into its 65.94M.
- Params: every nn.Parameter (BN affine included); BN running statistics are buffers and
  are not counted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from chipprune.models.base import ChannelSelect

BN_MACS_PER_ELEMENT = 2


@dataclass(frozen=True)
class ModelCost:
    params: int
    macs: int  # conv + linear (+ conv bias adds)
    macs_with_bn: int  # macs + BN_MACS_PER_ELEMENT per BatchNorm output element


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def conv_feature_sizes(
    model: nn.Module, input_size: tuple[int, int, int]
) -> dict[str, tuple[tuple[int, int], tuple[int, int]]]:
    """Conv name -> ((H, W) of its input, (H, W) of its output), from one zero-image forward;
    a `ChannelSelect` (a parameter-free selection conv of the description) is one too."""
    sizes: dict[str, tuple[tuple[int, int], tuple[int, int]]] = {}

    def hook(name):
        def record(_m, inputs, out):
            sizes[name] = (tuple(inputs[0].shape[-2:]), tuple(out.shape[-2:]))

        return record

    handles = [m.register_forward_hook(hook(name)) for name, m in model.named_modules()
               if isinstance(m, nn.Conv2d | ChannelSelect)]
    try:
        forward_zero_image(model, input_size)
    finally:
        for h in handles:
            h.remove()
    return sizes


def forward_zero_image(model: nn.Module, input_size: tuple[int, int, int]) -> None:
    """One eval-mode, no-grad forward of a zero image (C, H, W), for hooks to observe; the
    train/eval flags of every module are restored and no BN statistic changes."""
    training = {m: m.training for m in model.modules()}
    first = next(model.parameters())
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, *input_size, device=first.device, dtype=first.dtype))
    finally:
        for m, flag in training.items():
            m.training = flag


def measure_cost(model: nn.Module, input_size: tuple[int, int, int]) -> ModelCost:
    """Params and per-image MACs from one forward of a zero image (C, H, W) in eval mode.

    The model's train/eval flags are restored; no gradients, no BN statistics change.
    """
    macs = bn = 0

    def on_conv(m: nn.Conv2d, _inp, out: torch.Tensor) -> None:
        nonlocal macs
        k = m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
        macs += out.numel() * (k + (m.bias is not None))  # out: (1, Cout, Hout, Wout)

    def on_linear(m: nn.Linear, _inp, out: torch.Tensor) -> None:
        nonlocal macs
        macs += m.in_features * out.numel()  # out: (1, out_features)

    def on_bn(_m: nn.Module, _inp, out: torch.Tensor) -> None:
        nonlocal bn
        bn += BN_MACS_PER_ELEMENT * out.numel()

    hooks = {nn.Conv2d: on_conv, nn.Linear: on_linear, nn.modules.batchnorm._BatchNorm: on_bn}
    handles = [
        m.register_forward_hook(fn)
        for m in model.modules()
        for kind, fn in hooks.items()
        if isinstance(m, kind)
    ]
    try:
        forward_zero_image(model, input_size)
    finally:
        for h in handles:
            h.remove()
    return ModelCost(count_params(model), macs, macs + bn)


def count_macs(model: nn.Module, input_size: tuple[int, int, int]) -> int:
    """Conv + linear MACs per image (see the module docstring)."""
    return measure_cost(model, input_size).macs


def count_macs_with_bn(model: nn.Module, input_size: tuple[int, int, int]) -> int:
    """`count_macs` plus BatchNorm's per-element work."""
    return measure_cost(model, input_size).macs_with_bn
