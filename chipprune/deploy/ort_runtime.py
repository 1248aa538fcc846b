"""ONNX Runtime sessions and their measured latency, in evaluate's discipline: warm-up
excluded, the median of repeats, the fastest of interleaved rounds (load on a shared
machine only adds time), the model and its dense reference alternating in each round."""

from __future__ import annotations

from pathlib import Path

import numpy as np

PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")
# Sleep before timing a session when other sessions ran just before: their worker threads
# spin for a while after a run and would take the cores from the one being timed
QUIET_S = 0.01


def providers_for(device: str) -> list[str]:
    """The execution providers, in order of preference, for a deployment on `device`."""
    return list(PROVIDERS if device == "cuda" else PROVIDERS[1:])


def session(model: str | Path | bytes, device: str = "cpu", optimized_model_filepath: str = ""):
    """An InferenceSession of an ONNX file (or its serialised bytes) on `device`: CUDA
    where asked and available, else the CPU; with `optimized_model_filepath`, the graph it
    runs is written there (ONNX Runtime warns that it is for this machine only)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if optimized_model_filepath:
        opts.optimized_model_filepath = optimized_model_filepath
        opts.log_severity_level = 3  # the warning above, on every call
    providers = [p for p in providers_for(device) if p in ort.get_available_providers()]
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, sess_options=opts, providers=providers)


def median_latency_ms(sess, input_shape: tuple[int, int, int], batch_size: int,
                      warmup: int = 5, repeats: int = 20) -> float:
    """Median wall time in ms of one run of a (batch_size, *input_shape) float32 batch."""
    name = sess.get_inputs()[0].name
    x = np.random.default_rng(0).standard_normal((batch_size, *input_shape), dtype=np.float32)
    return median_run_ms(sess, {name: x}, warmup, repeats)


def median_run_ms(sess, feeds: dict[str, np.ndarray], warmup: int, repeats: int,
                  min_ms: float | None = None) -> float:
    """Median wall time in ms of `sess.run` on `feeds` (`chipprune.budgets.latency.median_ms`:
    sub-millisecond runs are repeated for `min_ms`, by default MIN_MS)."""
    from chipprune.budgets.latency import median_ms

    return median_ms(lambda: sess.run(None, feeds), warmup, repeats, min_ms)


def latency_metrics(sess, input_shape: tuple[int, int, int], batch_sizes: list[int],
                    warmup: int = 5, repeats: int = 20, reference=None,
                    rounds: int = 1) -> dict[str, float]:
    """`ort_latency_ms_bs<N>` per batch size and, with a `reference` session (the dense
    architecture exported the same way), `ort_dense_latency_ms_bs<N>` and
    `ort_speedup_bs<N>` = reference / this, each the fastest of `rounds` interleaved rounds."""
    out: dict[str, float] = {}
    for bs in batch_sizes:
        best = ref_best = float("inf")
        for _ in range(rounds):
            best = min(best, median_latency_ms(sess, input_shape, bs, warmup, repeats))
            if reference is not None:
                ref_best = min(ref_best,
                               median_latency_ms(reference, input_shape, bs, warmup, repeats))
        out[f"ort_latency_ms_bs{bs}"] = best
        if reference is not None:
            out[f"ort_dense_latency_ms_bs{bs}"] = ref_best
            out[f"ort_speedup_bs{bs}"] = ref_best / best
    return out
