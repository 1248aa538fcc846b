"""Training and evaluation loops over a split from `sources` (device tensors or a sharded
stream, one interface): uint8 batches, augmented as the split's form does it, normalised on
the device. Every epoch but the last ends in an atomic resume checkpoint, so a killed run
continues where it was (after the last, the caller writes its checkpoint and clears the state:
that save would be a full model-and-optimizer write deleted moments later, and a kill in
between repeats one epoch, deterministically)."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from chipprune.config import AugmentConfig, ScheduleConfig, TrainConfig
from chipprune.training import distributed
from chipprune.training.resume import ResumeStore
from chipprune.training.sources import DeviceData


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device: cuda was asked for but CUDA is not available")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def seed_everything(seed: int, device: torch.device) -> None:
    torch.manual_seed(seed)
    if device.type == "cpu":
        # Bitwise-repeatable on CPU; CUDA keeps its fast non-deterministic kernels. This is
        # torch.use_deterministic_algorithms(True, warn_only=True) without its other half, a
        # torch.compile setting whose import (torch._inductor, torch._dynamo) costs a second
        # or more per stage process; nothing here compiles.
        set_flag = getattr(torch._C, "_set_deterministic_algorithms", None)
        if set_flag is None:
            torch.use_deterministic_algorithms(True, warn_only=True)
        else:
            set_flag(True, warn_only=True)


def lr_multiplier(step: int, steps_per_epoch: int, epochs: int, sched: ScheduleConfig) -> float:
    """Multiplier of the base lr at optimiser step `step` (per-step warmup, then the schedule)."""
    warm = sched.warmup_epochs * steps_per_epoch
    if step < warm:
        return (step + 1) / warm
    if sched.kind == "constant":
        return 1.0
    if sched.kind == "step":
        return sched.gamma ** ((step // steps_per_epoch) // sched.step_size)
    if sched.kind == "multistep":
        epoch = step // steps_per_epoch
        return sched.gamma ** sum(epoch >= m for m in sched.milestones)
    total = epochs * steps_per_epoch
    progress = (step - warm) / max(1.0, total - warm)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def sgd(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD with weight decay on conv/linear weights only (BN affine and biases are not
    decayed), or on every parameter with `optimizer.weight_decay_scope: all`."""
    o = cfg.optimizer
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 or o.weight_decay_scope == "all" else no_decay).append(p)
    return torch.optim.SGD(
        [
            {"params": decay, "weight_decay": o.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=o.lr,
        momentum=o.momentum,
        nesterov=o.nesterov and o.momentum > 0,
    )


@torch.no_grad()
def evaluate(model: nn.Module, data: DeviceData, batch_size: int = 1024) -> dict[str, float]:
    """Loss, top-1 and top-k (k = min(5, classes)) accuracy in eval mode.

    In a process group every rank must call it: batch j goes to rank j mod N, the per-batch
    sums are all-reduced and added in batch order, so the result is bit for bit the
    one-process result (same batches, same kernels, same order of additions)."""
    was_training = model.training
    model.eval()
    n_batches = -(-len(data) // batch_size)
    n_ranks, me = distributed.world(), distributed.rank()
    sums = torch.zeros(n_batches, 3, device=data.device)  # loss, top-1, top-k
    for j, x, y in data.eval_batches(batch_size, lambda j: j % n_ranks == me):
        out = model(data.normalise(x)).float()
        sums[j, 0] = F.cross_entropy(out, y, reduction="sum")
        k = min(5, out.shape[1])
        pred = out.topk(k, dim=1).indices  # (B, k)
        sums[j, 1] = (pred[:, 0] == y).sum()
        sums[j, 2] = (pred == y[:, None]).any(dim=1).sum()
    model.train(was_training)
    distributed.all_reduce_sum(sums)
    total = torch.zeros(3, device=data.device)
    for j in range(n_batches):
        total += sums[j]
    loss_sum, top1, topk = total.tolist()
    n = max(1, len(data))
    return {"loss": loss_sum / n, "top1": top1 / n, "top5": topk / n}


class TrainHooks:
    """Extension points for methods that train more than weights (ChipNet's gates)."""

    def on_step(self, step: int, steps_per_epoch: int) -> None: ...

    def extra_loss(self, model: nn.Module) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        return None, {}

    def on_epoch_end(self, epoch: int, model: nn.Module) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class FitResult:
    history: list[dict[str, float]]
    resumed_from_epoch: int  # 0 for a fresh run
    kept_epoch: int = 0  # the epoch (1-based) whose weights the model holds at the end

    @property
    def kept(self) -> dict[str, float]:
        """The history row of the kept epoch."""
        return self.history[self.kept_epoch - 1]

    def kept_val_metrics(self) -> dict[str, float]:
        return {k: v for k, v in self.kept.items() if k.startswith("val_")}


def fit(
    model: nn.Module,
    train: DeviceData,
    val: DeviceData,
    cfg: TrainConfig,
    augment: AugmentConfig,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    hooks: TrainHooks | None = None,
    resume: ResumeStore | None = None,
    log: Callable[[dict[str, float]], None] | None = None,
) -> FitResult:
    """Train `model` for cfg.epochs on device tensors; returns the per-epoch history.

    In a process group (see `chipprune.training.distributed`) every rank calls it alike: the model is
    wrapped in DDP, each rank trains on its slice of every global batch of cfg.batch_size,
    metrics are all-reduced, and rank 0 alone saves the resume state, logs and prints."""
    device = train.device
    hooks = hooks or TrainHooks()
    optimizer = optimizer or sgd(model, cfg)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    cuda = device.type == "cuda"
    if cuda and cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    n_ranks = distributed.world()
    main = distributed.is_main()

    history: list[dict[str, float]] = []
    start_epoch = 0
    best: dict[str, Any] | None = None  # cfg.keep == "best_val": {"epoch", "top1", "model"}
    state = None
    if resume and n_ranks > 1:
        # Every rank reads rank 0's file; only then may rank 0 remove a stale one.
        state = resume.load(clear_stale=False, quiet=not main)
        distributed.barrier()
        if main and state is None:
            resume.clear()
    elif resume:
        state = resume.load()
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"].to(gen.get_state().device))
        hooks.load_state_dict(state["hooks"])
        history = list(state["history"])
        start_epoch = int(state["epoch"])
        best = state.get("best")

    n = len(train)
    bs = min(cfg.batch_size, n)
    steps_per_epoch = n // bs  # drop the ragged tail: a batch of one breaks BN in train mode
    part = distributed.batch_part(bs) if n_ranks > 1 else None  # this rank's rows of a batch
    net, synced_bn = model, []
    if n_ranks > 1:
        if cfg.distributed.sync_bn:
            synced_bn = distributed.sync_batchnorm(model)
        net = distributed.wrap(model, optimizer)
    bar = tqdm(
        total=cfg.epochs,
        initial=start_epoch,
        desc="train",
        disable=not sys.stderr.isatty() or not main,
    )
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device)
        extra_sums: dict[str, torch.Tensor] = {}
        batches = train.train_epoch(gen, bs, steps_per_epoch, augment, part)
        for i, (x, y) in enumerate(batches):
            step = epoch * steps_per_epoch + i
            mult = lr_multiplier(step, steps_per_epoch, cfg.epochs, cfg.schedule)
            for g, lr in zip(optimizer.param_groups, base_lrs, strict=True):
                g["lr"] = lr * mult
            hooks.on_step(step, steps_per_epoch)

            x = train.normalise(x)
            if cuda and cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda and cfg.bf16):
                out = net(x)
            ce = F.cross_entropy(out.float(), y, label_smoothing=cfg.label_smoothing)
            extra, logs = hooks.extra_loss(model)
            loss = ce if extra is None else ce + extra
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

            loss_sum += ce.detach()
            correct += (out.detach().argmax(1) == y).sum()
            for k, v in logs.items():
                extra_sums[k] = extra_sums.get(k, 0) + v.detach()

        steps = max(1, steps_per_epoch)
        if n_ranks > 1:
            # Sums over ranks: per-rank mean losses (divided by N below), correct counts.
            keys = sorted(extra_sums)
            sums = torch.stack([loss_sum, correct.float(), *(extra_sums[k] for k in keys)])
            distributed.all_reduce_sum(sums)
            loss_sum, correct = sums[0] / n_ranks, sums[1]
            extra_sums = {k: sums[2 + j] / n_ranks for j, k in enumerate(keys)}
            if not synced_bn:
                distributed.average_buffers(model)  # one set of BN statistics on every rank
        row = {
            "epoch": epoch + 1,
            "lr": optimizer.param_groups[0]["lr"],
            "train_loss": loss_sum.item() / steps,
            "train_acc": correct.item() / (steps * bs),
            **{k: float(v) / steps for k, v in extra_sums.items()},
        }
        row.update({f"val_{k}": v for k, v in evaluate(model, val, cfg.eval_batch_size).items()})
        row.update(hooks.on_epoch_end(epoch, model))
        row["epoch_seconds"] = time.perf_counter() - t0
        history.append(row)
        if cfg.keep == "best_val" and (best is None or row["val_top1"] > best["top1"]):
            best = {"epoch": epoch + 1, "top1": row["val_top1"],
                    "model": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}}
        if resume and main and epoch + 1 < cfg.epochs:  # the last one: see the module doc
            resume.save(
                {
                    "epoch": epoch + 1,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "generator": gen.get_state(),
                    "hooks": hooks.state_dict(),
                    "history": history,
                    "best": best,
                }
            )
        if log and main:
            log(row)
        bar.update(1)
        bar.set_postfix(loss=f"{row['train_loss']:.3f}", val=f"{row['val_top1']:.4f}")
        if bar.disable and main:
            print(
                f"epoch {epoch + 1}/{cfg.epochs} lr {row['lr']:.4g} loss {row['train_loss']:.4f} "
                f"train {row['train_acc']:.4f} val {row['val_top1']:.4f} "
                f"({row['epoch_seconds']:.1f}s)",
                flush=True,
            )
    bar.close()
    if n_ranks > 1:
        distributed.unsync_batchnorm(synced_bn)
        del net
        distributed.barrier()  # leave together: no rank exits while another still trains
    if cuda and cfg.channels_last:
        model.to(memory_format=torch.contiguous_format)
    kept_epoch = len(history)
    if best is not None:
        model.load_state_dict(best["model"])
        kept_epoch = int(best["epoch"])
    return FitResult(history=history, resumed_from_epoch=start_epoch, kept_epoch=kept_epoch)
