"""Measured inference latency: warm-up excluded, synchronised timers, median of repeats."""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn


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
