"""Latency tables timed in ONNX Runtime (`latency_budget.runtime: onnxruntime`): the timer
`chipprune.budgets.latency_profile.profile_model` takes, for the deployment runtime.

A table has hundreds of timed layers and torch's exporter costs about a second a graph, so
each layer's graph is written directly with onnx.helper, as the exporter writes the layer
inside the whole model: Conv [-> BatchNormalization] [-> Add shortcut] [-> Relu], batch
dimension free, float32. ONNX Runtime then fuses it as it fuses the model (BN folded into the
conv, the add and ReLU into the conv where its CPU kernels can). Whole models (the dense one,
the check and calibration models) go through the real exporter.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
from torch import nn

from chipprune.budgets.latency_table import ConvOp
from chipprune.deploy import ort_runtime
from chipprune.deploy.onnx_export import OPSET, export_onnx

IR_VERSION = 10  # what onnxruntime 1.2x reads; the exporter writes the same for opset 18
NCHWC = "com.microsoft.nchwc"  # ONNX Runtime's blocked-layout ops (its CPU provider's)


def layer_graph(op: ConvOp, n_in: int, n_out: int, seed: int = 0):
    """The ONNX model of one timed layer at these widths (random weights: time does not
    depend on them). Inputs `x` (N, C_in, H, W) and, for a branch's last conv, `shortcut`
    (N, C_out, H', W')."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    c_in, groups = (n_out, n_out) if op.depthwise else (n_in, op.groups)
    (h, w), (kh, kw), out_hw = op.in_hw, op.kernel, op.out_hw

    def init(name: str, *shape: int) -> object:
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)

    inits = [init("weight", n_out, c_in // groups, kh, kw)]
    conv_inputs = ["x", "weight"]
    if op.bias:
        inits.append(init("bias", n_out))
        conv_inputs.append("bias")
    nodes = [helper.make_node(
        "Conv", conv_inputs, ["conv"], kernel_shape=[kh, kw], strides=list(op.stride),
        pads=[*op.padding, *op.padding], dilations=list(op.dilation), group=groups)]
    last = "conv"
    if op.bn_relu:
        inits += [init("bn_scale", n_out), init("bn_bias", n_out), init("bn_mean", n_out),
                  numpy_helper.from_array(rng.uniform(0.5, 1.5, n_out).astype(np.float32),
                                          "bn_var")]
        nodes.append(helper.make_node("BatchNormalization",
                                      [last, "bn_scale", "bn_bias", "bn_mean", "bn_var"],
                                      ["bn"], epsilon=1e-5))
        last = "bn"
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", c_in, h, w])]
    if op.residual:
        inputs.append(helper.make_tensor_value_info("shortcut", TensorProto.FLOAT,
                                                    ["N", n_out, *out_hw]))
        nodes.append(helper.make_node("Add", [last, "shortcut"], ["added"]))
        last = "added"
    if op.bn_relu:
        nodes.append(helper.make_node("Relu", [last], ["relu"]))
        last = "relu"
    nodes.append(helper.make_node("Identity", [last], ["y"]))
    graph = helper.make_graph(
        nodes, "layer", inputs,
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", n_out, *out_hw])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    return model


def nchwc_block(device: str = "cpu") -> int:
    """The channel block of ONNX Runtime's blocked conv layout on `device` (16 with
    AVX-512, 8 with AVX2), read off the graph it makes of a conv with one output channel,
    which it pads to a whole block; 0 where it does not block convs (CUDA, other CPUs). A
    conv's widths cost what the next multiple of the block costs."""
    from onnx import load, numpy_helper

    op = ConvOp((1, 1), (1, 1), (0, 0), (1, 1), False, (4, 4), bn_relu=False)
    with tempfile.TemporaryDirectory(prefix="chipprune-ort-") as tmp:
        out = Path(tmp) / "optimised.onnx"
        ort_runtime.session(layer_graph(op, 8, 1).SerializeToString(), device,
                            optimized_model_filepath=str(out))
        graph = load(str(out)).graph
    weights = {t.name: numpy_helper.to_array(t).shape for t in graph.initializer}
    return next((int(weights[n.input[1]][0]) for n in graph.node
                 if n.domain == NCHWC and n.op_type == "Conv"), 0)


def layer_feeds(op: ConvOp, n_in: int, n_out: int, batch_size: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    c_in = n_out if op.depthwise else n_in
    feeds = {"x": rng.standard_normal((batch_size, c_in, *op.in_hw), dtype=np.float32)}
    if op.residual:
        feeds["shortcut"] = rng.standard_normal((batch_size, n_out, *op.out_hw), dtype=np.float32)
    return feeds


class OrtTimer:
    """The ONNX Runtime timer: per grid point the `layer_graph` (written once), timed in a
    fresh session warmed up `warmup` runs: the median of `repeats` runs; whole models through
    torch's `exporter` (exported once; the export stage's, so a table times the graphs that
    are deployed). Sessions as `chipprune.deploy.ort_runtime.session` makes them (all graph
    optimisations, the provider for `device`).

    A session lives for one timing only: every live session keeps its own thread pool, and
    idle pools slow the session being timed (measured on 2 cores: a ResNet-20 at batch 256
    ran in 28.5 ms, in 48 ms with 300 layer sessions alive, and once in 2.6 s; a table holds
    hundreds of points). `quiet_s` of sleep before each timing lets the previous session's
    threads wind down."""

    def __init__(self, device: str = "cpu", warmup: int = 3, repeats: int = 3,
                 quiet_s: float = ort_runtime.QUIET_S, min_ms: float | None = None,
                 exporter: str = "dynamo"):
        self.device, self.warmup, self.repeats, self.quiet_s = device, warmup, repeats, quiet_s
        self.min_ms = min_ms  # None: budgets.latency.MIN_MS
        self.exporter = exporter
        self._graphs: dict[tuple, bytes] = {}
        self._scratch = tempfile.TemporaryDirectory(prefix="chipprune-ort-")

    def _time(self, key: tuple, build: Callable[[], bytes], feeds: dict[str, np.ndarray]) -> float:
        if key not in self._graphs:
            self._graphs[key] = build()
        sess = ort_runtime.session(self._graphs[key], self.device)
        if self.quiet_s:
            time.sleep(self.quiet_s)
        ms = ort_runtime.median_run_ms(sess, feeds, max(1, self.warmup), self.repeats,
                                       self.min_ms)
        del sess  # its threads stop here (see the class doc)
        return ms

    def __call__(self, op: ConvOp, n_in: int, n_out: int, batch_size: int) -> float:
        return self._time((op, n_in, n_out),
                          lambda: layer_graph(op, n_in, n_out).SerializeToString(),
                          layer_feeds(op, n_in, n_out, batch_size))

    def model_timer(self, build: Callable[[Mapping[str, int]], nn.Module],
                    input_size: tuple[int, int, int],
                    batch_size: int) -> Callable[[Mapping[str, int]], float]:
        """A `profile_model` model timer: `build(widths)` exported once per widths."""
        x = np.random.default_rng(0).standard_normal((batch_size, *input_size), dtype=np.float32)

        def run(widths: Mapping[str, int]) -> float:
            key = ("model", tuple(sorted(widths.items())))

            def export():
                path = Path(self._scratch.name) / f"model-{len(self._graphs)}.onnx"
                export_onnx(build(dict(widths)).float().eval(), input_size, path,
                            exporter=self.exporter)
                return path.read_bytes()

            return self._time(key, export, {"images": x})

        return run
