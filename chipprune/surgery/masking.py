"""The masked reference: per-group channel scales applied by forward hooks, for ChipNet's soft
gates and for hard 0/1 keep-masks (a hard-masked model computes what the pruned one does)."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from chipprune.models import PrunableNet


def _scale_hook(group: str, scale: Callable[[], Tensor]):
    def hook(_module: nn.Module, _inputs, out: Tensor) -> Tensor:
        s = scale()  # (C,), recomputed every forward (soft gates depend on learnable zeta)
        if s.shape != (out.shape[1],):
            raise ValueError(
                f"scale of group {group!r} has shape {tuple(s.shape)}, "
                f"the output has {out.shape[1]} channels"
            )
        # (N, C, H, W) * (1, C, 1, 1); a new tensor, so the in-place ReLU that follows
        # never writes into a tensor autograd saved for the scale's gradient
        s = s.to(dtype=out.dtype, device=out.device)
        return out * s.view(1, -1, *([1] * (out.dim() - 2)))

    return hook


class _ScaledAffine:
    """Runs a BatchNorm with its affine scaled by s: s * (gamma x_hat + beta) computed as
    (s gamma) x_hat + s beta, the same value without a pass over the activations (forward
    and backward), which is most of what gating costs. The module's own forward runs with
    the scaled vectors swapped in for the call; running statistics update as usual."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm, group: str, scale):
        self.bn, self.group, self.scale = bn, group, scale
        bn.forward = self  # an instance attribute: nn.Module.__call__ finds it first

    def __call__(self, x: Tensor) -> Tensor:
        bn, s = self.bn, self.scale()  # (C,), recomputed every forward
        if s.shape != (bn.num_features,):
            raise ValueError(
                f"scale of group {self.group!r} has shape {tuple(s.shape)}, "
                f"the output has {bn.num_features} channels"
            )
        params = bn._parameters
        weight, bias = params["weight"], params["bias"]
        s = s.to(dtype=weight.dtype, device=weight.device)
        params["weight"], params["bias"] = weight * s, bias * s
        try:
            return type(bn).forward(bn, x)
        finally:
            params["weight"], params["bias"] = weight, bias

    def remove(self) -> None:
        if self.bn.__dict__.get("forward") is self:
            del self.bn.forward


def _attach_scale(module: nn.Module, group: str, scale):
    """Scale a module's output channels: folded into a BN's affine when it has one and is
    not scaled already, else an output hook."""
    if (
        isinstance(module, nn.modules.batchnorm._BatchNorm)
        and module.affine
        and "forward" not in module.__dict__
    ):
        return _ScaledAffine(module, group, scale)
    return module.register_forward_hook(_scale_hook(group, scale))


def attach_channel_scales(
    model: PrunableNet, scales: Mapping[str, Callable[[], Tensor]]
) -> list[RemovableHandle]:
    """Multiply every channel of each group in `scales` by its scale (C,); groups left out
    stay as they are. Returns the hook handles (`h.remove()` restores the model).

    Hooked: the BN after every prunable conv (after its affine, before ReLU and the residual
    add) and every option-A ChannelMap module by the scale of its OUT group, so a channel
    pruned from a stream cannot come back through a shortcut from another group.
    """
    spec = model.describe()
    groups = spec.groups()
    unknown = sorted(set(scales) - set(groups))
    if unknown:
        raise ValueError(f"unknown groups {unknown}; this model has {list(groups)}")
    targets = [(c.bn, c.group) for c in spec.convs]
    targets += [(cm.module, cm.out_group) for cm in spec.channel_maps]
    return [
        _attach_scale(model.get_submodule(name), group, scales[group])
        for name, group in targets
        if group in scales
    ]


def apply_hard_masks(model: PrunableNet, keep_bool: Mapping[str, Tensor]) -> list[RemovableHandle]:
    """Zero the pruned channels: `keep_bool` maps group -> bool (C,) over the model's current
    channels (dense widths for a dense model, e.g. from `masks.kept_as_bool`)."""
    widths = model.describe().widths()
    scales = {}
    for g, keep in keep_bool.items():
        if keep.dtype != torch.bool or (g in widths and keep.shape != (widths[g],)):
            raise ValueError(
                f"keep_bool[{g!r}] must be bool of shape ({widths.get(g)},), "
                f"got {keep.dtype} {tuple(keep.shape)}"
            )
        mask = keep.detach().float()  # (C,) of 0/1, cast to the output's dtype in the hook
        scales[g] = lambda mask=mask: mask
    handles = attach_channel_scales(model, scales)
    # orphan removal: a branch with an empty group is gone as a whole, its last conv too
    # (whose BN would otherwise add its constant to the stream), as in the pruned model
    spec = model.describe()
    for br in spec.branches:
        if any(g in keep_bool and not keep_bool[g].any() for g in br.groups):
            for conv in br.convs:
                c = spec.conv(conv)
                zero = torch.zeros(widths[c.group])
                hook = _scale_hook(c.group, lambda zero=zero: zero)
                handles.append(model.get_submodule(c.bn).register_forward_hook(hook))
    return handles
