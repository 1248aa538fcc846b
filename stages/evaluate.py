"""DVC stage `evaluate`: any checkpoint (dense or pruned) on the test split: top-1/top-5,
params, MACs and measured latency (NCHW and channels_last, the faster as `latency_ms_bs<N>`,
and `speedup_bs<N>` against the dense architecture timed in the same process) -> metrics JSON
(DVC metrics) and MLflow.

    python -m stages.evaluate <checkpoint> <data_dir> <out_dir>
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from chipprune.atomic import write_json
from chipprune.budgets.counting import measure_cost
from chipprune.budgets.latency import latency_metrics
from chipprune.config import load_params
from chipprune.data import load_prepared
from chipprune.models import create_model
from chipprune.reporting import tracking
from chipprune.reporting.records import run_tags
from chipprune.training.checkpoint import load_checkpoint, model_from_checkpoint
from chipprune.training.loop import DeviceData, evaluate, resolve_device
from stages._common import run_main


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="stages.evaluate", description=__doc__)
    ap.add_argument("checkpoint")
    ap.add_argument("data_dir")
    ap.add_argument("out_dir")
    ap.add_argument("--name", help="run name (defaults to the checkpoint's folder)")
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args(argv)

    cfg = load_params(args.params).evaluate
    ckpt = load_checkpoint(args.checkpoint)
    data = load_prepared(Path(args.data_dir), splits=("test",))
    model = model_from_checkpoint(ckpt, args.checkpoint)
    device = resolve_device(cfg.device)
    model.to(device).eval()
    shape = tuple(data.meta["image_shape"])

    name = f"evaluate@{args.name or Path(args.checkpoint).parent.name}"
    out = Path(args.out_dir)
    with tracking.stage_run(
        name, {"evaluate": cfg.model_dump(), "checkpoint": args.checkpoint},
        out / "mlflow_run.json", inputs={"checkpoint": args.checkpoint},
    ):
        import mlflow

        test = DeviceData.from_split(data.splits["test"], data.meta, device)
        acc = evaluate(model, test, cfg.batch_size)
        cost = measure_cost(model, shape)
        dense_kwargs = {k: v for k, v in ckpt["model_kwargs"].items() if k not in ("widths", "kept")}
        dense_model = create_model(ckpt["model_name"], **dense_kwargs)
        dense_cost = measure_cost(dense_model, shape)
        # both memory formats; latency_ms_bs<N> is the faster, speedup_bs<N> against the
        # dense architecture timed here too (a dense checkpoint is its own reference: 1.0)
        pruned = bool(set(ckpt["model_kwargs"]) & {"widths", "kept"})
        reference = dense_model.to(device) if pruned and cfg.latency.dense_reference else None
        latency, formats = latency_metrics(model, shape, cfg.latency.batch_sizes, device,
                                           cfg.latency.warmup, cfg.latency.repeats, reference,
                                           rounds=cfg.latency.rounds)
        if not pruned:
            latency |= {f"speedup_bs{bs}": 1.0 for bs in cfg.latency.batch_sizes}
        metrics = {
            "test_top1": acc["top1"],
            "test_top5": acc["top5"],
            "test_loss": acc["loss"],
            "params": cost.params,
            "macs": cost.macs,
            "macs_with_bn": cost.macs_with_bn,
            "params_fraction": cost.params / dense_cost.params,
            "macs_fraction": cost.macs / dense_cost.macs,
            **latency,
        }
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()})
        report = {
            **metrics,
            "model": ckpt["model_name"],
            "model_kwargs": dense_kwargs,  # widths / kept live in the checkpoint
            "method": ckpt.get("masks", {}).get("method", "dense"),
            "budget": ckpt.get("masks", {}).get("budget"),
            "teacher": ckpt.get("masks", {}).get("teacher"),
            "protocol": ckpt.get("masks", {}).get("protocol"),
            "dataset": data.meta.get("name"),
            "device": str(device),
            **formats,  # latency_format_bs<N>: the faster memory format
            "test_size": len(test),
        }
        mlflow.set_tags(run_tags(report))  # `python -m pipelines.compare` reads these
        write_json(out / "metrics.json", report)
        mlflow.log_artifact(str(out / "metrics.json"))
    print(f"{name}: top1 {acc['top1']:.4f} params {cost.params:,} MACs {cost.macs:,}", flush=True)


if __name__ == "__main__":
    sys.exit(run_main(main))
