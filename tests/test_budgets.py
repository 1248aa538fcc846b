"""Budgets: soft == hard with binary gates, hard == counting of the surgically pruned
model, exact thresholding at every type and target."""

from __future__ import annotations

import pytest
import torch

from chipprune.budgets.counting import measure_cost
from chipprune.budgets.exact import COUNT_TYPES, BudgetModel
from chipprune.budgets.thresholding import keep_at_budget
from chipprune.methods.gates import ChannelGates
from chipprune.models import create_model, list_models
from chipprune.surgery.rebuild import prune_model

SMALL = {"in_channels": 1, "num_classes": 5}


def _small(name):
    kw = dict(SMALL, cifar_stem=True) if name in ("resnet18", "resnet50") else dict(SMALL)
    return create_model(name, **kw), kw


@pytest.mark.parametrize("name", list_models())
def test_hard_budget_equals_counting_of_pruned_model(name):
    torch.manual_seed(0)
    model, kw = _small(name)
    size = (1, 16, 16)
    bm = BudgetModel.from_model(model, size)
    g = torch.Generator().manual_seed(1)
    keep = {k: torch.randperm(w, generator=g)[: max(1, w // 3)].sort().values.tolist()
            for k, w in bm.dense_widths.items()}
    pruned, _ = prune_model(model, name, kw, keep)
    cost = measure_cost(pruned, size)
    widths = {k: len(v) for k, v in keep.items()}
    assert bm.cost("params", widths) == cost.params
    assert bm.cost("flops", widths) == cost.macs


def test_soft_budget_agrees_with_hard_for_binary_gates():
    model = create_model("resnet56")
    bm = BudgetModel.from_model(model, (3, 32, 32))
    gates = ChannelGates.for_model(model)
    g = torch.Generator().manual_seed(0)
    keep = {}
    with torch.no_grad():
        for i, grp in enumerate(gates.groups):
            k = torch.rand(len(gates.zeta[i]), generator=g) < 0.4
            k[0] = True
            keep[grp] = int(k.sum())
            gates.zeta[i].copy_(torch.where(k, 1e3, -1e3))
    gates.steep = 60.0
    soft = gates.soft_counts()
    for kind in COUNT_TYPES:
        hard = bm.fraction(kind, keep)
        # equal up to float32 summation (sigmoid(30) and H(1) are exactly 1 in float32)
        assert float(bm.fraction(kind, soft)) == pytest.approx(hard, rel=1e-6)


def test_soft_budget_is_differentiable():
    model = create_model("vgg16_bn")
    bm = BudgetModel.from_model(model, (3, 32, 32))
    gates = ChannelGates.for_model(model)
    bm.fraction("flops", gates.soft_counts()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in gates.zeta)


def test_channel_and_volume_definitions():
    model = create_model("resnet20")
    bm = BudgetModel.from_model(model, (3, 32, 32))
    half = {g: w // 2 for g, w in bm.dense_widths.items()}
    assert bm.fraction("channel", half) == pytest.approx(0.5)
    assert bm.fraction("volume", half) == pytest.approx(0.5)
    # volume weights layers by output area: stem+layer1 (32x32) dominate
    only_stage3 = {g: (w if g.startswith("layer3") else 1) for g, w in bm.dense_widths.items()}
    convs = model.describe().convs
    n = sum(c.out_channels if c.group.startswith("layer3") else 1 for c in convs)
    assert bm.fraction("channel", only_stage3) == pytest.approx(n / sum(c.out_channels for c in convs))


TARGETS = (0.5, 0.25, 0.125, 0.0625, 0.02)
CASES = [("resnet56", {}, (3, 32, 32)), ("vgg16_bn", {}, (3, 32, 32)), ("resnet50", {}, (3, 224, 224)),
         ("preresnet164", {}, (3, 32, 32))]  # every PreResNet group may vanish: none forced


@pytest.mark.parametrize(("name", "kw", "size"), CASES, ids=[c[0] for c in CASES])
def test_thresholding_meets_every_budget_from_above(name, kw, size):
    model = create_model(name, **kw)
    bm = BudgetModel.from_model(model, size)
    vanishing = {g for br in bm.branches for g in br.groups}
    g = torch.Generator().manual_seed(0)
    removed = 0
    for kind in COUNT_TYPES:
        for target in TARGETS:
            scores = {k: torch.rand(w, generator=g) for k, w in bm.dense_widths.items()}
            r = keep_at_budget(scores, bm, kind, target)
            widths = {k: int(v.sum()) for k, v in r.keep.items()}
            # no layer left empty, except inner groups of a branch removed as a whole
            assert all(w >= 1 for k, w in widths.items() if k not in vanishing)
            for br in bm.branches:
                assert len({widths[k] == 0 for k in br.groups}) == 1, br  # all or none empty
                removed += widths[br.groups[0]] == 0
            assert r.achieved == pytest.approx(float(bm.fraction(kind, widths)))
            assert target <= r.achieved <= target + 0.01, (kind, target, r.achieved)
    # ResNet-56's 2% channel and volume budgets lie below one channel per layer (2.7% and
    # 4.7%): only orphan removal reaches them; VGG has no residual branch to remove
    assert (removed > 0) == (name != "vgg16_bn")


def test_hard_budget_counts_removed_branches_exactly():
    """A branch with an empty group costs nothing: the hard budget equals counting.py on the
    model surgery builds without it, for every budget type's underlying counts."""
    for name, kw in (("resnet20", {"shortcut": "A"}), ("resnet50", dict(SMALL, cifar_stem=True))):
        model = create_model(name, **kw)
        bm = BudgetModel.from_model(model, (3 if name == "resnet20" else 1, 16, 16))
        size = (3, 16, 16) if name == "resnet20" else (1, 16, 16)
        keep = {k: list(range(max(1, w // 2))) for k, w in bm.dense_widths.items()}
        for br in bm.branches[::2]:
            keep[br.groups[-1]] = []  # one empty group removes the branch
        pruned, kwargs = prune_model(model, name, kw, keep)
        assert len(pruned.describe().branches) == len(bm.branches) - len(bm.branches[::2])
        cost = measure_cost(pruned, size)
        widths = {k: len(v) for k, v in keep.items()}
        assert bm.cost("params", widths) == cost.params
        assert bm.cost("flops", widths) == cost.macs
        # channel budget: the removed branches' convs, their last one included, count 0
        live = [c for c in pruned.describe().convs]
        assert bm.cost("channel", widths) == sum(c.out_channels for c in live)
        rebuilt = create_model(name, **kwargs)  # the checkpoint's kwargs rebuild it alone
        assert measure_cost(rebuilt, size) == cost


def test_thresholding_keeps_the_highest_scores():
    model = create_model("resnet20")
    bm = BudgetModel.from_model(model, (3, 32, 32))
    scores = {k: torch.arange(w, dtype=torch.float64) for k, w in bm.dense_widths.items()}
    r = keep_at_budget(scores, bm, "channel", 0.5)
    for k, keep in r.keep.items():
        idx = keep.nonzero().flatten().tolist()
        assert idx == list(range(bm.dense_widths[k] - len(idx), bm.dense_widths[k]))  # top scores


@pytest.mark.parametrize("target", [0.0, -0.1, 1.5])
def test_bad_targets_are_refused(target):
    bm = BudgetModel.from_model(create_model("resnet20"), (3, 32, 32))
    scores = {k: torch.rand(w) for k, w in bm.dense_widths.items()}
    with pytest.raises(ValueError, match="budget target"):
        keep_at_budget(scores, bm, "flops", target)


@pytest.mark.parametrize(("name", "kw", "size"), CASES, ids=[c[0] for c in CASES])
def test_round_to_gives_multiples_and_still_meets_the_budget(name, kw, size):
    """round_to=8: every kept width is a multiple of 8 (or the dense width), the budget is
    met from above within 0.01, except below the floor of one block per layer, where it
    lands exactly on that floor (VGG-16-BN: volume 8.1%, channel 2.5%)."""
    bm = BudgetModel.from_model(create_model(name, **kw), size)
    vanishing = {g for br in bm.branches for g in br.groups}
    g = torch.Generator().manual_seed(3)
    below = []
    for kind in COUNT_TYPES:
        floor = float(bm.fraction(kind, {k: 0 if k in vanishing else min(8, w)
                                         for k, w in bm.dense_widths.items()}))
        for target in TARGETS:
            scores = {k: torch.rand(w, generator=g) for k, w in bm.dense_widths.items()}
            r = keep_at_budget(scores, bm, kind, target, round_to=8)
            widths = {k: int(v.sum()) for k, v in r.keep.items()}
            assert all(w % 8 == 0 or w == bm.dense_widths[k] for k, w in widths.items())
            if target >= floor:
                assert target <= r.achieved <= target + 0.01, (kind, target, r.achieved)
            else:
                assert r.achieved == pytest.approx(floor)
                below.append((kind, target))
    # VGG-16-BN: 13 layers x 8 channels are 2.5% of its 4,224 channels
    vgg = [("channel", 0.02), ("volume", 0.0625), ("volume", 0.02)]
    # PreResNet-164 with every branch removed still has its stem, stage shortcuts and
    # classifier: 2.67% of the params, 2.30% of the FLOPs
    pre = [("params", 0.02), ("flops", 0.02)]
    assert below == {"vgg16_bn": vgg, "preresnet164": pre}.get(name, [])


def test_round_to_keeps_the_best_channels_of_each_group():
    bm = BudgetModel.from_model(create_model("resnet20"), (3, 32, 32))
    scores = {k: torch.arange(w, dtype=torch.float64) for k, w in bm.dense_widths.items()}
    r = keep_at_budget(scores, bm, "channel", 0.5, round_to=4)
    for k, keep in r.keep.items():
        idx = keep.nonzero().flatten().tolist()
        w = bm.dense_widths[k]
        assert len(idx) % 4 == 0 and idx == list(range(w - len(idx), w))
    one = keep_at_budget(scores, bm, "flops", 0.3, round_to=1)
    assert one.keep.keys() == r.keep.keys()
    with pytest.raises(ValueError, match="round_to must be >= 1"):
        keep_at_budget(scores, bm, "flops", 0.3, round_to=0)
