"""Deployments of the chipprune flows, kept apart from the flow code: the pipeline every
night, the sweep on demand, and one experiment (what a sweep on the pool submits per grid
point). prefect.yaml declares the same three for `prefect deploy --all`.

    python -m pipelines.deployments serve    # this process runs them; no work pool, no worker
    python -m pipelines.deployments deploy   # register them on the `chipprune-pool` process
                                             # work pool, and the automation that marks a
                                             # flow run Crashed when its machine stops
                                             # answering; `prefect worker start --pool
                                             # chipprune-pool` runs them, one per machine
"""

from __future__ import annotations

import sys
from datetime import timedelta
from pathlib import Path

from prefect import deploy, serve
from prefect.automations import Automation
from prefect.client.schemas.objects import StateType
from prefect.deployments.runner import EntrypointType, RunnerDeployment
from prefect.events.actions import ChangeFlowRunState
from prefect.events.schemas.automations import EventTrigger, Posture
from prefect.events.schemas.events import ResourceSpecification
from prefect.schedules import Cron

from pipelines.flows import pruning_pipeline, reproduce_experiment, sweep

REPO = Path(__file__).resolve().parents[1]
POOL = "chipprune-pool"
NIGHTLY = "0 2 * * *"  # 02:00 UTC
TAGS = ["chipprune"]
EXPERIMENT = "chipprune-experiment/experiment"  # what a sweep on the pool submits
HEARTBEAT_S = 30  # an experiment's flow run says it is alive this often (Prefect's minimum)
ZOMBIE = "chipprune: crash flow runs that stopped heartbeating"
# A sweep's flow run only waits for its experiments: it goes to a queue of its own, so it
# never holds the one slot of a GPU box's worker (`--limit 1`) that its experiments need.
SWEEP_QUEUE = "sweeps"


def nightly(repo: Path = REPO, work_pool: str | None = None) -> RunnerDeployment:
    """`dvc repro` of the whole pipeline every night; DVC skips what is up to date, and one
    run at a time (a late run waits for the previous one)."""
    return pruning_pipeline.to_deployment(
        name="nightly",
        schedules=[Cron(NIGHTLY, timezone="UTC")],
        parameters={"repo": str(repo)},
        concurrency_limit=1,
        tags=[*TAGS, "nightly"],
        description="Reproduce dvc.yaml (DVC skips up-to-date stages); one MLflow parent run.",
        work_pool_name=work_pool,
        # The package is installed (pip install -e .): workers import the flow by module
        # path, so the deployment needs no code storage.
        entrypoint_type=EntrypointType.MODULE_PATH,
    )


def on_demand_sweep(repo: Path = REPO, work_pool: str | None = None) -> RunnerDeployment:
    """A params sweep, started by hand (UI, `prefect deployment run`) with its grid."""
    return sweep.to_deployment(
        name="on-demand",
        # on the pool, each experiment is a flow run of its own, taken by any worker
        parameters={"repo": str(repo), **({"deployment_name": EXPERIMENT} if work_pool else {})},
        tags=[*TAGS, "sweep"],
        description="Params overrides or a methods x budgets x targets x seeds grid as experiments.",
        work_pool_name=work_pool,
        work_queue_name=SWEEP_QUEUE if work_pool else None,
        entrypoint_type=EntrypointType.MODULE_PATH,
    )


def experiment(work_pool: str | None = None) -> RunnerDeployment:
    """One params override reproduced in the worker machine's own clone ($CHIPPRUNE_REPO
    where its worker is started), exchanging stage outputs through the default DVC remote.
    Its flow runs send a heartbeat every HEARTBEAT_S, so a dead machine's run is marked
    Crashed (zombie_automation) and the sweep retries it elsewhere."""
    return reproduce_experiment.to_deployment(
        name="experiment",
        tags=[*TAGS, "experiment"],
        description="One params override: dvc repro --pull, dvc push --run-cache, its metrics.",
        work_pool_name=work_pool,
        job_variables={"env": {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT_S)}},
        entrypoint_type=EntrypointType.MODULE_PATH,
    )


def zombie_automation(within_s: float = 3 * HEARTBEAT_S) -> Automation:
    """Prefect's recipe for zombie flow runs (docs: "Detect and respond to zombie flows"):
    a flow run that sent a heartbeat and then nothing (no heartbeat, no final state) for
    within_s is set Crashed. Self-hosted servers have no built-in equivalent."""
    final = ("Completed", "Failed", "Cancelled", "Crashed")
    return Automation(
        name=ZOMBIE,
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", *(f"prefect.flow-run.{s}" for s in final)},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=within_s),
        ),
        actions=[ChangeFlowRunState(state=StateType.CRASHED,
                                    message=f"no heartbeat for {within_s:g} s: its machine or worker died")],
    )


def ensure_zombie_automation(within_s: float = 3 * HEARTBEAT_S) -> None:
    """Create the zombie automation unless one of that name exists (idempotent)."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        if client.read_automations_by_name(ZOMBIE):
            return
    zombie_automation(within_s).create()


def main(argv: list[str] | None = None) -> None:
    command = (argv if argv is not None else sys.argv[1:]) or ["serve"]
    if command[0] == "serve":
        serve(nightly(), on_demand_sweep(), experiment())
    elif command[0] == "deploy":
        ensure_zombie_automation()
        deploy(
            nightly(work_pool=POOL),
            on_demand_sweep(work_pool=POOL),
            experiment(work_pool=POOL),
            work_pool_name=POOL,
            build=False,
            push=False,
            ignore_warnings=True,
        )
    else:
        sys.exit(f"usage: python -m pipelines.deployments [serve|deploy], not {command[0]!r}")


if __name__ == "__main__":
    main()
