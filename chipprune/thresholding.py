"""The one routine that turns per-channel scores into keep-masks at a budget, for every
method: rank all channels globally, keep the best of each group (no layer left empty),
then add channels in rank order until the exact (hard) budget is met from above.

Orphan removal (ChipNet): the groups of a removable residual branch (`ModelSpec.branches`)
are not guaranteed a channel. When one of them ends up empty the whole branch goes, its
other groups are emptied too, and the hard budget (`Term.when`) no longer counts it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from chipprune.budgets import BudgetModel


@dataclass(frozen=True)
class KeepResult:
    keep: dict[str, torch.Tensor]  # group -> (C,) bool
    achieved: float  # hard budget of `keep`, >= target unless target is below the minimum
    target: float


def keep_at_budget(
    scores: dict[str, torch.Tensor],
    budget: BudgetModel,
    kind: str,
    target: float,
    tolerance: float = 0.01,
) -> KeepResult:
    """Keep-masks whose hard `kind` budget is the smallest value >= target reachable by
    adding channels in descending score order (ties: group order, then channel index).

    One channel of a wide residual stream can cost several percent of a volume budget; if
    the channel that crosses the target overshoots by more than `tolerance`, the channels
    after it in rank order are tried instead, each taken if it keeps the budget within
    target + tolerance, until the target is met."""
    if not 0.0 < target <= 1.0:
        raise ValueError(f"budget target must be in (0, 1], got {target}")
    groups = list(budget.dense_widths)
    missing = set(groups) - set(scores)
    if missing:
        raise ValueError(f"scores missing for groups {sorted(missing)}")
    for g in groups:
        if scores[g].shape != (budget.dense_widths[g],):
            raise ValueError(f"scores[{g!r}] has shape {tuple(scores[g].shape)}, "
                             f"expected ({budget.dense_widths[g]},)")

    flat = torch.cat([scores[g].detach().double().cpu() for g in groups])  # (N,)
    gid = torch.cat([torch.full((budget.dense_widths[g],), i) for i, g in enumerate(groups)])
    # Stable sort on -score keeps (group order, index) order among ties.
    order = torch.sort(-flat, stable=True).indices
    forced = torch.zeros_like(flat, dtype=torch.bool)
    vanishing = {g for br in budget.branches for g in br.groups}
    # the best channel of every group outside removable branches is always kept
    seen = {i for i, g in enumerate(groups) if g in vanishing}
    for j in order.tolist():
        if int(gid[j]) not in seen:
            seen.add(int(gid[j]))
            forced[j] = True
    rest = order[~forced[order]]

    def widths_at(m: int) -> dict[str, int]:
        counts = torch.bincount(gid[forced], minlength=len(groups))
        counts += torch.bincount(gid[rest[:m]], minlength=len(groups))
        return {g: int(c) for g, c in zip(groups, counts, strict=True)}

    def value(m: int) -> float:
        return float(budget.fraction(kind, widths_at(m)))

    lo, hi = 0, len(rest)  # smallest m with value(m) >= target; value is monotone in m
    if value(lo) >= target:
        hi = lo
    while lo < hi:
        mid = (lo + hi) // 2
        if value(mid) >= target:
            hi = mid
        else:
            lo = mid + 1
    chosen = forced.clone()
    chosen[rest[:hi]] = True
    if hi > 0 and value(hi) > target + tolerance:
        chosen[rest[hi - 1]] = False
        counts = widths_at(hi - 1)
        for j in rest[hi:].tolist():
            g = groups[int(gid[j])]
            counts[g] += 1
            v = float(budget.fraction(kind, counts))
            if v > target + tolerance:
                counts[g] -= 1
                continue
            chosen[j] = True
            if v >= target:
                break
        else:  # nothing small enough fills the gap: fall back to the crossing channel
            chosen = forced.clone()
            chosen[rest[:hi]] = True
    keep, start = {}, 0
    for g in groups:
        n = budget.dense_widths[g]
        keep[g] = chosen[start : start + n].clone()
        start += n
    for br in budget.branches:  # a branch with an empty group goes as a whole
        if any(not keep[g].any() for g in br.groups):
            for g in br.groups:
                keep[g].zero_()
    achieved = float(budget.fraction(kind, {g: int(k.sum()) for g, k in keep.items()}))
    return KeepResult(keep=keep, achieved=achieved, target=target)
