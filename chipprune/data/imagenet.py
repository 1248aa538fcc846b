"""ImageNet-1k (ILSVRC2012) as users hold it: the official archives (ILSVRC2012_img_train.tar,
ILSVRC2012_img_val.tar, ILSVRC2012_devkit_t12.tar.gz), parsed and extracted by torchvision's
`ImageNet` dataset (checksums verified) into train/<wnid>/ and val/<wnid>/; or those class
folders already extracted; or a flat val/ folder (the val archive extracted as it is)
labelled by the devkit's ground truth. The official val split is our test split."""

from __future__ import annotations

from pathlib import Path

from .dataset import DataFileError
from .imagefolder import FileListing, class_folders, image_files, labelled_files
from .sourcefiles import required_root

ARCHIVES = ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar", "ILSVRC2012_devkit_t12.tar.gz")


def _extract_archives(root: Path) -> None:
    missing = [a for a in ARCHIVES if not (root / a).is_file()]
    if missing:
        raise FileNotFoundError(
            f"imagenet data not found in {root}: expected train/<wnid>/ and val/ folders, or "
            f"the official archives {', '.join(ARCHIVES)} (missing: {', '.join(missing)}); "
            "ImageNet cannot be downloaded, point root at where you keep it")
    from torchvision.datasets import ImageNet

    for split in ("train", "val"):  # torchvision verifies the archives' md5 and extracts
        ImageNet(str(root), split=split)


def _flat_val(root: Path, val_dir: Path, classes: list[str]) -> list[tuple[Path, int]]:
    """val/*.JPEG in file-name order, labelled by the devkit ground truth (torchvision's
    meta.bin, parsed from the devkit archive when absent)."""
    from torchvision.datasets.imagenet import META_FILE, load_meta_file, parse_devkit_archive

    if not (root / META_FILE).is_file():
        if not (root / ARCHIVES[2]).is_file():
            raise FileNotFoundError(
                f"imagenet: {val_dir} holds images but no class folders; their labels come "
                f"from the devkit: put {ARCHIVES[2]} (or torchvision's {META_FILE}) in {root}")
        parse_devkit_archive(str(root))
    val_wnids = load_meta_file(str(root))[1]
    files = image_files(val_dir)
    if len(files) != len(val_wnids):
        raise DataFileError(val_dir, f"{len(files)} images, the devkit labels {len(val_wnids)}")
    label_of = {w: i for i, w in enumerate(classes)}
    unknown = sorted(set(val_wnids) - set(label_of))
    if unknown:
        raise DataFileError(root / META_FILE, f"val wnids not among train's classes: {unknown[:5]}")
    return [(f, label_of[w]) for f, w in zip(files, val_wnids, strict=True)]


def imagenet_listing(root: str | Path | None) -> FileListing:
    root = required_root(root, "imagenet")
    train_dir, val_dir = root / "train", root / "val"
    if not (train_dir.is_dir() and val_dir.is_dir()):
        _extract_archives(root)
    classes = class_folders(train_dir)
    if not classes:
        raise DataFileError(train_dir, "no class folders (expected train/<wnid>/*.JPEG)")
    train = labelled_files(train_dir, classes, every_class=True)
    if class_folders(val_dir):
        test = labelled_files(val_dir, classes, every_class=False)
    else:
        test = _flat_val(root, val_dir, classes)
    return FileListing(root, train, test, classes)
