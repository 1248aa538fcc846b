"""StreamData: a sharded split behind the DeviceData interface (see sources.py).

DataLoader worker processes read each image's bytes from its shard, decode it and crop it
(the training view: random-resized crop and flip from a per-image seed; the evaluation view:
resize and centre crop), and the batches arrive as uint8 on the device, normalised there.
The main process draws the epoch's permutation and one seed per image from the run's
generator, so a batch's content depends on the seed alone, not on the number of workers
or ranks, and a resumed run continues with the generator state its checkpoint saved.

On CUDA, JPEG shards are decoded on the GPU instead (`decode="tensor"`): the workers only
read the bytes and draw the crop from the image header, and the batch is decoded by
torchvision.io.decode_jpeg in one call on the device, then cropped and resized there.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from chipprune.config import AugmentConfig, ConfigError
from chipprune.data.shards import ShardedSplit
from chipprune.training import distributed
from chipprune.training.sources import step_indices

SEED_HIGH = 2**62
WORKERS_ENV = "CHIPPRUNE_DATA_WORKERS"
GPU_DECODE_ENV = "CHIPPRUNE_GPU_DECODE"  # "0": decode in the workers (PIL) even on CUDA
JPEG = {"jpg", "jpeg"}


def default_workers() -> int:
    """Decoding processes per loader: $CHIPPRUNE_DATA_WORKERS, else the cores, at most 8."""
    value = os.environ.get(WORKERS_ENV)
    if value is not None:
        if not value.isdigit():
            raise ConfigError(f"{WORKERS_ENV} must be a whole number of processes, got {value!r}")
        return int(value)
    return min(8, os.cpu_count() or 1)


class _Views(Dataset):
    """key (index, seed, flip) -> (uint8 (C, H, W), label); seed < 0 is the evaluation view."""

    def __init__(self, split: ShardedSplit):
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, key: tuple[int, int, bool]) -> tuple[torch.Tensor, torch.Tensor]:
        i, seed, flip = key
        return self.split.view(i, None if seed < 0 else seed, flip), self.split.labels[i]


class _Encoded(_Views):
    """key -> (bytes as uint8 (n,), crop box (4,) or -1s for the eval view, mirrored, label)."""

    def __getitem__(self, key: tuple[int, int, bool]):
        i, seed, flip = key
        data, box, mirrored = self.split.draw(i, None if seed < 0 else seed, flip)
        return (torch.frombuffer(bytearray(data), dtype=torch.uint8),
                torch.tensor(box if box is not None else (-1, -1, -1, -1)),
                mirrored, self.split.labels[i])


def _as_lists(items: list) -> tuple[list, ...]:
    """Collate encoded images as lists: they differ in length."""
    return tuple(map(list, zip(*items, strict=True)))


class _Plan:
    """The batch sampler of a persistent DataLoader, refilled before each pass over it."""

    def __init__(self) -> None:
        self.batches: list[list[tuple[int, int, bool]]] = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class StreamData:
    def __init__(self, data_dir: str | Path, split: str, meta: dict | None,
                 device: torch.device | str, workers: int | None = None,
                 decode: str | None = None, **storage_options):
        """data_dir: the prepared folder, or a URL (s3://..., dvc://<path> with
        `url=<repository>` to read a DVC-tracked folder from the DVC remote); meta: its
        meta.json (None: read it); decode: "pil" (workers decode and crop) or "tensor"
        (torchvision decodes each batch on `device`; JPEG only); None: "tensor" on CUDA
        for JPEG shards, else "pil"."""
        self.split = ShardedSplit(data_dir, split, meta, **storage_options)
        meta = self.split.meta
        self.labels = self.split.labels
        self.device = torch.device(device)
        shape = (1, -1, 1, 1)
        kw = {"dtype": torch.float32, "device": self.device}
        self.mean = torch.tensor(meta["mean"], **kw).view(shape)
        self.std = torch.tensor(meta["std"], **kw).view(shape)
        self.workers = default_workers() if workers is None else workers
        if decode is None:
            jpeg_only = all(set(f) <= JPEG for f in meta.get("formats", {"": ["?"]}).values())
            gpu = self.device.type == "cuda" and os.environ.get(GPU_DECODE_ENV, "1") != "0"
            decode = "tensor" if gpu and jpeg_only else "pil"
        if decode not in ("pil", "tensor"):
            raise ValueError(f"decode must be 'pil' or 'tensor', got {decode!r}")
        self.decode = decode
        self._plan = _Plan()
        self._loader: DataLoader | None = None

    def __len__(self) -> int:
        return len(self.split)

    def normalise(self, x_uint8: torch.Tensor) -> torch.Tensor:
        return (x_uint8.float().div_(255.0) - self.mean) / self.std

    def _to_device(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def _run(self, batches: list[list[tuple[int, int, bool]]]
             ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self._loader is None:
            w = self.workers
            tensor = self.decode == "tensor"
            self._loader = DataLoader(
                (_Encoded if tensor else _Views)(self.split), batch_sampler=self._plan,
                collate_fn=_as_lists if tensor else None, num_workers=w,
                persistent_workers=w > 0, pin_memory=self.device.type == "cuda",
                prefetch_factor=4 if w > 0 else None,
                multiprocessing_context="fork" if w > 0 else None)
        self._plan.batches = batches
        for batch in self._loader:
            yield self._tensor_views(*batch) if self.decode == "tensor" else self._to_device(*batch)

    def _tensor_views(self, data: list, boxes: list, mirrored: list, labels: list
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """One decode_jpeg call for the batch on the device, then each image's view there."""
        from torchvision.io import ImageReadMode, decode_jpeg

        from chipprune.data.shards.transforms import tensor_eval_view, tensor_train_view

        images = decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)
        side = self.split.side
        x = torch.stack([
            tensor_eval_view(img, side) if int(box[0]) < 0
            else tensor_train_view(img, tuple(box.tolist()), m, side)
            for img, box, m in zip(images, boxes, mirrored, strict=True)])
        return x, torch.stack(labels).to(self.device)

    def _decoded(self, keys: list[tuple[int, int, bool]]) -> tuple[torch.Tensor, torch.Tensor]:
        """A few images decoded in this process (CHIP's sample, BN recalibration, parity)."""
        if self.decode == "tensor":
            views = _Encoded(self.split)
            return self._tensor_views(*_as_lists([views[k] for k in keys]))
        views = _Views(self.split)
        items = [views[k] for k in keys]
        x = torch.stack([v for v, _ in items])
        y = torch.stack([label for _, label in items])
        return self._to_device(x, y)

    def take(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._decoded([(i, -1, False) for i in idx.tolist()])

    def augmented(self, idx: torch.Tensor, augment: AugmentConfig, gen: torch.Generator,
                  part: slice | None = None) -> torch.Tensor:
        n = len(idx) if part is None else len(idx) * distributed.world()
        seeds = torch.randint(0, SEED_HIGH, (n,), generator=gen, device=gen.device)
        seeds = seeds[slice(None) if part is None else part].tolist()
        keys = [(i, s, augment.flip) for i, s in zip(idx.tolist(), seeds, strict=True)]
        return self._decoded(keys)[0]

    def train_epoch(self, gen: torch.Generator, bs: int, steps: int, augment: AugmentConfig,
                    part: slice | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self)
        perm = torch.randperm(n, generator=gen, device=gen.device).cpu()
        seeds = torch.randint(0, SEED_HIGH, (n,), generator=gen, device=gen.device).cpu().tolist()
        batches = [[(i, seeds[i], augment.flip) for i in step_indices(perm, s, bs, part).tolist()]
                   for s in range(steps)]
        yield from self._run(batches)

    def eval_batches(self, batch_size: int, mine: Callable[[int], bool] = lambda j: True
                     ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        starts = range(0, len(self), batch_size)
        kept = [j for j in range(len(starts)) if mine(j)]
        batches = [[(i, -1, False) for i in range(starts[j], min(starts[j] + batch_size, len(self)))]
                   for j in kept]
        for j, (x, y) in zip(kept, self._run(batches), strict=True):
            yield j, x, y
