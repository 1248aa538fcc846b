"""Image folders: root/{train,val}/<class>/**/<image>, and what every file-based source
shares: a FileListing (which file has which label) and its in-memory form.

The val folder is the test split (val is carved from train later). In memory (`storage:
memory`) every image is decoded into one uint8 tensor, centre-squared at image_size; with
`storage: shards` the files are written into shards instead (chipprune.data.shards).
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .dataset import DataFileError, RawData, Split
from .sourcefiles import combined_sha256, required_root

IMAGE_EXTENSIONS = {
    ".jpg",
    ".jpeg",
    ".png",
    ".bmp",
    ".gif",
    ".webp",
    ".tif",
    ".tiff",
    ".ppm",
    ".pgm",
}


@dataclass
class FileListing:
    """A file-based source before decoding: the official train and test files with labels."""

    root: Path
    train: list[tuple[Path, int]]
    test: list[tuple[Path, int]]
    classes: list[str]


def class_folders(split_dir: Path) -> list[str]:
    return sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def image_files(class_dir: Path) -> list[Path]:
    """Images anywhere below class_dir (Tiny-ImageNet keeps them in <class>/images/), sorted."""
    return sorted(
        p for p in class_dir.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
    )


def labelled_files(
    split_dir: Path, classes: list[str], *, every_class: bool
) -> list[tuple[Path, int]]:
    found = class_folders(split_dir)
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise DataFileError(split_dir, f"class folders not present in train: {unknown[:5]}")
    pairs = []
    for label, name in enumerate(classes):
        files = image_files(split_dir / name) if name in found else []
        if every_class and not files:
            raise DataFileError(split_dir / name, "class folder holds no images")
        pairs += [(f, label) for f in files]
    return pairs


def center_square(img: Image.Image, size: int) -> Image.Image:
    """Shorter side to size (bilinear, antialiased by PIL), then the central size x size crop."""
    w, h = img.size
    if (w, h) != (size, size):
        if w <= h:
            new_w, new_h = size, int(size * h / w)
        else:
            new_w, new_h = int(size * w / h), size
        if (new_w, new_h) != (w, h):
            img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
        left, top = int(round((new_w - size) / 2.0)), int(round((new_h - size) / 2.0))
        img = img.crop((left, top, left + size, top + size))
    return img


def decoded_split(root: Path, pairs: list[tuple[Path, int]], size: int) -> tuple[Split, list]:
    """Decode every image into (N, 3, size, size) uint8; also return (relative name, sha256) pairs."""
    images = torch.empty((len(pairs), 3, size, size), dtype=torch.uint8)
    digests = []
    for i, (path, _) in enumerate(pairs):
        data = path.read_bytes()  # read once: hashed and decoded from the same bytes
        digests.append((path.relative_to(root).as_posix(), hashlib.sha256(data).digest()))
        try:
            with Image.open(io.BytesIO(data)) as img:
                rgb = center_square(img.convert("RGB"), size)
        except Exception as exc:
            raise DataFileError(
                path, f"not a readable image ({type(exc).__name__}: {exc})"
            ) from exc
        images[i] = torch.from_numpy(np.asarray(rgb, dtype=np.uint8).copy()).permute(2, 0, 1)
    labels = torch.tensor([label for _, label in pairs], dtype=torch.int64)
    return Split(images, labels), digests


def imagefolder_listing(root: str | Path | None) -> FileListing:
    root = required_root(root, "imagefolder")
    for d in (root / "train", root / "val"):
        if not d.is_dir():
            raise FileNotFoundError(
                f"imagefolder data not found: expected directory {d} "
                "(root/train/<class>/... and root/val/<class>/...); this source cannot be "
                "downloaded, point root at a directory that holds it"
            )
    classes = class_folders(root / "train")
    if not classes:
        raise DataFileError(root / "train", "no class folders")
    return FileListing(root, labelled_files(root / "train", classes, every_class=True),
                       labelled_files(root / "val", classes, every_class=False), classes)


def decoded_listing(listing: FileListing, image_size: int | None, source: str) -> RawData:
    """Every file of the listing decoded and centre-squared at image_size, in memory."""
    if image_size is None or image_size < 1:
        raise ValueError(
            f"source {source!r} needs image_size (a positive int): images differ in size"
        )
    train, train_digests = decoded_split(listing.root, listing.train, image_size)
    test, test_digests = decoded_split(listing.root, listing.test, image_size)
    return RawData(train, test, listing.classes, combined_sha256(train_digests + test_digests))


def read_imagefolder(
    root: str | Path | None, *, download: bool = False, image_size: int | None = None
) -> RawData:
    return decoded_listing(imagefolder_listing(root), image_size, "imagefolder")
