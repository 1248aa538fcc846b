"""DVC stage `transfer_masks`: masks learned on a teacher dataset applied to the same
architecture built for a student dataset (class counts may differ; the classifier is never
pruned), then trained on the student: from scratch (the ChipNet authors' protocol) or from
the student's dense weights.

    python -m stages.transfer_masks <pair> <teacher_method_dir> <student_dense_ckpt> <student_data_dir> <out_dir>
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from chipprune.config import ConfigError, load_params
from chipprune.models import create_model
from chipprune.surgery.masks import load_masks, validate_masks
from chipprune.surgery.rebuild import prune_model
from chipprune.training.checkpoint import (
    load_checkpoint,
    model_from_checkpoint,
)
from chipprune.training.loop import resolve_device, seed_everything
from stages._common import run_main, start_ranks
from stages._pruned_training import train_pruned


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="stages.transfer_masks", description=__doc__)
    for a in ("pair", "teacher_dir", "student_ckpt", "data_dir", "out_dir"):
        ap.add_argument(a)
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args(argv)

    params = load_params(args.params)
    if args.pair not in params.transfer.pairs:
        raise ConfigError(f"transfer.pairs.{args.pair}: not defined in {args.params}")
    pair, cfg = params.transfer.pairs[args.pair], params.transfer.recipe
    device = start_ranks("stages.transfer_masks", argv, cfg.distributed, resolve_device(cfg.device))
    masks_path = Path(args.teacher_dir) / "masks.json"
    masks = load_masks(masks_path)
    student = load_checkpoint(args.student_ckpt)
    # Refuse masks of another architecture or other layer shapes, naming what differs.
    validate_masks(masks, model_from_checkpoint(student, args.student_ckpt).describe(),
                   model=student["model_name"])

    seed_everything(cfg.seed, device)
    if pair.protocol == "dense":
        source = model_from_checkpoint(student, args.student_ckpt)
    else:  # a fresh init of the student architecture, seeded
        source = create_model(student["model_name"], **student["model_kwargs"])
    model, kwargs = prune_model(source, student["model_name"], student["model_kwargs"],
                                {g: list(v) for g, v in masks.kept.items()})
    model.to(device)

    name = f"transfer_masks@{args.pair}"
    augment = params.datasets[pair.student].augment
    config = {"pair": pair.model_dump(), "recipe": cfg.model_dump(), "augment": augment.model_dump()}
    top1 = train_pruned(
        name, model, student["model_name"], kwargs, args.data_dir, cfg, augment, config,
        inputs={"teacher_masks": masks_path, "student_checkpoint": args.student_ckpt},
        out=Path(args.out_dir),
        masks_info={"method": masks.method, "budget": masks.budget, "teacher": masks.dataset,
                    "protocol": pair.protocol},
    )
    if top1 is not None:  # rank 0
        print(f"{name}: val top1 {top1:.4f}", flush=True)

if __name__ == "__main__":
    sys.exit(run_main(main))
