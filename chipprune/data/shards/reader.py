"""Random access to one sharded split: an image's bytes are one positioned read from its tar
(os.pread on a local disk, a ranged fsspec read from a URL), decoded and cropped by the
caller's process (a DataLoader worker). Local file handles are opened per process on first
use, so a reader can be handed to forked or spawned workers."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from fsspec.implementations.local import LocalFileSystem

from ..artifact import meta_problem
from ..dataset import DataFileError
from .layout import filesystem, load_index, read_meta
from .transforms import decode, eval_view, image_size, train_draw, train_view


class ShardedSplit:
    def __init__(self, location: str | Path, split: str, meta: dict | None = None,
                 **storage_options):
        """location: the prepared folder, local or a URL fsspec reads (s3://..., dvc://...);
        storage_options go to the filesystem (e.g. `url=` a DVC repository for dvc://)."""
        self.fs, root = filesystem(location, **storage_options)
        if meta is None:
            meta = read_meta(self.fs, root)
            if problem := meta_problem(meta):
                raise DataFileError(f"{root}/meta.json", problem)
        self.meta = meta
        index = load_index(self.fs, root, meta, split)
        self.local = isinstance(self.fs, LocalFileSystem)
        self.files = [f"{root}/{s['file']}" for s in meta["shards"][split]]
        self.shard = index["shard"].tolist()
        self.offset = index["offset"].tolist()
        self.size = index["size"].tolist()
        self.labels = index["label"]
        self.channels, self.side = meta["image_shape"][0], meta["image_shape"][1]
        self._fds: dict[int, int] = {}
        self._pid = -1

    def __len__(self) -> int:
        return len(self.offset)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fds": {}, "_pid": -1}  # descriptors stay in their process

    def where(self, i: int) -> str:
        return f"{self.files[self.shard[i]]}: image {i:08d}"

    def read(self, i: int) -> bytes:
        k = self.shard[i]
        if not self.local:
            data = self.fs.cat_file(self.files[k], start=self.offset[i],
                                    end=self.offset[i] + self.size[i])
        else:
            if self._pid != os.getpid():
                self._fds, self._pid = {}, os.getpid()
            fd = self._fds.get(k)
            if fd is None:
                fd = self._fds[k] = os.open(self.files[k], os.O_RDONLY)
            data = os.pread(fd, self.size[i], self.offset[i])
        if len(data) != self.size[i]:
            raise DataFileError(self.where(i), f"read {len(data)} of {self.size[i]} bytes "
                                               "(the shard was truncated)")
        return data

    def view(self, i: int, seed: int | None, flip: bool = True) -> torch.Tensor:
        """Image i as (C, side, side) uint8: the training view for a seed, else the eval view."""
        data = self.read(i)
        try:
            img = decode(data, self.channels)
        except Exception as exc:  # PIL raises many types for a bad file
            raise self._unreadable(i, exc) from exc
        return eval_view(img, self.side) if seed is None else train_view(img, self.side, seed, flip)

    def draw(self, i: int, seed: int | None, flip: bool = True
             ) -> tuple[bytes, tuple[int, int, int, int] | None, bool]:
        """Image i still encoded, with its training view's choices (from the header's size;
        None for the evaluation view): for decoding elsewhere (a batch on the GPU)."""
        data = self.read(i)
        if seed is None:
            return data, None, False
        try:
            w, h = image_size(data)
        except Exception as exc:
            raise self._unreadable(i, exc) from exc
        box, mirrored = train_draw(w, h, seed, flip)
        return data, box, mirrored

    def _unreadable(self, i: int, exc: Exception) -> DataFileError:
        return DataFileError(self.where(i), f"not a readable image ({type(exc).__name__}: {exc})")

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}
