"""CHIP (Sui et al. 2021): score channels by channel independence over a stream of images,
and select the channels to keep.

The CI math lives in `chip_ci`; the authors' per-layer rate strings and their layouts in
`chipprune.budgets.rates`; this module is the model-facing half.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from chipprune.methods.chip_ci import channel_independence, ci_definition
from chipprune.models import ModelSpec

__all__ = [
    "COMBINES",
    "channel_independence",
    "ci_definition",
    "group_scores",
    "score_channels",
    "select_top",
]

@torch.no_grad()
def score_channels(
    model: nn.Module,
    images_uint8_batches: Iterable[Tensor],
    normalise: Callable[[Tensor], Tensor],
    spec: ModelSpec,
) -> dict[str, Tensor]:
    """Conv name -> (C,) float64 mean CI over all images, on the model's device.

    A forward hook on each distinct `score_at` ReLU turns its output (B, C, H, W) into CI
    (B, C) at once and adds the batch sum to a running total, so only one layer's map of one
    batch is alive at a time; convs that share a `score_at` (a residual stream's block output,
    an option-B downsample) share one computation. Eval mode, no grad; modes are restored.
    """
    device = next(model.parameters()).device
    sums: dict[str, Tensor] = {}  # score_at module name -> (C,) running sum over images
    calls: dict[str, int] = {}  # per batch: a score_at ReLU must run exactly once

    def hook(name: str):
        def add_ci(_m: nn.Module, _inp, out: Tensor) -> None:
            ci = channel_independence(out.detach()).sum(0)  # (C,) float64
            sums[name] = ci if name not in sums else sums[name] + ci
            calls[name] = calls.get(name, 0) + 1

        return add_ci

    modules = sorted({c.score_at for c in spec.convs})
    handles = [model.get_submodule(m).register_forward_hook(hook(m)) for m in modules]
    training = {m: m.training for m in model.modules()}
    n_images = 0
    try:
        model.eval()
        for batch in images_uint8_batches:
            calls.clear()
            model(normalise(batch.to(device)))
            n_images += batch.shape[0]
            wrong = {m: calls.get(m, 0) for m in modules if calls.get(m, 0) != 1}
            if wrong:
                raise ValueError(f"score_at modules must run once per forward, ran {wrong}")
    finally:
        for h in handles:
            h.remove()
        for m, flag in training.items():
            m.training = flag
    if n_images == 0:
        raise ValueError("score_channels got no images")
    return {c.conv: sums[c.score_at] / n_images for c in spec.convs}


COMBINES = ("sum", "normalised")


def group_scores(
    per_conv: dict[str, Tensor], spec: ModelSpec, combine: str = "sum"
) -> dict[str, Tensor]:
    """Group -> (C,) CI of its coupled convs combined, each distinct feature map counted once
    (an option-B downsample scores at its block's output, already counted for that block).

    `combine`: "sum" adds the maps' CI as they are; "normalised" first divides each map's CI
    by its mean over channels, so every map weighs the same. Raw CI grows with the map's
    activation scale, and along a residual stream the scale grows block by block, so in a
    plain sum the deepest block's map chooses the stream's channels almost alone. A group
    with one map keeps the same order either way (a positive scale changes no ranking).

    One shared selection per residual stream is what surgery needs, since all convs of a
    group keep the same channels. The authors' code instead selects each block output of a
    stream on its own, from that block's CI alone, which a residual add cannot honour.
    """
    if combine not in COMBINES:
        raise ValueError(f"combine must be one of {COMBINES}, got {combine!r}")
    out: dict[str, Tensor] = {}
    for group, convs in spec.groups().items():
        seen: set[str] = set()
        for c in convs:
            if c.score_at in seen:
                continue
            seen.add(c.score_at)
            ci = per_conv[c.conv]
            if combine == "normalised":
                mean = ci.mean()
                ci = ci / mean if mean > 0 else ci  # an all-zero (dead) map adds nothing
            out[group] = ci if group not in out else out[group] + ci
    return out


def select_top(scores: dict[str, Tensor], widths: dict[str, int]) -> dict[str, list[int]]:
    """Group -> sorted ORIGINAL indices of its `width` highest scores (ties: lower index)."""
    out: dict[str, list[int]] = {}
    for group, width in widths.items():
        s = scores[group].detach().to("cpu", torch.float64)
        if not 1 <= width <= s.numel():
            raise ValueError(f"width {width} of {group!r} must be in [1, {s.numel()}]")
        if bool(torch.isnan(s).any()):
            raise ValueError(f"scores of {group!r} contain NaN")
        order = torch.sort(s, descending=True, stable=True).indices  # equal: lower index first
        out[group] = sorted(order[:width].tolist())
    return out
