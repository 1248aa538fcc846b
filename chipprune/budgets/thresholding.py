"""The one routine that turns per-channel scores into keep-masks at a budget, for every
method: rank all channels globally, keep the best of each group (no layer left empty),
then add channels in rank order until the exact (hard) budget is met from above.

Orphan removal (ChipNet): the groups of a removable residual branch (`ModelSpec.branches`)
are not guaranteed a channel. When one of them ends up empty the whole branch goes, its
other groups are emptied too, and the hard budget (`Term.when`) no longer counts it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from chipprune.budgets.exact import BudgetModel


@dataclass(frozen=True)
class KeepResult:
    keep: dict[str, torch.Tensor]  # group -> (C,) bool
    achieved: float  # hard budget of `keep`, >= target unless target is below the minimum
    target: float


def _units(scores: dict[str, torch.Tensor], groups: list[str], round_to: int):
    """The items the ranking moves: per group, its channels by descending score cut into
    blocks of `round_to` (the last block of a group whose width is not a multiple is
    smaller, so the dense width stays reachable). Returns per unit: score (the mean of its
    channels'), group id, size, and the channel indices it holds."""
    unit_score, unit_gid, unit_size, members = [], [], [], []
    for i, g in enumerate(groups):
        s = scores[g].detach().double().cpu()
        idx = torch.sort(-s, stable=True).indices  # ties: lower channel index first
        for start in range(0, len(idx), round_to):
            block = idx[start : start + round_to]
            # a block never outranks the block before it: means of a sorted list descend
            unit_score.append(float(s[block].mean()))
            unit_gid.append(i)
            unit_size.append(len(block))
            members.append(block)
    return (torch.tensor(unit_score, dtype=torch.float64), torch.tensor(unit_gid),
            torch.tensor(unit_size), members)


def keep_at_budget(
    scores: dict[str, torch.Tensor],
    budget: BudgetModel,
    kind: str,
    target: float,
    tolerance: float = 0.01,
    round_to: int = 1,
) -> KeepResult:
    """Keep-masks whose hard `kind` budget is the smallest value >= target reachable by
    adding channels in descending score order (ties: group order, then channel index).

    One channel of a wide residual stream can cost several percent of a volume budget; if
    the channel that crosses the target overshoots by more than `tolerance`, the channels
    after it in rank order are tried instead, each taken if it keeps the budget within
    target + tolerance, until the target is met.

    `round_to` > 1: hardware-friendly widths. Channels move in blocks of `round_to` (the
    best ones of a group first, a block ranked by its mean score), so every kept width is a
    multiple of `round_to` or the group's dense width; the budget is still met from above."""
    if not 0.0 < target <= 1.0:
        raise ValueError(f"budget target must be in (0, 1], got {target}")
    if round_to < 1:
        raise ValueError(f"round_to must be >= 1, got {round_to}")
    groups = list(budget.dense_widths)
    missing = set(groups) - set(scores)
    if missing:
        raise ValueError(f"scores missing for groups {sorted(missing)}")
    for g in groups:
        if scores[g].shape != (budget.dense_widths[g],):
            raise ValueError(f"scores[{g!r}] has shape {tuple(scores[g].shape)}, "
                             f"expected ({budget.dense_widths[g]},)")

    flat, gid, size, members = _units(scores, groups, round_to)  # (U,) each
    # Stable sort on -score keeps (group order, rank in group) order among ties.
    order = torch.sort(-flat, stable=True).indices
    forced = torch.zeros_like(flat, dtype=torch.bool)
    vanishing = {g for br in budget.branches for g in br.groups}
    # the best unit of every group outside removable branches is always kept
    seen = {i for i, g in enumerate(groups) if g in vanishing}
    for j in order.tolist():
        if int(gid[j]) not in seen:
            seen.add(int(gid[j]))
            forced[j] = True
    rest = order[~forced[order]]

    def widths_at(m: int) -> dict[str, int]:
        # index_add, not bincount: bincount of an empty index (no forced unit, when every
        # group may vanish, as in PreResNet-164) returns int64 whatever the weights
        counts = torch.zeros(len(groups), dtype=torch.float64)
        counts.index_add_(0, gid[forced], size[forced].double())
        counts.index_add_(0, gid[rest[:m]], size[rest[:m]].double())
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
        blocked = set()
        for j in rest[hi:].tolist():
            g = groups[int(gid[j])]
            # a group's units go in rank order: one skipped blocks the rest of its group
            if g in blocked:
                continue
            counts[g] += int(size[j])
            v = float(budget.fraction(kind, counts))
            if v > target + tolerance:
                counts[g] -= int(size[j])
                blocked.add(g)
                continue
            chosen[j] = True
            if v >= target:
                break
        else:  # nothing small enough fills the gap: fall back to the crossing unit
            chosen = forced.clone()
            chosen[rest[:hi]] = True
    keep = {g: torch.zeros(budget.dense_widths[g], dtype=torch.bool) for g in groups}
    for j in chosen.nonzero().flatten().tolist():
        keep[groups[int(gid[j])]][members[j]] = True
    for br in budget.branches:  # a branch with an empty group goes as a whole
        if any(not keep[g].any() for g in br.groups):
            for g in br.groups:
                keep[g].zero_()
    achieved = float(budget.fraction(kind, {g: int(k.sum()) for g, k in keep.items()}))
    return KeepResult(keep=keep, achieved=achieved, target=target)
