"""Prefect flows over the DVC pipeline: `pruning_pipeline` reproduces dvc.yaml one task per
stage under one MLflow parent run; `reproduce_experiment` reproduces it with one params override in a
temporary copy of the repo; `sweep` runs many experiments, here or on a work pool's workers,
and gathers their metrics into one table.

`python -m pipelines.flows [TARGET ...]` runs the pipeline flow once."""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import tempfile
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import allow_failure, flow, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import PrefectFuture, as_completed
from prefect.runtime import deployment, flow_run, task_run

from chipprune.config import ConfigError
from pipelines import sweep_tasks
from pipelines.graph import StageSpec, plan_stages, shared_stages
from pipelines.stage_server import serving
from pipelines.tasks import (
    ParentRun,
    StageOutcome,
    close_parent_run,
    ensure_writer_limit,
    open_parent_run,
    reproduce_stage,
    retry_on,
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
        needed = _needs_repro(specs, stale)
        # stages fork from a warm server instead of each importing torch and MLflow (seconds
        # a stage); none is started when every stage is up to date
        with serving(Path(root)) if needed else nullcontext({}) as served:
            outcomes, not_done = _reproduce_in_order(root, specs, {**env, **served}, parent,
                                                     needed)
    if not_done:
        raise PipelineFailed(
            "stages not reproduced: " + ", ".join(f"{k} ({v})" for k, v in not_done.items())
        )
    return PipelineResult(
        parent_run_id=parent.run_id,
        stages={o.stage: o.status for o in outcomes},
        seconds=round(time.perf_counter() - start, 3),
    )


class ExperimentCrashed(RuntimeError):
    """An experiment's flow run ended Crashed (its machine or worker died): retried once."""


class ExperimentFailed(RuntimeError):
    """An experiment's flow run failed (a stage failed): not retried, it would fail again."""


@flow(name="chipprune-experiment", flow_run_name="{name}")
def reproduce_experiment(
    name: str,
    overrides: dict[str, Any],
    repo: str | None = None,
    dvc_targets: list[str] | None = None,
    mlflow_run_id: str | None = None,
    tracking_uri: str | None = None,
    mlflow_experiment: str = "chipprune",
    artifact_root: str | None = None,
    remote: bool = False,
    keep_workspace: bool = False,
    threads: int | None = None,
) -> list[dict[str, Any]]:
    """One params override as `dvc repro [dvc_targets]` in a temporary copy of `repo` that
    shares its DVC cache; returns one row per model it evaluated (its metrics, the worker
    that ran it, what DVC did with each stage), also stored as this flow run's table
    artifact, which is how a sweep on another machine reads them.

    `repo` defaults to $CHIPPRUNE_REPO: a worker machine's own clone, set where its worker
    is started (a process worker runs each flow run in a fresh temporary directory).
    `remote`: `dvc repro --pull` fetches the DVC remote's run-cache first, so a stage another
    machine already ran with the same inputs and params is checked out instead of run, and
    `dvc push --run-cache` shares what this run made. Stage runs nest under `mlflow_run_id`.
    `threads`: OMP_NUM_THREADS of its stages (when experiments share a machine's cores).
    """
    repo = repo or os.environ.get("CHIPPRUNE_REPO")
    if not repo:
        raise ConfigError("experiment: no repo; pass `repo` or start the worker with "
                          "CHIPPRUNE_REPO=<its clone of the project>")
    root = Path(repo).resolve()
    worker = os.environ.get("PREFECT__WORKER_NAME") or "local"  # set by Prefect's workers
    host = socket.gethostname()
    env = {"MLFLOW_EXPERIMENT_NAME": mlflow_experiment}
    env.update({k: v for k, v in (("MLFLOW_TRACKING_URI", tracking_uri),
                                  ("MLFLOW_PARENT_RUN_ID", mlflow_run_id),
                                  ("CHIPPRUNE_ARTIFACT_ROOT", artifact_root),
                                  ("OMP_NUM_THREADS", threads and str(threads))) if v})
    if mlflow_run_id and tracking_uri:
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=tracking_uri)
        client.set_tag(mlflow_run_id, "chipprune.worker", worker)
        client.set_tag(mlflow_run_id, "chipprune.host", host)
        client.set_tag(mlflow_run_id, "prefect.flow_run_id", str(flow_run.id or ""))
    scratch = Path(tempfile.mkdtemp(prefix="chipprune-experiment-"))
    targets = list(dvc_targets or [])
    try:
        ws = sweep_tasks.prepare_workspace(str(root), str(scratch / name), name, overrides)
        env["CHIPPRUNE_ROOT"] = ws
        sweep_tasks.dvc_step(ws, name, ["checkout", "--allow-missing"], env)
        with serving(Path(ws)) as served:  # the workspace's own code, warm (see above)
            log = sweep_tasks.dvc_step(ws, name, ["repro", *(["--pull"] if remote else []),
                                                  *targets], {**env, **served})
        if remote:
            sweep_tasks.dvc_step(ws, name, ["push", "--run-cache", *targets], env)
        outcomes = sweep_tasks.repro_outcomes(log)
        about = {"worker": worker, "host": host,
                 **{f"stages_{kind}": " ".join(stages) for kind, stages in outcomes.items()}}
        rows = [{**row, **about} for row in sweep_tasks.evaluation_rows(name, overrides, ws)]
        rows = rows or [{"experiment": name, "overrides": sweep_tasks.label(overrides), **about}]
    finally:
        if not keep_workspace:
            shutil.rmtree(scratch, ignore_errors=True)
    sweep_tasks.publish_result(rows)
    return rows


@task(task_run_name="{name}", cache_policy=NO_CACHE, retries=1,
      retry_condition_fn=retry_on(ExperimentCrashed))
def run_experiment(name: str, parameters: dict[str, Any], deployment_name: str | None) -> list[dict[str, Any]]:
    """One experiment: in this process (a subflow), or as a flow run of `deployment_name` on
    its work pool's workers (waited for). A flow run that ended Crashed is retried once, as a
    new flow run that any live worker takes; `attempts` in the rows says so."""
    attempt = task_run.run_count or 1
    if deployment_name is None:
        rows = reproduce_experiment(**parameters)
    else:
        from prefect.deployments import run_deployment

        # The key makes the creation idempotent: under load the API client retries a POST
        # whose answer timed out, and without it the server made a second flow run of the
        # same experiment (seen on a 2-core CI machine: one ran, the other was orphaned).
        child = run_deployment(deployment_name, parameters=parameters, timeout=None,
                               flow_run_name=f"{name}" + (f" (attempt {attempt})" if attempt > 1 else ""),
                               idempotency_key=f"{flow_run.id}:{name}:{attempt}",
                               poll_interval=2)
        state = child.state
        if state is None or state.is_crashed():
            raise ExperimentCrashed(f"{name}: flow run {child.name} crashed ({state and state.message})")
        if not state.is_completed():
            raise ExperimentFailed(f"{name}: flow run {child.name} ended {state.name}: {state.message}")
        rows = sweep_tasks.read_result(child.id)
    return [{**row, "attempts": attempt} for row in rows]


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
    deployment_name: str | None = None,
) -> str:
    """Run params overrides as experiments and write one table of their DVC metrics to
    `<out>.csv` and `<out>.md` (relative to the repo; by default `results/sweep-<flow run
    name>`); returns the CSV's path.

    Give `overrides` (one dict of dotted params.yaml keys per experiment, e.g.
    `{"learn_masks.w_budget": 10}`; `+key` adds a key) or a grid: one experiment per
    methods x budgets x seeds point (a budget is TYPE-TARGET, e.g. flops-0.25; a missing
    axis keeps params.yaml's value; a seed sets `learn_masks.seed` and
    `finetune.<method>.seed`). Every experiment's params go through chipprune.config before
    anything runs.

    Each experiment is the `chipprune-experiment` flow (reproduce_experiment): `dvc repro` in its own temporary copy of a
    repo, sharing that repo's DVC cache; `jobs` run at once; `dvc_targets` limits what each
    reproduces (default: all of dvc.yaml). Without `deployment_name` they run here
    (OMP_NUM_THREADS defaults to cores / jobs). With it (e.g.
    `chipprune-experiment/experiment`), each is a flow run of that deployment on its work
    pool's workers, one machine each, exchanging data through the repo's default DVC remote.
    Either way, the stages every experiment would compute identically (the dense model, CHIP
    scores) run first, once, and the experiments restore them from DVC's run-cache (the
    remote's, on a pool). A flow run
    that crashes (its worker died) is retried once on another worker. MLflow: one sweep run,
    one nested run per experiment (overrides as params, worker as a tag), stage runs below.
    """
    root = Path(repo).resolve()
    experiments = overrides or sweep_tasks.grid_overrides(
        root, methods=methods, budgets=budgets, seeds=seeds
    )
    checked = sweep_tasks.validate_overrides(str(root), experiments)
    remote = deployment_name is not None
    if remote and not sweep_tasks.default_remote(root):
        raise ConfigError(f"sweep on {deployment_name}: {root} has no default DVC remote; "
                          "the workers exchange stage outputs through one (`dvc remote add -d`)")
    sweep_run = open_parent_run(
        str(root), experiment, run_name=f"sweep {flow_run.name or ''}".strip(),
        tags={**_prefect_tags(None), "chipprune.sweep": str(len(checked))},
    )
    common = {
        "repo": None if remote else str(root),  # a worker's own clone ($CHIPPRUNE_REPO)
        "dvc_targets": dvc_targets, "tracking_uri": sweep_run.tracking_uri,
        "mlflow_experiment": experiment, "remote": remote,
        # on a pool: the experiment's own location (a workers-wide one, set by the sweep's
        # CHIPPRUNE_ARTIFACT_ROOT or the tracking server), not a path on this machine
        "artifact_root": os.environ.get("CHIPPRUNE_ARTIFACT_ROOT")
        or (None if remote else (root / "mlartifacts").as_uri()),
        "keep_workspace": keep_workspaces,
    }
    if jobs > 1 and not remote and "OMP_NUM_THREADS" not in os.environ:
        common["threads"] = max(1, (os.cpu_count() or 1) // jobs)  # jobs share these cores
    rows: list[dict[str, Any]] = []
    failed: dict[str, str] = {}
    table = ""
    try:
        if len(checked) > 1:
            _run_shared_stages(root, checked, common, sweep_run, deployment_name, dvc_targets)
        numbered = [(f"exp-{i:02d}", o) for i, o in enumerate(checked, 1)]
        runs: dict[str, ParentRun] = {}
        in_flight: dict[str, PrefectFuture[list[dict[str, Any]]]] = {}
        while numbered or in_flight:
            while numbered and len(in_flight) < max(1, jobs):
                name, o = numbered.pop(0)
                runs[name] = open_parent_run(
                    str(root), experiment, run_name=name,
                    tags={"mlflow.parentRunId": sweep_run.run_id,
                          "chipprune.overrides": sweep_tasks.label(o)},
                    params={f"override.{k}": v for k, v in o.items()},
                )
                parameters = {**common, "name": name, "overrides": o,
                              "mlflow_run_id": runs[name].run_id}
                in_flight[name] = run_experiment.submit(name, parameters, deployment_name)
            done = next(iter(as_completed(list(in_flight.values()))))
            name = next(n for n, f in in_flight.items() if f is done)
            del in_flight[name]
            done.wait()  # its final state, not the one the API reported a moment ago
            if done.state.is_completed():
                rows += [r for r in done.result() if "run" in r]
            else:
                failed[name] = "failed"
            close_parent_run(str(root), runs[name], [], {name: "failed"} if name in failed else {})
        if rows:
            out = out or f"results/sweep-{flow_run.name or 'run'}"
            table = sweep_tasks.write_table(rows, str(root / out))
    except BaseException:
        failed = failed or {"sweep": "failed"}
        raise
    finally:
        outputs = [table, str(Path(table).with_suffix(".md"))] if table else []
        close_parent_run(str(root), sweep_run, [], failed, artifacts=outputs)
    if failed:
        raise PipelineFailed(f"experiments that failed: {', '.join(failed)} (see their task logs)")
    return table


def _run_shared_stages(
    root: Path,
    experiments: list[dict[str, Any]],
    common: dict[str, Any],
    sweep_run: ParentRun,
    deployment_name: str | None,
    dvc_targets: list[str] | None,
) -> None:
    """Reproduce, once, the stages every experiment would compute identically (into the DVC
    cache and its run-cache, pushed to the remote on a pool); the experiments then restore
    them from the run-cache instead of each computing them at the same time."""
    plans = [sweep_tasks.experiment_plan(root, o, dvc_targets) for o in experiments]
    shared = shared_stages(plans)
    if not shared:
        return
    name = "shared-stages"
    run = open_parent_run(str(root), common["mlflow_experiment"], run_name=name,
                          tags={"mlflow.parentRunId": sweep_run.run_id,
                                "chipprune.stages": " ".join(shared)})
    parameters = {**common, "name": name, "overrides": experiments[0], "dvc_targets": shared,
                  "mlflow_run_id": run.run_id}
    try:
        run_experiment(name, parameters, deployment_name)
    except BaseException:
        close_parent_run(str(root), run, [], {name: "failed"})
        raise
    close_parent_run(str(root), run, [], {})


def warm_tracking(repo: str) -> threading.Thread:
    """Import MLflow and open the repo's existing tracking store in a thread, started before
    the flow call: with no PREFECT_API_URL that call first starts Prefect's temporary server
    (a subprocess it waits about 4 s for), and the flow's first task, opening the MLflow
    parent run, then finds both ready instead of paying them (3.4 s of a 15 s no-op flow
    here). A store that does not exist yet is left for that task to create: a flow that
    fails before it leaves no mlflow.db behind."""
    def warm() -> None:
        try:
            from mlflow import MlflowClient

            from chipprune.reporting.tracking import local_store  # and torch, as the task

            db = local_store(Path(repo).resolve())
            if not os.environ.get("MLFLOW_TRACKING_URI") and db.is_file():
                MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments(max_results=1)
        except Exception:  # noqa: BLE001 - a warm-up only: the task reports any real problem
            pass

    thread = threading.Thread(target=warm, name="warm-tracking", daemon=True)
    thread.start()
    return thread


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run the chipprune pipeline flow once.")
    parser.add_argument("targets", nargs="*", help="DVC stages or groups (default: all)")
    parser.add_argument("--repo", default=".")
    parser.add_argument("--experiment", default="chipprune")
    parser.add_argument("--no-status-first", dest="status_first", action="store_false",
                        help="run `dvc repro --single-item` for every stage, even up-to-date ones")
    args = parser.parse_args(argv)
    warm_tracking(args.repo)
    result = pruning_pipeline(args.repo, args.targets or None, args.experiment, args.status_first)
    for stage, status in result.stages.items():
        print(f"{status:>8}  {stage}")
    print(f"MLflow parent run {result.parent_run_id}; {result.seconds:.1f} s")


if __name__ == "__main__":
    main()
