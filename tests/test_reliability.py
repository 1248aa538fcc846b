"""Faults and resumption with real processes: kill -9 mid-training and resume to the same
result, an unreachable MLflow server found before training, corrupt inputs named, two
`dvc repro` at once, and a DVC remote round trip."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from chipprune.data import prepare_dataset, save_prepared
from tests.conftest import REPO

pytestmark = pytest.mark.slow(cost=80)  # seconds alone, for test ordering


def _env(root: Path) -> dict:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
           "CHIPPRUNE_ARTIFACT_ROOT": (root / "mlartifacts").as_uri(),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MLFLOW_PARENT_RUN_ID", None)
    return env


def _workspace(root: Path, epochs: int) -> Path:
    """A folder with the project's code, a params.yaml and prepared digits."""
    for name in ("chipprune", "stages"):
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["train_dense"]["epochs"] = epochs
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    save_prepared(prepare_dataset("digits", image_size=16), root / "data")
    return root


TRAIN = [sys.executable, "-m", "stages.train_dense", "digits", "resnet20", "data", "out"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = _workspace(tmp_path_factory.mktemp("ref"), epochs=3)
    subprocess.run(TRAIN, cwd=root, env=_env(root), check=True, capture_output=True, timeout=600)
    return torch.load(root / "out/checkpoint.pt", weights_only=True)


def test_kill_9_mid_training_then_resume_gives_the_same_model(tmp_path, uninterrupted):
    root = _workspace(tmp_path, epochs=3)  # killed after epoch 1: two left to resume
    state = root / ".chipprune/resume/train_dense@digits-resnet20.pt"
    proc = subprocess.Popen(TRAIN, cwd=root, env=_env(root), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while not state.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert state.exists(), "no resume checkpoint was written"
    os.kill(proc.pid, signal.SIGKILL)  # a real kill -9, between two epochs or inside one
    proc.wait()
    assert not (root / "out/checkpoint.pt").exists()

    again = subprocess.run(TRAIN, cwd=root, env=_env(root), capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stderr
    assert "resuming from" in again.stdout
    assert not state.exists()  # cleared after success
    resumed = torch.load(root / "out/checkpoint.pt", weights_only=True)
    strip = ("epoch_seconds",)
    assert [{k: v for k, v in r.items() if k not in strip} for r in resumed["history"]] == [
        {k: v for k, v in r.items() if k not in strip} for r in uninterrupted["history"]
    ]
    for k, v in uninterrupted["state_dict"].items():
        assert torch.equal(v, resumed["state_dict"][k]), k


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_mlflow_server_is_found_before_training(tmp_path):
    root = _workspace(tmp_path, epochs=50)
    env = {**_env(root), "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{_free_port()}"}
    t0 = time.monotonic()
    proc = subprocess.run(TRAIN, cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "cannot be reached" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert "epoch 1/" not in proc.stdout  # nothing trained
    assert not (root / "out").exists()
    assert time.monotonic() - t0 < 60


def test_corrupt_prepared_data_names_the_file(tmp_path):
    root = _workspace(tmp_path, epochs=1)
    train = root / "data/train.pt"
    train.write_bytes(train.read_bytes()[:1000])
    proc = subprocess.run(TRAIN, cwd=root, env=_env(root), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert str(Path("data") / "train.pt") in proc.stderr, proc.stderr
    assert not (root / "out").exists()


def _git_dvc_repo(root: Path, env: dict) -> None:
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"]):
        subprocess.run(cmd, cwd=root, env=env, check=True, capture_output=True)


def test_two_dvc_repro_at_once_end_in_a_lock_error(tmp_path):
    root = _workspace(tmp_path, epochs=1)
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    env = _env(root)
    _git_dvc_repo(root, env)
    cmd = ["dvc", "repro", "--single-item", "prepare@digits"]
    first = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    time.sleep(1.0)  # let the first take DVC's repo lock
    second = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=120)
    out_first, _ = first.communicate(timeout=300)
    assert first.returncode == 0, out_first
    assert second.returncode != 0
    assert "lock" in (second.stdout + second.stderr).lower()
    meta = json.loads((root / "data/prepared/digits/meta.json").read_text())
    assert meta["sizes"] == {"train": 1294, "val": 144, "test": 359}


def test_dvc_push_pull_round_trip_through_a_local_remote(tmp_path):
    root = tmp_path / "repo"
    root.mkdir()
    env = _env(root)
    _git_dvc_repo(root, env)
    save_prepared(prepare_dataset("digits", image_size=16), root / "data")
    remote = tmp_path / "remote"
    for cmd in (["dvc", "remote", "add", "-d", "local", str(remote)], ["dvc", "add", "data"],
                ["dvc", "push"]):
        subprocess.run(cmd, cwd=root, env=env, check=True, capture_output=True)
    original = (root / "data/train.pt").read_bytes()
    shutil.rmtree(root / "data")
    shutil.rmtree(root / ".dvc/cache")
    proc = subprocess.run(["dvc", "pull"], cwd=root, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (root / "data/train.pt").read_bytes() == original
    assert any(remote.rglob("*"))
