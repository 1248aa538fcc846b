"""ChipNet mask learning on a tiny task: the soft budget is driven to the target, the hard
masks meet it exactly from above, and a resumed run continues gates and schedules."""

from __future__ import annotations

import pytest
import torch

from chipprune.budgets.exact import BudgetModel
from chipprune.config import AugmentConfig, ScheduleConfig, TrainConfig
from chipprune.methods.chipnet import ChipNetHooks, adamw
from chipprune.methods.gates import ChannelGates
from chipprune.models import create_model
from chipprune.training.loop import fit
from chipprune.training.resume import ResumeStore
from tests.test_train import _data

LOOP = TrainConfig(epochs=4, batch_size=16, schedule=ScheduleConfig(kind="constant"))
AUG = AugmentConfig(crop_padding=0, flip=False)


def _setup(seed=0):
    torch.manual_seed(seed)
    model = create_model("resnet20", num_classes=4, in_channels=1)
    gates = ChannelGates.for_model(model, generator=torch.Generator().manual_seed(seed))
    budget = BudgetModel.from_model(model, (1, 8, 8))
    return model, gates, budget


def test_soft_budget_is_driven_to_the_target_and_hard_masks_meet_it():
    data = _data()
    model, gates, budget = _setup()
    hooks = ChipNetHooks(model, gates, budget, "flops", 0.3, data)
    hist = fit(model, data, data, LOOP, AUG, optimizer=adamw(model, gates, 1e-3, 1e-3, 0.2),
               hooks=hooks).history
    # gates start at z = H(sigmoid(~0)) ~ 0.7 (soft budget ~0.9) and are pulled to the target
    assert hist[0]["soft_budget"] > hist[-1]["soft_budget"]
    assert abs(hist[-1]["soft_budget"] - 0.3) < 0.05
    for row in hist:
        assert 0.3 <= row["hard_budget"] <= 0.31
    best = hooks.best
    assert best.val_top1 == max(r["val_hard_top1"] for r in hist)
    widths = {g: int(k.sum()) for g, k in best.keep.items()}
    assert budget.fraction("flops", widths) == pytest.approx(best.achieved)


def test_resumed_run_continues_gates_and_schedule(tmp_path):
    data = _data()
    model, gates, budget = _setup()
    ref_hooks = ChipNetHooks(model, gates, budget, "params", 0.5, data)
    ref = fit(model, data, data, LOOP, AUG, optimizer=adamw(model, gates, 1e-3, 1e-3, 0.1),
              hooks=ref_hooks).history

    store = ResumeStore(tmp_path / "s.pt", "fp")

    def stop_after_two(row):
        if row["epoch"] == 2:
            raise KeyboardInterrupt

    model, gates, budget = _setup()
    hooks = ChipNetHooks(model, gates, budget, "params", 0.5, data)
    with pytest.raises(KeyboardInterrupt):
        fit(model, data, data, LOOP, AUG, optimizer=adamw(model, gates, 1e-3, 1e-3, 0.1),
            hooks=hooks, resume=store, log=stop_after_two)

    model, gates, budget = _setup(seed=5)  # different init: everything must come from the file
    hooks = ChipNetHooks(model, gates, budget, "params", 0.5, data)
    res = fit(model, data, data, LOOP, AUG, optimizer=adamw(model, gates, 1e-3, 1e-3, 0.1),
              hooks=hooks, resume=store)
    assert res.resumed_from_epoch == 2
    assert [r["gamma"] for r in res.history] == [r["gamma"] for r in ref]
    assert [r["soft_budget"] for r in res.history] == pytest.approx([r["soft_budget"] for r in ref])
    for a, b in zip(ref_hooks.gates.zeta, hooks.gates.zeta, strict=True):
        assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("name", ["vgg16_bn", "resnet18"])
def test_folding_gates_into_bn_reproduces_the_soft_model(name):
    """With every channel kept, the folded copy computes exactly what the gated model does
    (models without option-A shortcuts, whose gates all sit on BN outputs)."""
    from chipprune.methods.chipnet import folded_copy

    torch.manual_seed(0)
    kw = {"num_classes": 3, "in_channels": 1} | ({"cifar_stem": True} if name == "resnet18" else {})
    model = create_model(name, **kw).eval()
    gates = ChannelGates.for_model(model, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for p in gates.zeta:
            p.uniform_(-3, 3)  # gates spread over (0, 1)
    x = torch.randn(2, 1, 16, 16)
    handles = gates.attach(model)
    soft = model(x)
    for h in handles:
        h.remove()
    z = {g: v.detach() for g, v in gates.all_z().items()}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert torch.allclose(folded_copy(model, z)(x), soft, atol=1e-5)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # original intact


def test_bn_recalibration_is_the_exact_average_over_its_batches():
    """After recalibration the stem BN's running mean is the mean of the stem conv's output
    over exactly the chosen images (equal batches: the mean of the batch means), whatever
    the statistics were before; momentum is restored."""
    from chipprune.methods.chipnet import recalibrate_bn

    model, _, _ = _setup()
    data = _data(n=96)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.fill_(5.0)
    model.eval()
    recalibrate_bn(model, data, batches=3, batch_size=16, seed=7)
    perm = torch.randperm(96, generator=torch.Generator().manual_seed(7))[:48]
    with torch.no_grad():
        out = model.conv1(data.normalise(data.images[perm]))  # (48, 16, 8, 8)
    torch.testing.assert_close(model.bn1.running_mean, out.mean(dim=(0, 2, 3)),
                               rtol=1e-5, atol=1e-6)
    assert model.bn1.momentum == 0.1 and not model.training
    before = model.bn1.running_mean.clone()
    recalibrate_bn(model, data, batches=3, batch_size=16, seed=7)  # same images: same stats
    torch.testing.assert_close(model.bn1.running_mean, before)


def test_saturated_gates_are_ranked_by_zeta_not_by_tied_z():
    """At gamma 256 every z with psi > 0.07 is exactly 1.0 in float32, so ranking by z
    would choose the marginal channels by index; the hard masks rank by zeta instead."""
    model, gates, budget = _setup()
    hooks = ChipNetHooks(model, gates, budget, "flops", 0.3, _data())
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in gates._zetas():  # distinct zetas in random channel order, all saturated
            p.copy_(0.5 + torch.rand(p.numel(), generator=g))
    gates.beta, gates.gamma = 1.0, 256.0
    z, hard = hooks.hard_masks()
    assert all(bool((v == 1.0).all()) for v in z.values())  # every z tied
    zeta = gates.all_zeta()
    for group, keep in hard.keep.items():
        width = int(keep.sum())
        top = set(torch.sort(zeta[group], descending=True).indices[:width].tolist())
        assert set(keep.nonzero().flatten().tolist()) == top, group
    assert any(not bool(k[: int(k.sum())].all()) for k in hard.keep.values())  # not by index
    assert 0.3 <= hard.achieved <= 0.31
