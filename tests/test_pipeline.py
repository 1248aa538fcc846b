"""The default DVC pipeline end to end, on a tiny params set, in a temporary repo copy:
real `dvc repro`, real stages, a real MLflow sqlite store."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import yaml

from tests.conftest import REPO

pytestmark = pytest.mark.slow(cost=50)  # seconds alone, for test ordering


def _run(cmd, cwd, env, timeout=600):
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """A git+DVC repo holding the project's pipeline with a 1-epoch params.yaml."""
    root = tmp_path_factory.mktemp("pipeline")
    for name in ("chipprune", "stages", "pipelines", "nets"):
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["train_dense"]["epochs"] = 1
    params["learn_masks"]["epochs"] = 2
    params["finetune"]["chipnet"]["epochs"] = 1
    params["finetune"]["chip"]["epochs"] = 1
    params["chip"].update(batches=2, batch_size=32)
    params["transfer"]["recipe"]["epochs"] = 1
    params["transfer"]["pairs"] = {"to-even": {
        "method": "chipnet", "budget": "flops-0.5", "teacher": "digits",
        "student": "digits_even", "model": "resnet20", "protocol": "dense"}}
    params["prune"].update(
        methods=["chipnet", "chip", "random"], baselines=["random"], budgets=["flops-0.5"],
    )
    params["evaluate"]["latency"] = {"batch_sizes": [1, 8], "warmup": 1, "repeats": 2}
    params["latency_budget"].update(batch_size=8, step=16, warmup=1, repeats=1, rounds=1,
                                    min_ms=0)
    # TorchScript's exporter: torch.export's was 30 of this fixture's 80 s; the default one
    # runs through the export stage in tests/test_export.py
    params["export"]["exporter"] = "torchscript"
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
        "CHIPPRUNE_ARTIFACT_ROOT": (root / "mlartifacts").as_uri(),
        "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }
    env.pop("MLFLOW_PARENT_RUN_ID", None)
    _run(["git", "init", "-q"], root, env)
    _run(["dvc", "init", "-q"], root, env)
    _run(["git", "add", "-A"], root, env)
    _run(["git", "commit", "-qm", "init"], root, env)
    # as `make run` does: every stage forks from a warm stage server (tests/test_stage_server.py)
    first = _run([sys.executable, "-m", "pipelines.stage_server", "--", "dvc", "repro"], root, env)
    return root, env, first


@pytest.fixture
def in_repo(repo, monkeypatch):
    """This process inside the pipeline repo, with its MLflow store and artifact root, as a
    stage or CLI run there sees them: bad-input checks call `main` here instead of paying a
    process start that imports torch and MLflow."""
    root, env, _ = repo
    monkeypatch.chdir(root)
    for name in ("MLFLOW_TRACKING_URI", "CHIPPRUNE_ARTIFACT_ROOT"):
        monkeypatch.setenv(name, env[name])
    return root


def test_repro_builds_every_output(repo):
    root, _, first = repo
    prepared = root / "data/prepared/digits"
    assert {p.name for p in prepared.iterdir()} == {"train.pt", "val.pt", "test.pt", "meta.json"}
    run = root / "runs/dense/digits-resnet20"
    assert (run / "checkpoint.pt").is_file() and (run / "history.csv").is_file()
    metrics = json.loads((root / "runs/evaluate/dense-digits-resnet20/metrics.json").read_text())
    assert metrics["test_size"] == 359  # 20% of each class, rounded per class
    # resnet20 option A, 1 input channel, 10 classes: 269,722 - 2*16*9 stem weights
    assert metrics["params"] == 269_434
    assert 0.0 <= metrics["test_top1"] <= 1.0
    assert set(metrics) >= {"test_top5", "macs", "latency_ms_bs1", "latency_ms_bs8"}
    assert "Running stage 'train_dense@digits-resnet20'" in first.stdout
    # every evaluated model as ONNX, its logits PyTorch's, timed in ONNX Runtime, in the report
    for name in ("dense-digits-resnet20", "chipnet-flops-0.5-digits-resnet20"):
        export = json.loads((root / f"runs/export/{name}/export.json").read_text())
        assert (root / f"runs/export/{name}/model.onnx").is_file()
        assert export["parity_images"] == 256 and export["onnx_top1_agreement"] == 1.0
        assert export["onnx_max_abs_diff"] <= 1e-4 * max(1.0, export["onnx_max_abs_logit"])
        assert export["ort_latency_ms_bs1"] > 0 and export["ort_latency_ms_bs8"] > 0
    report = (root / "results/report.csv").read_text().splitlines()
    assert "ort_speedup" in report[0].split(",")


def test_every_executed_stage_has_an_mlflow_run(repo):
    root, env, _ = repo
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    runs = mlflow.search_runs(experiment_names=["chipprune"])
    assert sorted(runs["tags.mlflow.runName"]) == [
        "baseline_masks@random",
        "evaluate",
        "evaluate@chip-flops-0.5-digits-resnet20",
        "evaluate@chip-rates-r20-light",
        "evaluate@chipnet-flops-0.5-digits-resnet20",
        "evaluate@dense-digits-resnet20",
        "evaluate@dense-digits_even-resnet20",
        "evaluate@random-flops-0.5-digits-resnet20",
        "evaluate@transfer-to-even",
        "export",
        "export@chip-flops-0.5-digits-resnet20",
        "export@chip-rates-r20-light",
        "export@chipnet-flops-0.5-digits-resnet20",
        "export@dense-digits-resnet20",
        "export@dense-digits_even-resnet20",
        "export@random-flops-0.5-digits-resnet20",
        "export@transfer-to-even",
        "finetune@chip-flops-0.5-digits-resnet20",
        "finetune@chip-rates-r20-light",
        "finetune@chipnet-flops-0.5-digits-resnet20",
        "finetune@random-flops-0.5-digits-resnet20",
        "learn_masks@flops-0.5-digits-resnet20",
        "prepare@digits",
        "prepare@digits_even",
        "profile_latency@digits-resnet20",
        "report",
        "score_channels@digits-resnet20",
        "select_channels",
        "train_dense@digits-resnet20",
        "train_dense@digits_even-resnet20",
        "transfer_masks@to-even",
    ]
    assert set(runs["status"]) == {"FINISHED"}
    for stage_file in ("runs/prepare/digits", "runs/dense/digits-resnet20", "runs/evaluate"):
        info = json.loads((root / stage_file / "mlflow_run.json").read_text())
        assert info["run_id"] in set(runs["run_id"])
    # one run per evaluated model, nested under the evaluate stage's run
    evaluate_id = json.loads((root / "runs/evaluate/mlflow_run.json").read_text())["run_id"]
    per_model = runs[runs["tags.mlflow.runName"].str.startswith("evaluate@")]
    assert len(per_model) == 7 and set(per_model["tags.mlflow.parentRunId"]) == {evaluate_id}


def test_chipnet_masks_meet_the_budget_and_counting_agrees(repo):
    root, _, _ = repo
    masks = json.loads((root / "runs/chipnet/flops-0.5-digits-resnet20/masks.json").read_text())
    assert masks["method"] == "chipnet" and masks["budget"]["type"] == "flops"
    achieved = masks["budget"]["achieved"]
    assert 0.5 <= achieved <= 0.51
    metrics = json.loads(
        (root / "runs/evaluate/chipnet-flops-0.5-digits-resnet20/metrics.json").read_text()
    )
    # the hard budget is the exact MACs fraction of the physically pruned model
    assert metrics["macs_fraction"] == pytest.approx(achieved, rel=1e-12)
    assert metrics["method"] == "chipnet"
    assert (root / "runs/chipnet/flops-0.5-digits-resnet20/gates.png").stat().st_size > 10_000
    for method in ("random", "chip"):
        other = json.loads((root / f"runs/{method}/flops-0.5-digits-resnet20/masks.json").read_text())
        assert other["method"] == method and 0.5 <= other["budget"]["achieved"] <= 0.51
        m = json.loads(
            (root / f"runs/evaluate/{method}-flops-0.5-digits-resnet20/metrics.json").read_text()
        )
        assert m["macs_fraction"] == pytest.approx(other["budget"]["achieved"], rel=1e-12)


def test_report_lists_every_evaluated_run(repo):
    root, _, first = repo
    import pandas as pd

    df = pd.read_csv(root / "results/report.csv")
    rows = set(zip(df["method"], df["dataset"], df["teacher"].fillna(""), strict=True))
    assert rows == {
        ("dense", "digits", ""), ("dense", "digits_even", ""), ("chipnet", "digits", ""),
        ("chip", "digits", ""), ("random", "digits", ""), ("chipnet", "digits_even", "digits"),
    }
    dense = df[(df["method"] == "dense") & (df["dataset"] == "digits")].iloc[0]
    chip = df[df["method"] == "chip"].iloc[0]
    assert chip["delta_top1"] == pytest.approx(chip["top1"] - dense["top1"])
    assert chip["speedup_per_macs_reduction"] == pytest.approx(chip["speedup"] * chip["macs_fraction"])
    assert "| chipnet | digits_even | digits | dense |" in (root / "results/report.md").read_text()
    for png in ("pareto.png", "kept_channels.png"):
        assert (root / "results" / png).stat().st_size > 10_000
    # the README's picture is the report's own Pareto PNG
    assert (root / "docs/img/pareto.png").read_bytes() == (root / "results/pareto.png").read_bytes()
    # what make run prints fits a 100-column terminal, one line a run
    text = (root / "results/report.txt").read_text().splitlines()
    assert max(len(line) for line in text) <= 100 and len(text) == 2 + len(df)
    # DVC's one metrics file: top-1 per run, flat
    summary = json.loads((root / "results/metrics.json").read_text())
    assert summary == {label: pytest.approx(top1, abs=1e-6) for label, top1 in zip(
        ["dense-digits-resnet20", "chip-flops-0.5-digits-resnet20"], [dense["top1"], chip["top1"]],
        strict=True)} | {k: v for k, v in summary.items() if k not in (
        "dense-digits-resnet20", "chip-flops-0.5-digits-resnet20")}
    assert len(summary) == len(df)
    # the top-level plots' data: every method's fine-tune curve at the budget, ChipNet's curves
    curves = pd.read_csv(root / "results/curves/finetune-flops-0.5-digits-resnet20.csv")
    assert set(curves["series"]) == {"chipnet", "chip", "random"}
    assert list(curves.columns) == ["series", "epoch", "value"]
    chipnet = pd.read_csv(root / "results/curves/chipnet-flops-0.5-digits-resnet20.csv")
    assert set(chipnet["series"]) == {"soft val top-1", "hard val top-1", "achieved budget (hard)"}
    assert len(chipnet) == 3 * 2  # learn_masks runs 2 epochs here


def test_compare_rebuilds_the_report_from_mlflow_alone(repo, in_repo, capsys):
    """`python -m pipelines.compare` (mlflow.search_runs, no metrics files) prints the same
    table the report stage wrote from the metrics files."""
    root, env, _ = repo
    import pandas as pd

    out = _run([sys.executable, "-m", "pipelines.compare", "--experiment", "chipprune",
                "--csv", str(root / "compare.csv")], root, env)
    from_mlflow = pd.read_csv(root / "compare.csv")
    from_files = pd.read_csv(root / "results/report.csv")
    pd.testing.assert_frame_equal(from_mlflow, from_files)
    assert from_mlflow["ort_speedup"].notna().all()  # each model's export run joined its row
    assert out.stdout.splitlines()[0] == (root / "results/report.md").read_text().splitlines()[0]
    from pipelines.compare import main as compare  # bad input: in this process (in_repo)

    assert compare(["--experiment", "nope"]) == 2
    assert "no MLflow experiment 'nope'" in capsys.readouterr().err


def test_promote_aliases_the_best_version_under_a_budget_and_it_serves(repo, in_repo,
                                                                     capsys):
    """Every evaluated model was registered by the export stage; `pipelines.compare --promote`
    aliases the best one under the budget; `mlflow models serve` of that alias answers with
    the checkpoint's logits."""
    root, env, _ = repo
    exported = {p.parent.name: json.loads(p.read_text())
                for p in (root / "runs/export").glob("*/export.json")}
    evaluated = {p.parent.name: json.loads(p.read_text())
                 for p in (root / "runs/evaluate").glob("*/metrics.json")}
    assert exported.keys() == evaluated.keys()
    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    names = {m.name for m in client.search_registered_models()}
    assert names == {"digits-resnet20", "digits_even-resnet20"}
    assert len(client.search_model_versions("name = 'digits-resnet20'")) == sum(
        e["registered_model"] == "digits-resnet20" for e in exported.values())
    # the expected winner, from the files: best top-1 at flops <= 0.5, then fewer MACs
    under = [n for n, m in evaluated.items() if m["dataset"] == "digits" and m["budget"]
             and m["budget"]["type"] == "flops" and m["budget"]["target"] <= 0.5]
    assert len(under) == 3  # chipnet, chip, random at flops-0.5
    win = max(under, key=lambda n: (evaluated[n]["test_top1"], -evaluated[n]["macs_fraction"],
                                    int(exported[n]["registered_version"])))
    out = _run([sys.executable, "-m", "pipelines.compare", "--experiment", "chipprune",
                "--promote", "flops-0.5"], root, env)
    assert f"digits-resnet20@best-flops-0_5 -> version {exported[win]['registered_version']}" \
        in out.stdout
    version = client.get_model_version_by_alias("digits-resnet20", "best-flops-0_5")
    assert str(version.version) == exported[win]["registered_version"] and version.tags["run"] == win
    # the transfer pair's student (chipnet masks at flops-0.5) is its dataset's only candidate
    assert client.get_model_version_by_alias("digits_even-resnet20", "best-flops-0_5").tags[
        "run"] == "transfer-to-even"
    from pipelines.compare import main as compare  # bad input: in this process (in_repo)

    for argv, message in ((["--promote", "flops"], "expected TYPE-TARGET"),
                          (["--promote", "flops-0.01"], "no registered model version was pruned"),
                          (["--promote", "flops-0.5", "--alias", "v2"], "reserved")):
        assert compare(["--experiment", "chipprune", *argv]) == 2
        err = capsys.readouterr().err
        assert message in err, err

    # serve the alias on 127.0.0.1 and ask it for the first test images' logits
    import urllib.request

    import torch

    from chipprune.data import load_prepared
    from chipprune.training.checkpoint import load_checkpoint, model_from_checkpoint
    from chipprune.training.sources import DeviceData
    from pipelines.mlflow_server import free_port
    from pipelines.process_group import stop_group

    data = load_prepared(root / "data/prepared/digits", splits=("test",))
    images = DeviceData.from_split(data.splits["test"], data.meta, "cpu")
    x = images.normalise(images.images[:16])
    model = model_from_checkpoint(load_checkpoint(root / exported[win]["checkpoint"])).eval()
    with torch.no_grad():
        want = model(x).numpy()
    port = free_port()
    proc = subprocess.Popen(
        ["mlflow", "models", "serve", "-m", "models:/digits-resnet20@best-flops-0_5",
         "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
        cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, "mlflow models serve exited"
            assert time.monotonic() < deadline, "mlflow models serve not up after 90 s"
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations", json.dumps({"inputs": x.tolist()}).encode(),
            headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as r:
            got = np.asarray(json.loads(r.read())["predictions"]["logits"], dtype=np.float32)
    finally:
        stop_group(proc, timeout=15)
    assert got.shape == want.shape == (16, 10)
    assert np.abs(got - want).max() <= 1e-4 * max(1.0, np.abs(want).max())
    assert (got.argmax(1) == want.argmax(1)).all()


def test_transfer_refuses_masks_of_another_architecture(in_repo, tmp_path, capsys):
    params = yaml.safe_load((in_repo / "params.yaml").read_text())
    params["models"]["resnet32"] = {"arch": "resnet32", "kwargs": {"shortcut": "A"}}
    params["dense"]["models"].append("resnet32")
    params["prune"]["models"].append("resnet32")  # the pair's model must be in the grid
    params["transfer"]["pairs"]["to-even"]["model"] = "resnet32"
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(params))
    # a resnet32 "student checkpoint": shapes differ from the resnet20 teacher masks
    from chipprune.models import create_model
    from chipprune.training.checkpoint import make_checkpoint, save_checkpoint

    kw = {"num_classes": 5, "in_channels": 1, "shortcut": "A"}
    save_checkpoint(make_checkpoint(create_model("resnet32", **kw), "resnet32", kw), tmp_path / "s.pt")
    from stages import transfer_masks
    from stages._common import run_main  # the stage's own error contract (in_repo)

    out = tmp_path / "out"
    status = run_main(transfer_masks.main, [
        "to-even", "runs/chipnet/flops-0.5-digits-resnet20", str(tmp_path / "s.pt"),
        "data/prepared/digits_even", str(out), "--params", str(bad)])
    err = capsys.readouterr().err
    assert status == 2, err
    assert "masks are for model 'resnet20', not 'resnet32'" in err
    assert not out.exists()


def test_second_repro_is_a_no_op(repo):
    root, env, _ = repo
    again = _run(["dvc", "repro"], root, env)
    assert "Running stage" not in again.stdout
    status = _run(["dvc", "status"], root, env)
    assert "up to date" in status.stdout
