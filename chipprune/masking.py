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
        model.get_submodule(name).register_forward_hook(_scale_hook(group, scales[group]))
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
    return attach_channel_scales(model, scales)
