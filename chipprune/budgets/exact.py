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

A fifth type, latency, is the model's predicted time on a target device and batch size from
a per-layer table of measured times (`chipprune.budgets.latency_table`): a BudgetModel carries one
only when given (`from_model(..., latency=table)`); asking for it otherwise is an error that
names the missing table.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from chipprune.budgets.counting import conv_feature_sizes, measure_cost
from chipprune.budgets.latency_table import LatencyTable
from chipprune.models import Branch, PrunableNet
from chipprune.models.slicing import GROUPED

COUNT_TYPES = ("channel", "volume", "params", "flops")  # exact polynomials in the widths
BUDGET_TYPES = (*COUNT_TYPES, "latency")  # latency: only with a latency table

Width = torch.Tensor | float | int


@dataclass(frozen=True)
class Term:
    """coef * width[out] * width[inp] * alive(when); a None group contributes a factor of 1.

    `when` holds the groups of the removable residual branch the term belongs to: the
    branch exists only while each of them keeps a channel (orphan removal). alive is 1 or 0
    for integer widths and prod(min(width, 1)) for soft counts, which is 1 for the usual
    soft widths (>= 1) and goes to 0 with them, so it stays differentiable."""

    coef: float
    out: str | None
    inp: str | None
    when: tuple[str, ...] = ()


class BudgetModel:
    """Costs of one architecture as functions of its group widths."""

    def __init__(
        self,
        terms: dict[str, list[Term]],
        dense_widths: dict[str, int],
        branches: tuple[Branch, ...] = (),
        latency: LatencyTable | None = None,
    ):
        self.terms = terms
        self.dense_widths = dict(dense_widths)
        self.groups = list(self.dense_widths)  # the order of a width vector
        self.branches = branches  # removable residual branches: their groups may be empty
        self._compiled = {kind: self._compile(ts) for kind, ts in terms.items()}
        self.latency = latency  # a LatencyTable, or None: no latency budget
        self.types = COUNT_TYPES + (("latency",) if latency is not None else ())
        self.dense = {kind: float(self.cost(kind, dense_widths)) for kind in self.types}

    def _compile(self, terms: list[Term]) -> tuple[torch.Tensor, ...]:
        """The terms as index tensors, so a cost is a few vector ops (ChipNet evaluates the
        soft budget every step): slot len(groups) of the width vector holds the constant 1."""
        slot = {g: i for i, g in enumerate(self.groups)}
        one = len(self.groups)
        k = max([len(t.when) for t in terms] + [1])
        coef = torch.tensor([float(t.coef) for t in terms], dtype=torch.float64)
        out = torch.tensor([slot[t.out] if t.out else one for t in terms], dtype=torch.long)
        inp = torch.tensor([slot[t.inp] if t.inp else one for t in terms], dtype=torch.long)
        when = torch.tensor(
            [[slot[g] for g in t.when] + [one] * (k - len(t.when)) for t in terms],
            dtype=torch.long,
        ).view(len(terms), k)
        return coef, out, inp, when

    @classmethod
    def from_model(
        cls, model: PrunableNet, input_size: tuple[int, int, int],
        latency: LatencyTable | None = None,
    ) -> BudgetModel:
        """The budgets of a dense `model` at `input_size` (C, H, W); with a `latency` table
        (checked against the model and input size) the latency budget too."""
        if latency is not None:
            latency.check_model(model, input_size)
        spec = model.describe()
        # conv name -> Hout * Wout
        areas = {n: o[0] * o[1] for n, (_, o) in conv_feature_sizes(model, input_size).items()}
        conv_groups = {c.conv: (c.group, c.in_group) for c in spec.convs}
        # outputs never pruned, or following a group without a gate (out_group)
        conv_groups |= {f.conv: (f.out_group, f.in_group) for f in spec.fixed}
        bn_groups = {c.bn: c.group for c in spec.convs if c.bn != c.conv}
        # conv or BN name -> the groups its branch needs (empty outside removable branches)
        when = {c.conv: () for c in spec.convs} | {c.bn: () for c in spec.convs}
        for br in spec.branches:
            for conv in br.convs:
                when[conv] = when[spec.conv(conv).bn] = br.groups
            when |= dict.fromkeys(br.also, br.groups)  # e.g. a pre-activation BN, a FixedConv
        params: list[Term] = []
        macs: list[Term] = []
        for name, m in model.named_modules():
            own = [p for p in m.parameters(recurse=False)]
            if not own:
                continue
            if isinstance(m, nn.Conv2d) and name in conv_groups:
                out, inp = conv_groups[name]
                k = m.kernel_size[0] * m.kernel_size[1]
                if _is_depthwise(m, out, inp):  # channel i reads only input i: k * width
                    inp, k_in = None, k
                elif m.groups != 1 and (out is not None or inp is not None):
                    raise ValueError(f"{name}: {GROUPED}")
                else:  # (a grouped conv here has fixed input and output: a constant)
                    # the image (a fixed input) is not pruned
                    k_in = k if inp is not None else k * m.in_channels // m.groups
                n_out = 1 if out is not None else m.out_channels  # a FixedConv's are constant
                on = when.get(name, ())
                params.append(Term(k_in * n_out, out, inp, on))
                macs.append(Term(k_in * n_out * areas[name], out, inp, on))
                if m.bias is not None:
                    params.append(Term(n_out, out, None, on))
                    macs.append(Term(n_out * areas[name], out, None, on))
            elif isinstance(m, nn.BatchNorm2d) and name in bn_groups:
                params.append(Term(2, bn_groups[name], None, when[name]))
            elif isinstance(m, nn.Linear) and name == spec.classifier:
                # per channel of its group: classifier_repeat inputs (a flattened map)
                n_in = spec.classifier_repeat if spec.classifier_in_group else m.in_features
                params.append(Term(m.out_features * n_in, spec.classifier_in_group, None))
                macs.append(Term(m.out_features * n_in, spec.classifier_in_group, None))
                if m.bias is not None:
                    params.append(Term(m.out_features, None, None))
            else:  # not touched by pruning: a constant
                params.append(Term(sum(p.numel() for p in own), None, None, when.get(name, ())))
                if isinstance(m, nn.Linear):
                    macs.append(Term(m.in_features * m.out_features, None, None))
                elif isinstance(m, nn.Conv2d):
                    raise ValueError(f"{name}: a conv outside the model's description")
        channel = [Term(1, c.group, None, when[c.conv]) for c in spec.convs]
        volume = [Term(areas[c.conv], c.group, None, when[c.conv]) for c in spec.convs]
        bm = cls({"channel": channel, "volume": volume, "params": params, "flops": macs},
                 spec.widths(), spec.branches, latency)
        # The polynomial must reproduce the counter exactly, or a budget would lie.
        cost = measure_cost(model, input_size)
        if (bm.dense["params"], bm.dense["flops"]) != (cost.params, cost.macs):
            raise RuntimeError(
                f"budget model of {type(model).__name__} disagrees with counting: "
                f"{bm.dense['params']}/{bm.dense['flops']} vs {cost.params}/{cost.macs}"
            )
        return bm

    def cost(self, kind: str, widths: Mapping[str, Width] | torch.Tensor) -> Width:
        """Sum of the kind's terms at `widths`: group -> width, or a (G,) vector in
        `self.groups` order. Integer widths give an exact float (float64 sums of integers
        below 2^53); floating tensors give a differentiable tensor of their dtype.
        latency: predicted ms (`LatencyTable.predict_ms`), exact table sums at grid widths."""
        if kind == "latency" and self.latency is None:
            raise ValueError(
                "budget type 'latency' needs a latency table (runs/latency/<runtime>-<device>-bs<batch>-"
                "<dataset>-<model>/table.json, made by the profile_latency stage), and this "
                "budget model was built without one"
            )
        if kind not in self._compiled and kind != "latency":
            raise ValueError(f"unknown budget type {kind!r}; allowed: {', '.join(BUDGET_TYPES)}")
        if isinstance(widths, torch.Tensor):
            w, soft = widths, widths.is_floating_point()
        else:
            vals = [widths[g] for g in self.groups]
            soft = any(isinstance(v, torch.Tensor) and v.is_floating_point() for v in vals)
            w = torch.stack([torch.as_tensor(v) for v in vals]) if soft else torch.tensor(
                [int(v) for v in vals], dtype=torch.float64
            )
        w = w.to(torch.float64) if not soft else w
        if kind == "latency":
            total = self.latency.predict_ms(w, self.groups)
            return total if soft else float(total)
        coef, out, inp, when = self._compiled[kind]
        ext = torch.cat([w, w.new_ones(1)])  # (G + 1,): the last slot is the constant 1
        coef = coef.to(device=w.device, dtype=w.dtype)
        out, inp, when = out.to(w.device), inp.to(w.device), when.to(w.device)
        # alive = min(width, 1): 1 or 0 for integer widths, smooth for soft counts
        alive = ext.clamp(max=1.0)[when].prod(dim=1)  # (T,)
        total = (coef * ext[out] * ext[inp] * alive).sum()
        return total if soft else float(total)

    def fraction(self, kind: str, widths: Mapping[str, Width]) -> Width:
        """Cost relative to the dense model: the budget's value, in (0, 1]."""
        return self.cost(kind, widths) / self.dense[kind]


def _is_depthwise(m: nn.Conv2d, group: str | None, in_group: str | None) -> bool:
    """A depthwise conv: its output channels are its input channels (one group in the spec)."""
    return group is not None and group == in_group and m.groups == m.in_channels == m.out_channels


