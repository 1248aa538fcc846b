"""ChipNet's continuous Heaviside, crispness loss, schedules and gradient flow."""

from __future__ import annotations

import math

import pytest
import torch

from chipprune.methods.gates import ChannelGates, GateSchedule, heaviside
from chipprune.models import create_model


@pytest.mark.parametrize("gamma", [2.0, 16.0, 256.0])
def test_heaviside_end_points(gamma):
    assert float(heaviside(torch.tensor(0.0), gamma)) == 0.0
    assert float(heaviside(torch.tensor(1.0), gamma)) == pytest.approx(1.0, abs=1e-7)
    mid = float(heaviside(torch.tensor(0.5), gamma))
    assert mid == pytest.approx(1 - math.exp(-gamma * 0.5) + 0.5 * math.exp(-gamma))


def test_crispness_is_zero_at_binary_psi_and_positive_between():
    gates = ChannelGates({"a": 4, "b": 3})
    with torch.no_grad():
        gates.zeta[0].copy_(torch.tensor([1e3, -1e3, 1e3, -1e3]))
        gates.zeta[1].copy_(torch.tensor([-1e3, 1e3, 1e3]))
    gates.beta, gates.gamma = 1.0, 2.0
    assert float(gates.crispness_loss().detach()) == 0.0
    with torch.no_grad():
        gates.zeta[0].zero_()  # psi = 0.5
    z = 1 - math.exp(-1.0) + 0.5 * math.exp(-2.0)
    assert float(gates.crispness_loss().detach()) == pytest.approx(4 * (z - 0.5) ** 2 / 7, rel=1e-6)


@pytest.mark.parametrize(
    ("epoch", "beta", "gamma", "steep"),
    [(0, 1.0, 2.0, 10.0), (1, 1.02, 2 * math.sqrt(2), 15.0), (10, 1.2, 64.0, 60.0),
     (14, 1.28, 256.0, 60.0), (100, 3.0, 256.0, 60.0), (400, 6.0, 256.0, 60.0)],
)
def test_schedule_values(epoch, beta, gamma, steep):
    s = GateSchedule()
    assert s.beta(epoch) == pytest.approx(beta)
    assert s.gamma(epoch) == pytest.approx(gamma)
    assert s.steepness(epoch) == pytest.approx(steep)


def test_steepness_rises_per_step():
    assert GateSchedule().steepness(2.5) == pytest.approx(22.5)


def test_gradients_reach_zeta_through_model_and_budget():
    model = create_model("resnet20", num_classes=3, in_channels=1)
    gates = ChannelGates.for_model(model, generator=torch.Generator().manual_seed(0))
    handles = gates.attach(model)
    out = model(torch.randn(2, 1, 8, 8))
    loss = out.square().mean() + sum(c for c in gates.soft_counts().values()) + gates.crispness_loss()
    loss.backward()
    for h in handles:
        h.remove()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in gates.zeta)
    assert len(gates.groups) == len(model.describe().widths())


def test_zeta_initialised_in_0_to_0_01():
    gates = ChannelGates({"a": 1000}, generator=torch.Generator().manual_seed(1))
    z = gates.zeta[0]
    assert float(z.min()) >= 0.0 and float(z.max()) <= 0.01


def test_straight_through_count_is_the_hard_count_and_never_saturates():
    """The authors' soft count of a group whose gates are all near 0 is ~1e-13 with no
    gradient at steepness 60; the straight-through count is the number of z > 0.5 with the
    gradient of sum z, one per gate, whatever z is."""
    gates = ChannelGates({"a": 4, "b": 2})
    gates.beta, gates.gamma, gates.steep = 1.0, 256.0, 60.0
    with torch.no_grad():
        gates.zeta[0].copy_(torch.tensor([-30.0, -30.0, -30.0, -30.0]))  # a closed group
        gates.zeta[1].copy_(torch.tensor([30.0, -30.0]))
    soft = gates.soft_count_vector()
    assert float(soft[0]) < 1e-10
    (grad_soft,) = torch.autograd.grad(soft.sum(), gates.zeta[0], retain_graph=True)
    assert float(grad_soft.abs().max()) < 1e-20
    st = gates.soft_count_vector(straight_through=True)
    assert st.tolist() == [0.0, 1.0]
    _, z = gates.values()
    (dz,) = torch.autograd.grad(z[:4].sum(), gates.zeta[0], retain_graph=True)
    (grad_st,) = torch.autograd.grad(st[0], gates.zeta[0], retain_graph=True)
    assert torch.equal(grad_st, dz)  # d(count)/d(zeta) = dz/dzeta: the count's gradient is z's
