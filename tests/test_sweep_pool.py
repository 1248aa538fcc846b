"""Sweeps across machines, for real on 127.0.0.1: a `prefect server`, one `mlflow server`, a
local-directory DVC remote, and three process workers, each in its own clone of the repo
with its own DVC cache (three "machines"). A 4-experiment sweep submits one flow run of the
experiment deployment per experiment; the stages every experiment shares run once and reach
the others through the remote's run-cache; one worker is killed mid-experiment, Prefect's
zombie automation marks its flow run Crashed and the sweep retries it on a live worker. The
retried experiment's rows equal a local sweep's (run in a fourth clone while the pool waits
out the dead worker's heartbeat)."""

from __future__ import annotations

import contextvars
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from pipelines.graph import StageSpec, shared_stages
from pipelines.mlflow_server import local_server
from pipelines.process_group import stop_group
from tests.prefect_server import BIN, prefect_server
from tests.tiny_repo import TARGETS, git_env, make_tiny_repo

POOL = "test-pool"
BOXES = ("box-a", "box-b", "box-c")  # box-c dies during its first experiment
SEEDS = [1, 2, 3, 4]
# Heartbeats every 30 s (Prefect's minimum); a run silent for 50 s is a zombie.
ZOMBIE_AFTER_S = 50


def _spec(name: str, upstream: tuple[str, ...] = (), definition: str = "d") -> StageSpec:
    return StageSpec(name=name, upstream=upstream, run_id_files=(), definition=definition)


def test_shared_stages_are_those_defined_alike_everywhere_with_shared_upstream():
    base = [_spec("prepare"), _spec("dense", ("prepare",)), _spec("masks", ("dense",), "seed1"),
            _spec("finetune", ("masks",))]
    other = [_spec("prepare"), _spec("dense", ("prepare",)), _spec("masks", ("dense",), "seed2"),
             _spec("finetune", ("masks",))]
    # finetune is defined alike but its upstream (masks) differs: not shared
    assert shared_stages([base, other]) == ["prepare", "dense"]
    assert shared_stages([base]) == ["prepare", "dense", "masks", "finetune"]
    assert shared_stages([base, other[:1]]) == ["prepare"]  # a stage one plan lacks
    assert shared_stages([]) == []


def test_a_seed_grid_shares_the_data_dense_and_latency_stages(tmp_path):
    from pipelines.sweep_tasks import experiment_plan, grid_overrides

    repo = make_tiny_repo(tmp_path / "repo")
    grid = grid_overrides(repo, seeds=[1, 2])
    assert grid == [{"learn_masks.seed": s, "chip.seed": s, "baselines.seed": s,
                     "finetune.chipnet.seed": s} for s in (1, 2)]
    plans = [experiment_plan(repo, o, TARGETS) for o in grid]
    assert shared_stages(plans) == [
        "prepare@digits", "train_dense@digits-resnet20", "profile_latency@digits-resnet20"]


def _descends_from(pid: int, ancestor: int) -> bool:
    """`prefect worker start` runs the worker in a child process: walk up the parents."""
    while pid > 1:
        if pid == ancestor:
            return True
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (FileNotFoundError, ProcessLookupError):
            return False
    return False


def _kill_box_during_an_experiment(worker: subprocess.Popen, killed: dict, stop: threading.Event):
    """Wait until `worker` runs an experiment's flow run (its process is the worker's child),
    let it heartbeat, then SIGKILL the worker and the flow run's process group: a machine
    that dies, with nobody left to report the run's end."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    running = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING])))
    with get_client(sync_client=True) as client:
        while not stop.is_set():
            for run in client.read_flow_runs(flow_run_filter=running):
                pid = int(str(run.infrastructure_pid or "0:0").rsplit(":", 1)[-1] or 0)
                if run.name.startswith("exp-") and pid and _descends_from(pid, worker.pid):
                    time.sleep(5)
                    os.killpg(worker.pid, signal.SIGKILL)
                    try:
                        os.killpg(os.getpgid(pid), signal.SIGKILL)
                    except ProcessLookupError:
                        pass  # it was in the worker's group
                    killed.update(name=run.name, flow_run_id=str(run.id))
                    return
            time.sleep(0.5)


def _sweep_table(csv: str) -> pd.DataFrame:
    columns = ["experiment", "overrides", "run", "method", "test_top1", "test_top5", "params",
               "macs", "test_size"]
    return pd.read_csv(csv)[columns].sort_values(["experiment", "run"]).reset_index(drop=True)


def _kill_then_sweep_locally(worker: subprocess.Popen, killed: dict, stop: threading.Event,
                             env: dict[str, str], grid: dict, repo: Path, out: dict) -> None:
    """Kill `worker` during an experiment, then sweep that experiment alone in `repo` (a
    clone with a cache of its own: it runs the shared stages itself), as a user without a
    pool would, while the pool waits out the dead worker's heartbeat. Results (or the error)
    go into `out`."""
    _kill_box_during_an_experiment(worker, killed, stop)
    if not killed:  # stopped before any kill (the test then fails on that)
        return
    seed = SEEDS[int(killed["name"].removeprefix("exp-")) - 1]
    try:  # one experiment, not the grid: the retried one is the point of the comparison,
        # and the others ran the same code on the same kind of worker
        out["csv"], out["seconds"] = _sweep(env, **{**grid, "repo": str(repo), "seeds": [seed]},
                                            jobs=1, out="results/local")
    except BaseException as e:  # noqa: BLE001 - re-raised in the test's thread
        out["error"] = e


def _sweep(env: dict[str, str], **kwargs) -> tuple[str, float]:
    """The sweep flow in a process of its own, as a user starts it (this one keeps no Prefect
    log or event workers bound to a server the test stops); its CSV path and seconds."""
    code = ("import json, sys; from pipelines.flows import sweep; "
            "print(sweep(**json.loads(sys.argv[1])))")
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-c", code, json.dumps(kwargs)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout.strip().splitlines()[-1], time.monotonic() - start


@pytest.fixture
def scratch():
    """The workers' TMPDIR: the killed box's flow run leaves its workspace and stage-server
    folders behind, so they go here and this goes at the end. Short, not under tmp_path: the
    stage server's socket path lives in it (108 bytes at most)."""
    path = Path(tempfile.mkdtemp(prefix="pool-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.slow(cost=330)
def test_a_sweep_on_a_pool_of_workers(tmp_path, scratch):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from pipelines.deployments import EXPERIMENT, ZOMBIE, ensure_zombie_automation, experiment

    remote = tmp_path / "dvc-remote"
    origin = make_tiny_repo(tmp_path / "origin", dvc_remote=remote)
    clones = {}
    for box in (*BOXES, "local"):
        clones[box] = tmp_path / box
        subprocess.run(["git", "clone", "-q", str(origin), str(clones[box])], env=git_env(),
                       check=True, timeout=60)
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    workers: dict[str, subprocess.Popen] = {}
    killed: dict[str, str] = {}
    local: dict = {}
    stop = threading.Event()
    grid = {"repo": str(origin), "seeds": SEEDS, "dvc_targets": TARGETS}
    with local_server(store) as tracking, prefect_server(
        tmp_path, PREFECT_WORKER_QUERY_SECONDS="1", PREFECT_WORKER_PREFETCH_SECONDS="1",
    ) as (api, env):
        env = {**env, "MLFLOW_TRACKING_URI": tracking,
               "TMPDIR": str(scratch),
               "OMP_NUM_THREADS": "1",  # the same arithmetic in every process
               "CHIPPRUNE_ARTIFACT_ROOT": (tmp_path / "mlartifacts").as_uri()}
        env.pop("MLFLOW_PARENT_RUN_ID", None)
        done = subprocess.run([str(BIN / "prefect"), "work-pool", "create", POOL, "--type", "process"],
                              env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        with temporary_settings(updates={PREFECT_API_URL: api}):
            experiment(work_pool=POOL).apply()
            ensure_zombie_automation(within_s=ZOMBIE_AFTER_S)
            ensure_zombie_automation(within_s=ZOMBIE_AFTER_S)  # idempotent: still one
            try:
                for box in BOXES:  # one experiment at a time per machine
                    log = (tmp_path / f"{box}.log").open("w")
                    workers[box] = subprocess.Popen(
                        [str(BIN / "prefect"), "worker", "start", "--pool", POOL, "--name", box,
                         "--limit", "1"],
                        env={**env, "CHIPPRUNE_REPO": str(clones[box])},
                        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                    )
                killer = threading.Thread(  # with this context's settings (the server's URL)
                    target=contextvars.copy_context().run,
                    args=(_kill_then_sweep_locally, workers["box-c"], killed, stop, env, grid,
                          clones["local"], local),
                    daemon=True)
                killer.start()
                csv, pool_seconds = _sweep(env, **grid, jobs=3, out="results/pool",
                                           deployment_name=EXPERIMENT)
            finally:
                stop.set()
                stop_group(*workers.values(), timeout=20)
                killer.join(timeout=600)  # its local sweep
            with get_client(sync_client=True) as client:
                automations = client.read_automations_by_name(ZOMBIE)
                crashed = client.read_flow_run(killed["flow_run_id"]) if killed else None
                on_pool = sorted(r.name for r in client.read_flow_runs() if r.deployment_id)
        mlflow.set_tracking_uri(tracking)
        runs = mlflow.search_runs(experiment_names=["chipprune"])
    assert len(automations) == 1
    assert killed, "box-c never ran an experiment"
    if "error" in local:
        raise local["error"]
    local_csv = local["csv"]
    print(f"\npool sweep {pool_seconds:.0f} s (one worker killed), local sweep "
          f"{local['seconds']:.0f} s (during it)")
    assert crashed.state.is_crashed() and "heartbeat" in crashed.state.message
    # one flow run per experiment and attempt (the flow names its run after the experiment):
    # creating one is idempotent, so a POST the API client retried under load does not
    # start the experiment twice
    assert on_pool == sorted(["shared-stages", "exp-01", "exp-02", "exp-03", "exp-04",
                              killed["name"]])

    table = pd.read_csv(csv)
    assert sorted(table["experiment"].unique()) == ["exp-01", "exp-02", "exp-03", "exp-04"]
    assert set(table["run"]) == {"dense-digits-resnet20", "chipnet-flops-0.5-digits-resnet20"}
    # the two live machines did the work; the killed experiment is the only retry
    assert set(table["worker"]) == {"box-a", "box-b"}
    attempts = table.groupby("experiment")["attempts"].max().to_dict()
    assert attempts == {e: 2 if e == killed["name"] else 1 for e in attempts}
    # every experiment restored the shared stages from the remote's run-cache
    shared = {"prepare@digits", "train_dense@digits-resnet20", "profile_latency@digits-resnet20"}
    for restored in table["stages_restored"]:
        assert set(str(restored).split()) == shared
    # ... so each sweep trained the dense model once, in its shared-stages run
    names = runs["tags.mlflow.runName"].fillna("")
    sweeps = runs[names.str.startswith("sweep")].sort_values("start_time")["run_id"].tolist()
    assert len(sweeps) == 2  # the pool's, then the local one
    dense = runs[runs["tags.chipprune.stage"] == "train_dense@digits-resnet20"]
    parents = runs.set_index("run_id")["tags.mlflow.parentRunId"]
    assert sorted(parents[dense["tags.mlflow.parentRunId"]].tolist()) == sorted(sweeps)
    # on the pool in its shared-stages run (a one-experiment sweep has nothing to share)
    run_names = runs.set_index("run_id")["tags.mlflow.runName"]
    dense_in = dict(zip(parents[dense["tags.mlflow.parentRunId"]],
                        run_names[dense["tags.mlflow.parentRunId"]], strict=True))
    assert dense_in == {sweeps[0]: "shared-stages", sweeps[1]: "exp-01"}
    # each experiment's MLflow run names its worker (the retry's, for the killed one)
    exp_runs = runs[names.str.startswith("exp-")]
    workers_by_sweep = exp_runs.groupby("tags.mlflow.parentRunId")["tags.chipprune.worker"].agg(set)
    assert workers_by_sweep[sweeps[0]] == {"box-a", "box-b"}
    assert workers_by_sweep[sweeps[1]] == {"local"}
    # the same numbers as the local sweep (its one experiment is its exp-01)
    pool = _sweep_table(csv)
    pool = pool[pool["experiment"] == killed["name"]].reset_index(drop=True)
    local = _sweep_table(local_csv).assign(experiment=killed["name"])
    assert len(pool) == 2
    pd.testing.assert_frame_equal(pool, local)
