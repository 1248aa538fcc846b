"""DVC stage `evaluate`: every checkpoint the pipeline trains (dense models, fine-tuned grid
points, CHIP rate configurations, transfer pairs; the list comes from params.yaml), in one
process: test top-1/top-5, params, MACs and measured latency (NCHW and channels_last, the
faster as `latency_ms_bs<N>`, `speedup_bs<N>` against the dense architecture timed in the
same process) -> <out_dir>/<name>/metrics.json and one MLflow run per model, nested under
the stage's run.

    python -m stages.evaluate <out_dir> [--only NAME ...]
    python -m stages.evaluate <out_dir> --run NAME CHECKPOINT DATA_DIR [--run ...]

One stage rather than one per model: an evaluation costs a second here, a stage process
about ten (imports, MLflow, DVC's lock file). `--run` evaluates given checkpoints instead of
the params grid (benchmarks, tests). Every checkpoint is found before any work; the folder
is built aside and replaces <out_dir> when complete.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from chipprune.atomic import write_json
from chipprune.budgets.counting import measure_cost
from chipprune.budgets.latency import latency_metrics
from chipprune.config import EvaluateConfig, load_params
from chipprune.data.artifact import load_meta
from chipprune.reporting import tracking
from chipprune.reporting.records import CHECKPOINT_TAG, checkpoint_labels, run_tags
from chipprune.training.checkpoint import (
    dense_kwargs,
    dense_model,
    is_pruned,
    load_checkpoint,
    model_from_checkpoint,
)
from chipprune.training.loop import evaluate, resolve_device
from chipprune.training.sources import DeviceData, open_split
from stages._common import EvaluatedRun, atomic_dir, parse_run_args, run_main, runs_from_args


def evaluate_checkpoint(run: EvaluatedRun, test: DeviceData, meta: dict[str, Any],
                        cfg: EvaluateConfig, device: Any) -> dict[str, Any]:
    """The metrics record of one checkpoint (what metrics.json holds), on `test` (the test
    split of run.data_dir, on `device`) whose prepared meta.json is `meta`."""
    ckpt = load_checkpoint(run.checkpoint)
    model = model_from_checkpoint(ckpt, run.checkpoint)
    model.to(device).eval()
    shape = tuple(meta["image_shape"])

    acc = evaluate(model, test, cfg.batch_size)
    cost = measure_cost(model, shape)
    dense = dense_model(ckpt)
    dense_cost = measure_cost(dense, shape)
    # both memory formats; latency_ms_bs<N> is the faster, speedup_bs<N> against the dense
    # architecture timed here too (a dense checkpoint is its own reference: 1.0)
    pruned = is_pruned(ckpt)
    reference = dense.to(device) if pruned and cfg.latency.dense_reference else None
    latency, formats = latency_metrics(model, shape, cfg.latency.batch_sizes, device,
                                       cfg.latency.warmup, cfg.latency.repeats, reference,
                                       rounds=cfg.latency.rounds)
    if not pruned:
        latency |= {f"speedup_bs{bs}": 1.0 for bs in cfg.latency.batch_sizes}
    return {
        "test_top1": acc["top1"],
        "test_top5": acc["top5"],
        "test_loss": acc["loss"],
        "params": cost.params,
        "macs": cost.macs,
        "macs_with_bn": cost.macs_with_bn,
        "params_fraction": cost.params / dense_cost.params,
        "macs_fraction": cost.macs / dense_cost.macs,
        **latency,
        **checkpoint_labels(ckpt, meta.get("name")),
        "model_kwargs": dense_kwargs(ckpt),  # widths / kept live in the checkpoint
        "device": str(device),
        **formats,  # latency_format_bs<N>: the faster memory format
        "test_size": len(test),
        "checkpoint": str(run.checkpoint),
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_run_args(argv, "stages.evaluate", __doc__, "evaluate")

    cfg = load_params(args.params).evaluate
    runs = runs_from_args(args)
    device = resolve_device(cfg.device)
    config = {"evaluate": cfg.model_dump(), "runs": {r.name: str(r.checkpoint) for r in runs}}
    with atomic_dir(args.out_dir) as tmp, \
            tracking.stage_run("evaluate", config, tmp / "mlflow_run.json") as stage:
        import mlflow

        tests: dict[Path, tuple[DeviceData, dict[str, Any]]] = {}  # one load per dataset
        for r in runs:
            if r.data_dir not in tests:
                meta = load_meta(r.data_dir)
                tests[r.data_dir] = (open_split(r.data_dir, "test", device, meta), meta)
            tags = {"chipprune.evaluated": r.name,  # a model, not a stage: no chipprune.stage
                    CHECKPOINT_TAG: tracking.file_sha256(r.checkpoint)}
            with mlflow.start_run(run_name=f"evaluate@{r.name}", nested=True, tags=tags,
                                  experiment_id=stage.info.experiment_id):
                report = evaluate_checkpoint(r, *tests[r.data_dir], cfg, device)
                mlflow.log_params({"checkpoint": str(r.checkpoint), "data": str(r.data_dir)})
                mlflow.log_metrics({k: float(v) for k, v in report.items()
                                    if isinstance(v, int | float) and not isinstance(v, bool)})
                mlflow.set_tags(run_tags(report))  # `python -m pipelines.compare` reads these
                write_json(tmp / r.name / "metrics.json", report)
                mlflow.log_artifact(str(tmp / r.name / "metrics.json"))
            print(f"evaluate@{r.name}: top1 {report['test_top1']:.4f} params "
                  f"{report['params']:,} MACs {report['macs']:,}", flush=True)


if __name__ == "__main__":
    sys.exit(run_main(main))
