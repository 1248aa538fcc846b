"""Prefect tasks of the pipeline flow: one task per DVC stage (`dvc repro --single-item`, so
DVC alone decides what is stale), the workspace's writer limit, and the MLflow parent run
that every executed stage nests under."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from pipelines.graph import StageSpec

Status = Literal["ran", "skipped", "restored"]
DVC_LOCK_BUSY = "Unable to acquire lock"  # dvc/lock.py, after DVC's own 3 s of retrying


class DvcLockBusy(RuntimeError):
    """Another DVC process holds the workspace lock: transient, worth a retry."""


class CommandFailed(RuntimeError):
    """An external command exited non-zero for a reason a retry will not fix."""


@dataclass(frozen=True)
class StageOutcome:
    stage: str
    status: Status  # ran: DVC ran its cmd; skipped: up to date; restored: from the run cache
    run_id: str | None  # the MLflow run that made its outputs (new when ran)
    seconds: float


@dataclass(frozen=True)
class ParentRun:
    run_id: str
    experiment_id: str
    tracking_uri: str


def tool_env(extra: Mapping[str, str] = ()) -> dict[str, str]:
    """The environment of a DVC subprocess: this interpreter's bin first on PATH (DVC runs
    stage commands as `python -m stages...` through the shell), analytics off."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("DVC_NO_ANALYTICS", "1")
    env.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    env.update(extra)
    return env


def dvc(*args: str) -> list[str]:
    return [sys.executable, "-m", "dvc", *args]


def run_cli(
    cmd: list[str], cwd: str | Path, env: Mapping[str, str], stdout_only: bool = False
) -> str:
    """Run one external command with its output in the task's log (streamed, stderr merged;
    or, with stdout_only, stderr logged and stdout returned alone, for JSON). A non-zero exit
    is DvcLockBusy or CommandFailed, carrying the tail of the output."""
    logger = get_run_logger()
    logger.info("$ %s", " ".join(cmd[2:] if cmd[:2] == [sys.executable, "-m"] else cmd))
    if stdout_only:
        done = subprocess.run(cmd, cwd=cwd, env=dict(env), capture_output=True, text=True)
        lines = done.stderr.splitlines()
        for line in lines:
            logger.info(line)
        output, returncode = done.stdout, done.returncode
        lines += output.splitlines()
    else:
        lines = []
        with subprocess.Popen(
            cmd, cwd=cwd, env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, bufsize=1,
        ) as proc:
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.append(line.rstrip("\n"))
                logger.info(lines[-1])
        output, returncode = "\n".join(lines), proc.returncode
    if returncode != 0:
        tail = "\n".join(lines[-30:])
        error = DvcLockBusy if any(DVC_LOCK_BUSY in line for line in lines) else CommandFailed
        raise error(f"{' '.join(cmd)} exited with {returncode}:\n{tail}")
    return output


def retry_on(*errors: type[BaseException]) -> Callable[[Any, Any, Any], bool]:
    """A task's retry_condition_fn: retry only when it raised one of `errors`."""
    def condition(task: Any, task_run: Any, state: Any) -> bool:
        try:
            state.result()
        except errors:
            return True
        except BaseException:
            return False
        return False

    return condition


# Retry a failed stage only when DVC's lock was busy; a stage that crashed will crash again.
retry_if_transient = retry_on(DvcLockBusy)


def writer_limit_name(repo: str | Path) -> str:
    """One global concurrency limit per workspace: `dvc-writer-<dir>-<hash of its path>`."""
    root = Path(repo).resolve()
    slug = re.sub(r"[^A-Za-z0-9_-]", "-", root.name)[:40]
    return f"dvc-writer-{slug}-{hashlib.sha1(str(root).encode()).hexdigest()[:10]}"


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
def ensure_writer_limit(repo: str) -> str:
    """Create (or reset to 1) the workspace's writer limit on the Prefect server."""
    from prefect.client.orchestration import get_client

    name = writer_limit_name(repo)
    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(name, limit=1)
    return name


@contextmanager
def writer_slot(limit: str) -> Iterator[None]:
    """Hold the workspace's only DVC-writer slot for a whole flow run: DVC takes a repo-wide
    lock, so a `dvc repro` of another flow run in the same workspace would fail. (Taken per
    task instead, each acquisition costs about 2 s: the previous holder's release reaches
    the server after the next request, which then waits out a Retry-After.)"""
    from prefect.concurrency.sync import concurrency

    get_run_logger().info("taking the DVC-writer slot %r (waits while another run holds it)", limit)
    with concurrency(limit, occupy=1, strict=True):
        yield


def stage_status(output: str, stage: str) -> Status:
    if f"Running stage '{stage}'" in output:
        return "ran"
    if f"Stage '{stage}' is cached - skipping run" in output:
        return "restored"
    return "skipped"  # "Stage '...' didn't change, skipping"


def read_run_id(repo: str | Path, run_id_files: tuple[str, ...]) -> str | None:
    for rel in run_id_files:
        try:
            return json.loads((Path(repo) / rel).read_text())["run_id"]
        except (OSError, ValueError, KeyError):
            continue
    return None


@task(
    name="dvc-status",
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=10,
    retry_condition_fn=retry_if_transient,
)
def stale_stages(repo: str, env: dict[str, str]) -> list[str]:
    """`dvc status --json`: the stages whose own deps, params, outs or command changed."""
    output = run_cli(dvc("status", "--json"), repo, tool_env(env), stdout_only=True)
    return sorted(json.loads(output or "{}"))


@task(
    name="dvc-repro-stage",
    task_run_name="{spec.name}",
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=10,
    retry_condition_fn=retry_if_transient,
)
def reproduce_stage(
    repo: str, spec: StageSpec, env: dict[str, str], up_to_date: bool = False
) -> StageOutcome:
    """`dvc repro --single-item <stage>`: DVC decides whether it is stale; we only read
    whether it ran, and which MLflow run its outputs come from. `up_to_date`: DVC already
    said so (`dvc status`, nothing upstream re-run), so no subprocess is spent on it."""
    start = time.perf_counter()
    if up_to_date:
        get_run_logger().info("dvc status: %s is up to date, skipping", spec.name)
        status: Status = "skipped"
    else:
        output = run_cli(dvc("repro", "--single-item", spec.name), repo, tool_env(env))
        status = stage_status(output, spec.name)
    return StageOutcome(
        stage=spec.name,
        status=status,
        run_id=read_run_id(repo, spec.run_id_files),
        seconds=round(time.perf_counter() - start, 3),
    )


def mlflow_key(stage: str) -> str:
    """MLflow keys allow [\\w.\\- :/] only: `train_dense@digits-resnet20` -> `train_dense:digits-resnet20`."""
    return re.sub(r"[^\w.\- :/]", ":", stage)


@contextmanager
def _chipprune_root(repo: Path) -> Iterator[None]:
    """chipprune.reporting.tracking resolves the repo (git, mlflow.db) from CHIPPRUNE_ROOT or the cwd."""
    old = os.environ.get("CHIPPRUNE_ROOT")
    os.environ["CHIPPRUNE_ROOT"] = str(repo)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("CHIPPRUNE_ROOT", None)
        else:
            os.environ["CHIPPRUNE_ROOT"] = old


def _experiment_id(client: Any, name: str, repo: Path) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    artifacts = os.environ.get("CHIPPRUNE_ARTIFACT_ROOT") or (repo / "mlartifacts").as_uri()
    try:
        return client.create_experiment(name, artifact_location=artifacts)
    except Exception:  # created meanwhile by a stage or another flow run
        return client.get_experiment_by_name(name).experiment_id


def lock_sha256(repo: Path) -> str:
    from chipprune.reporting.tracking import file_sha256

    lock = repo / "dvc.lock"
    return file_sha256(lock) if lock.is_file() else "none"


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
def open_parent_run(
    repo: str,
    experiment: str,
    run_name: str,
    tags: dict[str, str],
    params: dict[str, str] | None = None,
) -> ParentRun:
    """A flow's MLflow run: provenance tags (git, packages, dvc.lock before the run). A
    `mlflow.parentRunId` tag nests it under another (a sweep's experiments)."""
    from mlflow import MlflowClient
    from mlflow.entities import Param

    from chipprune.reporting.tracking import provenance_tags, tracking_uri

    root = Path(repo)
    with _chipprune_root(root):
        uri = tracking_uri()
        all_tags = {**provenance_tags(), **tags, "dvc.lock.sha256.before": lock_sha256(root)}
    client = MlflowClient(tracking_uri=uri)
    exp_id = _experiment_id(client, experiment, root)
    run = client.create_run(exp_id, run_name=run_name, tags=all_tags)
    if params:
        client.log_batch(
            run.info.run_id, params=[Param(mlflow_key(k), str(v)[:6000]) for k, v in params.items()]
        )
    return ParentRun(run_id=run.info.run_id, experiment_id=exp_id, tracking_uri=uri)


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
def close_parent_run(
    repo: str,
    parent: ParentRun,
    outcomes: list[StageOutcome],
    not_done: dict[str, str],
    artifacts: list[str] | None = None,
) -> None:
    """Record what DVC skipped (`skipped.<stage>` = the run that made its outputs; MLflow keys
    cannot hold `@`, so `train_dense:digits-resnet20`), the params.yaml and dvc.lock the run
    left behind, and end the run FINISHED, or FAILED when a stage did not complete."""
    from mlflow import MlflowClient
    from mlflow.entities import RunTag

    client = MlflowClient(tracking_uri=parent.tracking_uri)
    root = Path(repo)
    tags = [
        RunTag(f"skipped.{mlflow_key(o.stage)}", o.run_id or "unknown")
        for o in outcomes
        if o.status != "ran"
    ]
    tags.append(RunTag("dvc.lock.sha256", lock_sha256(root)))
    client.log_batch(parent.run_id, tags=tags)
    summary = {o.stage: asdict(o) for o in outcomes}
    summary.update({stage: {"stage": stage, "status": why} for stage, why in not_done.items()})
    if summary:
        client.log_dict(parent.run_id, summary, "pipeline/stages.json")
    for path in [root / "params.yaml", root / "dvc.lock", *map(Path, artifacts or [])]:
        if path.is_file():
            client.log_artifact(parent.run_id, str(path), "pipeline")
    client.set_terminated(parent.run_id, "FAILED" if not_done else "FINISHED")
