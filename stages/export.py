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
only when every model passed. The exports (seconds each with torch.export, and they do not
share work) run first, in `export.workers` forked processes, and only then the parity checks
and the ONNX Runtime timings, one model at a time on an otherwise idle machine.
"""

from __future__ import annotations

import gc
import hashlib
import json
import multiprocessing
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
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
    preload,
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
from stages._common import (
    EvaluatedRun,
    atomic_dir,
    parse_run_args,
    run_main,
    runs_from_args,
)


def main(argv: list[str] | None = None) -> None:
    args = parse_run_args(argv, "stages.export", __doc__, "export")

    params = load_params(args.params)
    cfg, lat = params.export, params.evaluate.latency
    runs = runs_from_args(args)
    config = {"export": cfg.model_dump(), "latency": lat.model_dump(),
              "runs": {r.name: str(r.checkpoint) for r in runs}}

    with atomic_dir(args.out_dir) as tmp, tempfile.TemporaryDirectory() as scratch:
        tracking.check_reachable(tracking.tracking_uri())  # an unreachable server: no work
        jobs = [ExportJob(tmp / r.name / "model.onnx", r.checkpoint, r.data_dir, r.name)
                for r in runs]
        if lat.dense_reference:  # each dense architecture once (its weights do not change its
            jobs += dense_jobs(runs, Path(scratch))  # time), as evaluate times it
        t0 = time.perf_counter()
        export_seconds = export_all(jobs, cfg.exporter, cfg.workers)
        wall = time.perf_counter() - t0
        print(f"export: {len(jobs)} ONNX files in {wall:.1f}s ({cfg.exporter}, "
              f"{min(cfg.workers, len(jobs))} processes)", flush=True)
        with tracking.stage_run("export", config, tmp / "mlflow_run.json") as stage:
            import mlflow  # the exports ran before this run: their wall time is logged here

            mlflow.log_metrics({"exports_wall_seconds": wall, "exports": len(jobs)})
            record_all(runs, tmp, Path(scratch), export_seconds, stage, cfg, lat)


@dataclass(frozen=True)
class ExportJob:
    """One ONNX file to write: `checkpoint`'s model (its dense architecture when `run` is
    None) at the image shape of the prepared data in `data_dir`."""

    path: Path
    checkpoint: Path
    data_dir: Path
    run: str | None


def dense_jobs(runs: list[EvaluatedRun], scratch: Path) -> list[ExportJob]:
    """The dense architecture of every pruned run, one job per distinct (model, widths-free
    kwargs, image shape), written to `scratch` under its key's index (`dense_path`)."""
    jobs, seen = [], set()
    for r in runs:
        ckpt = load_checkpoint(r.checkpoint)
        key = dense_key(ckpt, load_meta(r.data_dir)["image_shape"])
        if is_pruned(ckpt) and key not in seen:
            seen.add(key)
            jobs.append(ExportJob(dense_path(scratch, key), r.checkpoint, r.data_dir, None))
    return jobs


def dense_key(ckpt: dict[str, Any], shape) -> str:
    return json.dumps([ckpt["model_name"], dense_kwargs(ckpt), list(shape)], sort_keys=True)


def dense_path(scratch: Path, key: str) -> Path:
    return scratch / f"dense-{hashlib.sha256(key.encode()).hexdigest()[:16]}.onnx"


def export_one(job: ExportJob, exporter: str) -> float:
    """Write one job's ONNX file; the seconds the export itself took."""
    meta = load_meta(job.data_dir)
    ckpt = load_checkpoint(job.checkpoint)
    if job.run is None:
        model, metadata = dense_model(ckpt).cpu(), {}
    else:
        model = model_from_checkpoint(ckpt, job.checkpoint)
        metadata = {**normalisation_metadata(meta["mean"], meta["std"]),
                    "chipprune.run": job.run, "chipprune.model": ckpt["model_name"]}
    job.path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    export_onnx(model.float().eval(), tuple(meta["image_shape"]), job.path, metadata, exporter)
    return time.perf_counter() - t0


def _export_in_worker(job: ExportJob, exporter: str) -> float:
    torch.set_num_threads(1)  # one core per worker, as a DataLoader worker
    return export_one(job, exporter)


def export_all(jobs: list[ExportJob], exporter: str, workers: int) -> dict[Path, float]:
    """Every job's file, in `workers` processes forked from this one (no import to repeat;
    in a stage it has run no model and MLflow has started no thread yet); the export seconds
    per file. The first error (an ExportError names the op) ends the stage.

    A fork inherits every object but not the threads behind them: a child that garbage-
    collected an inherited ONNX Runtime session (a caller's, in-process) would wait forever
    on its thread pool. So this process collects its own garbage first and freezes the rest
    while the workers fork (the gc.freeze recipe for fork): a child never collects an object
    it inherited."""
    if workers <= 1 or len(jobs) <= 1:
        return {job.path: export_one(job, exporter) for job in jobs}
    preload(exporter)  # once here, not once per worker
    context = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=context) as pool:
        gc.collect()
        gc.freeze()
        try:  # the first submit forks every worker
            futures = {job.path: pool.submit(_export_in_worker, job, exporter) for job in jobs}
        finally:
            gc.unfreeze()
        try:
            return {path: future.result() for path, future in futures.items()}
        except BaseException:
            pool.shutdown(cancel_futures=True)  # no waiting for the rest
            raise


def record_all(runs: list[EvaluatedRun], tmp: Path, scratch: Path,
               export_seconds: dict[Path, float], stage, cfg, lat) -> None:
    """Parity, ONNX Runtime latency, export.json and the registered MLflow model of every
    run, one at a time (timings on a machine nothing else of ours is using)."""
    import mlflow
    import onnxruntime

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
        session = ort_runtime.session(folder / "model.onnx", cfg.device)
        first = torch.arange(min(cfg.parity_images, len(test)))
        check = parity(model, session, test.normalise(test.take(first)[0]))
        if not check.within(cfg.tolerance):
            raise ExportError(
                f"{r.name}: ONNX Runtime's logits differ from PyTorch's by up to "
                f"{check.max_abs_diff:.3g} (largest |logit| {check.max_abs_logit:.3g}) on "
                f"{check.images} test images; export.tolerance allows "
                f"{cfg.tolerance:g} x max(1, largest |logit|)")
        dense = dense_model(ckpt).cpu()  # for the version's params and MACs fractions
        pruned = is_pruned(ckpt)
        reference = None
        if pruned and lat.dense_reference:  # as evaluate; else the report divides rows
            key = dense_key(ckpt, shape)
            if key not in dense_sessions:
                dense_sessions[key] = ort_runtime.session(dense_path(scratch, key), cfg.device)
            reference = dense_sessions[key]
        latency = ort_runtime.latency_metrics(session, shape, lat.batch_sizes, lat.warmup,
                                              lat.repeats, reference, lat.rounds)
        if not pruned:
            latency |= {f"ort_speedup_bs{bs}": 1.0 for bs in lat.batch_sizes}
        record = {
            "run": r.name, "onnx": "model.onnx", "opset": OPSET, "exporter": cfg.exporter,
            "onnx_bytes": (folder / "model.onnx").stat().st_size,
            "export_seconds": export_seconds[folder / "model.onnx"],
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
