"""The papers' own figures for the configurations in recipes/, so the report can put them
beside ours row by row. Fractions are what is kept (1 - the published reduction); a figure
our sources do not give is None, never a guess.

Sources: CHIP (Sui et al., NeurIPS 2021), abstract and DESIGN.md section 5 (top-1; params
and FLOPs reductions, FLOPs counting BN as the authors do); the CHIP authors' released
tables in DESIGN.md section 3 (ResNet-56 at the second rate string); ChipNet (Tiwari et al.,
ICLR 2021) as quoted in DESIGN.md section 4 (ResNet-50 on CIFAR-10 at a 12.5% volume budget).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Published:
    top1: float | None
    params_fraction: float | None
    macs_fraction: float | None
    source: str


# (method, dataset, model, budget): budget as the report names it, TYPE-TARGET for a budget
# ("flops-0.479") or rates:<name> for a chip_rates configuration of the recipes.
PUBLISHED: dict[tuple[str, str, str, str], Published] = {
    ("chip", "cifar10", "resnet56", "rates:r56-47"):
        Published(0.9416, 1 - 0.428, 1 - 0.474, "CHIP, NeurIPS 2021"),
    ("chip", "cifar10", "resnet56", "rates:r56-72"):
        Published(None, 240_793 / 853_018, 34.20e6 / 125.485696e6, "CHIP authors' tables"),
    ("chip", "cifar10", "resnet110", "flops-0.479"):
        Published(0.9444, 1 - 0.483, 1 - 0.521, "CHIP, NeurIPS 2021"),
    ("chip", "cifar10", "vgg16_bn", "flops-0.419"):
        Published(0.9386, None, 1 - 0.581, "CHIP, NeurIPS 2021"),
    ("chip", "imagenet", "resnet50", "flops-0.552"):
        Published(0.7630, 1 - 0.408, 1 - 0.448, "CHIP, NeurIPS 2021"),
    ("chipnet", "cifar10", "resnet50", "volume-0.125"):
        Published(None, 0.028, 0.051, "ChipNet, ICLR 2021"),
}


def published_for(method: str, dataset: str, model: str, budget: str) -> Published | None:
    return PUBLISHED.get((method, dataset, model, budget))
