"""ChipNet's gates: one learnable zeta per output channel of every coupling group, turned
into a near-binary gate by the continuous Heaviside, multiplying the BN outputs (after the
affine, before the ReLU and the residual add) of the group's convs.

    psi = sigmoid(beta * zeta);  z = 1 - exp(-gamma * psi) + psi * exp(-gamma)

One zeta per coupling group (not per conv): channels tied by a residual add are kept or
dropped together, so the gated model is exactly the model surgery can build.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from chipprune.models import PrunableNet
from chipprune.surgery.masking import attach_channel_scales


def heaviside(psi: torch.Tensor, gamma: float) -> torch.Tensor:
    """Continuous Heaviside on [0, 1]: H(0) = 0, H(1) = 1, sharper as gamma grows."""
    return 1.0 - torch.exp(-gamma * psi) + psi * math.exp(-gamma)


@dataclass(frozen=True)
class GateSchedule:
    """Per-epoch beta and gamma, per-step soft-count steepness (the authors' defaults)."""

    beta0: float = 1.0
    beta_step: float = 0.02
    beta_max: float = 6.0
    gamma0: float = 2.0
    gamma_mult: float = math.sqrt(2.0)
    gamma_max: float = 256.0
    steep0: float = 10.0
    steep_step: float = 5.0
    steep_max: float = 60.0

    def beta(self, epoch: int) -> float:
        return min(self.beta_max, self.beta0 + self.beta_step * epoch)

    def gamma(self, epoch: int) -> float:
        return min(self.gamma_max, self.gamma0 * self.gamma_mult**epoch)

    def steepness(self, epoch: float) -> float:
        """`epoch` may be fractional (step / steps_per_epoch): the rise is smooth per step."""
        return min(self.steep_max, self.steep0 + self.steep_step * epoch)


class ChannelGates(nn.Module):
    """zeta per group; `attach(model)` makes every forward of `model` gated by z.

    psi and z of every gate are computed once per forward of the model, in one flat vector
    (a pre-hook), and shared by its BN hooks and by the losses of the same step: a handful
    of vector ops per step instead of a few per conv."""

    def __init__(self, widths: dict[str, int], init_max: float = 0.01, generator=None):
        super().__init__()
        self.groups = list(widths)
        self.sizes = list(widths.values())
        # ParameterDict keys may not contain dots; keep our own order and names.
        self.zeta = nn.ParameterList(
            nn.Parameter(torch.rand(w, generator=generator) * init_max) for w in widths.values()
        )
        self.register_buffer(
            "group_index",  # (N,): the group of every gate, for per-group sums
            torch.repeat_interleave(torch.arange(len(self.sizes)), torch.tensor(self.sizes)),
            persistent=False,
        )
        self.beta, self.gamma, self.steep = 1.0, 2.0, 10.0
        self._latest: tuple[tuple, torch.Tensor, torch.Tensor, tuple] | None = None

    @classmethod
    def for_model(cls, model: PrunableNet, generator=None) -> ChannelGates:
        return cls(model.describe().widths(), generator=generator)

    def set_schedule(self, sched: GateSchedule, epoch: int, epoch_float: float) -> None:
        self.beta, self.gamma = sched.beta(epoch), sched.gamma(epoch)
        self.steep = sched.steepness(epoch_float)

    def _zetas(self) -> list[nn.Parameter]:
        # ParameterList's own indexing is slow Python; its dict holds them in order
        return list(self.zeta._parameters.values())

    def _key(self) -> tuple:
        # zeta changes in place (optimiser steps bump its version) or the schedule moves
        return (tuple(p._version for p in self._zetas()), self.beta, self.gamma,
                torch.is_grad_enabled())

    def values(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(psi, z), each (N,) over every gate in group order; reused while zeta, the
        schedule and the grad mode are what they were when last computed."""
        key = self._key()
        if self._latest is None or self._latest[0] != key:
            zeta = torch.cat(self._zetas())  # (N,)
            psi = torch.sigmoid(self.beta * zeta)
            z = heaviside(psi, self.gamma)
            self._latest = (key, psi, z, z.split(self.sizes))
        return self._latest[1], self._latest[2]

    def _group_z(self, i: int) -> torch.Tensor:
        # inside a gated forward the pre-hook has just computed every gate
        if self._latest is None:
            self.values()
        return self._latest[3][i]

    def psi(self, i: int) -> torch.Tensor:
        return self.values()[0].split(self.sizes)[i]

    def z(self, i: int) -> torch.Tensor:
        self.values()
        return self._latest[3][i]

    def all_z(self) -> dict[str, torch.Tensor]:
        self.values()
        return dict(zip(self.groups, self._latest[3], strict=True))

    def all_zeta(self) -> dict[str, torch.Tensor]:
        """Group -> (C,) zeta, detached: the ranking behind the hard masks. z is a monotone
        function of zeta (one beta and gamma for every gate) but saturates: in float32 z is
        exactly 1.0 once gamma * psi > 17.3, so at gamma 256 every channel with psi > 0.07
        ties at z = 1 and only zeta still orders them."""
        return {g: p.detach() for g, p in zip(self.groups, self._zetas(), strict=True)}

    def crispness_loss(self) -> torch.Tensor:
        """mean over every gate of (z - psi)^2: zero exactly when each psi is 0 or 1."""
        psi, z = self.values()
        return (z - psi).pow(2).mean()

    def soft_count_vector(self, straight_through: bool = False) -> torch.Tensor:
        """(G,) soft kept channels per group, in group order: sum of sigmoid(steep (z - 0.5)).

        straight_through (ours, not the authors'): the count is the hard one, gates with
        z > 0.5, and its gradient that of sum z. The authors' sigmoid saturates: once a
        group's z are all near 0 its count has no gradient at steepness 60 (sigmoid(-30) is
        1e-13), so a budget overshot downwards cannot pull channels back open; sum z keeps
        the gradient z has (it fades only where psi itself saturates)."""
        _, z = self.values()
        if straight_through:
            count = (z > 0.5).to(z.dtype) + (z - z.detach())
        else:
            count = torch.sigmoid(self.steep * (z - 0.5))
        return count.new_zeros(len(self.sizes)).index_add(0, self.group_index, count)

    def soft_counts(self) -> dict[str, torch.Tensor]:
        """Soft number of kept channels per group: sum of sigmoid(steep * (z - 0.5))."""
        return dict(zip(self.groups, self.soft_count_vector().unbind(), strict=True))

    def crisp_fraction(self, tol: float = 0.05) -> float:
        _, z = self.values()
        z = z.detach()
        return float(((z < tol) | (z > 1 - tol)).float().mean())

    def attach(self, model: nn.Module) -> list:
        def refresh(_module, _inputs):  # one computation of every gate per forward
            self._latest = None
            self.values()

        scales: dict[str, Callable[[], torch.Tensor]] = {
            g: (lambda i=i: self._group_z(i)) for i, g in enumerate(self.groups)
        }
        return [model.register_forward_pre_hook(refresh), *attach_channel_scales(model, scales)]

    def schedule_state(self) -> dict[str, float]:
        return {"beta": self.beta, "gamma": self.gamma, "steep": self.steep}

    def load_schedule_state(self, state: dict[str, float]) -> None:
        self.beta, self.gamma, self.steep = state["beta"], state["gamma"], state["steep"]
