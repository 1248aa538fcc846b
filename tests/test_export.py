"""ONNX export and ONNX Runtime: parity of pruned models (option-A channel maps, channel
selections, removed branches), the dynamic batch, the tolerance rule, latency records, the
export stage's outputs and its refusals."""

from __future__ import annotations

import json

import onnx
import pytest
import torch
import yaml
from torch import nn

from chipprune.data import prepare_dataset, save_prepared
from chipprune.deploy import ort_runtime
from chipprune.deploy.onnx_export import (
    EXPORTERS,
    ExportError,
    Parity,
    export_onnx,
    normalisation_metadata,
    parity,
)
from chipprune.models import create_model
from chipprune.models.preresnet import PreResNet
from chipprune.reporting.report import build_table
from chipprune.training.checkpoint import make_checkpoint, save_checkpoint
from stages import export as export_stage
from stages._common import run_main
from tests.conftest import REPO

pytestmark = pytest.mark.slow(cost=30)  # seconds alone, for test ordering


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("case", ["resnet20-A", "preresnet11-selections"])
def test_pruned_models_export_with_parity_at_any_batch(tmp_path, case, exporter):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if case == "resnet20-A":  # option-A channel maps over kept ORIGINAL indices
        dense = create_model("resnet20", num_classes=10, in_channels=1)
        kept = {k: sorted(torch.randperm(w, generator=g)[: max(1, w // 3)].tolist())
                for k, w in dense.describe().widths().items()}
        model = create_model("resnet20", num_classes=10, in_channels=1, kept=kept)
    else:  # the authors' PreResNet: selections in front of bn1, one branch removed
        dense = PreResNet(11, num_classes=10, in_channels=1)
        kept = {k: sorted(torch.randperm(w, generator=g)[: max(1, w // 2)].tolist())
                for k, w in dense.describe().widths().items()}
        kept["layer2.0.select"] = []
        model = PreResNet(11, num_classes=10, in_channels=1, kept=kept)
    model.eval()
    path = tmp_path / "m.onnx"
    export_onnx(model, (1, 16, 16), path, normalisation_metadata([0.5], [0.25]), exporter)
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["normalise_mean"]) == [0.5] and json.loads(meta["normalise_std"]) == [0.25]
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # the batch is symbolic
    sess = ort_runtime.session(path)
    for n in (1, 7):  # neither is the export example's 2
        check = parity(model, sess, torch.randn(n, 1, 16, 16))
        assert check.images == n and check.top1_agreement == 1.0
        assert check.within(1e-4), check


def test_tolerance_is_absolute_for_small_logits_and_relative_for_large():
    assert Parity(8, 1e-4, 0.5, 1.0).within(1e-4)
    assert not Parity(8, 1.1e-4, 0.5, 1.0).within(1e-4)
    assert Parity(8, 1e-2, 100.0, 1.0).within(1e-4)  # 1e-4 x 100
    assert not Parity(8, 1.1e-2, 100.0, 1.0).within(1e-4)


def test_unexportable_model_is_an_export_error_naming_the_failure(tmp_path):
    class DataDependent(nn.Module):  # control flow on values: torch.export refuses it
        def forward(self, x):
            return x * 2 if x.sum() > 0 else x - 1

    with pytest.raises(ExportError, match="ONNX export of DataDependent failed: .+"):
        export_onnx(DataDependent(), (1, 4, 4), tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()
    with pytest.raises(ValueError, match="exporter 'onnxscript': not one of dynamo, torchscript"):
        export_onnx(DataDependent(), (1, 4, 4), tmp_path / "x.onnx", exporter="onnxscript")


def test_latency_records_and_speedup_against_the_reference(tmp_path):
    small = create_model("resnet20", num_classes=10, in_channels=1, widths={"conv1": 8})
    dense = create_model("resnet20", num_classes=10, in_channels=1)
    for name, m in (("small", small), ("dense", dense)):
        export_onnx(m, (1, 8, 8), tmp_path / f"{name}.onnx")
    s, ref = (ort_runtime.session(tmp_path / f"{n}.onnx") for n in ("small", "dense"))
    out = ort_runtime.latency_metrics(s, (1, 8, 8), [1, 4], warmup=1, repeats=2,
                                      reference=ref, rounds=2)
    assert set(out) == {f"ort_{k}_bs{n}" for k in ("latency_ms", "dense_latency_ms", "speedup")
                        for n in (1, 4)}
    for n in (1, 4):
        assert out[f"ort_speedup_bs{n}"] == out[f"ort_dense_latency_ms_bs{n}"] / out[
            f"ort_latency_ms_bs{n}"]
    assert set(ort_runtime.latency_metrics(s, (1, 8, 8), [2], 0, 1)) == {"ort_latency_ms_bs2"}


def test_report_ort_speedup_is_against_the_dense_row():
    base = {"dataset": "d", "model": "m", "params_fraction": 1.0, "macs_fraction": 1.0,
            "test_top1": 0.9, "latency_ms_bs4": 2.0}
    records = [
        {**base, "method": "dense", "ort_latency_ms_bs4": 3.0, "onnx_max_abs_diff": 1e-6},
        {**base, "method": "chip", "budget": {"type": "flops", "target": 0.5},
         "macs_fraction": 0.5, "ort_latency_ms_bs4": 2.0, "onnx_max_abs_diff": 2e-6},
    ]
    df = build_table(records).set_index("method")
    assert df.loc["chip", "ort_speedup"] == 1.5 and df.loc["dense", "ort_speedup"] == 1.0
    assert df.loc["chip", "ort_latency_ms"] == 2.0 and df.loc["chip", "onnx_max_abs_diff"] == 2e-6
    without = build_table([{k: v for k, v in r.items() if not k.startswith(("ort", "onnx"))}
                           for r in records])
    assert without["ort_speedup"].isna().all()  # no export stage: empty, not an error


@pytest.fixture(scope="module")
def stage_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("export-stage")
    save_prepared(prepare_dataset("digits", image_size=16), root / "data")
    torch.manual_seed(0)
    kw = {"num_classes": 10, "in_channels": 1, "shortcut": "A"}
    dense = create_model("resnet20", **kw)
    save_checkpoint(make_checkpoint(dense, "resnet20", kw), root / "dense.pt")
    pkw = {**kw, "widths": {"layer1.0.conv1": 5, "layer2": 17}}
    save_checkpoint(make_checkpoint(create_model("resnet20", **pkw), "resnet20", pkw),
                    root / "pruned.pt")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["evaluate"]["latency"] = {"batch_sizes": [1, 4], "warmup": 1, "repeats": 2,
                                     "rounds": 1, "dense_reference": True}
    params["export"]["parity_images"] = 32
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root


def test_export_stage_writes_onnx_parity_and_latency(stage_inputs, tmp_path, mlflow_store):
    root = stage_inputs
    out = tmp_path / "export"
    rc = run_main(export_stage.main, [str(out), "--params", str(root / "params.yaml"),
                                      "--run", "dense", str(root / "dense.pt"), str(root / "data"),
                                      "--run", "pruned", str(root / "pruned.pt"), str(root / "data")])
    assert rc == 0
    for name in ("dense", "pruned"):
        rec = json.loads((out / name / "export.json").read_text())
        assert rec["parity_images"] == 32 and rec["onnx_top1_agreement"] == 1.0
        assert rec["onnx_max_abs_diff"] <= 1e-4 * max(1.0, rec["onnx_max_abs_logit"])
        assert rec["onnx_bytes"] == (out / name / "model.onnx").stat().st_size
        onnx.checker.check_model(onnx.load(str(out / name / "model.onnx")))
    dense = json.loads((out / "dense/export.json").read_text())
    pruned = json.loads((out / "pruned/export.json").read_text())
    assert dense["ort_speedup_bs4"] == 1.0 and "ort_dense_latency_ms_bs4" not in dense
    assert pruned["ort_speedup_bs4"] == pruned["ort_dense_latency_ms_bs4"] / pruned[
        "ort_latency_ms_bs4"]
    assert (out / "mlflow_run.json").is_file()
    # each export run's ONNX file is an MLflow model, registered: digits-resnet20 v1 and v2
    import mlflow

    from chipprune.budgets.counting import measure_cost
    from chipprune.reporting.records import CHECKPOINT_TAG
    from chipprune.reporting.tracking import file_sha256

    client = mlflow.MlflowClient()
    stage_run = client.get_run(json.loads((out / "mlflow_run.json").read_text())["run_id"])
    assert stage_run.data.metrics["exports"] == 3  # two runs and the pruned one's architecture
    assert stage_run.data.metrics["exports_wall_seconds"] > 0
    assert (dense["registered_model"], dense["registered_version"]) == ("digits-resnet20", "1")
    assert (pruned["registered_model"], pruned["registered_version"]) == ("digits-resnet20", "2")
    version = client.get_model_version("digits-resnet20", "2")
    kw = {"num_classes": 10, "in_channels": 1, "shortcut": "A"}
    cost = measure_cost(create_model("resnet20", **kw, widths={"layer1.0.conv1": 5, "layer2": 17}),
                        (1, 16, 16))
    dense_cost = measure_cost(create_model("resnet20", **kw), (1, 16, 16))
    assert version.tags == {
        "method": "dense", "budget_type": "", "target": "", "run": "pruned",
        "params_fraction": str(cost.params / dense_cost.params),
        "macs_fraction": str(cost.macs / dense_cost.macs),
        CHECKPOINT_TAG: file_sha256(root / "pruned.pt")}
    info = mlflow.models.get_model_info("models:/digits-resnet20/2")
    assert info.signature.inputs.to_dict() == [
        {"type": "tensor", "name": "images", "tensor-spec": {"dtype": "float32",
                                                             "shape": (-1, 1, 16, 16)}}]
    assert info.signature.outputs.to_dict()[0]["tensor-spec"]["shape"] == (-1, 10)
    # the registered model predicts what the exported file does (ONNX Runtime, CPU provider)
    loaded = mlflow.pyfunc.load_model("models:/digits-resnet20/2")
    x = torch.randn(3, 1, 16, 16).numpy()
    session = ort_runtime.session(out / "pruned/model.onnx")
    assert (loaded.predict(x)["logits"] == session.run(None, {"images": x})[0]).all()


def test_forked_exports_write_what_one_process_writes(stage_inputs, tmp_path):
    root = stage_inputs
    ExportJob = export_stage.ExportJob

    def jobs(folder):
        return [ExportJob(tmp_path / folder / n / "model.onnx", root / f"{n}.pt", root / "data", n)
                for n in ("dense", "pruned")] + [
            ExportJob(tmp_path / folder / "arch.onnx", root / "pruned.pt", root / "data", None)]

    one = export_stage.export_all(jobs("one"), "torchscript", workers=1)
    two = export_stage.export_all(jobs("two"), "torchscript", workers=2)
    assert len(one) == len(two) == 3 and all(s > 0 for s in two.values())
    for a, b in zip(one, two, strict=True):
        assert a.read_bytes() == b.read_bytes()  # the same bytes from a forked worker
    def shapes(path):
        return sorted(list(i.dims) for i in onnx.load(str(path)).graph.initializer)

    arch = onnx.load(str(tmp_path / "two/arch.onnx"))  # the pruned run's dense architecture:
    assert shapes(tmp_path / "two/arch.onnx") == shapes(tmp_path / "two/dense/model.onnx")
    assert shapes(tmp_path / "two/arch.onnx") != shapes(tmp_path / "two/pruned/model.onnx")
    assert not arch.metadata_props  # a timing reference, not a deliverable


def test_a_failed_forked_export_ends_the_stage_naming_the_file(stage_inputs, tmp_path):
    root = stage_inputs
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    ExportJob = export_stage.ExportJob
    jobs = [ExportJob(tmp_path / "a/model.onnx", root / "dense.pt", root / "data", "a"),
            ExportJob(tmp_path / "b/model.onnx", bad, root / "data", "b")]
    with pytest.raises(Exception, match="bad.pt"):
        export_stage.export_all(jobs, "torchscript", workers=2)


def test_export_stage_fails_over_the_tolerance_naming_the_run(stage_inputs, tmp_path, capsys,
                                                              mlflow_store):
    root = stage_inputs
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["export"]["tolerance"] = 1e-15  # float32 cannot meet it
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    out = tmp_path / "export"
    rc = run_main(export_stage.main, [str(out), "--params", str(tmp_path / "params.yaml"),
                                      "--run", "pruned", str(root / "pruned.pt"), str(root / "data")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "pruned: ONNX Runtime's logits differ from PyTorch's by up to" in err
    assert "export.tolerance allows 1e-15" in err
    assert not out.exists()  # nothing half-written


def test_best_version_under_a_budget_is_the_best_top1_at_or_below_the_target():
    from chipprune.deploy.registry import Candidate, best_under_budget

    def c(name, version, top1, macs, kind="flops", target=0.25):
        return Candidate(name, str(version), top1, macs, kind, target)

    cands = [c("d-r20", 1, 0.95, 0.26), c("d-r20", 2, 0.97, 0.13, target=0.125),  # tighter: in
             c("d-r20", 3, 0.99, 0.50, target=0.5),  # looser budget: out
             c("d-r20", 4, 0.99, 0.30, kind="params"),  # other type: out
             c("d-r20", 5, 0.97, 0.12, target=0.125),  # ties 2 on top-1, fewer MACs: wins
             c("e-r20", 1, 0.90, 0.25), c("e-r20", 2, 0.90, 0.25)]  # full tie: the newer
    best = best_under_budget(cands, "flops", 0.25)
    assert {k: v.version for k, v in best.items()} == {"d-r20": "5", "e-r20": "2"}
    assert best_under_budget(cands, "flops", 0.1) == {}
    assert best_under_budget(cands, "latency", 1.0) == {}


def test_alias_names_are_checked_before_any_registry_call():
    from chipprune.deploy.registry import check_alias, default_alias

    assert default_alias("flops-0.25") == "best-flops-0_25"
    check_alias(default_alias("latency-0.5"))
    for bad in ("best.flops", "latest", "v3", "a b", ""):
        with pytest.raises(ValueError, match="letters, digits"):
            check_alias(bad)
