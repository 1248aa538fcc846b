"""Deployments of the chipprune flows, kept apart from the flow code: the pipeline every
night, and the sweep on demand. prefect.yaml declares the same two for `prefect deploy --all`.

    python -m pipelines.deployments serve    # this process runs them; no work pool, no worker
    python -m pipelines.deployments deploy   # register them on the `chipprune-pool` process
                                             # work pool; `prefect worker start --pool
                                             # chipprune-pool` runs them
"""

from __future__ import annotations

import sys
from pathlib import Path

from prefect import deploy, serve
from prefect.deployments.runner import EntrypointType, RunnerDeployment
from prefect.schedules import Cron

from pipelines.flows import pruning_pipeline, sweep

REPO = Path(__file__).resolve().parents[1]
POOL = "chipprune-pool"
NIGHTLY = "0 2 * * *"  # 02:00 UTC
TAGS = ["chipprune"]


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
        parameters={"repo": str(repo)},
        tags=[*TAGS, "sweep"],
        description="Params overrides or a methods x budgets x targets x seeds grid as experiments.",
        work_pool_name=work_pool,
        entrypoint_type=EntrypointType.MODULE_PATH,
    )


def main(argv: list[str] | None = None) -> None:
    command = (argv if argv is not None else sys.argv[1:]) or ["serve"]
    if command[0] == "serve":
        serve(nightly(), on_demand_sweep())
    elif command[0] == "deploy":
        deploy(
            nightly(work_pool=POOL),
            on_demand_sweep(work_pool=POOL),
            work_pool_name=POOL,
            build=False,
            push=False,
            ignore_warnings=True,
        )
    else:
        sys.exit(f"usage: python -m pipelines.deployments [serve|deploy], not {command[0]!r}")


if __name__ == "__main__":
    main()
