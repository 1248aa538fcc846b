"""SVHN (cropped digits) from the official train_32x32.mat / test_32x32.mat files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .dataset import DataFileError, RawData, Split, resized_uint8
from .sourcefiles import ensure_files, files_sha256, required_root

# (file name, URL, md5) exactly as torchvision's SVHN class has them. They are plain .mat
# files, not archives, so download_url rather than download_and_extract_archive.
SVHN_FILES = {
    "train": (
        "train_32x32.mat",
        "http://ufldl.stanford.edu/housenumbers/train_32x32.mat",
        "e26dedcc434d2e4c54c9b2d4a06d8373",
    ),
    "test": (
        "test_32x32.mat",
        "http://ufldl.stanford.edu/housenumbers/test_32x32.mat",
        "eb5a983be6a315427106f1b164d9cef3",
    ),
}
SVHN_CLASSES = [str(d) for d in range(10)]


def download_url(*args, **kwargs) -> None:
    """torchvision's downloader, imported only when a download happens."""
    from torchvision.datasets.utils import download_url as download

    download(*args, **kwargs)


def mat_split(path: Path) -> Split:
    """X is (32, 32, 3, N) uint8 (H, W, C, N); y is (N, 1) in 1..10 where 10 means digit 0."""
    try:
        import scipy.io  # only when SVHN is read

        mat = scipy.io.loadmat(path)
    except Exception as exc:
        raise DataFileError(
            path, f"not a readable .mat file ({type(exc).__name__}: {exc})"
        ) from exc
    for key in ("X", "y"):
        if key not in mat:
            raise DataFileError(path, f"missing variable {key!r}")
    x, y = mat["X"], mat["y"]
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[2] != 3:
        raise DataFileError(path, f"X must be (H, W, 3, N) uint8, found {x.dtype} {x.shape}")
    y = y.reshape(-1).astype(np.int64)
    if y.shape[0] != x.shape[3]:
        raise DataFileError(path, f"y has {y.shape[0]} labels for {x.shape[3]} images")
    if y.size and (y.min() < 1 or y.max() > 10):
        raise DataFileError(path, f"y must lie in 1..10, found {y.min()}..{y.max()}")
    images = torch.from_numpy(np.ascontiguousarray(x.transpose(3, 2, 0, 1)))  # (N, 3, H, W)
    return Split(images, torch.from_numpy(y % 10))  # label 10 is digit 0


def read_svhn(
    root: str | Path | None, *, download: bool = False, image_size: int | None = None
) -> RawData:
    root = required_root(root, "SVHN")
    paths = [root / SVHN_FILES[s][0] for s in ("train", "test")]

    def fetch() -> None:
        for filename, url, md5 in SVHN_FILES.values():
            if not (root / filename).is_file():
                download_url(url, str(root), filename=filename, md5=md5)

    ensure_files(paths, download=download, fetch=fetch, dataset="SVHN")
    train, test = mat_split(paths[0]), mat_split(paths[1])
    return RawData(
        train=Split(resized_uint8(train.images, image_size), train.labels),
        test=Split(resized_uint8(test.images, image_size), test.labels),
        classes=SVHN_CLASSES,
        source_sha256=files_sha256(root, paths),
    )
