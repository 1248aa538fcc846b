"""scikit-learn's bundled 8x8 digits (no network): a tiny real dataset for tests and smoke runs."""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import numpy as np
import torch

from .dataset import DataFileError, RawData, Split, resized_uint8

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


def digits_file() -> Path:
    """scikit-learn's bundled digits.csv.gz, found without importing scikit-learn (its
    import costs seconds; `load_digits` reads just this file)."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise DataFileError("the digits dataset ships with scikit-learn, which is not installed")
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"
    if not path.is_file():
        raise DataFileError(f"{path}: scikit-learn's digits file is missing")
    return path


def read_digits(image_size: int | None = None) -> RawData:
    # 1797 rows of 64 pixels (0..16) and the label, as load_digits parses them
    table = np.loadtxt(digits_file(), delimiter=",")
    pixels = np.ascontiguousarray(table[:, :-1].reshape(-1, 8, 8), dtype=np.uint8)  # (1797, 8, 8)
    target = np.ascontiguousarray(table[:, -1], dtype=np.int64)  # (1797,)
    sha = hashlib.sha256(pixels.tobytes() + target.tobytes()).hexdigest()

    # 0..16 -> 0..255 in float, resized, then rounded once: (N, 1, S, S) uint8
    x = torch.from_numpy(pixels).to(torch.float32).unsqueeze(1) * (255.0 / 16.0)
    images = resized_uint8(x, image_size or DIGITS_SIZE)
    labels = torch.from_numpy(target)
    test = stratified_test_mask(labels, DIGITS_TEST_FRACTION, DIGITS_TEST_SEED)
    return RawData(
        train=Split(images[~test], labels[~test]),
        test=Split(images[test], labels[test]),
        classes=[str(int(n)) for n in np.unique(target)],  # load_digits: target_names 0..9
        source_sha256=sha,
    )
