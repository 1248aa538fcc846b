"""DVC stage `train_dense`: train `models.<model>` on prepared `datasets.<dataset>` with the
`train_dense` recipe; resumes after a kill; writes the checkpoint, history CSV, MLflow run.

    python -m stages.train_dense <dataset> <model> <data_dir> <out_dir>
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from chipprune.atomic import write_text
from chipprune.config import ConfigError, load_params
from chipprune.data.artifact import load_meta
from chipprune.models import create_model
from chipprune.reporting import tracking
from chipprune.training import distributed
from chipprune.training.checkpoint import load_pretrained, make_checkpoint, save_checkpoint
from chipprune.training.loop import fit, resolve_device, seed_everything
from chipprune.training.resume import ResumeStore, fingerprint
from chipprune.training.sources import open_split
from stages._common import RESUME_DIR, main_rank_run, run_main, start_ranks


def history_csv(history: list[dict[str, float]]) -> str:
    keys = list(history[0]) if history else ["epoch"]
    lines = [",".join(keys)]
    lines += [",".join(f"{row.get(k, '')}" for k in keys) for row in history]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="stages.train_dense", description=__doc__)
    ap.add_argument("dataset")
    ap.add_argument("model")
    ap.add_argument("data_dir")
    ap.add_argument("out_dir")
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args(argv)

    params = load_params(args.params)
    for section, key in (("datasets", args.dataset), ("models", args.model)):
        if key not in getattr(params, section):
            raise ConfigError(f"{section}.{key}: not defined in {args.params}")
    ds_cfg, m_cfg, cfg = params.datasets[args.dataset], params.models[args.model], params.train_dense
    device = start_ranks("stages.train_dense", argv, cfg.distributed, resolve_device(cfg.device))
    meta = load_meta(args.data_dir)

    seed_everything(cfg.seed, device)
    kwargs = {**m_cfg.kwargs, "num_classes": meta["num_classes"], "in_channels": meta["image_shape"][0]}
    model = create_model(m_cfg.arch, **kwargs)
    if m_cfg.weights:  # a local file; CheckpointError (exit 2) where it does not fit
        pretrained = load_pretrained(model, Path(m_cfg.weights).expanduser())
        print(f"{args.model}: {pretrained['loaded']} tensors from {m_cfg.weights}, "
              f"re-initialised {pretrained['reinitialised']}, "
              f"{len(pretrained['unused'])} unused", flush=True)
    kept_whole = getattr(model, "kept_whole", {})  # a traced model: convs pins keep whole
    if kept_whole:
        print(f"{args.model}: {len(kept_whole)} convs keep every channel, e.g. "
              + "; ".join(f"{k}: {v}" for k, v in list(kept_whole.items())[:3]), flush=True)
    model = model.to(device)
    train = open_split(args.data_dir, "train", device, meta)
    val = open_split(args.data_dir, "val", device, meta)

    config = {
        "dataset": {"name": args.dataset, **ds_cfg.model_dump()},
        "model": {"name": args.model, **m_cfg.model_dump()},
        "train": cfg.model_dump(),
    }
    name = f"train_dense@{args.dataset}-{args.model}"
    out = Path(args.out_dir)
    meta_file = Path(args.data_dir) / "meta.json"
    inputs = {"data_meta": meta_file}
    if m_cfg.weights:  # its sha256 goes into the run, and into the resume fingerprint
        inputs["weights"] = Path(m_cfg.weights).expanduser()
        config["model"]["weights_sha256"] = tracking.file_sha256(inputs["weights"])
    resume = ResumeStore(RESUME_DIR / f"{name}.pt", fingerprint(config, meta, kwargs))
    with main_rank_run(name, config, out / "mlflow_run.json", inputs=inputs):
        result = fit(model, train, val, cfg, ds_cfg.augment, resume=resume,
                     log=lambda row: tracking.log_history([row]))
        if not distributed.is_main():
            return  # rank 0 writes every output
        import mlflow

        tracking.log_history(result.history[: result.resumed_from_epoch])
        final = result.kept_val_metrics()  # the last epoch's, or the best (`keep`)
        mlflow.log_metric("kept_epoch", result.kept_epoch)
        if kept_whole:
            mlflow.log_dict(kept_whole, "kept_whole.json")
        ckpt = make_checkpoint(
            model, m_cfg.arch, kwargs, config=config, data_meta=meta,
            history=result.history, metrics=final,
        )
        save_checkpoint(ckpt, out / "checkpoint.pt")
        write_text(out / "history.csv", history_csv(result.history))
        mlflow.log_artifact(str(out / "history.csv"))
        # the checkpoint as an artifact; the model itself reaches MLflow as the export
        # stage's registered ONNX model (chipprune.deploy.registry), as every pruned one does
        mlflow.log_artifact(str(out / "checkpoint.pt"))
    resume.clear()
    print(f"{name}: val top1 {final['val_top1']:.4f}", flush=True)


if __name__ == "__main__":
    sys.exit(run_main(main))
