"""Per-layer pruning rates, the form the CHIP authors publish their configurations in
(`[0.]+[0.15]*2+[0.4]*27`), and their layouts: which coupling groups each rate sets, and the
group widths int(C * (1 - rate)) they give. Pure Python (no torch), so params validation
reads rate strings without loading a model library.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from chipprune.models.spec import ModelSpec

__all__ = ["parse_rates", "rates_to_widths"]

CIFAR_RESNETS = ("resnet20", "resnet32", "resnet56", "resnet110")
VGG_MODELS = ("vgg16_bn",)
BOTTLENECK_RESNETS = ("resnet50", "resnet101")


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
