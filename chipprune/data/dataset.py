"""In-memory dataset types and the tensor helpers every source and the training code share.

Images are always uint8 (N, C, H, W) on the 0..255 scale; labels are int64 (N,).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

SPLITS = ("train", "val", "test")
_CHUNK = 4096  # images per chunk when a whole-dataset float copy would not fit comfortably


class DataFileError(ValueError):
    """A data file is missing, truncated, corrupt or inconsistent; the message names the file."""

    def __init__(self, path: str | Path, problem: str):
        self.path = Path(path)
        super().__init__(f"{self.path}: {problem}")


@dataclass
class Split:
    images: torch.Tensor  # (N, C, H, W) uint8
    labels: torch.Tensor  # (N,) int64

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, index: torch.Tensor) -> Split:
        return Split(self.images[index], self.labels[index])


@dataclass
class PreparedDataset:
    splits: dict[str, Split]  # "train", "val", "test" (load_prepared may load fewer)
    meta: dict  # JSON-able; see chipprune.data.prepare.prepare_dataset for the keys


@dataclass
class RawData:
    """What a source reader returns: the official train/test splits before any carving."""

    train: Split
    test: Split
    classes: list[str]
    source_sha256: str


def resized_uint8(images: torch.Tensor, size: int | None) -> torch.Tensor:
    """(N, C, H, W) uint8 or float on the 0..255 scale -> (N, C, size, size) uint8.

    Bilinear (half-pixel centres, antialiased when shrinking), rounded once at the end so
    a float source (digits) is not rounded twice. size=None keeps H, W.
    """
    n, _, h, w = images.shape
    if size is not None and size < 1:
        raise ValueError(f"image_size must be a positive int, got {size}")
    same = size is None or (h, w) == (size, size)
    if same and images.dtype == torch.uint8:
        return images
    out_hw = (h, w) if size is None else (size, size)
    out = torch.empty((n, images.shape[1], *out_hw), dtype=torch.uint8)
    for start in range(0, n, _CHUNK):
        x = images[start : start + _CHUNK].to(torch.float32)
        if not same:
            shrink = size < h or size < w
            x = F.interpolate(
                x, size=out_hw, mode="bilinear", align_corners=False, antialias=shrink
            )
        out[start : start + _CHUNK] = x.round().clamp_(0, 255).to(torch.uint8)
    return out


def channel_mean_std(images: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and population std of (N, C, H, W) uint8 images on the 0..1 scale.

    Accumulated in float64 chunk by chunk, so a large train split is never copied to float whole.
    """
    c = images.shape[1]
    total = torch.zeros(c, dtype=torch.float64)
    total_sq = torch.zeros(c, dtype=torch.float64)
    for start in range(0, images.shape[0], _CHUNK):
        x = images[start : start + _CHUNK].to(torch.float64) / 255.0  # (n, C, H, W)
        total += x.sum(dim=(0, 2, 3))
        total_sq += (x * x).sum(dim=(0, 2, 3))
    count = images.shape[0] * images.shape[2] * images.shape[3]
    mean = total / count
    var = (total_sq / count - mean * mean).clamp_(min=0.0)
    return mean.tolist(), var.sqrt().tolist()


def normalize_images(
    images_uint8: torch.Tensor, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """(N, C, H, W) uint8 -> float32 (x / 255 - mean) / std per channel, on the images' device."""
    if images_uint8.dtype != torch.uint8 or images_uint8.dim() != 4:
        raise ValueError(
            f"expected (N, C, H, W) uint8 images, got {tuple(images_uint8.shape)} {images_uint8.dtype}"
        )
    c = images_uint8.shape[1]
    if len(mean) != c or len(std) != c:
        raise ValueError(f"mean/std need {c} values (one per channel), got {len(mean)}/{len(std)}")
    kw = {"dtype": torch.float32, "device": images_uint8.device}
    m = torch.as_tensor(mean, **kw).view(1, c, 1, 1)
    s = torch.as_tensor(std, **kw).view(1, c, 1, 1)
    return (images_uint8.to(torch.float32) / 255.0 - m) / s


def checked_labels(labels: torch.Tensor, num_classes: int, path: str | Path) -> torch.Tensor:
    """labels (N,) as int64, or DataFileError naming path when one is outside 0..num_classes-1."""
    labels = labels.to(torch.int64)
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataFileError(
            path,
            f"labels must lie in 0..{num_classes - 1}, found {int(labels.min())}..{int(labels.max())}",
        )
    return labels
