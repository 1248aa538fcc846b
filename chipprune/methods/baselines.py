"""Baseline channel scores, turned into masks by the same global thresholding as every
method (so they meet the same budget, from above):

- random: i.i.d. uniform scores -> a random allocation across layers, random channels.
- l1: the L1 norm of each output filter (Li et al. 2017; a channel selection's BN |gamma|),
  summed over the convs of a coupling group and divided by the group's mean, so layers of different scale compete
  on relative importance in the global rank.
- uniform: the same keep-rate in every layer (channels by L1 within each layer): a score
  of 1 - rank/C per group makes one global threshold keep the same fraction everywhere.
- tp_magnitude, tp_taylor, tp_bn_scale: Torch-Pruning's criteria (chipprune.methods.peers).
- fastnas: ModelOpt's FastNAS, which searches for its masks instead of scoring channels
  (chipprune.methods.fastnas; stages.baseline_masks runs it).
"""

from __future__ import annotations

import torch

from chipprune.methods.peers import PEER_CRITERIA, tp_scores
from chipprune.models import ChannelSelect, PrunableConv, PrunableNet

OWN_BASELINES = ("random", "l1", "uniform")
SEARCHES = ("fastnas",)  # peers that search for their masks under the budget
BASELINES = (*OWN_BASELINES, *PEER_CRITERIA, *SEARCHES)


def random_scores(widths: dict[str, int], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {group: torch.rand(w, generator=g, dtype=torch.float64) for group, w in widths.items()}


@torch.no_grad()
def l1_scores(model: PrunableNet) -> dict[str, torch.Tensor]:
    spec = model.describe()
    out: dict[str, torch.Tensor] = {}
    for group, convs in spec.groups().items():
        total = sum(_l1(model, c) for c in convs)  # (C,)
        out[group] = total / total.mean().clamp_min(1e-12)
    return out


def _l1(model: PrunableNet, c: PrunableConv) -> torch.Tensor:
    """(C,) L1 norm of each output filter; a channel selection has no filter, so its BN's
    |gamma| stands in (network slimming's own criterion for these channels)."""
    conv = model.get_submodule(c.conv)
    if isinstance(conv, ChannelSelect):
        return model.get_submodule(c.bn).weight.detach().abs().double().cpu()
    return conv.weight.detach().abs().double().sum(dim=(1, 2, 3)).cpu()


def uniform_scores(within: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rank-quantile scores: the best channel of each group scores 1, the worst 1/C."""
    out = {}
    for group, s in within.items():
        c = s.numel()
        order = torch.sort(-s.double(), stable=True).indices  # best first
        q = torch.empty(c, dtype=torch.float64)
        q[order] = 1.0 - torch.arange(c, dtype=torch.float64) / c
        out[group] = q
    return out


def baseline_scores(method: str, model: PrunableNet, seed: int = 0) -> dict[str, torch.Tensor]:
    if method == "random":
        return random_scores(model.describe().widths(), seed)
    if method == "l1":
        return l1_scores(model)
    if method == "uniform":
        return uniform_scores(l1_scores(model))
    if method in PEER_CRITERIA:  # tp_taylor: the caller has filled the weights' .grad
        return tp_scores(model, method)
    if method in SEARCHES:
        raise ValueError(f"{method} searches for its masks (chipprune.methods.fastnas); "
                         "it gives no channel scores")
    raise ValueError(f"unknown baseline {method!r}; allowed: {', '.join(BASELINES)}")
