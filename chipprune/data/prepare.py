"""prepare_dataset: any source -> train/val/test uint8 tensors plus a JSON-able meta dict;
prepare_shards: the same splits written as tar shards of encoded images (large sets)."""

from __future__ import annotations

import inspect
from pathlib import Path

import torch

from .cifar import read_cifar10, read_cifar100
from .dataset import SPLITS, DataFileError, PreparedDataset, RawData, Split, channel_mean_std
from .digits import read_digits
from .imagefolder import decoded_listing, imagefolder_listing
from .imagenet import imagenet_listing
from .shards import Source, write_split
from .shards.layout import index_path
from .sourcefiles import combined_sha256
from .svhn import read_svhn
from .synthetic import read_synthetic
from .tiny_imagenet import tiny_imagenet_listing

SOURCES = ("digits", "cifar10", "cifar100", "svhn", "imagefolder", "imagenet", "tiny_imagenet",
           "synthetic")
_FILE_READERS = {
    "cifar10": read_cifar10,
    "cifar100": read_cifar100,
    "svhn": read_svhn,
}
# Sources of encoded image files: listed first, then decoded in memory or sharded as they are.
LISTINGS = {
    "imagefolder": lambda root, download: imagefolder_listing(root),
    "imagenet": lambda root, download: imagenet_listing(root),
    "tiny_imagenet": tiny_imagenet_listing,
}


def raw_data(
    source: str, root, *, download: bool, image_size: int | None, synthetic: dict | None = None
) -> RawData:
    if source == "digits":
        return read_digits(image_size)
    if source == "synthetic":  # synthetic: channels, classes, train, test (SyntheticConfig)
        return read_synthetic(image_size=image_size, **(synthetic or {}))
    if source in LISTINGS:
        return decoded_listing(LISTINGS[source](root, download), image_size, source)
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


def class_subset(names: list[str], train, test, classes: list[int] | None, keep):
    """(names, train, test) restricted to `classes` (None: all), class classes[j] becoming
    label j; `keep(split, subset, num_classes)` does it for the splits' form."""
    if classes is None:
        return names, train, test
    subset = checked_class_subset(classes, len(names))
    return ([names[c] for c in subset], keep(train, subset, len(names)),
            keep(test, subset, len(names)))


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
    names, train, test = class_subset(raw.classes, raw.train, raw.test, classes, relabelled)
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


def listed_subset(pairs: list, classes: list[int], num_classes: int) -> list:
    """relabelled() for a file listing."""
    new_label = {c: j for j, c in enumerate(classes)}
    return [(p, new_label[y]) for p, y in pairs if y in new_label]


def memory_bytes(source: str, *, root, download: bool, image_size: int | None) -> int | None:
    """What a file-based source would take decoded in memory (uint8, image_size squared, 3
    channels), or None for sources that are arrays already (always held in memory)."""
    if source not in LISTINGS or image_size is None:
        return None
    listing = LISTINGS[source](root, download)
    return (len(listing.train) + len(listing.test)) * 3 * image_size * image_size


def prepare_shards(
    source: str,
    out_dir: str | Path,
    *,
    shard_side: int | None = None,
    shard_size: int = 1000,
    workers: int = 1,
    skip_corrupt: bool = False,
    **reading,
) -> dict:
    """Write the train/val/test splits prepare_dataset(source, **reading) would make as
    shards into out_dir (index files, shards; not meta.json) and return the meta:
    prepare_dataset's keys plus storage, shard_side, shards, skipped and formats.

    File sources are stored as their files are (re-encoded only where the short side
    exceeds shard_side), mean and std taken over the stored training images; array sources
    are prepare_dataset's splits as PNG (lossless: its mean and std hold). image_size is
    the side the model sees (the crop), image_shape is [C, image_size, image_size]."""
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}; choose one of {SOURCES}")
    out_dir = Path(out_dir)
    if source in LISTINGS:
        meta, split_sources = _listed_splits(source, **reading)
    else:
        ds = prepare_dataset(source, **reading)
        meta, channels = ds.meta, ds.meta["image_shape"][0]
        if channels not in (1, 3):
            raise ValueError(f"shards hold 1- or 3-channel images, {source!r} has {channels}")
        split_sources = {name: [Source(f"{name}/{i}", int(split.labels[i]), pixels=split.images[i])
                                for i in range(len(split))]
                         for name, split in ds.splits.items()}
    written = {}
    for name in SPLITS:
        written[name] = write_split(out_dir, name, split_sources[name],
                                    channels=meta["image_shape"][0], shard_size=shard_size,
                                    shard_side=shard_side, workers=workers,
                                    skip_corrupt=skip_corrupt)
        if not written[name].index["label"].numel() and name != "val":
            raise DataFileError(reading.get("root") or out_dir,
                                f"split {name!r} has no readable images "
                                f"({len(written[name].skipped)} skipped)")
    if source in LISTINGS:  # over the pixels as stored, which is what the loader decodes
        t = written["train"]
        mean = t.sums[:, 0] / max(1, t.pixels)
        std = (t.sums[:, 1] / max(1, t.pixels) - mean * mean).clip(min=0.0) ** 0.5
        digests = [d for name in SPLITS for d in written[name].digests]
        meta |= {"mean": mean.tolist(), "std": std.tolist(),
                 "source_sha256": combined_sha256(digests)}
    meta |= {
        "sizes": {s: len(written[s].index["label"]) for s in SPLITS},
        "storage": "shards",
        "shard_side": shard_side,
        "shards": {s: written[s].shards for s in SPLITS},
        "skipped": {s: written[s].skipped for s in SPLITS},
        "formats": {s: written[s].formats for s in SPLITS},
    }
    for name in SPLITS:  # byte-identical for the same data: saved into an open file
        with open(index_path(out_dir, name), "wb") as f:
            torch.save(written[name].index, f)
    return meta


def _listed_splits(source: str, **reading) -> tuple[dict, dict[str, list[Source]]]:
    """A file source's meta (without mean, std and checksum, which come from the written
    shards) and its carved splits as files to shard, with prepare_dataset's keywords."""
    args = inspect.signature(prepare_dataset).bind(source, **reading)
    args.apply_defaults()  # one set of defaults: prepare_dataset's
    a = args.arguments
    if a["image_size"] is None:
        raise ValueError(f"source {source!r} needs image_size (the side the model sees)")
    listing = LISTINGS[source](a["root"], a["download"])
    names, train, test = class_subset(listing.classes, listing.train, listing.test, a["classes"],
                                      listed_subset)
    train_idx, val_idx = train_val_indices(len(train), val_count(a["val_size"], len(train)),
                                           a["seed"])

    def files(pairs: list) -> list[Source]:
        return [Source(p.relative_to(listing.root).as_posix(), y, path=p) for p, y in pairs]

    splits = {"train": files([train[i] for i in train_idx.tolist()]),
              "val": files([train[i] for i in val_idx.tolist()]), "test": files(test)}
    meta = {
        "name": source, "classes": names, "num_classes": len(names),
        "image_shape": [3, a["image_size"], a["image_size"]], "split_seed": a["seed"],
        "val_size": a["val_size"],
        "class_subset": None if a["classes"] is None else list(a["classes"]),
    }
    return meta, splits
