"""Budgets as exact polynomials in the per-group widths: channel, volume, params and flops.

One `BudgetModel` serves both forms. Fed soft channel counts (differentiable in ChipNet's
gates) it is the soft budget; fed integer widths it is the hard budget, and that equals
`counting.measure_cost` of the model surgery produces (params and MACs under the project's
counting convention, BN, bias and classifier included). With binary gates the two agree
by construction.

Deviation from the ChipNet authors' code: their params/flops budgets count conv weights
only (sum n_l n_prev k^2 [A_l]); ours count the whole pruned model, so a "25% params"
budget is 25% of what counting.py reports. Channel and volume follow their definitions:
sum n_l / sum C_l and sum n_l A_l / sum C_l A_l over prunable convs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from chipprune.counting import forward_zero_image, measure_cost
from chipprune.models import PrunableNet

BUDGET_TYPES = ("channel", "volume", "params", "flops")

Width = torch.Tensor | float | int


@dataclass(frozen=True)
class Term:
    """coef * width[out] * width[inp]; a None group contributes a factor of 1."""

    coef: float
    out: str | None
    inp: str | None


class BudgetModel:
    """Costs of one architecture as functions of its group widths."""

    def __init__(self, terms: dict[str, list[Term]], dense_widths: dict[str, int]):
        self.terms = terms
        self.dense_widths = dict(dense_widths)
        self.dense = {kind: float(self.cost(kind, dense_widths)) for kind in BUDGET_TYPES}

    @classmethod
    def from_model(cls, model: PrunableNet, input_size: tuple[int, int, int]) -> BudgetModel:
        spec = model.describe()
        areas = _output_areas(model, input_size)  # module name -> Hout * Wout
        conv_groups = {c.conv: (c.group, c.in_group) for c in spec.convs}
        bn_groups = {c.bn: c.group for c in spec.convs}
        params: list[Term] = []
        macs: list[Term] = []
        for name, m in model.named_modules():
            own = [p for p in m.parameters(recurse=False)]
            if not own:
                continue
            if isinstance(m, nn.Conv2d) and name in conv_groups:
                if m.groups != 1:
                    raise ValueError(f"{name}: grouped convs are not supported by budgets")
                out, inp = conv_groups[name]
                k = m.kernel_size[0] * m.kernel_size[1]
                k_in = k if inp is not None else k * m.in_channels  # the image is not pruned
                params.append(Term(k_in, out, inp))
                macs.append(Term(k_in * areas[name], out, inp))
                if m.bias is not None:
                    params.append(Term(1, out, None))
                    macs.append(Term(areas[name], out, None))
            elif isinstance(m, nn.BatchNorm2d) and name in bn_groups:
                params.append(Term(2, bn_groups[name], None))
            elif isinstance(m, nn.Linear) and name == spec.classifier:
                params.append(Term(m.out_features, spec.classifier_in_group, None))
                macs.append(Term(m.out_features, spec.classifier_in_group, None))
                if m.bias is not None:
                    params.append(Term(m.out_features, None, None))
            else:  # not touched by pruning: a constant
                params.append(Term(sum(p.numel() for p in own), None, None))
                if isinstance(m, nn.Linear):
                    macs.append(Term(m.in_features * m.out_features, None, None))
                elif isinstance(m, nn.Conv2d):
                    raise ValueError(f"{name}: a conv outside the model's description")
        channel = [Term(1, c.group, None) for c in spec.convs]
        volume = [Term(areas[c.conv], c.group, None) for c in spec.convs]
        bm = cls({"channel": channel, "volume": volume, "params": params, "flops": macs},
                 spec.widths())
        # The polynomial must reproduce the counter exactly, or a budget would lie.
        cost = measure_cost(model, input_size)
        if (bm.dense["params"], bm.dense["flops"]) != (cost.params, cost.macs):
            raise RuntimeError(
                f"budget model of {type(model).__name__} disagrees with counting: "
                f"{bm.dense['params']}/{bm.dense['flops']} vs {cost.params}/{cost.macs}"
            )
        return bm

    def cost(self, kind: str, widths: Mapping[str, Width]) -> Width:
        if kind not in self.terms:
            raise ValueError(f"unknown budget type {kind!r}; allowed: {', '.join(BUDGET_TYPES)}")
        total: Width = 0.0
        for t in self.terms[kind]:
            a = widths[t.out] if t.out is not None else 1
            b = widths[t.inp] if t.inp is not None else 1
            total = total + t.coef * a * b
        return total

    def fraction(self, kind: str, widths: Mapping[str, Width]) -> Width:
        """Cost relative to the dense model: the budget's value, in (0, 1]."""
        return self.cost(kind, widths) / self.dense[kind]


def _output_areas(model: nn.Module, input_size: tuple[int, int, int]) -> dict[str, int]:
    areas: dict[str, int] = {}
    handles = [
        m.register_forward_hook(
            lambda _m, _i, out, name=name: areas.__setitem__(name, out.shape[-1] * out.shape[-2])
        )
        for name, m in model.named_modules()
        if isinstance(m, nn.Conv2d)
    ]
    try:
        forward_zero_image(model, input_size)
    finally:
        for h in handles:
            h.remove()
    return areas
