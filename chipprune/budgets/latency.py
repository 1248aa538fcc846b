"""Measured inference latency: warm-up excluded, synchronised timers, median of repeats."""

from __future__ import annotations

import ctypes
import functools
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn


@functools.cache
def keep_large_allocations() -> None:
    """Stop glibc from returning big blocks to the OS after every free: on CPU, a batch's
    activations (MBs) would otherwise be mmap'ed, page-faulted and unmapped on every forward,
    and the measured latency swings 2-10x with the state of the heap (seen here: the same
    model at batch 256 took 10 ms or 90-240 ms from one process to the next)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (e.g. musl): nothing to tune
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 1 << 30)
    libc.mallopt(m_trim_threshold, 1 << 30)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# Sub-millisecond forwards (a small model at batch 1, one layer of a latency table) are timed
# for at least this long, warm-up and measurement each: a median of 3 runs of 0.1 ms spans
# less than a scheduler tick, and a fresh session's first runs are slow for longer than 3 runs
# (measured here: ResNet-20 at batch 1 in ONNX Runtime, 0.17 ms, read as 0.30 ms)
MIN_MS = 10.0
MAX_RUNS = 2000


def median_ms(run: Callable[[], object], warmup: int, repeats: int,
              min_ms: float | None = None, sync: Callable[[], object] = lambda: None,
              warmup_ms: float | None = None) -> float:
    """Median wall time in ms of `run()` (then `sync()`): after `warmup` runs, and with any
    warm-up at all at least `warmup_ms` (None: `min_ms`) of it, at least `repeats` timed runs
    and `min_ms` (None: MIN_MS) of them (at most MAX_RUNS each). Every timer passes its
    `min_ms` through to here; `warmup_ms` 0 re-warms something already warm (its caches) in
    exactly `warmup` runs."""
    min_ms = MIN_MS if min_ms is None else min_ms
    warmup_ms = min_ms if warmup_ms is None else warmup_ms

    def timed(count: int, at_least_ms: float) -> list[float]:
        times: list[float] = []
        while len(times) < count or (sum(times) < at_least_ms and len(times) < MAX_RUNS):
            t0 = time.perf_counter()
            run()
            sync()
            times.append((time.perf_counter() - t0) * 1e3)
        return times

    timed(warmup, warmup_ms if warmup > 0 else 0.0)
    return statistics.median(timed(repeats, min_ms))


MEMORY_FORMATS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
SHORT = {"nchw": "nchw", "channels_last": "cl"}  # metric-key suffixes


@torch.no_grad()
def median_latency_ms(
    model: nn.Module,
    input_shape: tuple[int, int, int],
    batch_size: int,
    device: torch.device,
    warmup: int = 5,
    repeats: int = 20,
    memory_format: str = "nchw",
    dtype: torch.dtype = torch.float32,
    min_ms: float | None = None,
    warmup_ms: float | None = None,
) -> float:
    """Median wall time in ms of one forward pass of a (batch_size, *input_shape) batch
    (`median_ms`).

    `memory_format` ("nchw" or "channels_last") is applied to the model (in place) and the
    input; `dtype` is the input's (the model must already be in it)."""
    if device.type == "cpu":
        keep_large_allocations()
    fmt = MEMORY_FORMATS[memory_format]
    was_training = model.training
    model.eval()
    model.to(memory_format=fmt)
    x = torch.randn(batch_size, *input_shape, device=device, dtype=dtype)
    x = x.contiguous(memory_format=fmt)
    ms = median_ms(lambda: model(x), warmup, repeats, min_ms, sync=lambda: _sync(device),
                   warmup_ms=warmup_ms)
    model.train(was_training)
    return ms


def latency_by_format(
    model: nn.Module,
    input_shape: tuple[int, int, int],
    batch_size: int,
    device: torch.device,
    warmup: int = 5,
    repeats: int = 20,
    dtype: torch.dtype = torch.float32,
    rounds: int = 1,
) -> dict[str, float]:
    """Median latency (ms) in both memory formats: {"nchw": ..., "channels_last": ...}; with
    `rounds` > 1 the fastest of that many interleaved rounds of each (on a shared machine
    load only adds time, so the fastest round is the least disturbed one). The model is
    left in NCHW."""
    out: dict[str, float] = {}
    for _ in range(rounds):
        for fmt in MEMORY_FORMATS:
            ms = median_latency_ms(model, input_shape, batch_size, device, warmup, repeats, fmt,
                                   dtype)
            out[fmt] = min(ms, out.get(fmt, ms))
    model.to(memory_format=torch.contiguous_format)
    return out


def latency_metrics(
    model: nn.Module,
    input_shape: tuple[int, int, int],
    batch_sizes: list[int],
    device: torch.device,
    warmup: int = 5,
    repeats: int = 20,
    reference: nn.Module | None = None,
    rounds: int = 1,
) -> tuple[dict[str, float], dict[str, str]]:
    """Evaluate's latency figures per batch size N: `latency_ms_bs<N>_nchw`, `_cl` and
    `latency_ms_bs<N>` (the faster of the two), and with a `reference` (the dense model,
    measured in the same process) `speedup_bs<N>` = its best time / this model's best time
    and `dense_latency_ms_bs<N>`. Also returns the faster format per batch size."""
    metrics: dict[str, float] = {}
    best: dict[str, str] = {}
    for bs in batch_sizes:
        ms = latency_by_format(model, input_shape, bs, device, warmup, repeats, rounds=rounds)
        fmt = min(ms, key=ms.get)
        metrics |= {f"latency_ms_bs{bs}_{SHORT[f]}": v for f, v in ms.items()}
        metrics[f"latency_ms_bs{bs}"] = ms[fmt]
        best[f"latency_format_bs{bs}"] = fmt
        if reference is not None:
            ref = min(
                latency_by_format(reference, input_shape, bs, device, warmup, repeats,
                                  rounds=rounds).values()
            )
            metrics[f"dense_latency_ms_bs{bs}"] = ref
            metrics[f"speedup_bs{bs}"] = ref / ms[fmt]
    return metrics, best


@functools.cache
def memory_read_ms_per_mb(device: torch.device, mb: int = 256) -> float:
    """What reading a MB (10^6 bytes) of memory costs on `device`, in ms: the median of 7 sums
    of a float32 buffer of `mb` MB, larger than the caches, after one untimed sum. Once per
    process and device."""
    x = torch.ones(mb * 250_000, device=device)
    ms = median_ms(lambda: x.sum(), 1, 7, min_ms=0.0, sync=lambda: _sync(device))
    return ms / mb


CPU_CACHES = "/sys/devices/system/cpu/cpu0/cache"  # Linux sysfs: index<N>/{level,type,size}


@functools.cache
def last_level_cache_mb(device: torch.device, cpu_caches: str = CPU_CACHES) -> float:
    """The size in MB (10^6 bytes) of `device`'s last-level cache: the CPU's highest data or
    unified cache level in sysfs (`cpu_caches`, the first CPU's), a CUDA device's L2; 0
    where unknown (the latency table's spill term is then off). Read once per process."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).L2_cache_size / 1e6
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    best = (0, 0.0)  # (level, MB)
    for index in Path(cpu_caches).glob("index*"):
        try:
            level = int((index / "level").read_text())
            if (index / "type").read_text().strip() == "Instruction":
                continue
            size = (index / "size").read_text().strip()
            value = int(size.rstrip("KMG")) * units.get(size[-1], 1)
        except (OSError, ValueError):
            continue
        best = max(best, (level, value / 1e6))
    return best[1]


def onednn_block(device: torch.device) -> int:
    """The channel block of PyTorch's CPU convs: oneDNN computes them in blocked layouts of
    one vector register of float32 channels, 16 with AVX-512 and 8 with AVX2; 0 elsewhere
    (CUDA, other CPUs: no block assumed). A width off the block costs at least what the next
    multiple does: measured here (AVX-512, channels_last, batch 1), 136 output channels of a
    3x3 conv on 256 channels at 8x8 ran in 0.314 ms and 144 in 0.286 ms, 56 on 64 at 32x32
    in 0.475 ms and 64 in 0.407 ms."""
    if device.type != "cpu":
        return 0
    capability = torch.backends.cpu.get_cpu_capability()
    return 16 if capability.startswith("AVX512") else 8 if capability.startswith("AVX2") else 0


def onednn_round_to(step: int, round_to: int, device: torch.device) -> int:
    """The `round_to` a PyTorch latency budget wants on `device`: where the table's grid is
    coarser than `round_to` (step > round_to), `round_to` up to a multiple of oneDNN's block
    (`onednn_block`), since the grid interpolates past the slower widths off it (VGG-16-BN at
    step 64: its latency-0.5 models within 10% in 4 of 12 rows with round_to 8, 9 of 12 with
    16); else `round_to` itself (a grid of step = round_to times every width it makes)."""
    block = onednn_block(device)
    if step <= round_to or not block:
        return round_to
    return -(-round_to // block) * block
