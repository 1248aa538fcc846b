"""What every stage shell shares: argv parsing helpers and the error contract (a bad input
is one line on stderr naming the file or key, exit code 2, nothing written)."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from chipprune.config import ConfigError, DistributedConfig, load_params, parse_budget_label
from chipprune.data import DataFileError
from chipprune.deploy.onnx_export import ExportError
from chipprune.reporting import tracking
from chipprune.reporting.tracking import TrackingUnreachable
from chipprune.surgery.masks import MaskError
from chipprune.training import distributed
from chipprune.training.checkpoint import CheckpointError


def parse_budget(label: str) -> tuple[str, float]:
    """A budget from argv (a DVC matrix value, TYPE-TARGET), as a ConfigError if bad."""
    try:
        return parse_budget_label(label)
    except ValueError as e:
        raise ConfigError(str(e)) from None


USER_ERRORS = (
    ConfigError, CheckpointError, DataFileError, MaskError, TrackingUnreachable, FileNotFoundError,
    ExportError,
)
RESUME_DIR = Path(".chipprune") / "resume"


def run_main(main: Callable[[list[str] | None], None], argv: list[str] | None = None) -> int:
    """Run a stage's main; user errors become one clear message and exit code 2."""
    try:
        main(argv)
    except USER_ERRORS as e:
        who = f" (rank {distributed.rank()})" if not distributed.is_main() else ""
        print(f"error{who}: {e}", file=sys.stderr)
        return 2
    finally:
        distributed.teardown()
    return 0


def start_ranks(
    module: str, argv: list[str] | None, cfg: DistributedConfig, device: torch.device
) -> torch.device:
    """Multi-process training: when `cfg.nproc` > 1 and this is not yet one rank of a group,
    re-run the stage as that many ranks and exit with their status; in a rank (started so,
    or by torchrun by hand) join the group. Returns this rank's device."""
    distributed.relaunch(module, sys.argv[1:] if argv is None else list(argv), cfg.nproc, device)
    return distributed.setup(device)


@contextmanager
def main_rank_run(
    stage: str,
    config: Mapping[str, Any],
    run_id_path: str | Path,
    inputs: Mapping[str, str | Path] = (),
) -> Iterator[Any]:
    """`tracking.stage_run` on rank 0; nothing (None) on the other ranks, which write nothing.
    The run is tagged with the number of processes that trained (torchrun by hand may differ
    from `distributed.nproc`)."""
    if distributed.is_main():
        tags = {"chipprune.world_size": str(distributed.world())}
        with tracking.stage_run(stage, config, run_id_path, inputs=inputs, tags=tags) as run:
            yield run
    else:
        yield None


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Build a directory output in a temp sibling; it replaces `path` only when complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


@dataclass
class GridPoint:
    """One budget x dataset x model of the pruning grid, read and ready for thresholding."""

    name: str  # <budget>-<dataset>-<model>, the run folder's name
    dataset: str
    model_name: str
    dense: dict[str, Any]  # the dense checkpoint
    model: Any  # the dense PrunableNet
    budget: Any  # its BudgetModel, with the latency table when the budget is latency
    kind: str
    target: float
    table: Any  # the LatencyTable, or None


def grid_points(params: Any, dense_root: str | Path, data_root: str | Path,
                latency_root: str | Path) -> list[GridPoint]:
    """Every point of params.prune's grid, from <dense_root>/<dataset>-<model>/checkpoint.pt,
    <data_root>/<dataset> and the latency tables under `latency_root`: all read before any
    work, so a missing file fails before an MLflow run opens or an output is written."""
    import itertools

    from chipprune.budgets.exact import BudgetModel
    from chipprune.budgets.latency_table import table_for_budget, table_path
    from chipprune.data import load_prepared
    from chipprune.training.checkpoint import load_checkpoint, model_from_checkpoint

    grid, lb = params.prune, params.latency_budget
    budgets = [(label, *parse_budget(label)) for label in grid.budgets]
    points = []
    for dataset, model_name in itertools.product(grid.datasets, grid.models):
        ckpt = Path(dense_root) / f"{dataset}-{model_name}" / "checkpoint.pt"
        dense = load_checkpoint(ckpt)
        model = model_from_checkpoint(dense, ckpt)
        shape = tuple(load_prepared(Path(data_root) / dataset, splits=()).meta["image_shape"])
        for label, kind, target in budgets:
            path = table_path(lb.runtime, lb.device, lb.batch_size, dataset, model_name, latency_root)
            table = table_for_budget(kind, path, lb, dataset, model_name)
            points.append(GridPoint(f"{label}-{dataset}-{model_name}", dataset, model_name, dense,
                                    model, BudgetModel.from_model(model, shape, latency=table),
                                    kind, target, table))
    return points


@dataclass(frozen=True)
class EvaluatedRun:
    """One checkpoint the pipeline evaluates: a dense model, a fine-tuned grid point, a CHIP
    rate configuration or a transfer pair, with the prepared dataset it is tested on."""

    name: str  # the report's and MLflow's name, e.g. chipnet-flops-0.25-digits-resnet20
    checkpoint: Path
    data_dir: Path


def evaluated_runs(params: Any, runs_root: str | Path = "runs",
                   data_root: str | Path = "data/prepared") -> list[EvaluatedRun]:
    """Every checkpoint dvc.yaml trains, read from params (not a glob of runs/, which would
    also find the leftovers of grid points since removed), in the report's order."""
    import itertools

    runs, data = Path(runs_root), Path(data_root)
    out = [EvaluatedRun(f"dense-{ds}-{m}", runs / "dense" / f"{ds}-{m}" / "checkpoint.pt", data / ds)
           for ds, m in itertools.product(params.dense.datasets, params.dense.models)]
    if params.prune is not None:
        g = params.prune
        for method, budget, ds, m in itertools.product(g.methods, g.budgets, g.datasets, g.models):
            name = f"{method}-{budget}-{ds}-{m}"
            out.append(EvaluatedRun(name, runs / "finetune" / name / "checkpoint.pt", data / ds))
    for key, rc in params.chip_rates.items():
        out.append(EvaluatedRun(f"chip-rates-{key}",
                                runs / "finetune" / f"chip-rates-{key}" / "checkpoint.pt",
                                data / rc.dataset))
    for key, pair in params.transfer.pairs.items():
        out.append(EvaluatedRun(f"transfer-{key}", runs / "finetune" / f"transfer-{key}" / "checkpoint.pt",
                                data / pair.student))
    return out


def parse_run_args(argv: list[str] | None, prog: str, doc: str | None, verb: str) -> Any:
    """The CLI of a stage over every evaluated checkpoint (evaluate, export): its output
    folder, then which checkpoints (see `runs_from_args`)."""
    import argparse

    ap = argparse.ArgumentParser(prog=prog, description=doc,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir")
    ap.add_argument("--only", action="append", metavar="NAME",
                    help=f"{verb} only this run of the params grid (repeatable)")
    ap.add_argument("--run", action="append", nargs=3, metavar=("NAME", "CHECKPOINT", "DATA_DIR"),
                    help=f"{verb} this checkpoint instead of the params grid (repeatable)")
    ap.add_argument("--runs-root", default="runs")
    ap.add_argument("--data-root", default="data/prepared")
    ap.add_argument("--params", default="params.yaml")
    return ap.parse_args(argv)


def runs_from_args(args: Any) -> list[EvaluatedRun]:
    """The checkpoints `parse_run_args` named (`--run`), else the params grid's (`--only`
    a subset), each found with its prepared data before any work."""
    if args.run:
        runs = [EvaluatedRun(n, Path(c), Path(d)) for n, c, d in args.run]
    else:
        runs = evaluated_runs(load_params(args.params), args.runs_root, args.data_root)
        if args.only:
            known = {r.name for r in runs}
            unknown = sorted(set(args.only) - known)
            if unknown:
                raise ConfigError(f"--only {', '.join(unknown)}: not a run of {args.params}; "
                                  f"its runs: {', '.join(sorted(known))}")
            runs = [r for r in runs if r.name in args.only]
    names = [r.name for r in runs]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"runs named twice: {repeated}")
    for r in runs:  # all found before any work
        if not r.checkpoint.is_file():
            raise FileNotFoundError(f"{r.name}: no checkpoint at {r.checkpoint}")
        if not (r.data_dir / "meta.json").is_file():
            raise FileNotFoundError(f"{r.name}: no prepared dataset at {r.data_dir}")
    return runs
