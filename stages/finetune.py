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

from chipprune import tracking
from chipprune.atomic import write_text
from chipprune.checkpoint import (
    load_checkpoint,
    make_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
)
from chipprune.config import ConfigError, load_params
from chipprune.data import load_prepared
from chipprune.masks import load_masks, validate_masks
from chipprune.resume import ResumeStore, fingerprint
from chipprune.surgery import prune_model
from chipprune.train import DeviceData, fit, resolve_device, seed_everything
from stages._common import RESUME_DIR, run_main
from stages.train_dense import history_csv


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
    source_path = method_dir / masks.extra["weights"] if "weights" in masks.extra else Path(args.dense_ckpt)
    source = load_checkpoint(source_path)
    dense_model = model_from_checkpoint(source, source_path)
    validate_masks(masks, dense_model.describe())
    model, kwargs = prune_model(dense_model, source["model_name"], source["model_kwargs"],
                                {g: list(v) for g, v in masks.kept.items()})

    data = load_prepared(Path(args.data_dir), splits=("train", "val"))
    meta = data.meta
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed, device)
    model.to(device)
    train = DeviceData.from_split(data.splits["train"], meta, device)
    val = DeviceData.from_split(data.splits["val"], meta, device)

    run_id = method_dir.name
    name = f"finetune@{masks.method}-{run_id}"
    config = {"finetune": cfg.model_dump(), "method": masks.method, "budget": masks.budget,
              "dataset": masks.dataset, "augment": augment.model_dump()}
    out = Path(args.out_dir)
    inputs = {"masks": masks_path, "source_checkpoint": source_path}
    digest = [tracking.file_sha256(p) for p in inputs.values()]
    resume = ResumeStore(RESUME_DIR / f"{name}.pt", fingerprint(config, meta, digest))
    with tracking.stage_run(name, config, out / "mlflow_run.json", inputs=inputs):
        import mlflow

        result = fit(model, train, val, cfg, augment, resume=resume,
                     log=lambda row: tracking.log_history([row]))
        tracking.log_history(result.history[: result.resumed_from_epoch])
        final = {k: v for k, v in result.history[-1].items() if k.startswith("val_")}
        ckpt = make_checkpoint(model, source["model_name"], kwargs, config=config,
                               data_meta=meta, history=result.history, metrics=final,
                               masks={"method": masks.method, "budget": masks.budget})
        save_checkpoint(ckpt, out / "checkpoint.pt")
        write_text(out / "history.csv", history_csv(result.history))
        mlflow.log_artifact(str(out / "history.csv"))
        mlflow.log_artifact(str(masks_path))
    resume.clear()
    print(f"{name}: val top1 {final['val_top1']:.4f}", flush=True)


if __name__ == "__main__":
    sys.exit(run_main(main))
