"""DVC stage `select_rates`: CHIP masks at per-layer rates (the authors' published
configurations) instead of a budget.

    python -m stages.select_rates <dataset> <model> <scores_dir> <dense_ckpt> <out_dir> \\
        (--rate-config NAME | --rates "[0.]+[0.15]*2+[0.4]*27")

`--rate-config NAME` reads `chip_rates.NAME` of params.yaml (what the DVC stages pass);
`--rates` takes a list or the authors' string form directly. Within a layer, the channels
of largest CI are kept; coupled channels share one selection (see select_channels).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from chipprune.config import ConfigError, load_params
from chipprune.methods.chip import rates_to_widths, select_top
from chipprune.reporting import tracking
from chipprune.surgery.masks import masks_from_keep, save_masks
from chipprune.training.checkpoint import load_checkpoint, model_from_checkpoint
from stages._common import run_main
from stages.select_channels import load_scores


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="stages.select_rates", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    for a in ("dataset", "model", "scores_dir", "dense_ckpt", "out_dir"):
        ap.add_argument(a)
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--rate-config", help="a name under chip_rates in params.yaml")
    mode.add_argument("--rates", help="per-layer rates, a list or the authors' string form")
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args(argv)
    rates, rates_key = args.rates, "--rates"
    if args.rate_config:
        configs = load_params(args.params).chip_rates
        if args.rate_config not in configs:
            raise ConfigError(f"chip_rates.{args.rate_config}: not defined in {args.params}; "
                              f"defined: {sorted(configs)}")
        rates, rates_key = configs[args.rate_config].rates, f"chip_rates.{args.rate_config}"

    scores = load_scores(args.scores_dir)
    dense = load_checkpoint(args.dense_ckpt)
    spec = model_from_checkpoint(dense, args.dense_ckpt).describe()
    try:
        widths = rates_to_widths(spec, rates, dense["model_name"])
    except ValueError as e:
        raise ConfigError(f"{rates_key}: {e}") from None
    keep = select_top(scores, widths)
    budget_doc = {"type": "rates", "target": None, "achieved": None}
    if args.rate_config:
        budget_doc["config"] = args.rate_config
    label = f"rates-{args.rate_config}" if args.rate_config else "rates"

    name = f"select_rates@chip-{label}-{args.dataset}-{args.model}"
    out = Path(args.out_dir)
    with tracking.stage_run(name, {"budget": budget_doc, "rates": rates}, out / "mlflow_run.json",
                            inputs={"scores": Path(args.scores_dir) / "scores.json"}):
        import mlflow

        masks = masks_from_keep(
            dense["model_name"], dense["model_kwargs"], spec, keep, dataset=args.dataset,
            method="chip", budget=budget_doc, extra={"rates": rates},
        )
        save_masks(masks, out / "masks.json")
        mlflow.log_artifact(str(out / "masks.json"))
    print(f"{name}: {sum(len(v) for v in masks.kept.values())} channels kept", flush=True)


if __name__ == "__main__":
    sys.exit(run_main(main))
