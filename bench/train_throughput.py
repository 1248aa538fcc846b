"""Training-stage throughput against a bare forward/backward loop, same model, same device
tensors, same batch size, in one process. Prints images/s and the ratio (goal >= 0.95).

    python bench/train_throughput.py [--model resnet20] [--epochs 3] [--repeats 3] [--device auto]

The stage loop adds batched augmentation (crop + flip on uint8, on the device), per-batch
normalisation, per-step lr, and running loss/accuracy sums; the bare loop has none of it.
Both exclude warm-up; validation time is excluded from the stage figure by timing
epochs with an empty validation set.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from chipprune.config import AugmentConfig, ScheduleConfig, TrainConfig
from chipprune.data import Split, prepare_dataset
from chipprune.models import create_model
from chipprune.training.loop import fit, resolve_device, seed_everything, sgd
from chipprune.training.sources import DeviceData


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bare_loop(model, x, y, cfg: TrainConfig, steps: int, device) -> float:
    """images/s of plain fwd/bwd/step over pre-normalised, pre-batched device tensors."""
    opt = sgd(model, cfg)
    bs = cfg.batch_size
    cuda = device.type == "cuda"
    sync(device)
    t0 = time.perf_counter()
    for i in range(steps):
        xb, yb = x[i * bs : (i + 1) * bs], y[i * bs : (i + 1) * bs]
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda and cfg.bf16):
            out = model(xb)
        loss = F.cross_entropy(out.float(), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    sync(device)
    return steps * bs / (time.perf_counter() - t0)


def stage_loop(model, train: DeviceData, empty: DeviceData, cfg: TrainConfig, aug) -> float:
    sync(train.images.device)
    t0 = time.perf_counter()
    fit(model, train, empty, cfg, aug)
    sync(train.images.device)
    steps = len(train) // cfg.batch_size
    return cfg.epochs * steps * cfg.batch_size / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()

    device = resolve_device(args.device)
    seed_everything(0, device)
    ds = prepare_dataset("digits")
    meta = ds.meta
    train = DeviceData.from_split(ds.splits["train"], meta, device)
    empty_split = Split(ds.splits["val"].images[:0], ds.splits["val"].labels[:0])
    empty = DeviceData.from_split(empty_split, meta, device)
    cfg = TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, device=args.device,
        schedule=ScheduleConfig(kind="cosine", warmup_epochs=1),
    )
    aug = AugmentConfig(crop_padding=2, flip=True)
    kwargs = {"num_classes": meta["num_classes"], "in_channels": meta["image_shape"][0]}
    steps = args.epochs * (len(train) // args.batch_size)
    # The bare loop sees the same images, already normalised and laid out in batch order.
    x = train.normalise(train.images)
    if device.type == "cuda" and cfg.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    idx = torch.arange(steps * args.batch_size, device=device) % len(train)
    xb, yb = x[idx], train.labels[idx]

    def fresh():
        m = create_model(args.model, **kwargs).to(device)
        if device.type == "cuda" and cfg.channels_last:
            m.to(memory_format=torch.channels_last)
        return m

    bare_loop(fresh(), xb, yb, cfg, min(steps, 5), device)  # warm-up, excluded
    stage_loop(fresh(), train, empty, cfg.model_copy(update={"epochs": 1}), aug)
    bare, stage = [], []
    for _ in range(args.repeats):  # interleaved, so drift hits both alike
        bare.append(bare_loop(fresh(), xb, yb, cfg, steps, device))
        stage.append(stage_loop(fresh(), train, empty, cfg, aug))
    b, s = statistics.median(bare), statistics.median(stage)
    print(f"device {device}, model {args.model}, batch {args.batch_size}, {steps} steps x {args.repeats} repeats")
    print(f"{'loop':<28}{'images/s (median)':>20}{'ratio':>10}")
    print(f"{'bare forward/backward':<28}{b:>20.1f}{1.0:>10.3f}")
    print(f"{'training stage (fit)':<28}{s:>20.1f}{s / b:>10.3f}")


if __name__ == "__main__":
    main()
