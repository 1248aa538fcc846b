"""One rank of the data-parallel equivalence test (tests/test_distributed.py): dense training
and ChipNet mask learning through `train.fit` on prepared digits, results saved per rank.
The test runs `run()` in its own process as the one-process reference.

    python -m tests._ddp_worker <data_dir> <out_dir> <variant> ...   (under a launcher)

A variant is `<float32|float64>-<sync|plain>`: the dtype of the model and the normalised
images, and whether BatchNorm statistics are synchronised across ranks; `-resume` appended:
dense training only, interrupted on every rank after epoch 1 and resumed from the state
rank 0 saved in out_dir.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from chipprune.budgets.exact import BudgetModel
from chipprune.config import AugmentConfig, DistributedConfig, ScheduleConfig, TrainConfig
from chipprune.data import Split, load_prepared
from chipprune.methods.chipnet import ChipNetHooks, adamw
from chipprune.methods.gates import ChannelGates
from chipprune.models import create_model
from chipprune.training import distributed
from chipprune.training.loop import TrainHooks, fit, seed_everything
from chipprune.training.resume import ResumeStore
from chipprune.training.sources import DeviceData

N_TRAIN, BATCH, EPOCHS = 128, 32, 2  # 4 steps per epoch, 8 in all
AUG = AugmentConfig(crop_padding=2, flip=True)


def _model(meta: dict, dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model(
        "resnet20",
        num_classes=meta["num_classes"],
        in_channels=meta["image_shape"][0],
        shortcut="A",
    ).to(dtype)


def _device_data(split: Split, meta: dict, dtype: torch.dtype) -> DeviceData:
    d = DeviceData.from_split(split, meta, torch.device("cpu"))
    # float64 mean/std make `normalise` return float64 images (type promotion).
    return DeviceData(d.images, d.labels, d.mean.to(dtype), d.std.to(dtype))


class _Interrupt(TrainHooks):
    """Stops training on every rank at the first step of epoch 2 (after epoch 1's state)."""

    def on_step(self, step: int, steps_per_epoch: int) -> None:
        if step == steps_per_epoch:
            raise KeyboardInterrupt


def run(data_dir: Path, variant: str, out_dir: Path | None = None) -> dict:
    """Dense SGD training, then ChipNet (gates + AdamW) on the same split; plain tensors back."""
    dtype_name, bn, *resume = variant.split("-")
    dtype = getattr(torch, dtype_name)
    device = torch.device("cpu")
    seed_everything(0, device)
    data = load_prepared(data_dir, splits=("train", "val"))
    meta = data.meta
    tr = data.splits["train"]
    train = _device_data(Split(tr.images[:N_TRAIN], tr.labels[:N_TRAIN]), meta, dtype)
    val = _device_data(data.splits["val"], meta, dtype)
    dist_cfg = DistributedConfig(nproc=max(1, distributed.world()), sync_bn=bn == "sync")
    out: dict = {}

    model = _model(meta, dtype)
    cfg = TrainConfig(
        epochs=EPOCHS,
        batch_size=BATCH,
        seed=0,
        distributed=dist_cfg,
        schedule=ScheduleConfig(kind="cosine", warmup_epochs=1),
    )
    if resume:
        store = ResumeStore(out_dir / f"{variant}.state.pt", "fingerprint")
        try:
            fit(model, train, val, cfg, AUG, hooks=_Interrupt(), resume=store)
        except KeyboardInterrupt:
            pass
        distributed.barrier()
        model = _model(meta, dtype)  # a fresh process would start from a fresh model
        result = fit(model, train, val, cfg, AUG, resume=store)
        out["resumed_from_epoch"] = result.resumed_from_epoch
        out["dense"] = {k: v.clone() for k, v in model.state_dict().items()}
        out["dense_history"] = result.history
        return out
    hist = fit(model, train, val, cfg, AUG).history
    out["dense"] = {k: v.clone() for k, v in model.state_dict().items()}
    out["dense_history"] = hist

    model = _model(meta, dtype)
    gates = ChannelGates.for_model(model, generator=torch.Generator().manual_seed(0)).to(dtype)
    budget = BudgetModel.from_model(model, tuple(meta["image_shape"]))
    hooks = ChipNetHooks(model, gates, budget, "flops", 0.5, val)
    loop = TrainConfig(
        epochs=EPOCHS,
        batch_size=BATCH,
        seed=0,
        distributed=dist_cfg,
        schedule=ScheduleConfig(kind="constant"),
    )
    hist = fit(
        model, train, val, loop, AUG, optimizer=adamw(model, gates, 1e-3, 1e-3, 0.1), hooks=hooks
    ).history
    hooks.detach()
    out["chipnet"] = {k: v.clone() for k, v in model.state_dict().items()}
    out["zeta"] = [p.detach().clone() for p in gates.zeta]
    out["keep"] = hooks.best.keep
    out["best_epoch"] = hooks.best.epoch
    out["chipnet_history"] = hist
    return out


if __name__ == "__main__":
    data_dir, out_dir = Path(sys.argv[1]), Path(sys.argv[2])
    distributed.setup(torch.device("cpu"))
    try:
        for variant in sys.argv[3:]:
            result = run(data_dir, variant, out_dir)
            # The test compares every rank, so each saves here (a stage's ranks never do).
            torch.save(result, out_dir / f"{variant}-rank{distributed.rank()}.pt")
    finally:
        distributed.teardown()
