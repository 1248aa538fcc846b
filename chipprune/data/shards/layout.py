"""The sharded prepared dataset on disk, for image sets too large to hold in memory:

    out_dir/meta.json              the same keys as the in-memory artifact, plus
                                   storage: "shards", shard_side, and per split the shard
                                   files with their counts, sizes and sha256
    out_dir/<split>.index.pt       {"shard": int32 (N,), "offset": int64 (N,),
                                    "size": int64 (N,), "label": int64 (N,)}
    out_dir/shards/<split>-00000.tar ...

Each shard is a plain POSIX tar in WebDataset's convention (`<key>.<ext>` holding the encoded
image and `<key>.cls` its label as text), so `tar`, WebDataset and litdata can read it too;
the index holds each image's byte range inside its tar, which gives us random access: an
epoch is one seeded permutation of the whole split, as for the in-memory tensors.

Files are reached through fsspec, so the folder may be local or any URL fsspec reads with
range requests (s3://, gs://, az://, http(s)://, or dvc:// for a DVC-tracked folder read
from the project's DVC remote): an image is one ranged read from its shard.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import fsspec
import torch

from ..dataset import DataFileError

SHARDS_DIR = "shards"
INDEX_KEYS = ("shard", "offset", "size", "label")


def index_name(split: str) -> str:
    return f"{split}.index.pt"


def index_path(out_dir: str | Path, split: str) -> Path:
    return Path(out_dir) / index_name(split)


def shard_name(split: str, k: int) -> str:
    return f"{SHARDS_DIR}/{split}-{k:05d}.tar"


def filesystem(location: str | Path, **storage_options: Any) -> tuple[Any, str]:
    """(fsspec filesystem, path inside it) for a local folder or a URL."""
    protocol, _ = fsspec.core.split_protocol(str(location))
    cls = fsspec.get_filesystem_class(protocol or "file")
    return cls(**storage_options), cls._strip_protocol(str(location)).rstrip("/")


def read_meta(fs: Any, root: str) -> dict:
    path = f"{root}/meta.json"
    if not fs.isfile(path):
        raise DataFileError(path, "missing: not a prepared dataset (run the prepare stage)")
    with fs.open(path, "rb") as f:
        return json.loads(f.read().decode("utf-8"))


def load_index(fs: Any, root: str, meta: dict, split: str) -> dict[str, torch.Tensor]:
    """The split's index, checked against meta: every shard it names is present with the
    recorded size, every image's byte range lies inside its shard, labels are in range."""
    path = f"{root}/{index_name(split)}"
    if not fs.isfile(path):
        raise DataFileError(path, "missing")
    try:
        with fs.open(path, "rb") as f:
            index = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise DataFileError(path, f"torch.load failed, truncated or corrupt? ({exc})") from exc
    if not isinstance(index, dict) or sorted(index) != sorted(INDEX_KEYS):
        raise DataFileError(path, f"expected a dict with keys {sorted(INDEX_KEYS)}")
    n = meta["sizes"][split]
    if any(index[k].shape != (n,) for k in INDEX_KEYS):
        raise DataFileError(path, f"every index tensor must have {n} entries (meta sizes)")
    shards = meta["shards"][split]
    sizes = torch.tensor([s["bytes"] for s in shards] + [0], dtype=torch.int64)
    present = {Path(e["name"]).name: e["size"]
               for e in (fs.ls(f"{root}/{SHARDS_DIR}", detail=True)
                         if fs.isdir(f"{root}/{SHARDS_DIR}") else [])}
    for s in shards:
        f, name = f"{root}/{s['file']}", Path(s["file"]).name
        if name not in present:
            raise DataFileError(f, f"missing: the index of split {split!r} names it")
        if present[name] is not None and present[name] != s["bytes"]:  # None: not listed
            raise DataFileError(f, f"{present[name]} bytes, the index recorded {s['bytes']} "
                                   "(truncated or replaced?)")
    on_disk = sorted(n for n in present if n.startswith(f"{split}-") and n.endswith(".tar"))
    listed = sorted(Path(s["file"]).name for s in shards)
    if on_disk != listed:
        extra = sorted(set(on_disk) - set(listed))
        raise DataFileError(f"{root}/{SHARDS_DIR}", f"shards not in the index of {split!r}: {extra}")
    shard = index["shard"].to(torch.int64)
    if n and (shard.min() < 0 or shard.max() >= len(shards)):
        raise DataFileError(path, f"shard numbers outside 0..{len(shards) - 1}")
    if n and ((index["offset"] < 0).any() or (index["offset"] + index["size"] > sizes[shard]).any()):
        raise DataFileError(path, "an image's byte range lies outside its shard")
    k = meta["num_classes"]
    labels = index["label"]
    if n and (labels.min() < 0 or labels.max() >= k):
        raise DataFileError(
            path, f"labels span {int(labels.min())}..{int(labels.max())}, num_classes is {k}")
    return index
