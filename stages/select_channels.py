"""DVC stage `select_channels`: CHIP masks from channel-independence scores, either at a
global budget (type, target) or from the authors' per-layer rates.

    python -m stages.select_channels <dataset> <model> <scores_dir> <dense_ckpt> <data_dir> <out_dir> \\
        (--budget TYPE TARGET | --rates "[0.]+[0.15]*2+[0.4]*27" | --rate-config NAME)

`--rate-config NAME` reads the rates of `chip_rates.NAME` in params.yaml (the DVC stages).

At a budget, CHIP keeps the same rate in every layer (the authors' configurations are near
uniform), met exactly from above by the shared thresholding; within a layer, the channels
of largest CI are kept. Channels coupled by residual adds share one selection: the sum of
their maps' CI (the authors' code selects each block output on its own).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from chipprune import tracking
from chipprune.baselines import uniform_scores
from chipprune.budgets import BudgetModel
from chipprune.checkpoint import load_checkpoint, model_from_checkpoint
from chipprune.chip import rates_to_widths, select_top
from chipprune.config import ConfigError, load_params
from chipprune.data import load_prepared
from chipprune.latency_table import latency_budget_doc, table_for_budget
from chipprune.masks import masks_from_keep, save_masks
from chipprune.thresholding import keep_at_budget
from stages._common import parse_budget, run_main


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="stages.select_channels", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    for a in ("dataset", "model", "scores_dir", "dense_ckpt", "data_dir", "out_dir"):
        ap.add_argument(a)
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--budget", nargs=2, metavar=("TYPE", "TARGET"))
    mode.add_argument("--rates", help="per-layer rates, a list or the authors' string form")
    mode.add_argument("--rate-config", help="a name under chip_rates in params.yaml")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--latency-table", help="--budget latency: the profile_latency table "
                    "(default: runs/latency/<device>-bs<batch>-<dataset>-<model>/table.json)")
    args = ap.parse_args(argv)
    rates_key = "--rates"
    if args.rate_config:
        configs = load_params(args.params).chip_rates
        if args.rate_config not in configs:
            raise ConfigError(f"chip_rates.{args.rate_config}: not defined in {args.params}; "
                              f"defined: {sorted(configs)}")
        args.rates, rates_key = configs[args.rate_config].rates, f"chip_rates.{args.rate_config}"

    scores_path = Path(args.scores_dir) / "scores.json"
    try:
        scores_doc = json.loads(scores_path.read_text())
        groups = {g: torch.tensor(v, dtype=torch.float64) for g, v in scores_doc["groups"].items()}
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"{scores_path}: not a scores file ({e})") from None
    dense = load_checkpoint(args.dense_ckpt)
    model = model_from_checkpoint(dense, args.dense_ckpt)
    spec = model.describe()
    meta = load_prepared(Path(args.data_dir), splits=()).meta

    if args.budget:
        kind, target = args.budget[0], parse_budget(*args.budget)
        params = load_params(args.params)
        table = table_for_budget(kind, args.latency_table, params.latency_budget, args.dataset,
                                 args.model)  # None unless the budget is latency
        budget = BudgetModel.from_model(model, tuple(meta["image_shape"]), latency=table)
        grid = params.prune
        result = keep_at_budget(uniform_scores(groups), budget, kind, target,
                                round_to=grid.round_to if grid else 1)
        keep, achieved = result.keep, result.achieved
        budget_doc = {"type": kind, "target": target, "achieved": achieved,
                      **latency_budget_doc(table, achieved)}
        label = f"{kind}-{target}"
    else:
        try:
            widths = rates_to_widths(spec, args.rates, dense["model_name"])
        except ValueError as e:
            raise ConfigError(f"{rates_key}: {e}") from None
        keep = select_top(groups, widths)
        budget_doc = {"type": "rates", "target": None, "achieved": None}
        if args.rate_config:
            budget_doc["config"] = args.rate_config
        label = f"rates-{args.rate_config}" if args.rate_config else "rates"

    name = f"select_channels@chip-{label}-{args.dataset}-{args.model}"
    out = Path(args.out_dir)
    with tracking.stage_run(name, {"budget": budget_doc, "rates": args.rates},
                            out / "mlflow_run.json", inputs={"scores": scores_path}):
        import mlflow

        masks = masks_from_keep(
            dense["model_name"], dense["model_kwargs"], spec, keep, dataset=args.dataset,
            method="chip", budget=budget_doc, extra={"rates": args.rates} if args.rates else {},
        )
        save_masks(masks, out / "masks.json")
        mlflow.log_artifact(str(out / "masks.json"))
    print(f"{name}: {sum(len(v) for v in masks.kept.values())} channels kept, "
          f"budget {budget_doc['achieved']}", flush=True)


if __name__ == "__main__":
    sys.exit(run_main(main))
