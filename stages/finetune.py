"""DVC stage `finetune`, shared by every method: masks + source weights -> surgery (a
physically smaller model) -> training with the method's recipe (`finetune.<method>`).

    python -m stages.finetune <method_dir> <dense_ckpt> <data_dir> <out_dir>

<method_dir> holds the method's masks.json; when the masks name weights of their own
(`extra.weights`, e.g. ChipNet's learned weights) they are the source, else the dense
checkpoint is.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from chipprune.config import ConfigError, load_params
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
    ap = argparse.ArgumentParser(prog="stages.finetune", description=__doc__)
    for a in ("method_dir", "dense_ckpt", "data_dir", "out_dir"):
        ap.add_argument(a)
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args(argv)

    params = load_params(args.params)
    method_dir = Path(args.method_dir)
    masks_path = method_dir / "masks.json"
    masks = load_masks(masks_path)
    if masks.method not in params.finetune:
        raise ConfigError(f"finetune.{masks.method}: no recipe for method {masks.method!r}; "
                          f"defined: {sorted(params.finetune)}")
    cfg = params.finetune[masks.method]
    if masks.dataset not in params.datasets:
        raise ConfigError(f"datasets.{masks.dataset}: not defined in {args.params}")
    augment = params.datasets[masks.dataset].augment
    device = start_ranks("stages.finetune", argv, cfg.distributed, resolve_device(cfg.device))
    source_path = method_dir / masks.extra["weights"] if "weights" in masks.extra else Path(args.dense_ckpt)
    source = load_checkpoint(source_path)
    dense_model = model_from_checkpoint(source, source_path)
    # the architecture the file names, not only groups that happen to fit (as transfer_masks)
    validate_masks(masks, dense_model.describe(), model=source["model_name"])
    model, kwargs = prune_model(dense_model, source["model_name"], source["model_kwargs"],
                                {g: list(v) for g, v in masks.kept.items()})

    seed_everything(cfg.seed, device)
    model.to(device)

    name = f"finetune@{masks.method}-{method_dir.name}"
    config = {"finetune": cfg.model_dump(), "method": masks.method, "budget": masks.budget,
              "dataset": masks.dataset, "augment": augment.model_dump()}
    top1 = train_pruned(
        name, model, source["model_name"], kwargs, args.data_dir, cfg, augment, config,
        inputs={"masks": masks_path, "source_checkpoint": source_path}, out=Path(args.out_dir),
        masks_info={"method": masks.method, "budget": masks.budget},
    )
    if top1 is not None:  # rank 0
        print(f"{name}: val top1 {top1:.4f}", flush=True)

if __name__ == "__main__":
    sys.exit(run_main(main))
