"""ChipNet mask learning (Tiwari et al., ICLR 2021): weights and gates train together on
CE + w_budget * (V_soft - target)^2 + w_crisp * crispness; every epoch the gates are
binarised at exactly the budget and the hard-masked model is validated; the best
hard-mask epoch is kept."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from chipprune.budgets.exact import BudgetModel
from chipprune.budgets.thresholding import keep_at_budget
from chipprune.methods.gates import ChannelGates, GateSchedule
from chipprune.surgery.masking import apply_hard_masks
from chipprune.training.loop import TrainHooks, evaluate
from chipprune.training.sources import DeviceData


def adamw(model: nn.Module, gates: ChannelGates, lr: float, weight_decay: float,
          gate_lr: float | None = None):
    """AdamW: weight decay on the network's weights, none on zeta (the authors' choice)."""
    return torch.optim.AdamW(
        [
            {"params": [p for p in model.parameters() if p.requires_grad],
             "weight_decay": weight_decay},
            {"params": list(gates.parameters()), "weight_decay": 0.0, "lr": gate_lr or lr},
        ],
        lr=lr,
    )


@torch.no_grad()
def folded_copy(model: nn.Module, z: dict[str, torch.Tensor]) -> nn.Module:
    """A copy of `model` (without its gate hooks) whose BN affine carries the gates:
    z * (gamma x_hat + beta) = (z gamma) x_hat + z beta, exactly. Binarising then only
    removes channels; the kept ones keep the scale the network was trained with, so the
    hard model starts where the soft one was instead of at 1/z times its activations.
    (An option-A shortcut's own gate has no parameter to fold into; it drops to 1.)

    Deviation from the authors' code, which sets kept gates to exactly 1."""
    folded = copy.deepcopy(model)
    for c in folded.describe().convs:
        gated = folded.get_submodule(c.bn)  # a BN, or the conv itself where none follows
        scale = z[c.group].to(gated.weight.dtype)
        # (C,) BN affine, or a conv's weight (C, Cin, k, k) and bias: z (W x + b), exactly
        gated.weight.mul_(scale.view(-1, *([1] * (gated.weight.dim() - 1))))
        if gated.bias is not None:
            gated.bias.mul_(scale)
    return folded


@torch.no_grad()
def recalibrate_bn(
    model: nn.Module, data: DeviceData, batches: int, batch_size: int, seed: int
) -> None:
    """Re-estimate every BN's running statistics from `batches` batches of training images
    (a seeded random subset, no augmentation): the exact average over those batches
    (momentum None), so the result depends on the images, not on earlier statistics."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if batches <= 0 or not bns:
        return
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    was_training = model.training
    model.train()
    gen = torch.Generator(device=data.device).manual_seed(seed)
    perm = torch.randperm(len(data), generator=gen, device=data.device)
    bs = min(batch_size, len(data))
    for i in range(min(batches, len(data) // bs)):
        model(data.normalise(data.take(perm[i * bs : (i + 1) * bs])[0]))
    for m, momentum in zip(bns, saved, strict=True):
        m.momentum = momentum
    model.train(was_training)


@dataclass
class BestHard:
    epoch: int
    val_top1: float
    achieved: float
    keep: dict[str, torch.Tensor]
    weights: dict[str, torch.Tensor]
    z: dict[str, torch.Tensor] = field(default_factory=dict)


class ChipNetHooks(TrainHooks):
    """Adds ChipNet's losses, schedules and per-epoch hard validation to `train.fit`."""

    def __init__(
        self,
        model: nn.Module,
        gates: ChannelGates,
        budget: BudgetModel,
        kind: str,
        target: float,
        val: DeviceData,
        *,
        schedule: GateSchedule | None = None,
        w_budget: float = 30.0,
        w_crisp: float = 10.0,
        eval_batch_size: int = 1024,
        calibration: DeviceData | None = None,
        calibration_batches: int = 0,
        calibration_batch_size: int = 128,
        round_to: int = 1,
        budget_count: str = "soft",
    ):
        self.model, self.gates, self.budget = model, gates, budget
        self.kind, self.target, self.val = kind, target, val
        self.schedule = schedule or GateSchedule()
        self.w_budget, self.w_crisp = w_budget, w_crisp
        self.eval_batch_size = eval_batch_size
        # training images for the hard model's BN statistics (every rank holds all of them)
        self.calibration, self.calibration_batches = calibration, calibration_batches
        self.calibration_batch_size = calibration_batch_size
        self.round_to = round_to  # hardware-friendly widths (see keep_at_budget)
        self.straight_through = budget_count == "straight_through"  # see soft_count_vector
        if gates.groups != budget.groups:
            raise ValueError("gates and budget model describe different groups")
        self.best: BestHard | None = None
        self.first_z: dict[str, torch.Tensor] | None = None
        self.handles = gates.attach(model)

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def on_step(self, step: int, steps_per_epoch: int) -> None:
        epoch = step // steps_per_epoch
        self.gates.set_schedule(self.schedule, epoch, step / steps_per_epoch)

    def extra_loss(self, model: nn.Module):
        # the gates' values from this step's forward: no second computation
        soft = self.budget.fraction(self.kind, self.gates.soft_count_vector(self.straight_through))
        budget_loss = (soft - self.target) ** 2
        crisp = self.gates.crispness_loss()
        logs = {"budget_loss": budget_loss, "crisp_loss": crisp, "soft_budget": soft}
        return self.w_budget * budget_loss + self.w_crisp * crisp, logs

    @torch.no_grad()
    def hard_masks(self):
        """(z, the keep-masks at the budget): channels ranked by zeta, the order z has where
        it has not saturated (see `ChannelGates.all_zeta`); z itself is what folds into BN."""
        z = {g: v.detach() for g, v in self.gates.all_z().items()}
        return z, keep_at_budget(self.gates.all_zeta(), self.budget, self.kind, self.target,
                                 round_to=self.round_to)

    @torch.no_grad()
    def on_epoch_end(self, epoch: int, model: nn.Module) -> dict[str, float]:
        z, hard = self.hard_masks()
        if self.first_z is None:
            self.first_z = {g: v.cpu() for g, v in z.items()}
        self.detach()  # validate the binarised model, then put the soft gates back
        binarised = folded_copy(model, z)
        handles = apply_hard_masks(binarised, hard.keep)
        if self.calibration is not None:
            recalibrate_bn(binarised, self.calibration, self.calibration_batches,
                           self.calibration_batch_size, seed=epoch)
        acc = evaluate(binarised, self.val, self.eval_batch_size)["top1"]
        for h in handles:
            h.remove()
        self.handles = self.gates.attach(model)
        if self.best is None or acc >= self.best.val_top1:  # ties: the later, crisper epoch
            self.best = BestHard(
                epoch=epoch + 1, val_top1=acc, achieved=hard.achieved,
                keep={g: k.cpu() for g, k in hard.keep.items()},
                weights={k: v.detach().cpu().clone() for k, v in binarised.state_dict().items()},
                z={g: v.cpu() for g, v in z.items()},
            )
        kept = sum(int(k.sum()) for k in hard.keep.values())
        return {
            "val_hard_top1": acc,
            "hard_budget": hard.achieved,
            "crisp_fraction": self.gates.crisp_fraction(),
            "kept_channels": float(kept),
            "beta": self.gates.beta,
            "gamma": self.gates.gamma,
        }

    def state_dict(self) -> dict[str, Any]:
        best = None if self.best is None else copy.copy(vars(self.best))
        return {
            "gates": {k: v.detach().cpu() for k, v in self.gates.state_dict().items()},
            "schedule": self.gates.schedule_state(),
            "best": best,
            "first_z": self.first_z,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.gates.load_state_dict(state["gates"])
        self.gates.load_schedule_state(state["schedule"])
        self.best = None if state["best"] is None else BestHard(**state["best"])
        self.first_z = state["first_z"]
