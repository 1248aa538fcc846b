"""Latency tables in ONNX Runtime: the hand-built layer graphs compute what the layer they
stand for computes, and the profile_latency stage makes a calibrated table in that runtime
that a latency budget accepts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from onnx import numpy_helper

from chipprune.budgets.exact import BudgetModel
from chipprune.budgets.latency_table import _layer_plan, load_table
from chipprune.deploy import ort_runtime
from chipprune.deploy.ort_latency import OrtTimer, layer_feeds, layer_graph, nchwc_block
from chipprune.models import create_model
from stages import profile_latency
from stages._common import run_main
from tests.test_latency_budget import TINY


def _reference(op, weights: dict[str, np.ndarray], feeds: dict[str, np.ndarray]) -> np.ndarray:
    """The layer in PyTorch from the graph's own initializers: conv [-> BN] [-> add] [-> ReLU]."""
    t = {k: torch.from_numpy(v) for k, v in weights.items()}
    y = F.conv2d(torch.from_numpy(feeds["x"]), t["weight"], t.get("bias"), op.stride,
                 op.padding, op.dilation, groups=t["weight"].shape[0] if op.depthwise else 1)
    if op.bn_relu:
        y = F.batch_norm(y, t["bn_mean"], t["bn_var"], t["bn_scale"], t["bn_bias"], eps=1e-5)
    if op.residual:
        y = y + torch.from_numpy(feeds["shortcut"])
    return (torch.relu(y) if op.bn_relu else y).numpy()


@pytest.mark.parametrize("arch,shape", [("resnet20", (1, 16, 16)), ("mobilenetv2_cifar", (3, 32, 32))])
def test_layer_graphs_compute_the_layer_they_time(arch, shape):
    kw = {"num_classes": 10, "in_channels": shape[0]}
    _, plan = _layer_plan(create_model(arch, **kw), shape)
    ops = {p[5] for p in plan}
    assert any(op.residual for op in ops) and (arch != "mobilenetv2_cifar" or any(
        op.depthwise for op in ops))
    g = np.random.default_rng(0)
    for op in sorted(ops, key=repr):
        n_in, n_out = int(g.integers(1, 20)), int(g.integers(1, 20))
        model = layer_graph(op, n_in, n_out)
        weights = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
        feeds = layer_feeds(op, n_in, n_out, 3)
        got = ort_runtime.session(model.SerializeToString()).run(None, feeds)[0]
        want = _reference(op, weights, feeds)
        assert got.shape == want.shape
        assert np.abs(got - want).max() <= 1e-4 * max(1.0, np.abs(want).max()), op


def test_ort_timer_times_layers_and_whole_models():
    op = next(p[5] for p in _layer_plan(create_model("resnet20", num_classes=10, in_channels=1),
                                        (1, 16, 16))[1] if p[5].residual)
    timer = OrtTimer(warmup=1, repeats=2, quiet_s=0.0)
    assert timer(op, 8, 16, 2) > 0 and timer(op, 8, 16, 2) > 0
    assert len(timer._graphs) == 1  # written once, reused
    build = lambda w: create_model("resnet20", num_classes=10, in_channels=1,  # noqa: E731
                                   **({"widths": w} if w else {}))
    run = timer.model_timer(build, (1, 16, 16), 2)
    half = {g: max(1, w // 2) for g, w in build(None).describe().widths().items()}
    assert run(half) > 0 and len(timer._graphs) == 2


def test_the_channel_block_is_read_off_the_graph_onnx_runtime_makes():
    """A conv's output is padded to a whole block in the blocked layout; a model whose
    widths are not multiples of it pays for the padding (see the profile stage's note)."""
    block = nchwc_block()
    assert block in (0, 4, 8, 16)  # MLAS: AVX-512 16, AVX2 8, SSE 4; 0: not blocked
    if block:
        assert nchwc_block("cuda") in (0, block)  # CUDA (where present) does not block


def test_profile_latency_stage_in_onnxruntime(tmp_path, mlflow_store, capsys):
    from chipprune.data import prepare_dataset, save_prepared
    from tests.conftest import REPO

    save_prepared(prepare_dataset("digits", image_size=16), tmp_path / "data")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["latency_budget"] = {**TINY, "runtime": "onnxruntime", "calibration": 0, "step": 12}
    params["export"]["exporter"] = "torchscript"  # whole models exported as the export stage's
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    out = tmp_path / "runs/latency/onnxruntime-cpu-bs2-digits-resnet20"
    rc = run_main(profile_latency.main, ["digits", "resnet20", str(tmp_path / "data"), str(out),
                                         "--params", str(tmp_path / "params.yaml")])
    assert rc == 0
    table = load_table(out / "table.json")
    assert table.meta["runtime"] == "onnxruntime" and table.meta["memory_format"] == "onnx"
    assert table.meta["onnxruntime"] and "calibration" not in table.meta  # tested in torch
    assert table.meta["exporter"] == "torchscript"
    block = nchwc_block()
    assert table.meta["channel_block"] == block
    note = "latency_budget.step 12 and prune.round_to 1 the budget pays for channels"
    assert (note in capsys.readouterr().out) == bool(block)
    assert table.scale == 1.0 and all(lt.ms[-1][-1] > 0 for lt in table.layers)
    model = create_model("resnet20", num_classes=10, in_channels=1, shortcut="A")
    bm = BudgetModel.from_model(model, (1, 16, 16), latency=table)
    assert bm.fraction("latency", bm.dense_widths) == pytest.approx(1.0, rel=1e-12)
