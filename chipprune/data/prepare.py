"""prepare_dataset: any source -> train/val/test uint8 tensors plus a JSON-able meta dict."""

from __future__ import annotations

from pathlib import Path

import torch

from .cifar import read_cifar10, read_cifar100
from .dataset import SPLITS, PreparedDataset, RawData, Split, channel_mean_std
from .digits import read_digits
from .imagefolder import read_imagefolder
from .svhn import read_svhn
from .synthetic import read_synthetic

SOURCES = ("digits", "cifar10", "cifar100", "svhn", "imagefolder", "synthetic")
_FILE_READERS = {
    "cifar10": read_cifar10,
    "cifar100": read_cifar100,
    "svhn": read_svhn,
    "imagefolder": read_imagefolder,
}


def raw_data(
    source: str, root, *, download: bool, image_size: int | None, synthetic: dict | None = None
) -> RawData:
    if source == "digits":
        return read_digits(image_size)
    if source == "synthetic":  # synthetic: channels, classes, train, test (SyntheticConfig)
        return read_synthetic(image_size=image_size, **(synthetic or {}))
    if source not in _FILE_READERS:
        raise ValueError(f"unknown source {source!r}; choose one of {SOURCES}")
    return _FILE_READERS[source](root, download=download, image_size=image_size)


def checked_class_subset(classes: list[int], num_classes: int) -> list[int]:
    bad = [c for c in classes if isinstance(c, bool) or not isinstance(c, int)]
    if bad:
        raise ValueError(f"classes must be ints (class indices), got {bad}")
    out_of_range = [c for c in classes if not 0 <= c < num_classes]
    if out_of_range:
        raise ValueError(f"classes {out_of_range} out of range 0..{num_classes - 1}")
    if len(set(classes)) != len(classes):
        raise ValueError(f"classes must be unique, got {classes}")
    if len(classes) < 2:
        raise ValueError(f"classes must name at least 2 classes, got {classes}")
    return list(classes)


def relabelled(split: Split, classes: list[int], num_classes: int) -> Split:
    """Keep images of the listed classes; class classes[j] becomes label j."""
    new_label = torch.full((num_classes,), -1, dtype=torch.int64)
    new_label[torch.tensor(classes)] = torch.arange(len(classes))
    mapped = new_label[split.labels]  # (N,), -1 for dropped classes
    keep = mapped >= 0
    return Split(split.images[keep], mapped[keep])


def val_count(val_size: int | float, n_train: int) -> int:
    """val_size as an image count: an int is a count, a float in (0, 1) a fraction of train."""
    if isinstance(val_size, bool) or not isinstance(val_size, int | float):
        raise ValueError(f"val_size must be an int count or a float fraction, got {val_size!r}")
    if isinstance(val_size, float):
        if not 0.0 < val_size < 1.0:
            raise ValueError(
                f"a float val_size is a fraction of train and must lie in (0, 1), got {val_size}"
            )
        n_val = int(n_train * val_size + 0.5)
    else:
        n_val = val_size
    if not 0 <= n_val < n_train:
        raise ValueError(f"val_size {val_size} leaves no train images ({n_train} available)")
    return n_val


def train_val_indices(n: int, n_val: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded permutation; the first n_val go to val. Each index set is sorted, so both
    splits keep the source order."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[n_val:].sort().values, perm[:n_val].sort().values


def prepare_dataset(
    source: str,
    *,
    root: str | Path | None = None,
    download: bool = False,
    classes: list[int] | None = None,
    val_size: int | float = 0.1,
    seed: int = 0,
    image_size: int | None = None,
    synthetic: dict | None = None,
) -> PreparedDataset:
    """Read source, optionally keep a class subset, carve val from train, compute mean/std.

    meta keys: name, classes (names), num_classes, image_shape [C, H, W], mean and std
    (per channel, train split, 0..1 scale, population std), split_seed, val_size (as
    given), source_sha256, class_subset (indices into the source's classes, or None),
    sizes {split: N}. Same arguments -> byte-identical tensors.
    """
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}; choose one of {SOURCES}")
    raw = raw_data(source, root, download=download, image_size=image_size, synthetic=synthetic)
    names, train, test = raw.classes, raw.train, raw.test
    if classes is not None:
        subset = checked_class_subset(classes, len(names))
        train = relabelled(train, subset, len(names))
        test = relabelled(test, subset, len(names))
        names = [names[c] for c in subset]
    train_idx, val_idx = train_val_indices(len(train), val_count(val_size, len(train)), seed)
    splits = {"train": train.subset(train_idx), "val": train.subset(val_idx), "test": test}
    mean, std = channel_mean_std(splits["train"].images)
    meta = {
        "name": source,
        "classes": names,
        "num_classes": len(names),
        "image_shape": list(splits["train"].images.shape[1:]),
        "mean": mean,
        "std": std,
        "split_seed": seed,
        "val_size": val_size,
        "source_sha256": raw.source_sha256,
        "class_subset": None if classes is None else list(classes),
        "sizes": {s: len(splits[s]) for s in SPLITS},
    }
    return PreparedDataset(splits=splits, meta=meta)
