"""The training tail shared by `finetune` and `transfer_masks`: a physically pruned model
trained with a recipe, resumable, saved as a checkpoint that rebuilds it, logged to MLflow."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from chipprune.atomic import write_text
from chipprune.config import AugmentConfig, TrainConfig
from chipprune.data.artifact import load_meta
from chipprune.reporting import tracking
from chipprune.training import distributed
from chipprune.training.checkpoint import make_checkpoint, save_checkpoint
from chipprune.training.loop import fit
from chipprune.training.resume import ResumeStore, fingerprint
from chipprune.training.sources import open_split
from stages._common import RESUME_DIR, main_rank_run
from stages.train_dense import history_csv


def train_pruned(
    name: str,
    model: nn.Module,
    model_name: str,
    model_kwargs: dict[str, Any],
    data_dir: str | Path,
    cfg: TrainConfig,
    augment: AugmentConfig,
    config: dict[str, Any],
    inputs: dict[str, str | Path],
    out: Path,
    masks_info: dict[str, Any],
) -> float | None:
    """Train `model` (already on its device) on the prepared train/val splits; returns the
    final val top-1. `inputs` are hashed into the resume fingerprint and the MLflow tags.
    In a process group every rank trains; rank 0 alone writes (the others return None)."""
    device = next(model.parameters()).device
    meta = load_meta(data_dir)
    train = open_split(data_dir, "train", device, meta)
    val = open_split(data_dir, "val", device, meta)
    digest = [tracking.file_sha256(p) for p in inputs.values()]
    resume = ResumeStore(RESUME_DIR / f"{name}.pt", fingerprint(config, meta, digest))
    with main_rank_run(name, config, out / "mlflow_run.json", inputs=inputs):
        result = fit(model, train, val, cfg, augment, resume=resume,
                     log=lambda row: tracking.log_history([row]))
        if not distributed.is_main():
            return None
        import mlflow

        tracking.log_history(result.history[: result.resumed_from_epoch])
        final = result.kept_val_metrics()  # the last epoch's, or the best (`keep`)
        mlflow.log_metric("kept_epoch", result.kept_epoch)
        ckpt = make_checkpoint(model, model_name, model_kwargs, config=config, data_meta=meta,
                               history=result.history, metrics=final, masks=masks_info)
        save_checkpoint(ckpt, out / "checkpoint.pt")
        write_text(out / "history.csv", history_csv(result.history))
        mlflow.log_artifact(str(out / "history.csv"))
        for path in inputs.values():
            if str(path).endswith(".json"):
                mlflow.log_artifact(str(path))
    resume.clear()
    return final["val_top1"]
