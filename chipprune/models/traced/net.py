"""`TracedNet`: any traceable CNN as a `PrunableNet`, described from its torch.fx graph.

Built from its arch string and plain kwargs alone, so a checkpoint rebuilds it without
unpickling code: the factory builds the dense network, torch.fx traces it, the description
is read off the graph, and where the kwargs carry `widths` / `kept` the same slicing that
surgery applies to a trained state dict is applied to the fresh network, giving a model
whose state dict the pruned checkpoint's fits.
"""

from __future__ import annotations

from typing import Any

import torch

from chipprune.models.base import GroupWidths, PrunableNet
from chipprune.models.slicing import slice_in_place, slice_plan
from chipprune.models.spec import ModelSpec

from .factory import build_dense
from .graph import TraceError, describe_graph, trace

PROBE_SIZE = 64  # the image side the graph's shapes are read at (not the training size)
NET = "net"  # the GraphModule's name: every described module is "net.<its own name>"


class TracedNet(PrunableNet):
    """arch: `torchvision:<builder>` or `<module>:<callable>`; kwargs go to the factory.

    `probe_size` is the image side the network is traced at; set it where the network only
    runs at one size (a classifier over a flattened map of fixed size). `adapted_conv` names
    the first conv replaced to read `in_channels` (None where the factory took them).
    """

    WEIGHTS_PREFIX = f"{NET}."

    def __init__(
        self,
        arch: str,
        num_classes: int = 10,
        in_channels: int = 3,
        probe_size: int = PROBE_SIZE,
        widths: dict[str, int] | None = None,
        kept: dict[str, list[int]] | None = None,
        **kwargs: Any,
    ):
        super().__init__()
        self.arch = arch
        dense, adapted = build_dense(arch, num_classes, in_channels, kwargs)
        self.adapted_conv = adapted
        example = torch.zeros(1, in_channels, probe_size, probe_size)
        try:
            self.net = trace(dense)
            described = describe_graph(self.net, example, f"{NET}.")
        except TraceError as e:
            raise TraceError(f"arch {arch!r}: {e}") from None
        self._spec: ModelSpec = described.spec
        self._stem = f"{NET}.{described.stem}"
        # conv -> why it keeps every channel (its group reaches a concat, a grouped conv ...)
        self.kept_whole = described.kept_whole
        if widths or kept:
            self._prune_in_place(widths, kept)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def _stem_conv(self) -> str:
        return self._stem  # found while tracing: the conv the image placeholder feeds

    def _prune_in_place(self, widths, kept) -> None:
        resolve = GroupWidths(widths, kept)
        dense = self.describe().widths()
        for group, width in dense.items():
            resolve(group, width)
        resolve.check_all_used()
        pos = {g: torch.tensor(resolve.kept(g), dtype=torch.long) for g in dense}
        slice_in_place(self, slice_plan(self, pos))
