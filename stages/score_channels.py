"""DVC stage `score_channels`: CHIP's channel independence of every prunable conv of a dense
checkpoint, averaged over augmented training images -> scores.json, a PNG of the per-layer
CI distributions, MLflow.

    python -m stages.score_channels <dataset> <model> <dense_ckpt> <data_dir> <out_dir>
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

from chipprune.atomic import write_json
from chipprune.config import load_params
from chipprune.methods.chip import group_scores, score_channels
from chipprune.reporting import tracking
from chipprune.reporting.plots import ci_distribution_figure, save_png
from chipprune.training.checkpoint import load_checkpoint, model_from_checkpoint
from chipprune.training.loop import resolve_device, seed_everything
from chipprune.training.sources import open_split
from stages._common import run_main


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="stages.score_channels", description=__doc__)
    for a in ("dataset", "model", "dense_ckpt", "data_dir", "out_dir"):
        ap.add_argument(a)
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args(argv)

    params = load_params(args.params)
    cfg = params.chip
    augment = params.datasets[args.dataset].augment if args.dataset in params.datasets else None
    dense = load_checkpoint(args.dense_ckpt)
    model = model_from_checkpoint(dense, args.dense_ckpt)
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed, device)
    model.to(device)
    train = open_split(args.data_dir, "train", device)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    perm = torch.randperm(len(train), generator=gen, device=device)

    def batches():
        # The authors' sample: `batches` x `batch_size` training images, augmented as in training.
        for i in range(cfg.batches):
            idx = perm[i * cfg.batch_size : (i + 1) * cfg.batch_size]
            if idx.numel() == 0:
                return
            if cfg.augment and augment is not None:
                yield train.augmented(idx, augment, gen)
            else:
                yield train.take(idx)[0]

    name = f"score_channels@{args.dataset}-{args.model}"
    out = Path(args.out_dir)
    with tracking.stage_run(name, {"chip": cfg.model_dump(), "dataset": args.dataset,
                                   "model": args.model}, out / "mlflow_run.json",
                            inputs={"dense_checkpoint": args.dense_ckpt}):
        import mlflow

        t0 = time.perf_counter()
        spec = model.describe()
        per_conv = score_channels(model, batches(), train.normalise, spec)
        seconds = time.perf_counter() - t0
        per_group = group_scores(per_conv, spec, cfg.combine)
        write_json(out / "scores.json", {
            "model": dense["model_name"], "dataset": args.dataset,
            "images": min(len(train), cfg.batches * cfg.batch_size), "combine": cfg.combine,
            "convs": {k: v.cpu().tolist() for k, v in per_conv.items()},
            "groups": {k: v.cpu().tolist() for k, v in per_group.items()},
        })
        save_png(ci_distribution_figure(per_conv, name), out / "ci.png")
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        mlflow.log_metrics({"scoring_seconds": seconds, "peak_rss_mib": peak_mib})
        mlflow.log_artifact(str(out / "scores.json"))
        mlflow.log_artifact(str(out / "ci.png"))
    print(f"{name}: {len(per_conv)} layers scored in {seconds:.1f}s, peak RSS {peak_mib:.0f} MiB",
          flush=True)


if __name__ == "__main__":
    sys.exit(run_main(main))
