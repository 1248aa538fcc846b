"""Tiny-ImageNet in its official layout (the tiny-imagenet-200 folder or zip, as CS231n
publishes it): wnids.txt, train/<wnid>/images/*.JPEG, val/images/*.JPEG labelled by
val/val_annotations.txt. The official val split is our test split (its test/ folder has no
labels); classes are the wnids in sorted order, as an ImageFolder over train/ orders them."""

from __future__ import annotations

from pathlib import Path

from .dataset import DataFileError
from .imagefolder import FileListing, image_files
from .sourcefiles import required_root

URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
MD5 = "90528d7ca1a48142e341f4ef8d21d0de"
FOLDER = "tiny-imagenet-200"


def dataset_dir(root: Path, download: bool) -> Path:
    """The folder holding wnids.txt: root itself, root/tiny-imagenet-200, or the official zip
    in root extracted (downloaded first with download: true)."""
    for d in (root, root / FOLDER):
        if (d / "wnids.txt").is_file():
            return d
    archive = root / f"{FOLDER}.zip"
    if archive.is_file() or download:
        from torchvision.datasets.utils import download_and_extract_archive, extract_archive

        if archive.is_file():
            extract_archive(str(archive), str(root))
        else:
            download_and_extract_archive(URL, str(root), md5=MD5)
        if (root / FOLDER / "wnids.txt").is_file():
            return root / FOLDER
    raise FileNotFoundError(
        f"tiny_imagenet data not found: expected {root / FOLDER / 'wnids.txt'} (or "
        f"{root / 'wnids.txt'}, or {archive}); set download: true to fetch it, or point root "
        "at the tiny-imagenet-200 folder")


def tiny_imagenet_listing(root: str | Path | None, download: bool = False) -> FileListing:
    d = dataset_dir(required_root(root, "tiny_imagenet"), download)
    wnids_file = d / "wnids.txt"
    classes = sorted(w.strip() for w in wnids_file.read_text().split() if w.strip())
    if len(set(classes)) != len(classes) or len(classes) < 2:
        raise DataFileError(wnids_file, "must list at least 2 distinct wnids, one per line")
    label_of = {w: i for i, w in enumerate(classes)}
    train = []
    for w in classes:
        files = image_files(d / "train" / w)
        if not files:
            raise DataFileError(d / "train" / w, "class folder holds no images")
        train += [(f, label_of[w]) for f in files]
    annotations = d / "val" / "val_annotations.txt"
    if not annotations.is_file():
        raise DataFileError(annotations, "missing: it labels the images in val/images")
    test = []
    for n, line in enumerate(annotations.read_text().splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2:
            raise DataFileError(annotations, f"line {n}: expected <file>\\t<wnid>\\t..., got {line!r}")
        name, wnid = fields[0], fields[1]
        if wnid not in label_of:
            raise DataFileError(annotations, f"line {n}: wnid {wnid!r} is not in wnids.txt")
        path = d / "val" / "images" / name
        if not path.is_file():
            raise DataFileError(path, f"missing: {annotations.name} line {n} names it")
        test.append((path, label_of[wnid]))
    return FileListing(d, train, sorted(test), classes)
