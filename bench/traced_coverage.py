"""Any CNN, traced: per torchvision family (and the user's own CNN in nets/), what a FLOPs
budget of 0.5 prunes it to with ChipNet's thresholding of random gates and with CHIP, and
what describing and thresholding cost against one training epoch.

    python -m bench.traced_coverage [--families resnet18,mobilenet_v2] [--markdown]

Per family, at 32x32 images (AlexNet 64, Inception-v3 96), 10 classes, on this machine:
- build: the factory's dense network; describe: torch.fx trace + the graph description
  (median of 3);
- floor: the smallest params / MACs fractions reachable (every group at one channel): what
  the pins (concats, grouped convs, ...) keep whole;
- ChipNet and CHIP at flops-0.5: params and MACs fractions of the thresholded model (the
  budget polynomial, which the tests check equals counting of the pruned model); ChipNet's
  gates are random (zeta uniform in [0, 0.01], as initialised); CHIP scores 2 batches of 8
  random images;
- threshold: keep_at_budget at flops-0.5 (median of 3);
- epoch: one training step (forward, backward, SGD) at batch 64, median of 3 after one
  warm-up, times the 782 steps of a CIFAR-10 epoch: the describe / epoch and threshold /
  epoch ratios are what the issue asks to be small.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from chipprune.budgets.exact import BudgetModel
from chipprune.budgets.thresholding import keep_at_budget
from chipprune.methods.baselines import uniform_scores
from chipprune.methods.chip import group_scores, score_channels
from chipprune.methods.gates import ChannelGates
from chipprune.models.traced.factory import build_dense
from chipprune.models.traced.graph import TraceError, describe_graph, trace
from chipprune.models.traced.net import TracedNet

FAMILIES = ("alexnet", "vgg11", "vgg11_bn", "resnet18", "resnext50_32x4d", "wide_resnet50_2",
            "regnet_x_400mf", "regnet_y_400mf", "mobilenet_v2", "mobilenet_v3_small",
            "efficientnet_b0", "efficientnet_v2_s", "mnasnet0_5", "densenet121", "googlenet",
            "inception_v3", "squeezenet1_1", "shufflenet_v2_x0_5", "convnext_tiny")
OWN = "nets.small_cnn:build"
SIDE = {"alexnet": 64, "inception_v3": 96}
STEPS_PER_EPOCH = 50_000 // 64


def median_time(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def fractions(budget: BudgetModel, keep) -> tuple[float, float]:
    widths = {g: int(k.sum()) for g, k in keep.items()}
    return budget.fraction("params", widths), budget.fraction("flops", widths)


def row(arch: str) -> dict:
    side = SIDE.get(arch.split(":")[-1], 32)
    probe = max(side, 64)  # TracedNet's default probe, or the image where that is larger
    example = torch.zeros(1, 3, probe, probe)
    t_build = median_time(lambda: build_dense(arch, 10, 3, {}))
    dense, _ = build_dense(arch, 10, 3, {})

    def describe():
        return describe_graph(trace(dense), example, "").spec

    try:
        t_describe = median_time(describe)
    except TraceError as e:
        return {"arch": arch, "refused": str(e)}
    model = TracedNet(arch, num_classes=10, in_channels=3, probe_size=probe)
    spec = model.describe()
    budget = BudgetModel.from_model(model, (3, side, side))
    floor = {g: 1 for g in budget.dense_widths}
    gates = ChannelGates(budget.dense_widths, generator=torch.Generator().manual_seed(0))
    zeta = gates.all_zeta()
    chipnet = keep_at_budget(zeta, budget, "flops", 0.5)
    t_threshold = median_time(lambda: keep_at_budget(zeta, budget, "flops", 0.5))
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 256, (8, 3, side, side), dtype=torch.uint8, generator=g)
               for _ in range(2)]
    mspec = model.describe()
    t0 = time.perf_counter()
    ci = group_scores(score_channels(model.eval(), batches, lambda x: x.float() / 255, mspec),
                      mspec)
    t_chip = time.perf_counter() - t0
    chip = keep_at_budget(uniform_scores(ci), budget, "flops", 0.5)

    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(64, 3, side, side), torch.randint(0, 10, (64,))

    def step():
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()

    step()
    t_epoch = median_time(step) * STEPS_PER_EPOCH
    return {
        "arch": arch, "groups": len(budget.dense_widths), "gated": len(spec.convs),
        "fixed": len(spec.fixed),
        "floor": (budget.fraction("params", floor), budget.fraction("flops", floor)),
        "chipnet": fractions(budget, chipnet.keep), "chip": fractions(budget, chip.keep),
        "build_s": t_build, "describe_s": t_describe, "threshold_s": t_threshold,
        "chip_score_s": t_chip, "epoch_s": t_epoch,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--markdown", action="store_true", help="print the README's table")
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    archs = [f"torchvision:{f}" for f in args.families.split(",") if f] + [OWN]
    print("| family | groups | gated / fixed convs | floor params / MACs | ChipNet params / "
          "MACs | CHIP params / MACs | describe s | threshold ms | epoch s (est.) | "
          "describe / epoch |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for arch in archs:
        r = row(arch)
        name = arch.split(":")[-1] if arch.startswith("torchvision:") else arch
        if "refused" in r:
            print(f"| {name} | refused: {r['refused']} |||||||||")
            continue
        f = r["floor"]
        print(f"| {name} | {r['groups']} | {r['gated']} / {r['fixed']} | {f[0]:.3f} / "
              f"{f[1]:.3f} | {r['chipnet'][0]:.3f} / {r['chipnet'][1]:.3f} | "
              f"{r['chip'][0]:.3f} / {r['chip'][1]:.3f} | {r['describe_s']:.2f} | "
              f"{1000 * r['threshold_s']:.1f} | {r['epoch_s']:.0f} | "
              f"{r['describe_s'] / r['epoch_s']:.1e} |", flush=True)


if __name__ == "__main__":
    main()
