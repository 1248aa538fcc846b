"""Measured inference latency: warm-up excluded, synchronised timers, median of repeats."""

from __future__ import annotations

import ctypes
import functools
import statistics
import sys
import time

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


@torch.no_grad()
def median_latency_ms(
    model: nn.Module,
    input_shape: tuple[int, int, int],
    batch_size: int,
    device: torch.device,
    warmup: int = 5,
    repeats: int = 20,
) -> float:
    """Median wall time in ms of one forward pass of a (batch_size, *input_shape) batch."""
    if device.type == "cpu":
        keep_large_allocations()
    was_training = model.training
    model.eval()
    x = torch.randn(batch_size, *input_shape, device=device)
    for _ in range(warmup):
        model(x)
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        model(x)
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    model.train(was_training)
    return statistics.median(times)
