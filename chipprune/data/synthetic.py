"""Synthetic images of a real dataset's shape: what a recipe's smoke run trains on where
the data is not on the machine. The shapes, class counts and code paths are the real
run's; the accuracy means nothing."""

from __future__ import annotations

import hashlib

import torch

from .dataset import RawData, Split


def read_synthetic(
    channels: int, classes: int, train: int, test: int, image_size: int, seed: int = 0
) -> RawData:
    """Uniform random uint8 images (N, channels, image_size, image_size), labels 0, 1, 2, ...
    in turn (every class seen once there are enough images); the same arguments give the
    same bytes."""
    g = torch.Generator().manual_seed(seed)

    def split(n: int) -> Split:
        images = torch.randint(0, 256, (n, channels, image_size, image_size), generator=g,
                               dtype=torch.uint8)
        return Split(images, torch.arange(n, dtype=torch.int64) % classes)

    spec = f"synthetic:{channels}x{image_size}x{image_size}:{classes}:{train}:{test}:{seed}"
    return RawData(
        train=split(train),
        test=split(test),
        classes=[f"class{i}" for i in range(classes)],
        source_sha256=hashlib.sha256(spec.encode()).hexdigest(),
    )
