"""DVC stage `profile_latency`: the latency table of one architecture on the target device at
the target batch size in the target runtime (params `latency_budget`: eager PyTorch, or ONNX
Runtime as the export stage runs the model), for the `latency` budget type -> table.json
(per prunable conv, measured ms on a grid of in/out widths, rest, scale and call fitted to whole
models; chipprune.budgets.latency_table), MLflow.

    python -m stages.profile_latency <dataset> <model> <data_dir> <out_dir>

When no budget of prune.budgets is a latency budget, the stage writes a table file that
says it was not profiled (profiling is minutes to hours; nothing would read it), and a
stage that asks for it later gets that message; adding a latency budget re-runs it.

Only the architecture matters (the dataset gives the input shape and class count), so the
table is built from params.yaml's `models.<model>`, not from a trained checkpoint, and is made
once per model, runtime, device and batch size:
runs/latency/<runtime>-<device>-bs<batch>-<dataset>-<model>/.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import sys
import time
from pathlib import Path

import torch

from chipprune.atomic import write_json
from chipprune.budgets.latency import (
    last_level_cache_mb,
    latency_by_format,
    onednn_block,
    onednn_round_to,
)
from chipprune.budgets.latency_profile import (
    TorchTimer,
    best_checked,
    device_meta,
    profile_model,
    table_faults,
    weight_cost_bound,
)
from chipprune.budgets.latency_table import NOT_PROFILED
from chipprune.config import ConfigError, load_params, parse_budget_label
from chipprune.data import load_prepared
from chipprune.models import create_model
from chipprune.reporting import tracking
from stages._common import run_main


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="stages.profile_latency",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for a in ("dataset", "model", "data_dir", "out_dir"):
        ap.add_argument(a)
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args(argv)

    params = load_params(args.params)
    cfg = params.latency_budget
    if args.dataset not in params.datasets:
        raise ConfigError(f"datasets.{args.dataset}: not defined in {args.params}")
    if args.model not in params.models:
        raise ConfigError(
            f"models.{args.model}: not defined in {args.params}; defined: {sorted(params.models)}"
        )
    grid = params.prune
    wanted = grid is not None and args.dataset in grid.datasets and args.model in grid.models and (
        any(parse_budget_label(b)[0] == "latency" for b in grid.budgets))
    if not wanted:
        out = Path(args.out_dir)
        reason = "no latency budget in prune.budgets for this dataset and model"
        with tracking.stage_run(f"profile_latency@{args.dataset}-{args.model}",
                                {"profiled": False, "reason": reason}, out / "mlflow_run.json"):
            write_json(out / "table.json", {"format": NOT_PROFILED, "reason": reason,
                                            "dataset": args.dataset, "model": args.model})
        print(f"profile_latency@{args.dataset}-{args.model}: not profiled ({reason})", flush=True)
        return
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"{args.params}: latency_budget.device: 'cuda' is not available here "
            "(the table must be measured on the target device)"
        )
    meta = load_prepared(Path(args.data_dir), splits=()).meta
    shape = tuple(meta["image_shape"])
    m_cfg = params.models[args.model]

    def build(widths=None):  # the architecture at these group widths (random weights)
        return create_model(
            m_cfg.arch,
            **m_cfg.kwargs,
            num_classes=meta["num_classes"],
            in_channels=shape[0],
            **({"widths": widths} if widths else {}),
        )

    model = build().eval()
    device = torch.device(cfg.device)

    name = f"profile_latency@{args.dataset}-{args.model}"
    out = Path(args.out_dir)
    config = {
        "latency_budget": cfg.model_dump(),
        **({"export.exporter": params.export.exporter} if cfg.runtime == "onnxruntime" else {}),
        "dataset": args.dataset,
        "model": args.model,
        "arch": m_cfg.arch,
        "kwargs": m_cfg.kwargs,
    }
    with tracking.stage_run(name, config, out / "mlflow_run.json"):
        import mlflow

        t0 = time.perf_counter()
        fmt, by_format = cfg.memory_format, {}
        if cfg.runtime == "onnxruntime":
            from chipprune.deploy.ort_latency import nchwc_block

            fmt = "onnx"  # ONNX Runtime picks its own layout (blocked NCHWc on CPU)
            block = nchwc_block(cfg.device)
            unaligned = [f"{key} {v}" for key, v in (("latency_budget.step", cfg.step),
                                                     ("prune.round_to", grid.round_to))
                         if v % max(block, 1)]  # block 0: convs not blocked, all aligned
            if unaligned:  # measured: ResNet-56 at 24-wide groups ran as at 32
                print(f"{name}: note: ONNX Runtime computes convs here in blocks of {block} "
                      f"channels, a width costs what the next multiple of {block} does; with "
                      f"{' and '.join(unaligned)} the budget pays for channels that buy no "
                      f"speed (set both to {block})", flush=True)
        else:
            block = onednn_block(device)
            if onednn_round_to(cfg.step, grid.round_to, device) != grid.round_to:
                print(f"{name}: note: PyTorch (oneDNN) computes convs here in blocks of {block} "
                      f"channels and a width off them runs slower than the table's grid around "
                      f"it says; with latency_budget.step {cfg.step} coarser than prune.round_to "
                      f"{grid.round_to} the budget interpolates past them (set prune.round_to "
                      f"to a multiple of {block}, or latency_budget.step to prune.round_to)",
                      flush=True)
        if cfg.runtime != "onnxruntime" and fmt == "auto":  # the faster format, best of rounds
            probe = model.to(device)
            rounds = [
                latency_by_format(probe, shape, cfg.batch_size, device, cfg.warmup, cfg.repeats)
                for _ in range(cfg.rounds)
            ]
            by_format = {f: min(r[f] for r in rounds) for f in rounds[0]}
            fmt = min(by_format, key=by_format.get)

        def attempt(number: int):
            if cfg.runtime == "onnxruntime":
                from chipprune.deploy.ort_latency import OrtTimer

                timer = OrtTimer(cfg.device, cfg.warmup, cfg.repeats, min_ms=cfg.min_ms,
                                 exporter=params.export.exporter)  # what the export stage ships
            else:
                timer = TorchTimer(device, fmt, cfg.warmup, cfg.repeats, min_ms=cfg.min_ms)
            table = profile_model(
                model,
                shape,
                cfg.batch_size,
                step=cfg.step,
                timer=timer,
                model_timer=timer.model_timer(build, shape, cfg.batch_size),
                rounds=cfg.rounds,
                calibration=cfg.calibration,
                weight_ms_per_mb_max=weight_cost_bound(device),
                cache_mb=last_level_cache_mb(device),
                meta={
                    "model": args.model,
                    "runtime": cfg.runtime,
                    "arch": m_cfg.arch,
                    "kwargs": m_cfg.kwargs,
                    "dataset": args.dataset,
                    "memory_format": fmt,
                    "channel_block": block,
                    "dense_ms_by_format": by_format,
                    "warmup": cfg.warmup,
                    "repeats": cfg.repeats,
                    "attempt": number,
                    **device_meta(device),
                    **({"onnxruntime": importlib.metadata.version("onnxruntime"),
                        "exporter": params.export.exporter}
                       if cfg.runtime == "onnxruntime" else {}),
                },
            )
            print(f"{name}: attempt {number}, check error {table.meta['check']['error']:+.1%}",
                  flush=True)
            return table

        table, tables = best_checked(attempt, cfg.attempts, cfg.max_check_error)
        seconds = time.perf_counter() - t0
        table.save(out / "table.json")
        check = table.meta["check"]  # a second whole model, widths halved: held-out error
        mlflow.log_metrics(
            {
                "dense_ms": table.model_ms,
                "rest_ms": table.rest_ms,
                "scale": table.scale,
                "call_ms": table.call_ms,
                "weight_ms_per_mb": table.weight_ms_per_mb,
                "spill_ms_per_mb": table.spill_ms_per_mb,
                "check_error": check["error"],
                "timings": table.meta["timings"],
                "profile_seconds": seconds,
                "attempts": len(tables),
            }
        )
        mlflow.log_artifact(str(out / "table.json"))
    faults = table_faults(table, cfg.max_check_error)
    if faults:
        print(
            f"warning: {name}: after {len(tables)} attempts the best table {'; '.join(faults)}"
            "; timings this noisy make a poor budget: profile on an idle machine, or raise "
            "latency_budget.rounds / repeats / attempts",
            file=sys.stderr,
            flush=True,
        )
    print(
        f"{name}: {len(table.layers)} layers, {table.meta['timings']} timings x {cfg.rounds} "
        f"rounds in {seconds:.1f}s on {device} ({cfg.runtime}, {fmt}, batch {cfg.batch_size}); "
        f"dense {table.model_ms:.3f} ms, rest {table.rest_ms:.3f} ms, scale {table.scale:.3f}, "
        f"call {table.call_ms:+.4f} ms, weights {table.weight_ms_per_mb:.4f} ms/MB, spill "
        f"{table.spill_ms_per_mb:.4f} ms/MB over {table.cache_mb:.1f} MB; "
        "half-width model predicted "
        f"{check['predicted_ms']:.3f} ms, measured {check['measured_ms']:.3f} ms "
        f"({check['error']:+.1%})",
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(run_main(main))
