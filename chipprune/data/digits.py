"""scikit-learn's bundled 8x8 digits (no network): a tiny real dataset for tests and smoke runs."""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from .dataset import RawData, Split, resized_uint8

DIGITS_SIZE = 16  # a CIFAR ResNet's last stage (x4 down) still sees 4x4 maps
DIGITS_TEST_FRACTION = 0.2
# Fixed, not the caller's seed: the test split must not move when the val seed changes.
DIGITS_TEST_SEED = 0


def stratified_test_mask(labels: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """(N,) bool, True for the test images: round(fraction * n_c) random images of each class c.

    Our own few lines rather than sklearn's splitter, so a sklearn upgrade cannot move it.
    """
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(labels.shape[0], dtype=torch.bool)
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        n_test = int(idx.numel() * fraction + 0.5)
        mask[idx[torch.randperm(idx.numel(), generator=g)[:n_test]]] = True
    return mask


def read_digits(image_size: int | None = None) -> RawData:
    from sklearn.datasets import load_digits  # scikit-learn only when digits are prepared

    bunch = load_digits()
    pixels = np.ascontiguousarray(bunch.images, dtype=np.uint8)  # (1797, 8, 8), values 0..16
    target = np.ascontiguousarray(bunch.target, dtype=np.int64)  # (1797,)
    sha = hashlib.sha256(pixels.tobytes() + target.tobytes()).hexdigest()

    # 0..16 -> 0..255 in float, resized, then rounded once: (N, 1, S, S) uint8
    x = torch.from_numpy(pixels).to(torch.float32).unsqueeze(1) * (255.0 / 16.0)
    images = resized_uint8(x, image_size or DIGITS_SIZE)
    labels = torch.from_numpy(target)
    test = stratified_test_mask(labels, DIGITS_TEST_FRACTION, DIGITS_TEST_SEED)
    return RawData(
        train=Split(images[~test], labels[~test]),
        test=Split(images[test], labels[test]),
        classes=[str(int(n)) for n in bunch.target_names],
        source_sha256=sha,
    )
