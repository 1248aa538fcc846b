"""pipelines.mlflow_server: a real `mlflow server` on 127.0.0.1 for one command; the stage
code logs through it into the sqlite store, and the server is gone afterwards."""

from __future__ import annotations

import json
import socket
import sys

import mlflow
import pytest

from pipelines.mlflow_server import _healthy, main
from tests.conftest import REPO

pytestmark = pytest.mark.slow(cost=20)  # seconds alone, for test ordering

LOG_ONE_RUN = (
    "from chipprune.reporting import tracking\n"
    "with tracking.stage_run('probe', {'a': 1}, 'run.json'):\n"
    "    import mlflow; mlflow.log_metric('m', 2.5)\n"
)


def test_a_command_logs_through_the_server_its_status_is_the_commands_and_it_stops(
        tmp_path, monkeypatch, new_mlflow_store):
    """One server start (each costs seconds of CPU): the command logs a run through it and
    exits 5, which is the wrapper's status; the server is gone afterwards."""
    store = new_mlflow_store(tmp_path)  # not its migrations again
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_PARENT_RUN_ID", raising=False)
    monkeypatch.setenv("CHIPPRUNE_ARTIFACT_ROOT", (tmp_path / "artifacts").as_uri())
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    rc = main(["--store", store, "--", sys.executable, "-c",
               "import os; print(os.environ['MLFLOW_TRACKING_URI'])\n" + LOG_ONE_RUN +
               "raise SystemExit(5)\n"])
    assert rc == 5
    info = json.loads((tmp_path / "run.json").read_text())
    assert info["tracking_uri"].startswith("http://127.0.0.1:")
    assert not _healthy(info["tracking_uri"])  # stopped
    mlflow.set_tracking_uri(store)
    run = mlflow.get_run(info["run_id"])
    assert run.data.metrics == {"m": 2.5} and run.data.params == {"a": "1"}


def test_a_server_that_cannot_start_is_one_clear_error(tmp_path, capsys):
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with socket.socket() as taken:  # the port is busy: the server exits, the command never runs
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        marker = tmp_path / "ran"
        rc = main(["--store", store, "--port", str(port), "--", "touch", str(marker)])
    assert rc == 2 and not marker.exists()
    err = capsys.readouterr().err
    assert err.startswith(f"error: MLflow server for {store} on http://127.0.0.1:{port} exited")
