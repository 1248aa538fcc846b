"""Prefect flows over the DVC pipeline: `pruning_pipeline` reproduces dvc.yaml one task per
stage under one MLflow parent run; `sweep` runs params overrides as experiments (each a
`dvc repro` in a temporary copy of the repo) and gathers their metrics into one table.

`python -m pipelines.flows [TARGET ...]` runs the pipeline flow once."""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import allow_failure, flow
from prefect.futures import PrefectFuture
from prefect.runtime import deployment, flow_run

from pipelines import sweep_tasks
from pipelines.graph import StageSpec, plan_stages
from pipelines.tasks import (
    ParentRun,
    StageOutcome,
    close_parent_run,
    ensure_writer_limit,
    open_parent_run,
    reproduce_stage,
    stale_stages,
    writer_slot,
)


class PipelineFailed(RuntimeError):
    pass


@dataclass(frozen=True)
class PipelineResult:
    parent_run_id: str
    stages: dict[str, str]  # stage -> ran | skipped | restored
    seconds: float


def _prefect_tags(targets: list[str] | None) -> dict[str, str]:
    tags = {
        "prefect.flow_run_id": str(flow_run.id or ""),
        "prefect.flow_run_name": str(flow_run.name or ""),
        "chipprune.pipeline": "dvc.yaml",
        "chipprune.targets": " ".join(targets or []) or "(all)",
    }
    if deployment.id:
        tags["prefect.deployment_id"] = str(deployment.id)
    return tags


def _needs_repro(specs: list[StageSpec], stale: set[str] | None) -> set[str]:
    """Stages DVC reported stale, and everything downstream of them (their deps change when
    an upstream stage re-runs); all of them when there is no status to go by."""
    if stale is None:
        return {spec.name for spec in specs}
    needed: set[str] = set()
    for spec in specs:  # dependencies first
        if spec.name in stale or needed.intersection(spec.upstream):
            needed.add(spec.name)
    return needed


def _reproduce_in_order(
    root: str,
    specs: list[StageSpec],
    env: dict[str, str],
    parent: ParentRun,
    needed: set[str],
) -> tuple[list[StageOutcome], dict[str, str]]:
    """Submit every stage in DVC's order. A stage waits for its upstream stages (so a failed
    stage blocks only what depends on it) and for the stage submitted before it, whatever
    its state: DVC holds a repo-wide lock, so two stages of one workspace never run at once."""
    futures: dict[str, PrefectFuture[StageOutcome]] = {}
    outcomes: list[StageOutcome] = []
    not_done: dict[str, str] = {spec.name: "not run" for spec in specs}
    try:
        previous: PrefectFuture[StageOutcome] | None = None
        for spec in specs:
            wait_for: list[Any] = [futures[name] for name in spec.upstream]
            if previous is not None:
                wait_for.append(allow_failure(previous))
            previous = futures[spec.name] = reproduce_stage.submit(
                root, spec, env, up_to_date=spec.name not in needed, wait_for=wait_for
            )
        for name, future in futures.items():
            future.wait()
            if future.state.is_completed():
                outcomes.append(future.result())
                del not_done[name]
            else:  # Failed, or NotReady because an upstream stage failed
                not_done[name] = "failed" if future.state.is_failed() else "upstream failed"
    finally:
        close_parent_run(root, parent, outcomes, not_done)
    return outcomes, not_done


@flow(name="chipprune-pipeline")
def pruning_pipeline(
    repo: str = ".",
    targets: list[str] | None = None,
    experiment: str = "chipprune",
    status_first: bool = True,
) -> PipelineResult:
    """Reproduce the DVC pipeline (or `targets` and their upstream), one task per stage.

    Stages run one at a time in DVC's own order (DVC's repo lock allows one writer per
    workspace); a failed stage blocks only the stages downstream of it. The run holds a
    Prefect global concurrency limit of 1 per workspace, so another flow run on the same
    workspace waits instead of colliding with it; a DVC lock held outside Prefect is retried.

    `status_first`: one `dvc status` first; a stage it reports up to date, with nothing
    upstream to re-run, is recorded as skipped without starting DVC (about 0.5 s a stage:
    the no-op run of a 70-stage pipeline drops from ~40 s to a few). False: every stage
    goes through `dvc repro --single-item`.
    """
    start = time.perf_counter()
    root = str(Path(repo).resolve())
    specs = plan_stages(root, targets)
    with writer_slot(ensure_writer_limit(root)):
        parent: ParentRun = open_parent_run(
            root, experiment, run_name=f"pipeline {flow_run.name or ''}".strip(),
            tags=_prefect_tags(targets),
        )
        env = {
            "MLFLOW_TRACKING_URI": parent.tracking_uri,
            "MLFLOW_PARENT_RUN_ID": parent.run_id,
            "MLFLOW_EXPERIMENT_NAME": experiment,
            "CHIPPRUNE_ROOT": root,
        }
        stale = set(stale_stages(root, env)) if status_first else None
        outcomes, not_done = _reproduce_in_order(
            root, specs, env, parent, _needs_repro(specs, stale)
        )
    if not_done:
        raise PipelineFailed(
            "stages not reproduced: " + ", ".join(f"{k} ({v})" for k, v in not_done.items())
        )
    return PipelineResult(
        parent_run_id=parent.run_id,
        stages={o.stage: o.status for o in outcomes},
        seconds=round(time.perf_counter() - start, 3),
    )


@flow(name="chipprune-sweep")
def sweep(
    repo: str = ".",
    overrides: list[dict[str, Any]] | None = None,
    methods: list[str] | None = None,
    budgets: list[str] | None = None,
    seeds: list[int] | None = None,
    jobs: int = 1,
    experiment: str = "chipprune",
    out: str | None = None,
    dvc_targets: list[str] | None = None,
    keep_workspaces: bool = False,
) -> str:
    """Run params overrides as experiments and write one table of their DVC metrics to
    `<out>.csv` and `<out>.md` (relative to the repo; by default `results/sweep-<flow run
    name>`); returns the CSV's path.

    Give `overrides` (one dict of dotted params.yaml keys per experiment, e.g.
    `{"learn_masks.w_budget": 10}`; `+key` adds a key) or a grid: one experiment per
    methods x budgets x seeds point (a budget is TYPE-TARGET, e.g. flops-0.25; a missing
    axis keeps params.yaml's value; a seed sets `learn_masks.seed` and
    `finetune.<method>.seed`). Every experiment's params
    go through chipprune.config before anything runs.

    Each experiment is `dvc repro` in its own temporary copy of the repo that shares the
    repo's DVC cache: it never takes the workspace's DVC lock, unchanged stages are skipped,
    and `jobs` experiments run at once (OMP_NUM_THREADS defaults to cores / jobs);
    `dvc_targets` limits what each experiment reproduces (default: all of dvc.yaml). MLflow:
    one sweep run, one nested run per experiment (overrides as params), stage runs below.
    """
    root = Path(repo).resolve()
    experiments = overrides or sweep_tasks.grid_overrides(
        root, methods=methods, budgets=budgets, seeds=seeds
    )
    checked = sweep_tasks.validate_overrides(str(root), experiments)
    sweep_run = open_parent_run(
        str(root), experiment, run_name=f"sweep {flow_run.name or ''}".strip(),
        tags={**_prefect_tags(None), "chipprune.sweep": str(len(checked))},
    )
    base_env = {
        "MLFLOW_TRACKING_URI": sweep_run.tracking_uri,
        "MLFLOW_EXPERIMENT_NAME": experiment,
        "CHIPPRUNE_ARTIFACT_ROOT": os.environ.get("CHIPPRUNE_ARTIFACT_ROOT")
        or (root / "mlartifacts").as_uri(),
    }
    if jobs > 1 and "OMP_NUM_THREADS" not in os.environ:
        base_env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
    workdir = Path(tempfile.mkdtemp(prefix="chipprune-sweep-"))
    rows: list[dict[str, Any]] = []
    failed: dict[str, str] = {}
    table = ""
    try:
        numbered = [(f"exp-{i:02d}", o) for i, o in enumerate(checked, 1)]
        for start in range(0, len(numbered), max(1, jobs)):  # waves of `jobs` experiments
            wave = []
            for name, o in numbered[start : start + max(1, jobs)]:
                run = open_parent_run(
                    str(root), experiment, run_name=name,
                    tags={"mlflow.parentRunId": sweep_run.run_id,
                          "chipprune.overrides": sweep_tasks.label(o)},
                    params={f"override.{k}": v for k, v in o.items()},
                )
                ws = str(workdir / name)
                env = {**base_env, "MLFLOW_PARENT_RUN_ID": run.run_id, "CHIPPRUNE_ROOT": ws}
                made = sweep_tasks.prepare_workspace.submit(str(root), ws, name, o)
                checkout = sweep_tasks.dvc_step.submit(
                    made, name, ["checkout", "--allow-missing"], env
                )
                repro = sweep_tasks.dvc_step.submit(
                    made, name, ["repro", *(dvc_targets or [])], env, wait_for=[checkout]
                )
                metrics = sweep_tasks.evaluation_rows.submit(name, o, ws, wait_for=[repro])
                wave.append((name, o, run, ws, metrics))
            for name, _o, run, ws, metrics in wave:
                metrics.wait()
                if metrics.state.is_completed():
                    rows += metrics.result()
                else:
                    failed[name] = "failed"
                close_parent_run(ws, run, [], {name: "failed"} if name in failed else {})
        if rows:
            out = out or f"results/sweep-{flow_run.name or 'run'}"
            table = sweep_tasks.write_table(rows, str(root / out))
    except BaseException:
        failed = failed or {"sweep": "failed"}
        raise
    finally:
        outputs = [table, str(Path(table).with_suffix(".md"))] if table else []
        close_parent_run(str(root), sweep_run, [], failed, artifacts=outputs)
        if not keep_workspaces:
            shutil.rmtree(workdir, ignore_errors=True)
    if failed:
        raise PipelineFailed(f"experiments that failed: {', '.join(failed)} (see their task logs)")
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run the chipprune pipeline flow once.")
    parser.add_argument("targets", nargs="*", help="DVC stages or groups (default: all)")
    parser.add_argument("--repo", default=".")
    parser.add_argument("--experiment", default="chipprune")
    parser.add_argument("--no-status-first", dest="status_first", action="store_false",
                        help="run `dvc repro --single-item` for every stage, even up-to-date ones")
    args = parser.parse_args(argv)
    result = pruning_pipeline(args.repo, args.targets or None, args.experiment, args.status_first)
    for stage, status in result.stages.items():
        print(f"{status:>8}  {stage}")
    print(f"MLflow parent run {result.parent_run_id}; {result.seconds:.1f} s")


if __name__ == "__main__":
    main()
