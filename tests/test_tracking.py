"""MLflow adapter: a real sqlite store, nesting under a parent run, provenance, run-id file."""

from __future__ import annotations

import json

import mlflow

from chipprune.reporting import tracking


def test_stage_run_nests_under_parent_and_writes_run_id(tmp_path, mlflow_store, monkeypatch):
    mlflow.set_tracking_uri(mlflow_store)
    exp = mlflow.set_experiment("chipprune")
    with mlflow.start_run(run_name="pipeline") as parent:
        pass
    monkeypatch.setenv("MLFLOW_PARENT_RUN_ID", parent.info.run_id)
    inp = tmp_path / "input.bin"
    inp.write_bytes(b"abc")
    run_file = tmp_path / "out" / "mlflow_run.json"
    with tracking.stage_run("train@x", {"train": {"lr": 0.1, "epochs": 2}}, run_file,
                            inputs={"data": inp}):
        tracking.log_history([{"epoch": 1, "loss": 2.0}, {"epoch": 2, "loss": 1.0}])

    info = json.loads(run_file.read_text())
    run = mlflow.get_run(info["run_id"])
    assert info["parent_run_id"] == parent.info.run_id
    assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert run.data.params == {"train.lr": "0.1", "train.epochs": "2"}
    assert run.data.tags["input.data.sha256"] == (
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )
    assert run.data.tags["version.torch"]
    assert run.info.experiment_id == exp.experiment_id
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(1, 2.0), (2, 1.0)]


def test_failed_stage_writes_no_run_id(tmp_path, mlflow_store):
    run_file = tmp_path / "mlflow_run.json"
    try:
        with tracking.stage_run("boom", {}, run_file):
            raise RuntimeError("stage failed")
    except RuntimeError:
        pass
    assert not run_file.exists()
    runs = mlflow.search_runs(experiment_names=["chipprune"])
    assert list(runs["status"]) == ["FAILED"]


def test_default_uri_is_absolute_sqlite(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("CHIPPRUNE_ROOT", str(tmp_path))
    assert tracking.tracking_uri() == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    # another project's store, whatever CHIPPRUNE_ROOT says (what the flow CLI warms up)
    assert tracking.local_store(tmp_path / "other") == tmp_path / "other" / "mlflow.db"


def test_flatten():
    assert tracking.flatten({"a": {"b": 1, "c": {"d": 2}}, "e": {}}) == {"a.b": 1, "a.c.d": 2, "e": {}}


def test_file_sha256_follows_the_file_not_its_name(tmp_path):
    import hashlib

    from chipprune import atomic

    path = tmp_path / "ckpt.pt"
    atomic.write_text(path, "first")
    assert tracking.file_sha256(path) == hashlib.sha256(b"first").hexdigest()
    assert tracking.file_sha256(str(path)) == hashlib.sha256(b"first").hexdigest()  # remembered
    atomic.write_text(path, "other")  # a new file at the same path (what every stage writes)
    assert tracking.file_sha256(path) == hashlib.sha256(b"other").hexdigest()
    path.write_text("third, longer")  # rewritten in place
    assert tracking.file_sha256(path) == hashlib.sha256(b"third, longer").hexdigest()
