"""DVC stage `baseline_masks`: random, L1-norm or uniform masks from the dense checkpoint at
one budget, through the same thresholding as every method.

    python -m stages.baseline_masks <method> <dataset> <model> <budget_type> <target> <dense_ckpt> <data_dir> <out_dir>
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from chipprune import tracking
from chipprune.baselines import BASELINES, baseline_scores
from chipprune.budgets import BudgetModel
from chipprune.checkpoint import load_checkpoint, model_from_checkpoint
from chipprune.config import ConfigError, load_params
from chipprune.data import load_prepared
from chipprune.latency_table import latency_budget_doc, table_for_budget
from chipprune.masks import masks_from_keep, save_masks
from chipprune.thresholding import keep_at_budget
from stages._common import parse_budget, run_main


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="stages.baseline_masks", description=__doc__)
    for a in ("method", "dataset", "model", "budget_type", "target", "dense_ckpt", "data_dir", "out_dir"):
        ap.add_argument(a)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--latency-table", help="budget type latency: the profile_latency table "
                    "(default: runs/latency/<device>-bs<batch>-<dataset>-<model>/table.json)")
    args = ap.parse_args(argv)

    params = load_params(args.params)
    if args.method not in BASELINES:
        raise ConfigError(f"baseline {args.method!r}: allowed {', '.join(BASELINES)}")
    target = parse_budget(args.budget_type, args.target)
    dense = load_checkpoint(args.dense_ckpt)
    model = model_from_checkpoint(dense, args.dense_ckpt)
    meta = load_prepared(Path(args.data_dir), splits=()).meta
    table = table_for_budget(args.budget_type, args.latency_table, params.latency_budget,
                             args.dataset, args.model)  # None unless the budget is latency
    budget = BudgetModel.from_model(model, tuple(meta["image_shape"]), latency=table)
    seed = params.baselines.seed

    name = f"baseline_masks@{args.method}-{args.budget_type}-{args.target}-{args.dataset}-{args.model}"
    config = {"method": args.method, "budget": {"type": args.budget_type, "target": target},
              "seed": seed, "dataset": args.dataset, "model": args.model}
    out = Path(args.out_dir)
    with tracking.stage_run(name, config, out / "mlflow_run.json",
                            inputs={"dense_checkpoint": args.dense_ckpt,
                                    **({"latency_table": table.source} if table else {})}):
        import mlflow

        result = keep_at_budget(baseline_scores(args.method, model, seed), budget,
                                args.budget_type, target,
                                round_to=params.prune.round_to if params.prune else 1)
        masks = masks_from_keep(
            dense["model_name"], dense["model_kwargs"], model.describe(), result.keep,
            dataset=args.dataset, method=args.method,
            budget={"type": args.budget_type, "target": target, "achieved": result.achieved,
                    **latency_budget_doc(table, result.achieved)},
            extra={"seed": seed},
        )
        save_masks(masks, out / "masks.json")
        mlflow.log_artifact(str(out / "masks.json"))
        mlflow.log_metric("achieved_budget", result.achieved)
    print(f"{name}: budget {result.achieved:.4f} (target {target})", flush=True)


if __name__ == "__main__":
    sys.exit(run_main(main))
