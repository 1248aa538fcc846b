"""CHIP (Sui et al. 2021): score channels by channel independence over a stream of images,
turn the authors' per-layer rates into group widths, and select the channels to keep.

The CI math lives in `chip_ci`; this module is the model-facing half.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

from chipprune.methods.chip_ci import channel_independence, ci_definition
from chipprune.models import ModelSpec

__all__ = [
    "COMBINES",
    "channel_independence",
    "ci_definition",
    "group_scores",
    "parse_rates",
    "rates_to_widths",
    "score_channels",
    "select_top",
]

CIFAR_RESNETS = ("resnet20", "resnet32", "resnet56", "resnet110")
VGG_MODELS = ("vgg16_bn",)
BOTTLENECK_RESNETS = ("resnet50", "resnet101")


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


_FLOAT = r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?"
_TERM = re.compile(rf"\[\s*({_FLOAT}(?:\s*,\s*{_FLOAT})*)\s*,?\s*\](?:\s*\*\s*(\d+))?")


def parse_rates(text_or_list: str | Sequence[float]) -> list[float]:
    """Per-layer pruning rates from a list of numbers or the authors' string form
    `[0.]+[0.15]*2+[0.4]*27`: terms `[x]`, `[x, y, ...]` or `[x]*n` joined by `+` (parsed
    by a regular expression, never evaluated). Every rate must lie in [0, 1)."""
    if isinstance(text_or_list, str):
        rates: list[float] = []
        for piece in text_or_list.split("+"):
            m = _TERM.fullmatch(piece.strip())
            if m is None:
                raise ValueError(
                    f"bad rates term {piece.strip()!r} in {text_or_list!r}; expected terms "
                    "like [0.4] or [0.4]*27 joined by +"
                )
            values = [float(v) for v in m.group(1).split(",")]
            rates += values * (int(m.group(2)) if m.group(2) is not None else 1)
    else:
        bad = [v for v in text_or_list if isinstance(v, bool) or not isinstance(v, int | float)]
        if bad:
            raise ValueError(f"rates must be numbers, got {bad}")
        rates = [float(v) for v in text_or_list]
    out_of_range = [(i, r) for i, r in enumerate(rates) if not 0.0 <= r < 1.0]
    if out_of_range:
        raise ValueError(f"rates must lie in [0, 1); (index, rate) {out_of_range}")
    if not rates:
        raise ValueError("no rates given")
    return rates


def cifar_resnet_rate_groups(spec: ModelSpec) -> list[list[str]]:
    """The authors' ResNet-56/110 layout: one entry per rate, the groups it sets.

    [stem, layer1 .. layer{S-1} streams, then each block's inner conv in forward order]; the
    last stage's stream is never pruned. With option-B shortcuts the stem is in layer1's
    group, so the stem rate and the layer1 rate must agree (checked by the caller).
    """
    groups = spec.groups()
    streams = sorted({g for g in groups if re.fullmatch(r"layer\d+", g)})
    inner = [c.group for c in spec.convs if re.fullmatch(r"layer\d+\.\d+\.conv1", c.conv)]
    stem = next(c.group for c in spec.convs if c.in_group is None)
    return [[stem]] + [[s] for s in streams[:-1]] + [[g] for g in inner]


def bottleneck_resnet_rate_groups(spec: ModelSpec) -> list[list[str]]:
    """The authors' ResNet-50 layout: one entry per rate, the groups it sets.

    [stem, the layer1 .. layer3 streams, then one rate per bottleneck in forward order that
    sets both its conv1 and conv2]; layer4's stream (the classifier's input) is never pruned.
    """
    groups = spec.groups()
    streams = sorted(g for g in groups if re.fullmatch(r"layer\d+", g))[:-1]
    blocks = [g[: -len(".conv1")] for g in groups if re.fullmatch(r"layer\d+\.\d+\.conv1", g)]
    return [["conv1"], *([s] for s in streams), *([f"{b}.conv1", f"{b}.conv2"] for b in blocks)]


def rates_to_widths(
    model_spec: ModelSpec, rates: str | Sequence[float], model_name: str
) -> dict[str, int]:
    """Group -> width = int(C * (1 - rate)) for the authors' rate layouts (groups without a
    rate stay dense): CIFAR ResNets as in `cifar_resnet_rate_groups`, VGG-16-BN one rate per
    conv (13, or 12 meaning the last conv stays dense), ResNet-50 (and -101, the same
    pattern) as in `bottleneck_resnet_rate_groups`."""
    rates = parse_rates(rates)
    dense = model_spec.widths()
    if model_name in CIFAR_RESNETS:
        layout = cifar_resnet_rate_groups(model_spec)
        blocks = sum(1 for (g,) in layout if g.endswith(".conv1"))
        if len(rates) != len(layout):
            raise ValueError(
                f"{model_name} takes {len(layout)} rates (1 stem, {len(layout) - 1 - blocks} "
                f"stage streams, {blocks} blocks), got {len(rates)}"
            )
    elif model_name in BOTTLENECK_RESNETS:
        layout = bottleneck_resnet_rate_groups(model_spec)
        blocks = len(layout) - 4
        if len(rates) != len(layout):
            raise ValueError(
                f"{model_name} takes {len(layout)} rates (1 stem, 3 stage streams, {blocks} "
                f"bottlenecks), got {len(rates)}"
            )
    elif model_name in VGG_MODELS:
        layout = [[c.group] for c in model_spec.convs]
        if len(rates) not in (len(layout), len(layout) - 1):
            raise ValueError(
                f"{model_name} takes {len(layout)} rates, or {len(layout) - 1} with the last "
                f"conv dense, got {len(rates)}"
            )
    else:
        raise ValueError(
            f"no CHIP rate layout for model {model_name!r}; known: "
            f"{CIFAR_RESNETS + VGG_MODELS + BOTTLENECK_RESNETS}"
        )
    widths: dict[str, int] = dict(dense)
    rate_of: dict[str, float] = {}
    for groups, rate in zip(layout, rates, strict=False):
        for g in groups:
            if g in rate_of and rate_of[g] != rate:
                raise ValueError(
                    f"group {g!r} gets two rates ({rate_of[g]} and {rate}): with option-B "
                    "shortcuts the stem is coupled to layer1, so their rates must agree"
                )
            rate_of[g] = rate
            width = int(dense[g] * (1.0 - rate))
            if width < 1:
                raise ValueError(f"rate {rate} leaves no channel of {g!r} ({dense[g]} channels)")
            widths[g] = width
    return widths


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
