"""Baselines meet the budget exactly as the methods do, with their defining properties."""

from __future__ import annotations

import pytest
import torch

from chipprune.budgets.exact import COUNT_TYPES, BudgetModel
from chipprune.budgets.thresholding import keep_at_budget
from chipprune.methods.baselines import (
    BASELINES,
    SEARCHES,
    baseline_scores,
    l1_scores,
    uniform_scores,
)
from chipprune.methods.peers import accumulate_gradients
from chipprune.models import create_model


@pytest.fixture(scope="module")
def resnet56():
    torch.manual_seed(0)
    model = create_model("resnet56")
    for m in model.modules():  # BN scales as training leaves them, not all 1 (tp_bn_scale)
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(0.2, 1.5)
    batch = (torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8), torch.arange(8))
    accumulate_gradients(model, [batch], lambda x: x.float() / 255 - 0.5)  # for tp_taylor
    return model, BudgetModel.from_model(model, (3, 32, 32))


@pytest.mark.parametrize("method", [m for m in BASELINES if m not in SEARCHES])  # scored ones
@pytest.mark.parametrize("kind", COUNT_TYPES)
def test_each_baseline_meets_the_budget(resnet56, method, kind):
    model, bm = resnet56
    for target in (0.5, 0.25, 0.125):
        r = keep_at_budget(baseline_scores(method, model, seed=1), bm, kind, target)
        assert target <= r.achieved <= target + 0.01


def test_uniform_keeps_the_same_fraction_in_every_layer(resnet56):
    model, bm = resnet56
    r = keep_at_budget(baseline_scores("uniform", model), bm, "channel", 0.5)
    fractions = [int(k.sum()) / k.numel() for k in r.keep.values()]
    assert max(fractions) - min(fractions) <= 1 / 16 + 1e-9  # one channel of the smallest layer


def test_l1_keeps_the_largest_filters_within_a_layer(resnet56):
    model, bm = resnet56
    scores = l1_scores(model)
    r = keep_at_budget(scores, bm, "params", 0.3)
    for group, keep in r.keep.items():
        if keep.all():
            continue
        assert scores[group][keep].min() >= scores[group][~keep].max()


def test_uniform_scores_are_rank_quantiles():
    q = uniform_scores({"a": torch.tensor([0.3, 0.9, 0.1, 0.5])})["a"]
    assert q.tolist() == [0.5, 1.0, 0.25, 0.75]


def test_random_is_seeded(resnet56):
    model, _ = resnet56
    a, b = baseline_scores("random", model, 3), baseline_scores("random", model, 3)
    c = baseline_scores("random", model, 4)
    assert all(torch.equal(a[g], b[g]) for g in a)
    assert not all(torch.equal(a[g], c[g]) for g in a)


def test_l1_of_a_channel_selection_is_its_bn_scale():
    """A selection (the authors' PreResNet gates every BN) has no filter: |gamma| of its BN,
    over the group mean, as network slimming ranks those channels."""
    model = create_model("preresnet164")
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data = torch.randn(m.num_features, generator=g)
    scores = l1_scores(model)
    gamma = model.get_submodule("layer2.3.bn1").weight.detach().abs().double()
    torch.testing.assert_close(scores["layer2.3.select"], gamma / gamma.mean())
    w = model.get_submodule("layer2.3.conv1").weight.detach().abs().double().sum((1, 2, 3))
    torch.testing.assert_close(scores["layer2.3.conv1"], w / w.mean())
