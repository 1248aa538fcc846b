"""Random access to one sharded split: an image's bytes are one positioned read from its tar,
decoded and cropped by the caller's process (a DataLoader worker). File handles are opened
per process on first use, so a reader can be handed to forked or spawned workers."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..dataset import DataFileError
from .layout import load_index
from .transforms import decode, eval_view, train_view


class ShardedSplit:
    def __init__(self, out_dir: str | Path, split: str, meta: dict):
        self.root = Path(out_dir)
        index = load_index(self.root, meta, split)
        self.files = [self.root / s["file"] for s in meta["shards"][split]]
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
        if self._pid != os.getpid():
            self._fds, self._pid = {}, os.getpid()
        k = self.shard[i]
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
        try:
            img = decode(self.read(i), self.channels)
        except DataFileError:
            raise
        except Exception as exc:
            raise DataFileError(self.where(i), f"not a readable image ({type(exc).__name__}: "
                                               f"{exc})") from exc
        return eval_view(img, self.side) if seed is None else train_view(img, self.side, seed, flip)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}
