"""What every model shares: the `PrunableNet` base, the `widths`/`kept` kwargs and the
parameter-free option-A shortcut."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from .spec import ModelSpec


class PrunableNet(nn.Module):
    """A model that describes its prunable convs, coupling groups and shortcuts (`describe`)."""

    _spec: ModelSpec  # set by the subclass at construction; widths are read live
    # what the state dict's keys have in front of the network's own (pretrained weights)
    WEIGHTS_PREFIX = ""

    def describe(self) -> ModelSpec:
        """The spec, with widths read from the module tree as it is now (after surgery too)."""
        convs = tuple(
            replace(c, out_channels=self.get_submodule(c.conv).out_channels)
            for c in self._spec.convs
        )
        in_channels = self.get_submodule(self._stem_conv()).in_channels
        return replace(self._spec, convs=convs, in_channels=in_channels)

    def _stem_conv(self) -> str:
        """The conv that reads the image: the first with a fixed input, fixed convs first."""
        return next(c for c in (*self._spec.fixed, *self._spec.convs) if c.in_group is None).conv


class GroupWidths:
    """Resolves the `widths` and `kept` model kwargs group by group while a model is built.

    widths: group -> number of output channels (missing groups stay dense).
    kept: group -> ORIGINAL indices of the kept channels; only option-A shortcuts use the
    indices themselves, elsewhere they just give the width.
    """

    def __init__(self, widths: dict[str, int] | None, kept: dict[str, list[int]] | None):
        self._widths = dict(widths or {})
        self._kept = {g: [int(i) for i in idx] for g, idx in (kept or {}).items()}
        self._resolved: dict[str, tuple[int, list[int]]] = {}  # group -> (width, kept indices)

    def __call__(self, group: str, dense: int, may_vanish: bool = False) -> int:
        """Width of `group`, whose dense width is `dense`. Only a group of a removable
        residual branch (`may_vanish`) may have width 0: the branch is then left out."""
        if group not in self._resolved:
            self._resolved[group] = self._resolve(group, dense, may_vanish)
        return self._resolved[group][0]

    def _resolve(self, group: str, dense: int, may_vanish: bool) -> tuple[int, list[int]]:
        width, kept = self._widths.get(group), self._kept.get(group)
        if kept is not None:
            if len(set(kept)) != len(kept) or not all(0 <= i < dense for i in kept):
                raise ValueError(f"kept[{group!r}] must be distinct indices in [0, {dense})")
            if width is not None and width != len(kept):
                raise ValueError(f"widths[{group!r}]={width} but kept has {len(kept)} indices")
            width = len(kept)
        if width is None:
            width = dense
        least = 0 if may_vanish else 1
        if not least <= int(width) <= dense:
            raise ValueError(f"widths[{group!r}]={width} must be in [{least}, {dense}]")
        return int(width), kept if kept is not None else list(range(width))

    def kept(self, group: str) -> list[int]:
        """Original indices kept in an already resolved group (default: the first `width`)."""
        return self._resolved[group][1]

    def check_all_used(self) -> None:
        """Unknown group names are errors, not silently ignored."""
        unknown = sorted((set(self._widths) | set(self._kept)) - set(self._resolved))
        if unknown:
            raise ValueError(f"unknown groups {unknown}; this model has {list(self._resolved)}")


class ChannelMapShortcut(nn.Module):
    """Option-A shortcut: out[:, j] = in[:, j - offset] over ORIGINAL channel indices.

    Dense with offset planes//4 and stride 2 this is the classic
    `F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, planes // 4, planes // 4))`; with pruned groups it
    moves each kept input channel to the output position of its original index + offset,
    drops those with no place and zero-fills the rest.
    """

    def __init__(self, in_kept: list[int], out_kept: list[int], offset: int, stride: int):
        super().__init__()
        self.offset, self.stride = offset, stride
        self.in_channels, self.out_channels = len(in_kept), len(out_kept)
        position = {orig: pos for pos, orig in enumerate(in_kept)}
        # index[p] = input position feeding output position p; in_channels = the zero channel
        index = [position.get(orig - offset, len(in_kept)) for orig in out_kept]
        self.identity = stride == 1 and index == list(range(len(in_kept)))
        # not persistent: rebuilt from the model kwargs, so dense checkpoints load unchanged
        self.register_buffer("index", torch.tensor(index, dtype=torch.long), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (N, Cin, H, W) -> (N, Cout, H/stride, W/stride)
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.identity:
            return x
        zero = x.new_zeros(x.shape[0], 1, x.shape[2], x.shape[3])
        return torch.cat([x, zero], dim=1).index_select(1, self.index)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, offset={self.offset}, stride={self.stride}"
        )


class ChannelSelect(nn.Module):
    """Network slimming's channel selection: out = in[:, kept], the input's channels that one
    reader keeps (ORIGINAL indices), in front of the BN that normalises them for it.

    Seen as a conv it is a parameter-free 1x1 conv whose weight is the 0/1 selection matrix:
    its output channels are prunable (a group), its input is a stream that stays whole. It
    costs no parameter and no MAC; what pruning it saves is the BN's and the reader's share.
    Identity while every channel is kept (the dense model), so dense state dicts are unchanged.
    """

    def __init__(self, in_channels: int, kept: list[int]):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, len(kept)
        self.identity = list(kept) == list(range(in_channels))
        # not persistent: rebuilt from the model kwargs, like the option-A channel maps
        self.register_buffer("index", torch.tensor(kept, dtype=torch.long), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (N, Cin, H, W) -> (N, len(kept), H, W)
        return x if self.identity else x.index_select(1, self.index)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}"
