"""DVC stage `export`: every checkpoint evaluate evaluates (the same list, from params.yaml),
as an ONNX file with a dynamic batch dimension, checked against PyTorch on the first
`export.parity_images` test images (max |logit difference| and top-1 agreement; over
`export.tolerance` the stage fails, naming the run), and timed in ONNX Runtime at
evaluate.latency's batch sizes and rounds (with `dense_reference`, interleaved with its dense
architecture exported the same way: `ort_speedup_bs<N>`; else the report divides by the
dense model's row) -> <out_dir>/<name>/model.onnx and export.json, one MLflow run per model
nested under the stage's run, the ONNX file logged there as an MLflow model (signature, input
example) and registered in the Model Registry as a new version of `<dataset>-<architecture>`,
tagged with the method, budget, fractions and the checkpoint's hash.

    python -m stages.export <out_dir> [--only NAME ...]
    python -m stages.export <out_dir> --run NAME CHECKPOINT DATA_DIR [--run ...]

Every checkpoint is found before any work; the folder is built aside and replaces <out_dir>
only when every model passed.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from chipprune.atomic import write_json
from chipprune.budgets.counting import measure_cost
from chipprune.config import load_params
from chipprune.data.artifact import load_meta
from chipprune.deploy import ort_runtime, registry
from chipprune.deploy.onnx_export import (
    OPSET,
    ExportError,
    export_onnx,
    normalisation_metadata,
    parity,
)
from chipprune.reporting import tracking
from chipprune.reporting.records import CHECKPOINT_TAG, checkpoint_labels, record_labels
from chipprune.training.checkpoint import (
    dense_kwargs,
    dense_model,
    is_pruned,
    load_checkpoint,
    model_from_checkpoint,
)
from chipprune.training.sources import DeviceData, open_split
from stages._common import atomic_dir, parse_run_args, run_main, runs_from_args


def main(argv: list[str] | None = None) -> None:
    args = parse_run_args(argv, "stages.export", __doc__, "export")

    params = load_params(args.params)
    cfg, lat = params.export, params.evaluate.latency
    runs = runs_from_args(args)
    config = {"export": cfg.model_dump(), "latency": lat.model_dump(),
              "runs": {r.name: str(r.checkpoint) for r in runs}}
    import onnxruntime

    with atomic_dir(args.out_dir) as tmp, tempfile.TemporaryDirectory() as scratch, \
            tracking.stage_run("export", config, tmp / "mlflow_run.json") as stage:
        import mlflow

        tests: dict[Path, tuple[DeviceData, dict[str, Any]]] = {}  # one load per dataset
        dense_sessions: dict[str, Any] = {}  # dense architecture -> its ORT session
        for r in runs:
            if r.data_dir not in tests:
                meta = load_meta(r.data_dir)
                tests[r.data_dir] = (open_split(r.data_dir, "test", "cpu", meta), meta)
            test, meta = tests[r.data_dir]
            shape = tuple(meta["image_shape"])
            ckpt = load_checkpoint(r.checkpoint)
            model = model_from_checkpoint(ckpt, r.checkpoint).float().eval()
            folder = tmp / r.name
            folder.mkdir()
            t0 = time.perf_counter()
            export_onnx(model, shape, folder / "model.onnx", {
                **normalisation_metadata(meta["mean"], meta["std"]),
                "chipprune.run": r.name, "chipprune.model": ckpt["model_name"]}, cfg.exporter)
            export_seconds = time.perf_counter() - t0
            session = ort_runtime.session(folder / "model.onnx", cfg.device)
            first = torch.arange(min(cfg.parity_images, len(test)))
            check = parity(model, session, test.normalise(test.take(first)[0]))
            if not check.within(cfg.tolerance):
                raise ExportError(
                    f"{r.name}: ONNX Runtime's logits differ from PyTorch's by up to "
                    f"{check.max_abs_diff:.3g} (largest |logit| {check.max_abs_logit:.3g}) on "
                    f"{check.images} test images; export.tolerance allows "
                    f"{cfg.tolerance:g} x max(1, largest |logit|)")
            # the dense architecture (its weights do not change its time), exported once
            dense = dense_model(ckpt).cpu()  # evaluate, in this process, may have moved it
            pruned = is_pruned(ckpt)
            reference = None
            if pruned and lat.dense_reference:  # as evaluate; else the report divides rows
                key = json.dumps([ckpt["model_name"], dense_kwargs(ckpt), shape], sort_keys=True)
                if key not in dense_sessions:
                    path = Path(scratch) / f"dense-{len(dense_sessions)}.onnx"
                    export_onnx(dense, shape, path, exporter=cfg.exporter)
                    dense_sessions[key] = ort_runtime.session(path, cfg.device)
                reference = dense_sessions[key]
            latency = ort_runtime.latency_metrics(session, shape, lat.batch_sizes, lat.warmup,
                                                  lat.repeats, reference, lat.rounds)
            if not pruned:
                latency |= {f"ort_speedup_bs{bs}": 1.0 for bs in lat.batch_sizes}
            record = {
                "run": r.name, "onnx": "model.onnx", "opset": OPSET, "exporter": cfg.exporter,
                "onnx_bytes": (folder / "model.onnx").stat().st_size,
                "export_seconds": export_seconds,
                "parity_images": check.images, "onnx_max_abs_diff": check.max_abs_diff,
                "onnx_max_abs_logit": check.max_abs_logit,
                "onnx_top1_agreement": check.top1_agreement,
                **latency,
                "ort_device": cfg.device, "ort_providers": session.get_providers(),
                "onnxruntime": onnxruntime.__version__, "checkpoint": str(r.checkpoint),
            }
            sha = tracking.file_sha256(r.checkpoint)
            tags = {"chipprune.exported": r.name, CHECKPOINT_TAG: sha}
            with mlflow.start_run(run_name=f"export@{r.name}", nested=True, tags=tags,
                                  experiment_id=stage.info.experiment_id):
                mlflow.log_metrics({k: float(v) for k, v in record.items()
                                    if isinstance(v, int | float) and not isinstance(v, bool)})
                name = registry.registered_model_name(meta["name"], ckpt["model_name"])
                # one image: MLflow writes the example as JSON and validates it through the
                # model (2 s for two 224x224 images, half of it the JSON)
                version = registry.log_registered_onnx(
                    folder / "model.onnx", test.normalise(test.take(first[:1])[0]).numpy(),
                    int(meta["num_classes"]), name,
                    {**version_tags(ckpt, meta, model, dense), "run": r.name, CHECKPOINT_TAG: sha},
                    ort_runtime.providers_for(cfg.device))
                record |= {"registered_model": name, "registered_version": version}
                write_json(folder / "export.json", record)
                mlflow.log_artifact(str(folder / "export.json"))
            speed = max(lat.batch_sizes)
            print(f"export@{r.name}: max |diff| {check.max_abs_diff:.2e}, top-1 agreement "
                  f"{check.top1_agreement:.4f}, ONNX Runtime bs{speed} "
                  f"{latency[f'ort_latency_ms_bs{speed}']:.2f} ms, registered "
                  f"{name} v{version}", flush=True)


def version_tags(ckpt: dict[str, Any], meta: dict[str, Any], model, dense) -> dict:
    """What a registered version is: method, budget (type and target) as evaluate's run tags
    say them, params and MACs fractions of its dense architecture."""
    labels = record_labels(checkpoint_labels(ckpt, meta["name"]))
    shape = tuple(meta["image_shape"])
    cost, dense_cost = measure_cost(model, shape), measure_cost(dense, shape)
    return {**{k: labels[k] for k in ("method", "budget_type", "target")},
            "params_fraction": cost.params / dense_cost.params,
            "macs_fraction": cost.macs / dense_cost.macs}


if __name__ == "__main__":
    sys.exit(run_main(main))
