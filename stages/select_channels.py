"""DVC stage `select_channels`: CHIP masks from channel-independence scores at every budget
of the pruning grid (prune.budgets x prune.datasets x prune.models) and at every per-layer
rate configuration of `chip_rates` (the authors' published ones), in one process: a
selection costs milliseconds, a stage process seconds.

    python -m stages.select_channels <scores_root> <dense_root> <data_root> <out_dir>

Reads <scores_root>/<dataset>-<model>/scores.json (stage score_channels),
<dense_root>/<dataset>-<model>/checkpoint.pt and <data_root>/<dataset>; writes
<out_dir>/<budget>-<dataset>-<model>/masks.json, <out_dir>/rates-<name>/masks.json and one MLflow run (<out_dir>/mlflow_run.json);
a latency budget reads the profile_latency table of its dataset and model under
--latency-root. The folder is built aside and replaces <out_dir> when complete.

At a budget, CHIP keeps the same rate in every layer (the authors' configurations are near
uniform), met exactly from above by the shared thresholding; within a layer, the channels
of largest CI are kept. Channels coupled by residual adds share one selection: the sum of
their maps' CI (the authors' code selects each block output on its own). At a rate
configuration, layer i keeps int(width * (1 - rate_i)) channels, the largest-CI ones.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from chipprune.budgets.latency_table import TABLE_ROOT, latency_budget_doc
from chipprune.budgets.rates import rates_to_widths
from chipprune.budgets.thresholding import keep_at_budget
from chipprune.config import ConfigError, load_params
from chipprune.methods.baselines import uniform_scores
from chipprune.methods.chip import select_top
from chipprune.reporting import tracking
from chipprune.surgery.masks import masks_from_keep, save_masks
from stages._common import atomic_dir, grid_points, run_main


def load_scores(scores_dir: str | Path) -> dict[str, torch.Tensor]:
    """Per coupling group, the CI score of each channel (float64), from scores.json."""
    path = Path(scores_dir) / "scores.json"
    try:
        doc = json.loads(path.read_text())
        return {g: torch.tensor(v, dtype=torch.float64) for g, v in doc["groups"].items()}
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"{path}: not a scores file ({e})") from None


def rate_masks(name: str, rc, scores: dict[str, torch.Tensor], dense: dict, model):
    """CHIP's masks at the per-layer rates of chip_rates.<name>, from the dense checkpoint
    and model of its dataset and architecture (a grid point's: params require them there)."""
    spec = model.describe()
    try:
        widths = rates_to_widths(spec, rc.rates, dense["model_name"])
    except ValueError as e:
        raise ConfigError(f"chip_rates.{name}: {e}") from None
    keep = select_top(scores, widths)
    return masks_from_keep(
        dense["model_name"], dense["model_kwargs"], spec, keep, dataset=rc.dataset, method="chip",
        budget={"type": "rates", "target": None, "achieved": None, "config": name},
        extra={"rates": rc.rates},
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="stages.select_channels", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    for a in ("scores_root", "dense_root", "data_root", "out_dir"):
        ap.add_argument(a)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--latency-root", default=str(TABLE_ROOT),
                    help="where profile_latency wrote its tables (latency budgets only)")
    args = ap.parse_args(argv)

    params = load_params(args.params)
    grid = params.prune
    if grid is None:
        raise ConfigError(f"{args.params}: no `prune` section, so no grid to select for")
    points = grid_points(params, args.dense_root, args.data_root, args.latency_root)
    dense = {f"{p.dataset}-{p.model_name}": (p.dense, p.model) for p in points}
    scores = {pair: load_scores(Path(args.scores_root) / pair) for pair in dense}  # before any work
    rated = {name: rate_masks(name, rc, scores[pair := f"{rc.dataset}-{rc.model}"], *dense[pair])
             for name, rc in params.chip_rates.items()}

    config = {"budgets": grid.budgets, "datasets": grid.datasets, "models": grid.models,
              "round_to": grid.round_to,
              "chip_rates": {n: rc.model_dump() for n, rc in params.chip_rates.items()}}
    with atomic_dir(args.out_dir) as tmp, \
            tracking.stage_run("select_channels", config, tmp / "mlflow_run.json"):
        import mlflow

        for p in points:
            result = keep_at_budget(uniform_scores(scores[f"{p.dataset}-{p.model_name}"]),
                                    p.budget, p.kind, p.target, round_to=grid.round_to)
            masks = masks_from_keep(
                p.dense["model_name"], p.dense["model_kwargs"], p.model.describe(), result.keep,
                dataset=p.dataset, method="chip",
                budget={"type": p.kind, "target": p.target, "achieved": result.achieved,
                        **latency_budget_doc(p.table, result.achieved)},
            )
            save_masks(masks, tmp / p.name / "masks.json")
            mlflow.log_artifact(str(tmp / p.name / "masks.json"), artifact_path=p.name)
            mlflow.log_metric(f"achieved_budget/{p.name}", result.achieved)
            print(f"select_channels: chip {p.name}: {sum(len(v) for v in masks.kept.values())} "
                  f"channels kept, budget {result.achieved:.4f} (target {p.target})", flush=True)
        for name, masks in rated.items():
            save_masks(masks, tmp / f"rates-{name}" / "masks.json")
            mlflow.log_artifact(str(tmp / f"rates-{name}" / "masks.json"),
                                artifact_path=f"rates-{name}")
            print(f"select_channels: chip rates-{name}: "
                  f"{sum(len(v) for v in masks.kept.values())} channels kept", flush=True)


if __name__ == "__main__":
    sys.exit(run_main(main))
