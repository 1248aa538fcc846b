"""Data-parallel training with real processes (gloo, CPU): two ranks reach the weights one
process reaches with the same global batch, every rank ends identical, and a stage run with
`distributed.nproc: 2` writes its outputs from rank 0 only.

Tolerance: the equivalence is checked in float64 with synchronised BatchNorm, where only
summation order differs (measured after 8 steps: max |dw| 8e-12 dense SGD, 4e-13 ChipNet,
BN statistics 3e-10); we assert 1e-6 (1e-5 for BN statistics). float32 is no test of the
algorithm here: on a digits batch the one-process float32 gradient with torch's BatchNorm
kernels is itself 2% from the float64 one (1e-5 with a two-pass var_mean BatchNorm, as
ours), and the dense recipe's lr amplifies any difference. Plain per-rank BN differs from one
process by design (statistics over B/N images); there the ranks must still agree bit for bit."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import mlflow
import pytest
import torch
import yaml

from chipprune.data import prepare_dataset, save_prepared
from chipprune.training import distributed
from tests._ddp_worker import run
from tests.conftest import REPO

pytestmark = pytest.mark.slow(cost=45)  # seconds alone, for test ordering

TOL = 1e-6


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("digits") / "data"
    save_prepared(prepare_dataset("digits", image_size=16), path)
    return path


def _max_diff(a: dict, b: dict, buffers: bool) -> float:
    keys = [k for k in a if ("running" in k) == buffers and "num_batches" not in k]
    return max((a[k].double() - b[k].double()).abs().max().item() for k in keys)


def test_two_gloo_processes_match_one_process(digits, tmp_path, capfd):
    variants = ["float64-sync", "float32-plain", "float32-plain-resume"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    rc = distributed.launch("tests._ddp_worker", [str(digits), str(tmp_path), *variants], 2, env)
    assert rc == 0
    ranks = {
        v: [torch.load(tmp_path / f"{v}-rank{r}.pt", weights_only=True) for r in (0, 1)]
        for v in variants
    }

    # Interrupted after epoch 1 on both ranks, resumed from rank 0's state by both: the
    # uninterrupted run's weights, bit for bit; one "resuming from" line (rank 0's).
    plain, resumed = ranks["float32-plain"], ranks["float32-plain-resume"]
    for r in (0, 1):
        assert resumed[r]["resumed_from_epoch"] == 1
        for k, t in plain[r]["dense"].items():
            assert torch.equal(t, resumed[r]["dense"][k]), k
    assert capfd.readouterr().out.count("resuming from") == 1

    # Every rank ends with the same bits: weights, gates, BN statistics, masks, metrics.
    for v, (r0, r1) in ranks.items():
        if v.endswith("resume"):
            continue
        for key in ("dense", "chipnet"):
            for k, t in r0[key].items():
                assert torch.equal(t, r1[key][k]), (v, key, k)
        assert all(torch.equal(a, b) for a, b in zip(r0["zeta"], r1["zeta"], strict=True))
        assert all(torch.equal(r0["keep"][g], r1["keep"][g]) for g in r0["keep"])
        for h in ("dense_history", "chipnet_history"):
            strip = [{k: x for k, x in row.items() if k != "epoch_seconds"} for row in r0[h]]
            assert strip == [
                {k: x for k, x in row.items() if k != "epoch_seconds"} for row in r1[h]
            ]

    # Two processes of 16 images = one process of 32: the same weights, masks and metrics.
    two, one = ranks["float64-sync"][0], run(digits, "float64-sync")
    for key in ("dense", "chipnet"):
        assert _max_diff(two[key], one[key], buffers=False) < TOL, key
        assert _max_diff(two[key], one[key], buffers=True) < 10 * TOL, key
    assert (
        max((a - b).abs().max().item() for a, b in zip(two["zeta"], one["zeta"], strict=True)) < TOL
    )
    assert two["best_epoch"] == one["best_epoch"]
    assert all(torch.equal(two["keep"][g], one["keep"][g]) for g in one["keep"])
    for h in ("dense_history", "chipnet_history"):
        for a, b in zip(two[h], one[h], strict=True):
            for k in a:
                if k != "epoch_seconds":
                    assert a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-9), (h, k)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_torchrun_nodes_match_one_process(digits, tmp_path):
    """Multi-node data parallel as a user starts it, one `torchrun --nnodes 2` per box, here
    both boxes on this machine (one process per "node", c10d rendezvous on 127.0.0.1):
    the float64 result of one process, as two local ranks give it, and the nodes agree."""
    port = _free_port()
    # TMPDIR: torchrun leaves a torchelastic_* log folder behind in it on every run
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}

    def node(rank: int) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
             "--nproc-per-node", "1", "--node-rank", str(rank), "--rdzv-backend", "c10d",
             "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "chipprune-test",
             "-m", "tests._ddp_worker", str(digits), str(tmp_path), "float64-sync"],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True)

    nodes = [node(0), node(1)]
    try:
        outs = [p.communicate(timeout=240)[0] for p in nodes]
    finally:
        for p in nodes:
            if p.poll() is None:
                os.killpg(p.pid, 9)
    assert [p.returncode for p in nodes] == [0, 0], "\n".join(o[-2000:] for o in outs)
    ranks = [torch.load(tmp_path / f"float64-sync-rank{r}.pt", weights_only=True) for r in (0, 1)]
    one = run(digits, "float64-sync")
    for key in ("dense", "chipnet"):
        for k, t in ranks[0][key].items():
            assert torch.equal(t, ranks[1][key][k]), (key, k)
        assert _max_diff(ranks[0][key], one[key], buffers=False) < TOL, key
        assert _max_diff(ranks[0][key], one[key], buffers=True) < 10 * TOL, key
    assert all(torch.equal(ranks[0]["keep"][g], one["keep"][g]) for g in one["keep"])


# Loaded by every process of the stage (sitecustomize): a non-zero rank reports each file it
# opens for writing, creates, renames or removes inside the workspace, and any sqlite
# (MLflow) connection there. The project writes files through Python's open (chipprune.atomic),
# which the audit hook sees. torch's own caches elsewhere (/tmp/torchinductor_*) are not
# the stage's outputs.
AUDIT = """\
import os, sys
if os.environ.get("RANK", "0") != "0":
    ROOT = os.getcwd()
    WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    def _report(what, path):
        if isinstance(path, (str, bytes, os.PathLike)):
            path = os.path.abspath(os.fsdecode(path))
            if path.startswith(ROOT):
                os.write(2, f"AUDIT rank {os.environ['RANK']} {what} {path}\\n".encode())
    def _audit(event, args):
        if event == "open" and isinstance(args[2], int) and args[2] & WRITE:
            _report("open", args[0])
        elif event in ("os.rename", "os.remove", "os.mkdir", "os.rmdir", "shutil.rmtree",
                       "sqlite3.connect"):
            _report(event, args[0])
    sys.addaudithook(_audit)
"""


def test_stage_with_nproc_2_writes_from_rank_0_only(digits, tmp_path):
    root = tmp_path / "ws"
    for name in ("chipprune", "stages"):
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(digits, root / "data")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    # two epochs: the first ends in a resume state (rank 0 writes it, the stage clears it)
    params["train_dense"].update(epochs=2, distributed={"nproc": 2})
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    audit = tmp_path / "audit"
    audit.mkdir()
    (audit / "sitecustomize.py").write_text(textwrap.dedent(AUDIT))
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
        "CHIPPRUNE_ARTIFACT_ROOT": (root / "mlartifacts").as_uri(),
        "PYTHONPATH": str(audit),
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    env.pop("MLFLOW_PARENT_RUN_ID", None)
    proc = subprocess.run(
        [sys.executable, "-m", "stages.train_dense", "digits", "resnet20", "data", "out"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "AUDIT" not in proc.stderr, proc.stderr  # rank 1 wrote nothing in the workspace
    assert proc.stdout.count("epoch 1/2") == proc.stdout.count("epoch 2/2") == 1
    assert proc.stdout.count("val top1") == 1
    ckpt = torch.load(root / "out/checkpoint.pt", weights_only=True)
    assert [r["epoch"] for r in ckpt["history"]] == [1, 2]
    assert ckpt["config"]["train"]["distributed"] == {"nproc": 2, "sync_bn": False}
    assert not any((root / ".chipprune/resume").iterdir())  # cleared by rank 0
    run_id = json.loads((root / "out/mlflow_run.json").read_text())["run_id"]
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert [r.info.run_id for r in runs] == [run_id]  # one MLflow run, from rank 0
    assert runs[0].data.tags["chipprune.world_size"] == "2"
    assert len(mlflow.MlflowClient().get_metric_history(run_id, "val_top1")) == 2  # per epoch, once


@pytest.mark.parametrize(
    ("section", "value", "words"),
    [
        ("train_dense", {"nproc": 0}, "train_dense.distributed.nproc: Input should be greater"),
        ("train_dense", {"nproc": 3}, "batch_size 64 (the global batch) must be divisible"),
        ("learn_masks", {"nproc": 3}, "learn_masks: batch_size 32"),
        ("train_dense", {"nproc": 2, "gloo": True}, "train_dense.distributed.gloo: unknown key"),
    ],
)
def test_distributed_params_are_checked(section, value, words):
    from chipprune.config import ConfigError, parse_params

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw[section]["distributed"] = value
    with pytest.raises(ConfigError, match=re.escape(words)):
        parse_params(raw)
