"""DVC stage `baseline_masks`: one baseline's masks (random, L1-norm, uniform, one of
Torch-Pruning's criteria: tp_magnitude, tp_taylor, tp_bn_scale, or ModelOpt's FastNAS) for
the whole pruning grid, prune.budgets x prune.datasets x prune.models: scores through the
same thresholding as every method, or FastNAS's own search under the budget. One stage per
baseline, not per budget: a mask costs milliseconds, a stage process seconds (torch and
MLflow imports).

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
            extra = {"seed": seed}
            if args.method == "fastnas":
                keep, extra_fastnas = fastnas_keep(p, Path(args.data_root) / p.dataset,
                                                   params.baselines, grid.round_to)
                extra.update(extra_fastnas)
                mlflow.log_metric(f"search_seconds/{p.name}", extra["search_seconds"])
                achieved = float(p.budget.fraction(p.kind, {g: int(k.sum()) for g, k in keep.items()}))
            else:
                result = keep_at_budget(baseline_scores(args.method, p.model, seed), p.budget,
                                        p.kind, p.target, round_to=grid.round_to)
                keep, achieved = result.keep, result.achieved
            masks = masks_from_keep(
                p.dense["model_name"], p.dense["model_kwargs"], p.model.describe(), keep,
                dataset=p.dataset, method=args.method,
                budget={"type": p.kind, "target": p.target, "achieved": achieved,
                        **latency_budget_doc(p.table, achieved)},
                extra=extra,
            )
            save_masks(masks, tmp / p.name / "masks.json")
            mlflow.log_artifact(str(tmp / p.name / "masks.json"), artifact_path=p.name)
            mlflow.log_metric(f"achieved_budget/{p.name}", achieved)
            print(f"{name}: {p.name} budget {achieved:.4f} (target {p.target})", flush=True)


def taylor_gradients(model, data_dir: Path, cfg) -> None:
    """Fill model's .grad with the cross-entropy gradients summed over `taylor_batches` seeded
    batches of training images (on CUDA where there is one; the scores come back to the CPU)."""
    from chipprune.methods.peers import accumulate_gradients
    from chipprune.training.loop import resolve_device
    from chipprune.training.sources import open_split

    device = resolve_device("auto")
    train = open_split(data_dir, "train", device)
    model.to(device)
    accumulate_gradients(model, (train.take(i) for i in seeded_batches(
        len(train), cfg.seed, cfg.taylor_batches, cfg.taylor_batch_size, device)),
                         train.normalise)


def seeded_batches(n: int, seed: int, batches: int, batch_size: int, device):
    """Index tensors of up to `batches` batches of a seeded permutation of range(n) (the
    training images tp_taylor and fastnas sample); empty batches left out."""
    import torch

    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return [order[i * batch_size:(i + 1) * batch_size].to(device)
            for i in range(batches) if i * batch_size < n]


def fastnas_keep(p, data_dir: Path, cfg, round_to: int):
    """FastNAS's search on grid point `p` (chipprune.methods.fastnas): the score is top-1 on
    the first `fastnas_score_images` validation images, BN statistics re-estimated on
    `fastnas_calibration_batches` seeded training batches; its channel divisor is round_to.
    Returns the kept channels as masks and what to record of the search."""
    import torch

    from chipprune.methods import fastnas
    from chipprune.training.loop import resolve_device
    from chipprune.training.sources import open_split

    device = resolve_device("auto")
    train, val = open_split(data_dir, "train", device), open_split(data_dir, "val", device)
    bs = cfg.fastnas_batch_size
    calibration = [train.normalise(train.take(i)[0]) for i in seeded_batches(
        len(train), cfg.seed, cfg.fastnas_calibration_batches, bs, device)]
    shown = torch.arange(min(cfg.fastnas_score_images, len(val)), device=device)
    images, labels = val.take(shown)

    @torch.no_grad()
    def score(model) -> float:
        right = sum(int((model(val.normalise(images[i:i + bs])).argmax(1) == labels[i:i + bs]).sum())
                    for i in range(0, len(labels), bs))
        return right / len(labels)

    result = fastnas.search(p.model.to(device), p.kind, p.target, score=score,
                            calibration=calibration, dummy_input=calibration[0][:1],
                            channel_divisor=round_to)
    if p.target < result.its_floor:
        print(f"baseline_masks@fastnas: {p.name}: {p.kind} {p.target} is below the smallest "
              f"subnet FastNAS searches ({result.its_floor:.4f}); it searches at that floor",
              flush=True)
    keep = fastnas.as_keep(result.kept, p.model.describe().widths())
    return keep, {"search_seconds": round(result.seconds, 3),
                  f"fastnas_{p.kind}_fraction": result.its_fraction,
                  f"fastnas_{p.kind}_floor": result.its_floor}


if __name__ == "__main__":
    sys.exit(run_main(main))
