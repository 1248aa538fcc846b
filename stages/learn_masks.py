"""DVC stage `learn_masks`: ChipNet on a dense checkpoint at one budget (TYPE-TARGET, e.g. flops-0.125).
Writes masks.json, the best hard-mask checkpoint (learned weights, dense architecture),
a per-epoch CSV for `dvc plots`, a PNG of gate values, and an MLflow run.

    python -m stages.learn_masks <dataset> <model> <budget> <data_dir> <dense_ckpt> <out_dir>
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from chipprune.atomic import write_text
from chipprune.budgets.exact import BudgetModel
from chipprune.budgets.latency_table import latency_budget_doc, table_for_budget
from chipprune.config import ConfigError, ScheduleConfig, TrainConfig, load_params
from chipprune.data.artifact import load_meta
from chipprune.methods.chipnet import ChipNetHooks, adamw
from chipprune.methods.gates import ChannelGates
from chipprune.reporting import tracking
from chipprune.reporting.plots import gate_values_figure, save_png
from chipprune.surgery.masks import masks_from_keep, save_masks
from chipprune.training import distributed
from chipprune.training.checkpoint import (
    load_checkpoint,
    make_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
)
from chipprune.training.loop import fit, resolve_device, seed_everything
from chipprune.training.resume import ResumeStore, fingerprint
from chipprune.training.sources import open_split
from stages._common import RESUME_DIR, main_rank_run, parse_budget, run_main, start_ranks
from stages.train_dense import history_csv


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="stages.learn_masks", description=__doc__)
    for a in ("dataset", "model", "budget", "data_dir", "dense_ckpt", "out_dir"):
        ap.add_argument(a)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--latency-table", help="budget type latency: the profile_latency table "
                    "(default: runs/latency/<runtime>-<device>-bs<batch>-<dataset>-<model>/table.json)")
    args = ap.parse_args(argv)

    params = load_params(args.params)
    cfg = params.learn_masks
    if args.dataset not in params.datasets:
        raise ConfigError(f"datasets.{args.dataset}: not defined in {args.params}")
    kind, target = parse_budget(args.budget)
    augment = params.datasets[args.dataset].augment
    device = start_ranks("stages.learn_masks", argv, cfg.distributed, resolve_device(cfg.device))

    meta = load_meta(args.data_dir)
    dense = load_checkpoint(args.dense_ckpt)
    seed_everything(cfg.seed, device)
    model = model_from_checkpoint(dense, args.dense_ckpt).to(device)
    shape = tuple(meta["image_shape"])
    table = table_for_budget(kind, args.latency_table, params.latency_budget,
                             args.dataset, args.model)  # None unless the budget is latency
    budget = BudgetModel.from_model(model, shape, latency=table)
    gates = ChannelGates.for_model(model, generator=torch.Generator().manual_seed(cfg.seed))
    gates.to(device)
    train = open_split(args.data_dir, "train", device, meta)
    val = open_split(args.data_dir, "val", device, meta)

    name = f"learn_masks@{args.budget}-{args.dataset}-{args.model}"
    config = {
        "learn_masks": cfg.model_dump(), "budget": {"type": kind, "target": target},
        "dataset": args.dataset, "model": args.model, "augment": augment.model_dump(),
    }
    if table is not None:  # a new table is a new budget: part of the resume fingerprint too
        config["budget"]["table_sha256"] = tracking.file_sha256(table.source)
    # fit() drives the loop; ChipNet's optimiser and constant lr replace the dense recipe.
    loop = TrainConfig(
        epochs=cfg.epochs, batch_size=cfg.batch_size, eval_batch_size=cfg.eval_batch_size,
        schedule=ScheduleConfig(kind="constant"), seed=cfg.seed, device=cfg.device,
        channels_last=cfg.channels_last, bf16=cfg.bf16, distributed=cfg.distributed,
    )
    hooks = ChipNetHooks(
        model, gates, budget, kind, target, val,
        w_budget=cfg.w_budget, w_crisp=cfg.w_crisp, eval_batch_size=cfg.eval_batch_size,
        calibration=train, calibration_batches=cfg.bn_recalibration_batches,
        round_to=params.prune.round_to if params.prune else 1, budget_count=cfg.budget_count,
    )
    out = Path(args.out_dir)
    dense_sha = tracking.file_sha256(args.dense_ckpt)
    resume = ResumeStore(RESUME_DIR / f"{name}.pt", fingerprint(config, meta, dense_sha))
    inputs = {"dense_checkpoint": args.dense_ckpt,
              **({"latency_table": table.source} if table else {})}
    with main_rank_run(name, config, out / "mlflow_run.json", inputs=inputs):
        result = fit(model, train, val, loop, augment,
                     optimizer=adamw(model, gates, cfg.lr, cfg.weight_decay, cfg.gate_lr), hooks=hooks,
                     resume=resume, log=lambda row: tracking.log_history([row]))
        if not distributed.is_main():
            return  # the gates, thresholds and best epoch are the same on every rank
        import mlflow

        tracking.log_history(result.history[: result.resumed_from_epoch])
        hooks.detach()
        best = hooks.best
        masks = masks_from_keep(
            dense["model_name"], dense["model_kwargs"], model.describe(), best.keep,
            dataset=args.dataset, method="chipnet",
            budget={"type": kind, "target": target, "achieved": best.achieved,
                    **latency_budget_doc(table, best.achieved)},
            # `weights` makes finetune start from the learned weights (the authors' way);
            # without it finetune slices the dense checkpoint (finetune_from: dense)
            extra={"best_epoch": best.epoch, "val_hard_top1": best.val_top1,
                   **({"weights": "checkpoint.pt"} if cfg.finetune_from == "learned"
                      else {"learned_weights": "checkpoint.pt"})},
        )
        save_masks(masks, out / "masks.json")
        ckpt = make_checkpoint(model, dense["model_name"], dense["model_kwargs"],
                               config=config, data_meta=meta, history=result.history)
        ckpt["state_dict"] = best.weights  # the weights of the best hard-mask epoch
        save_checkpoint(ckpt, out / "checkpoint.pt")
        write_text(out / "history.csv", history_csv(result.history))
        last = {g: v.detach().cpu() for g, v in gates.all_z().items()}
        save_png(gate_values_figure(hooks.first_z, last, name), out / "gates.png")
        for f in ("masks.json", "history.csv", "gates.png"):
            mlflow.log_artifact(str(out / f))
        mlflow.log_metrics({"best_val_hard_top1": best.val_top1, "achieved_budget": best.achieved,
                            "best_epoch": best.epoch})
    resume.clear()
    print(f"{name}: best epoch {best.epoch}, hard val top1 {best.val_top1:.4f}, "
          f"budget {best.achieved:.4f} (target {target})", flush=True)


if __name__ == "__main__":
    sys.exit(run_main(main))
