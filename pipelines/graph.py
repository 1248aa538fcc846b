"""The stages a pipeline run reproduces, in the order `dvc repro` would run them, read from
DVC's own graph of dvc.yaml (no copied list): adding a dataset, a model or a budget to
params.yaml adds tasks here without a code change."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any

RUN_ID_FILE = "mlflow_run.json"


@dataclass(frozen=True)
class StageSpec:
    name: str  # DVC's address, e.g. "train_dense@digits-resnet20"
    upstream: tuple[str, ...]  # the planned stages it depends on directly
    run_id_files: tuple[str, ...]  # its `mlflow_run.json` outs, relative to the repo root
    cmd: str = ""  # the command DVC resolved from dvc.yaml and params.yaml
    # What decides the stage's result besides its input files: command, dependency and
    # output paths, and the values of the params it reads (JSON). Two workspaces whose
    # stage has one definition and the same upstream compute the same thing.
    definition: str = ""


def _rooted(root: Path, target: str) -> str:
    """DVC reads a target's file part from the cwd; the flow's cwd need not be the repo."""
    from dvc.utils import parse_target

    path, name = parse_target(target)
    path = str(root / (path or "dvc.yaml"))
    return f"{path}:{name}" if name else path


def _address(stage: Any, root: Path) -> str:
    """The stage's address as `dvc repro` run from the repo root spells it."""
    rel = Path(os.path.relpath(stage.path, root)).as_posix()
    name = getattr(stage, "name", None)
    if not name:
        return rel  # a .dvc file
    return name if rel == "dvc.yaml" else f"{rel}:{name}"


def _run_id_files(stage: Any, root: Path) -> tuple[str, ...]:
    """Where a stage writes its MLflow run id: an `mlflow_run.json` output of its own, or else
    the top of a directory output (select_channels, baseline_masks, evaluate write it there)."""
    def rel(path: str) -> str:
        return Path(os.path.relpath(path, root)).as_posix()

    named = tuple(rel(o.fs_path) for o in stage.outs if PurePath(o.fs_path).name == RUN_ID_FILE)
    if named:
        return named
    return tuple(f"{rel(o.fs_path)}/{RUN_ID_FILE}" for o in stage.outs
                 if not PurePath(o.fs_path).suffix)


def _definition(stage: Any, root: Path) -> str:
    from dvc.dependency.param import ParamsDependency

    params = {
        Path(os.path.relpath(dep.fs_path, root)).as_posix(): dep.read_params()
        for dep in stage.deps if isinstance(dep, ParamsDependency)
    }
    return json.dumps({
        "cmd": stage.cmd,
        "deps": sorted(dep.def_path for dep in stage.deps if not isinstance(dep, ParamsDependency)),
        "params": params,
        "outs": sorted(out.def_path for out in stage.outs),
    }, sort_keys=True, default=str)


def shared_stages(plans: list[list[StageSpec]]) -> list[str]:
    """The stages every plan has with one definition and whose upstream stages are shared
    too, in the first plan's order (dependencies first): what a set of experiments would
    each compute identically, so it need run once."""
    if not plans:
        return []
    others = [{spec.name: spec for spec in plan} for plan in plans[1:]]
    shared: list[str] = []
    for spec in plans[0]:
        same = all(
            (o := other.get(spec.name)) is not None
            and o.definition == spec.definition and o.upstream == spec.upstream
            for other in others
        )
        if same and set(spec.upstream) <= set(shared):
            shared.append(spec.name)
    return shared


def plan_stages(repo: str | os.PathLike[str], targets: list[str] | None = None) -> list[StageSpec]:
    """Every stage `dvc repro [targets]` would visit, dependencies first.

    Targets are anything `dvc repro` accepts: a stage (`train_dense@digits-resnet20`), a
    foreach/matrix group (`learn_masks`), a dvc.yaml path; their upstream stages come along.
    """
    from dvc.repo import Repo
    from dvc.repo.reproduce import collect_stages, get_active_graph, plan_repro

    with Repo(os.fspath(repo)) as dvc_repo:
        root = Path(dvc_repo.root_dir)
        stages = collect_stages(dvc_repo, [_rooted(root, t) for t in targets or ["dvc.yaml"]])
        # Edges run from a stage to the stages it depends on; frozen stages lose theirs,
        # exactly as in `dvc repro`.
        graph = get_active_graph(dvc_repo.index.graph)
        order = plan_repro(graph, stages)
        planned = set(order)
        return [
            StageSpec(
                name=_address(stage, root),
                upstream=tuple(_address(dep, root) for dep in graph.successors(stage) if dep in planned),
                run_id_files=_run_id_files(stage, root),
                cmd=" && ".join(stage.cmd) if isinstance(stage.cmd, list) else (stage.cmd or ""),
                definition=_definition(stage, root),
            )
            for stage in order
        ]
