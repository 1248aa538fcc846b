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
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..dataset import DataFileError

SHARDS_DIR = "shards"
INDEX_KEYS = ("shard", "offset", "size", "label")


def index_path(out_dir: str | Path, split: str) -> Path:
    return Path(out_dir) / f"{split}.index.pt"


def shard_name(split: str, k: int) -> str:
    return f"{SHARDS_DIR}/{split}-{k:05d}.tar"


def load_index(out_dir: Path, meta: dict, split: str) -> dict[str, torch.Tensor]:
    """The split's index, checked against meta: every shard it names is present with the
    recorded size, every image's byte range lies inside its shard, labels are in range."""
    path = index_path(out_dir, split)
    if not path.is_file():
        raise DataFileError(path, "missing")
    try:
        index = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise DataFileError(path, f"torch.load failed, truncated or corrupt? ({exc})") from exc
    if not isinstance(index, dict) or sorted(index) != sorted(INDEX_KEYS):
        raise DataFileError(path, f"expected a dict with keys {sorted(INDEX_KEYS)}")
    n = meta["sizes"][split]
    if any(index[k].shape != (n,) for k in INDEX_KEYS):
        raise DataFileError(path, f"every index tensor must have {n} entries (meta sizes)")
    shards = meta["shards"][split]
    sizes = torch.tensor([s["bytes"] for s in shards] + [0], dtype=torch.int64)
    for s in shards:
        f = out_dir / s["file"]
        if not f.is_file():
            raise DataFileError(f, f"missing: the index of split {split!r} names it")
        if f.stat().st_size != s["bytes"]:
            raise DataFileError(f, f"{f.stat().st_size} bytes, the index recorded {s['bytes']} "
                                   "(truncated or replaced?)")
    on_disk = sorted(p.name for p in (out_dir / SHARDS_DIR).glob(f"{split}-*.tar"))
    listed = sorted(Path(s["file"]).name for s in shards)
    if on_disk != listed:
        extra = sorted(set(on_disk) - set(listed))
        raise DataFileError(out_dir / SHARDS_DIR, f"shards not in the index of {split!r}: {extra}")
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
