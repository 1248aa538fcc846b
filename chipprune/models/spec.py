"""The uniform description every model gives of itself (`PrunableNet.describe()`).

Pruning, scoring, budgets and surgery read only this, so they need no per-model code.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PrunableConv:
    """An nn.Conv2d whose output channels can be pruned, with the modules around it."""

    conv: str  # qualified name of the nn.Conv2d, or of a `ChannelSelect` (a parameter-free
    # selection of an unpruned stream's channels for one reader, with in_group None)
    bn: str  # qualified name of the BatchNorm2d right after it (gates multiply its output);
    # the conv's own name where no BN follows it: the gate then multiplies the conv's output
    group: str  # coupling group: every conv of a group keeps the same output channels
    in_group: str | None  # group whose channels feed this conv (None = an input that is
    # never pruned: the image, or a stream of `FixedConv`s)
    score_at: str  # the dedicated nn.ReLU (or ReLU6) whose output scores these channels
    # (CHIP); for a residual block's last conv and its downsample, the ReLU after the add; an
    # nn.Identity tap on the block output where there is no activation (linear bottleneck);
    # the max-pool right after the ReLU where there is one, as the CHIP authors score (VGG's
    # pooled convs, the ImageNet ResNet stem)
    out_channels: int = 0  # current width; describe() fills it from the module tree


@dataclass(frozen=True)
class FixedConv:
    """An nn.Conv2d that is described but never pruned: its output channels stay as they are
    (it has no BN of its own right after it to gate, like the stream convs of a pre-activation
    ResNet). Only its input channels are sliced, when `in_group` is pruned."""

    conv: str  # qualified name of the nn.Conv2d (groups == 1 unless in_group is None)
    in_group: str | None  # group whose channels feed it (None = an input never pruned)
    out_group: str | None = None  # a follower: its output channels are sliced with this
    # group but never gated (a squeeze-and-excitation block's excitation conv, whose output
    # scales the group's channels: a pruned channel's scale multiplies a zero)


@dataclass(frozen=True)
class ChannelMap:
    """A parameter-free option-A shortcut: out[:, j] = in[:, j - offset] (zero where none).

    Indices are ORIGINAL (dense) channel indices; the module maps the kept ones.
    """

    module: str
    in_group: str
    out_group: str
    offset: int
    stride: int


@dataclass(frozen=True)
class Branch:
    """A residual branch that may go as a whole (ChipNet's orphan removal).

    When any of its `groups` keeps no channel, the branch carries nothing: the block adds
    nothing to its shortcut, so every conv of the branch (`convs`, incl. its last one, which
    belongs to the stream group) is removed and the block computes relu(shortcut(x)).
    """

    block: str  # qualified name of the block module
    groups: tuple[str, ...]  # the branch's own (inner) groups; only these may be empty
    convs: tuple[str, ...]  # every prunable conv of the branch, in forward order
    also: tuple[str, ...] = ()  # other modules with parameters that go with the branch
    # (e.g. a pre-activation BN, a FixedConv at its end)


@dataclass(frozen=True)
class ModelSpec:
    convs: tuple[PrunableConv, ...]  # forward order
    channel_maps: tuple[ChannelMap, ...]  # empty for models without option-A shortcuts
    classifier: str  # the nn.Linear that reads a group (never pruned); "" where none does
    classifier_in_group: str | None  # the group feeding the classifier (None: never pruned)
    in_channels: int = 3  # channels of the image
    branches: tuple[Branch, ...] = ()  # removable residual branches (none for plain nets)
    # convs that are described but never pruned, forward order; the image feeds the first conv
    # with in_group None, looking at these first
    fixed: tuple[FixedConv, ...] = ()
    # classifier inputs per channel of classifier_in_group: 1 after global pooling, H * W
    # where the classifier reads a flattened (C, H, W) map (AlexNet, VGG: 7 * 7)
    classifier_repeat: int = 1

    def groups(self) -> dict[str, list[PrunableConv]]:
        """Group name -> its convs, both in forward order (a group appears where it starts)."""
        out: dict[str, list[PrunableConv]] = {}
        for c in self.convs:
            out.setdefault(c.group, []).append(c)
        return out

    def widths(self) -> dict[str, int]:
        """Group name -> number of output channels, as the module tree has it now."""
        return {g: convs[0].out_channels for g, convs in self.groups().items()}

    def conv(self, name: str) -> PrunableConv:
        """The entry of the conv with this qualified name."""
        for c in self.convs:
            if c.conv == name:
                return c
        raise KeyError(f"no prunable conv named {name!r}")
