"""DVC stage `baseline_masks`: one baseline's masks (random, L1-norm, uniform, or one of
Torch-Pruning's criteria: tp_magnitude, tp_taylor, tp_bn_scale) for the whole
pruning grid, prune.budgets x prune.datasets x prune.models, through the same thresholding
as every method. One stage per baseline, not per budget: a mask costs milliseconds, a stage
process seconds (torch and MLflow imports).

    python -m stages.baseline_masks <method> <dense_root> <data_root> <out_dir>

Reads <dense_root>/<dataset>-<model>/checkpoint.pt and <data_root>/<dataset>; writes
<out_dir>/<budget>-<dataset>-<model>/masks.json for every grid point and one MLflow run
(<out_dir>/mlflow_run.json); a latency budget reads the profile_latency table of its
dataset and model under --latency-root. The folder is built aside and replaces <out_dir>
when complete.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from chipprune.budgets.latency_table import TABLE_ROOT, latency_budget_doc
from chipprune.budgets.thresholding import keep_at_budget
from chipprune.config import ConfigError, load_params
from chipprune.methods.baselines import BASELINES, baseline_scores
from chipprune.reporting import tracking
from chipprune.surgery.masks import masks_from_keep, save_masks
from stages._common import atomic_dir, grid_points, run_main


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="stages.baseline_masks", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    for a in ("method", "dense_root", "data_root", "out_dir"):
        ap.add_argument(a)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--latency-root", default=str(TABLE_ROOT),
                    help="where profile_latency wrote its tables (latency budgets only)")
    args = ap.parse_args(argv)

    params = load_params(args.params)
    if args.method not in BASELINES:
        raise ConfigError(f"baseline {args.method!r}: allowed {', '.join(BASELINES)}")
    grid = params.prune
    if grid is None:
        raise ConfigError(f"{args.params}: no `prune` section, so no grid to make masks for")
    seed = params.baselines.seed
    points = grid_points(params, args.dense_root, args.data_root, args.latency_root)

    name = f"baseline_masks@{args.method}"
    config = {"method": args.method, "budgets": grid.budgets, "datasets": grid.datasets,
              "models": grid.models, "round_to": grid.round_to,
              **params.baselines.model_dump()}
    with atomic_dir(args.out_dir) as tmp, tracking.stage_run(name, config, tmp / "mlflow_run.json"):
        import mlflow

        if args.method == "tp_taylor":  # gradients once per dense model, before any mask
            for p in {id(p.model): p for p in points}.values():
                taylor_gradients(p.model, Path(args.data_root) / p.dataset, params.baselines)
        for p in points:
            result = keep_at_budget(baseline_scores(args.method, p.model, seed), p.budget, p.kind,
                                    p.target, round_to=grid.round_to)
            masks = masks_from_keep(
                p.dense["model_name"], p.dense["model_kwargs"], p.model.describe(), result.keep,
                dataset=p.dataset, method=args.method,
                budget={"type": p.kind, "target": p.target, "achieved": result.achieved,
                        **latency_budget_doc(p.table, result.achieved)},
                extra={"seed": seed},
            )
            save_masks(masks, tmp / p.name / "masks.json")
            mlflow.log_artifact(str(tmp / p.name / "masks.json"), artifact_path=p.name)
            mlflow.log_metric(f"achieved_budget/{p.name}", result.achieved)
            print(f"{name}: {p.name} budget {result.achieved:.4f} (target {p.target})", flush=True)


def taylor_gradients(model, data_dir: Path, cfg) -> None:
    """Fill model's .grad with the cross-entropy gradients summed over `taylor_batches` seeded
    batches of training images (on CUDA where there is one; the scores come back to the CPU)."""
    import torch

    from chipprune.methods.peers import accumulate_gradients
    from chipprune.training.loop import resolve_device
    from chipprune.training.sources import open_split

    device = resolve_device("auto")
    train = open_split(data_dir, "train", device)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed))
    batches = [order[i * cfg.taylor_batch_size:(i + 1) * cfg.taylor_batch_size].to(device)
               for i in range(cfg.taylor_batches)]
    model.to(device)
    accumulate_gradients(model, (train.take(i) for i in batches if len(i)),
                         train.normalise)


if __name__ == "__main__":
    sys.exit(run_main(main))
