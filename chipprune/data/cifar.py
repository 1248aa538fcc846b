"""CIFAR-10 and CIFAR-100 from the official python-pickle layout (our reader, no md5 gate)."""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .dataset import DataFileError, RawData, Split, checked_labels, resized_uint8
from .sourcefiles import ensure_files, files_sha256, required_root


def download_and_extract_archive(*args, **kwargs) -> None:
    """torchvision's downloader, imported only when a download happens (torchvision costs
    about 2 s to import, paid by every stage that merely reads prepared data)."""
    from torchvision.datasets.utils import download_and_extract_archive as download

    download(*args, **kwargs)


@dataclass(frozen=True)
class CifarLayout:
    name: str
    folder: str  # directory under root that the archive extracts to
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    label_key: bytes
    names_key: bytes
    url: str  # the URL and archive md5 torchvision uses
    archive: str
    md5: str


CIFAR10 = CifarLayout(
    name="CIFAR-10",
    folder="cifar-10-batches-py",
    train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
    test_files=("test_batch",),
    meta_file="batches.meta",
    label_key=b"labels",
    names_key=b"label_names",
    url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    archive="cifar-10-python.tar.gz",
    md5="c58f30108f718f92721af3b95e74349a",
)
CIFAR100 = CifarLayout(
    name="CIFAR-100",
    folder="cifar-100-python",
    train_files=("train",),
    test_files=("test",),
    meta_file="meta",
    label_key=b"fine_labels",
    names_key=b"fine_label_names",
    url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
    archive="cifar-100-python.tar.gz",
    md5="eb9058c3a382ffc7106e4002c42a8d85",
)

# The files are Python 2 pickles of dicts holding numpy arrays; a pickle can run any code,
# so only the globals that rebuild an array are allowed (both numpy 1 and numpy 2 spellings,
# and _codecs.encode, which Python 3 writes for bytes at protocol 2).
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _ArrayOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refusing global {module}.{name}")
        return super().find_class(module, name)


def unpickled_dict(path: Path) -> dict[bytes, object]:
    """The dict in one CIFAR pickle, keys as bytes (encoding='bytes', as the files were written)."""
    try:
        with open(path, "rb") as f:
            obj = _ArrayOnlyUnpickler(f, encoding="bytes").load()
    except Exception as exc:
        raise DataFileError(
            path, f"not a readable CIFAR pickle ({type(exc).__name__}: {exc})"
        ) from exc
    if not isinstance(obj, dict):
        raise DataFileError(path, f"expected a pickled dict, found {type(obj).__name__}")
    return {k.encode() if isinstance(k, str) else k: v for k, v in obj.items()}


def batch_split(path: Path, label_key: bytes) -> Split:
    """One batch file -> Split: b'data' is (N, 3072) uint8, each row 1024 R, G, B values, row-major."""
    batch = unpickled_dict(path)
    for key in (b"data", label_key):
        if key not in batch:
            raise DataFileError(path, f"missing key {key!r} (has {sorted(batch)})")
    data = batch[b"data"]
    if (
        not isinstance(data, np.ndarray)
        or data.dtype != np.uint8
        or data.ndim != 2
        or data.shape[1] != 3072
    ):
        raise DataFileError(
            path, f"b'data' must be an (N, 3072) uint8 array, found {_describe(data)}"
        )
    labels = np.asarray(batch[label_key], dtype=np.int64)
    if labels.shape != (data.shape[0],):
        raise DataFileError(
            path, f"{label_key!r} has shape {labels.shape}, expected ({data.shape[0]},)"
        )
    images = torch.from_numpy(np.ascontiguousarray(data)).reshape(-1, 3, 32, 32)  # (N, 3, 32, 32)
    return Split(images, torch.from_numpy(labels))


def class_names(path: Path, names_key: bytes) -> list[str]:
    meta = unpickled_dict(path)
    if names_key not in meta:
        raise DataFileError(path, f"missing key {names_key!r} (has {sorted(meta)})")
    return [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in meta[names_key]]


def concatenated(paths: list[Path], label_key: bytes, num_classes: int) -> Split:
    parts = []
    for p in paths:
        part = batch_split(p, label_key)
        checked_labels(part.labels, num_classes, p)
        parts.append(part)
    return Split(torch.cat([s.images for s in parts]), torch.cat([s.labels for s in parts]))


def read_cifar(
    layout: CifarLayout, root: str | Path | None, *, download: bool, image_size: int | None
) -> RawData:
    root = required_root(root, layout.name)
    base = root / layout.folder
    train_paths = [base / f for f in layout.train_files]
    test_paths = [base / f for f in layout.test_files]
    meta_path = base / layout.meta_file

    def fetch() -> None:
        download_and_extract_archive(layout.url, str(root), filename=layout.archive, md5=layout.md5)

    ensure_files(
        [meta_path, *train_paths, *test_paths], download=download, fetch=fetch, dataset=layout.name
    )
    classes = class_names(meta_path, layout.names_key)
    train = concatenated(train_paths, layout.label_key, len(classes))
    test = concatenated(test_paths, layout.label_key, len(classes))
    return RawData(
        train=Split(resized_uint8(train.images, image_size), train.labels),
        test=Split(resized_uint8(test.images, image_size), test.labels),
        classes=classes,
        source_sha256=files_sha256(root, [meta_path, *train_paths, *test_paths]),
    )


def read_cifar10(root, *, download=False, image_size=None) -> RawData:
    return read_cifar(CIFAR10, root, download=download, image_size=image_size)


def read_cifar100(root, *, download=False, image_size=None) -> RawData:
    return read_cifar(CIFAR100, root, download=download, image_size=image_size)


def _describe(x: object) -> str:
    if isinstance(x, np.ndarray):
        return f"{x.dtype} array of shape {x.shape}"
    return type(x).__name__
