"""Where training, scoring and evaluation get their images: one interface, two forms.

`DeviceData` holds a whole split on the device as uint8 (digits, CIFAR, Tiny-ImageNet) and
augments batches there (zero-padded random crop, flip); `StreamData` (stream.py) reads a
sharded split (ImageNet) through DataLoader workers that decode and crop each image. Both give:

    len(data), data.device, data.normalise(x_uint8)
    data.take(idx) -> (x, y)                    the evaluation view of those images
    data.augmented(idx, augment, gen, part)     their training view, drawn from gen
    data.train_epoch(gen, bs, steps, augment, part) -> iterator of (x, y), one per step
    data.eval_batches(batch_size, mine) -> iterator of (j, x, y) for the batches j it keeps

Batches are uint8 on the device, normalised there. The epoch is one permutation drawn from
`gen`; with `part` (a data-parallel rank's rows) each rank takes its rows of every global
batch, so N ranks see exactly the batches one process sees.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from chipprune.config import AugmentConfig
from chipprune.training import distributed


def random_crop_flip(
    x: torch.Tensor, padding: int, flip: bool, gen: torch.Generator, part: slice | None = None
) -> torch.Tensor:
    """Batched augmentation of uint8 images (B, C, H, W): zero-padded random crop, h-flip.

    `part`: `x` is a data-parallel rank's rows of a global batch of len(x) * world() images;
    the draws are made for the whole global batch and sliced, so every rank augments its
    rows exactly as one process augments the global batch."""
    b, _, h, w = x.shape
    n = b if part is None else b * distributed.world()
    rows_of = slice(None) if part is None else part
    if padding > 0:
        xp = F.pad(x, (padding,) * 4)  # (B, C, H+2p, W+2p)
        oy = torch.randint(0, 2 * padding + 1, (n,), generator=gen, device=x.device)[rows_of]
        ox = torch.randint(0, 2 * padding + 1, (n,), generator=gen, device=x.device)[rows_of]
        rows = (oy[:, None] + torch.arange(h, device=x.device))[:, :, None]  # (B, H, 1)
        cols = (ox[:, None] + torch.arange(w, device=x.device))[:, None, :]  # (B, 1, W)
        bidx = torch.arange(b, device=x.device)[:, None, None]
        x = xp.permute(0, 2, 3, 1)[bidx, rows, cols].permute(0, 3, 1, 2)  # (B, C, H, W)
    if flip:
        coin = torch.rand(n, generator=gen, device=x.device)[rows_of] < 0.5
        x = torch.where(coin[:, None, None, None], x.flip(3), x)
    return x


def step_indices(perm: torch.Tensor, step: int, bs: int, part: slice | None) -> torch.Tensor:
    """The indices of one step: the whole batch, or this rank's rows of the global batch."""
    if part is None:
        return perm[step * bs : (step + 1) * bs]
    return distributed.shard_indices(perm, step, bs)


@dataclass
class DeviceData:
    """One split on the training device, normalisation constants beside it."""

    images: torch.Tensor  # (N, C, H, W) uint8
    labels: torch.Tensor  # (N,) int64
    mean: torch.Tensor  # (1, C, 1, 1) float32, 0..1 scale
    std: torch.Tensor  # (1, C, 1, 1) float32

    @classmethod
    def from_split(cls, split: Any, meta: dict, device: torch.device | str) -> DeviceData:
        shape = (1, -1, 1, 1)
        return cls(
            images=split.images.to(device),
            labels=split.labels.to(device),
            mean=torch.tensor(meta["mean"], dtype=torch.float32, device=device).view(shape),
            std=torch.tensor(meta["std"], dtype=torch.float32, device=device).view(shape),
        )

    def __len__(self) -> int:
        return self.labels.shape[0]

    @property
    def device(self) -> torch.device:
        return self.images.device

    def normalise(self, x_uint8: torch.Tensor) -> torch.Tensor:
        return (x_uint8.float().div_(255.0) - self.mean) / self.std

    def take(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[idx], self.labels[idx]

    def augmented(self, idx: torch.Tensor, augment: AugmentConfig, gen: torch.Generator,
                  part: slice | None = None) -> torch.Tensor:
        return random_crop_flip(self.images[idx], augment.crop_padding, augment.flip, gen, part)

    def train_epoch(self, gen: torch.Generator, bs: int, steps: int, augment: AugmentConfig,
                    part: slice | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        perm = torch.randperm(len(self), generator=gen, device=self.device)
        for i in range(steps):
            idx = step_indices(perm, i, bs, part)
            yield self.augmented(idx, augment, gen, part), self.labels[idx]

    def eval_batches(self, batch_size: int, mine: Callable[[int], bool] = lambda j: True
                     ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        for j, i in enumerate(range(0, len(self), batch_size)):
            if mine(j):
                yield j, self.images[i : i + batch_size], self.labels[i : i + batch_size]


def open_split(data_dir: str | Path, split: str, device: torch.device | str,
               meta: dict | None = None) -> DeviceData:
    """A prepared split in the form its storage asks for: DeviceData for tensors,
    StreamData (same interface) for shards."""
    from chipprune.data.artifact import load_meta, load_split, split_path

    meta = meta or load_meta(data_dir)
    if meta.get("storage") == "shards":
        from chipprune.training.stream import StreamData

        return StreamData(data_dir, split, meta, torch.device(device))  # type: ignore[return-value]
    return DeviceData.from_split(load_split(split_path(data_dir, split), meta, split), meta,
                                 device)
