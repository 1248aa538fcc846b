"""Shared test set-up: telemetry off and MLflow pointed at a per-test sqlite store."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

# Under pytest-xdist each worker gets its share of the cores: two workers each running torch
# on every core oversubscribe them (a recipe smoke run took 3.7x its time alone). The stage
# subprocesses a test starts inherit the setting.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT") and "OMP_NUM_THREADS" not in os.environ:
    workers = int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // workers))

REPO = Path(__file__).resolve().parents[1]


def _timing_files() -> set[str]:
    """The Makefile's TIMING_TESTS: the files `make test` collects for its timing run."""
    for line in (REPO / "Makefile").read_text().splitlines():
        if line.startswith("TIMING_TESTS"):
            return set(line.split("=", 1)[1].split("#")[0].split())
    return set()


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """A timing test outside the Makefile's TIMING_TESTS is an error (`make test` would
    never run it). For `--dist loadgroup`: a module's tests form one group (one worker, so
    its module fixtures are built once) unless a test names a group of its own (each
    recipe's smoke run); groups holding a slow test are queued first, heaviest first (a
    group weighs its heaviest test's `slow(cost=seconds)`, module fixture included), so the
    workers finish together: the scheduler hands out groups in this order."""
    def group(item):
        mark = item.get_closest_marker("xdist_group")
        return mark.args[0] if mark and mark.args else item.module.__name__

    stray = sorted({str(item.path.relative_to(REPO)) for item in items
                    if item.get_closest_marker("timing")} - _timing_files())
    if stray:
        raise pytest.UsageError(f"timing tests in {', '.join(stray)}: `make test` runs them "
                                "from the Makefile's TIMING_TESTS files only; add the file there")
    cost: dict[str, float] = {}
    for item in items:
        if item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(group(item)))
        slow = item.get_closest_marker("slow")
        weight = float(slow.kwargs.get("cost", 30)) if slow else 0.0
        cost[group(item)] = max(cost.get(group(item), 0.0), weight)
    first = {}
    for i, item in enumerate(items):
        first.setdefault(group(item), i)
    items.sort(key=lambda it: (-cost[group(it)], first[group(it)]))


@pytest.fixture(scope="session")
def new_mlflow_store(tmp_path_factory) -> Callable[[Path], str]:
    """`new_mlflow_store(folder)`: an MLflow sqlite store with no runs at folder/mlflow.db;
    returns its URI. MLflow making a store runs its schema migrations (1.5-2 s of CPU here,
    per store): one is made per test process and each new store is a copy of it."""
    from mlflow import MlflowClient

    empty = tmp_path_factory.mktemp("mlflow-empty") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{empty}").search_experiments(max_results=1)

    def new(folder: Path) -> str:
        shutil.copyfile(empty, folder / "mlflow.db")
        return f"sqlite:///{folder / 'mlflow.db'}"

    return new


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch, new_mlflow_store):
    """A fresh MLflow sqlite store (absolute path) and artifact root for one test."""
    uri = new_mlflow_store(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("CHIPPRUNE_ARTIFACT_ROOT", (tmp_path / "mlartifacts").as_uri())
    monkeypatch.delenv("MLFLOW_PARENT_RUN_ID", raising=False)
    return uri
