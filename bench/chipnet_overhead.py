"""ChipNet mask-learning epoch against a dense training epoch: same model, data, batch size
and device, in one process. Prints seconds per epoch and the ratio (goal <= 1.3).

    python bench/chipnet_overhead.py [--model resnet20] [--epochs 3] [--repeats 3] [--device auto]

The ChipNet epoch carries everything the stage does: gates on every BN output (and option-A
shortcut), the soft budget and crispness losses every step, and the per-epoch binarisation
at the budget, the hard model's BN recalibration (as params.yaml sets it) and hard-mask
validation. The dense epoch carries its own validation.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from chipprune.budgets.exact import BudgetModel
from chipprune.config import AugmentConfig, ScheduleConfig, TrainConfig
from chipprune.data import prepare_dataset
from chipprune.methods.chipnet import ChipNetHooks, adamw
from chipprune.methods.gates import ChannelGates
from chipprune.models import create_model
from chipprune.training.loop import fit, resolve_device, seed_everything
from chipprune.training.sources import DeviceData


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--bn-recalibration-batches", type=int, default=2,
                    help="as learn_masks.bn_recalibration_batches (default params: 2; 0 = off)")
    args = ap.parse_args()

    device = resolve_device(args.device)
    seed_everything(0, device)
    ds = prepare_dataset("digits")
    meta = ds.meta
    train = DeviceData.from_split(ds.splits["train"], meta, device)
    val = DeviceData.from_split(ds.splits["val"], meta, device)
    kwargs = {"num_classes": meta["num_classes"], "in_channels": meta["image_shape"][0]}
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, device=args.device,
                      schedule=ScheduleConfig(kind="constant"))
    aug = AugmentConfig(crop_padding=2, flip=False)
    shape = tuple(meta["image_shape"])

    def dense_run(epochs):
        model = create_model(args.model, **kwargs).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-3)
        sync(device)
        t0 = time.perf_counter()
        fit(model, train, val, cfg.model_copy(update={"epochs": epochs}), aug, optimizer=opt)
        sync(device)
        return (time.perf_counter() - t0) / epochs

    def chipnet_run(epochs):
        model = create_model(args.model, **kwargs).to(device)
        gates = ChannelGates.for_model(model).to(device)
        hooks = ChipNetHooks(model, gates, BudgetModel.from_model(model, shape), "flops", 0.25, val,
                             calibration=train, calibration_batches=args.bn_recalibration_batches)
        sync(device)
        t0 = time.perf_counter()
        fit(model, train, val, cfg.model_copy(update={"epochs": epochs}), aug,
            optimizer=adamw(model, gates, 1e-3, 1e-3, 0.1), hooks=hooks)
        sync(device)
        return (time.perf_counter() - t0) / epochs

    dense_run(1), chipnet_run(1)  # warm-up, excluded
    dense, chip = [], []
    for _ in range(args.repeats):  # interleaved so drift hits both alike
        dense.append(dense_run(args.epochs))
        chip.append(chipnet_run(args.epochs))
    d, c = statistics.median(dense), statistics.median(chip)
    steps = len(train) // args.batch_size
    print(f"device {device}, model {args.model}, batch {args.batch_size}, {steps} steps/epoch, "
          f"{args.epochs} epochs x {args.repeats} repeats")
    print(f"{'epoch':<34}{'s/epoch (median)':>18}{'ratio':>8}")
    print(f"{'dense training':<34}{d:>18.3f}{1.0:>8.3f}")
    label = f"ChipNet (BN recal. {args.bn_recalibration_batches})"
    print(f"{label:<34}{c:>18.3f}{c / d:>8.3f}")


if __name__ == "__main__":
    main()
