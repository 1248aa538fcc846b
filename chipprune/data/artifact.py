"""The prepared-dataset artifact: out_dir/{train,val,test}.pt + meta.json, written atomically.

Each .pt holds {"images": uint8 (N, C, H, W), "labels": int64 (N,)} and is read with
weights_only=True, so loading runs no pickled code. Same data -> byte-identical files.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch

from ..atomic import atomic_path, write_text
from .dataset import SPLITS, DataFileError, PreparedDataset, Split

META_FILE = "meta.json"
META_KEYS = (
    "name", "classes", "num_classes", "image_shape", "mean", "std", "split_seed",
    "val_size", "source_sha256", "class_subset", "sizes",
)  # fmt: skip


def split_path(out_dir: str | Path, split: str) -> Path:
    return Path(out_dir) / f"{split}.pt"


def compact(t: torch.Tensor) -> torch.Tensor:
    """t owning exactly its own storage: torch.save of a view would write the whole base tensor."""
    t = t.contiguous()
    if t.storage_offset() or t.untyped_storage().nbytes() != t.numel() * t.element_size():
        t = t.clone()
    return t


def meta_problem(meta: dict) -> str | None:
    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        return f"meta is missing keys {missing}"
    shape = meta["image_shape"]
    if not (
        isinstance(shape, list)
        and len(shape) == 3
        and all(isinstance(d, int) and d > 0 for d in shape)
    ):
        return f"image_shape must be [C, H, W] positive ints, found {shape!r}"
    if meta["num_classes"] != len(meta["classes"]):
        return f"num_classes {meta['num_classes']} != {len(meta['classes'])} class names"
    if len(meta["mean"]) != shape[0] or len(meta["std"]) != shape[0]:
        return f"mean/std need {shape[0]} values (one per channel)"
    if not isinstance(meta["sizes"], dict) or sorted(meta["sizes"]) != sorted(SPLITS):
        return f"sizes must map each of {SPLITS} to a count, found {meta['sizes']!r}"
    return None


def split_problem(images: object, labels: object, meta: dict, split: str) -> str | None:
    """What is wrong with one split against meta, or None when it is consistent."""
    shape = tuple(meta["image_shape"])
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
        return f"images must be a uint8 (N, C, H, W) tensor, found {_describe(images)}"
    if tuple(images.shape[1:]) != shape:
        return f"images have shape {tuple(images.shape)}, meta image_shape is {list(shape)}"
    if not isinstance(labels, torch.Tensor) or labels.dtype != torch.int64 or labels.dim() != 1:
        return f"labels must be an int64 (N,) tensor, found {_describe(labels)}"
    if labels.shape[0] != images.shape[0]:
        return f"{images.shape[0]} images but {labels.shape[0]} labels"
    if images.shape[0] != meta["sizes"][split]:
        return f"{images.shape[0]} images, meta sizes[{split!r}] says {meta['sizes'][split]}"
    k = meta["num_classes"]
    if labels.numel() and (labels.min() < 0 or labels.max() >= k):
        return f"labels span {int(labels.min())}..{int(labels.max())}, num_classes is {k}"
    return None


def save_prepared(ds: PreparedDataset, out_dir: str | Path) -> None:
    """Write out_dir/{train,val,test}.pt, then meta.json (last, so its presence means complete)."""
    out_dir = Path(out_dir)
    if sorted(ds.splits) != sorted(SPLITS):
        raise ValueError(
            f"a prepared dataset has exactly the splits {SPLITS}, got {sorted(ds.splits)}"
        )
    if problem := meta_problem(ds.meta):
        raise ValueError(problem)
    for name, split in ds.splits.items():  # check all before writing any
        if problem := split_problem(split.images, split.labels, ds.meta, name):
            raise ValueError(f"split {name!r}: {problem}")
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in SPLITS:
        split = ds.splits[name]
        payload = {"images": compact(split.images), "labels": compact(split.labels)}
        # Into an open file, not a path: torch names the archive inside after the path, and
        # the temp file's random name would make the bytes (and DVC's hash) differ run to run.
        with atomic_path(split_path(out_dir, name)) as tmp, open(tmp, "wb") as f:
            torch.save(payload, f)
    write_meta(out_dir, ds.meta)


def write_meta(out_dir: str | Path, meta: dict) -> None:
    """out_dir/meta.json, atomically; written last, so its presence means complete."""
    write_text(Path(out_dir) / META_FILE,
               json.dumps(meta, sort_keys=True, indent=2, allow_nan=False) + "\n")


def load_meta(out_dir: str | Path) -> dict:
    path = Path(out_dir) / META_FILE
    if not path.is_file():
        raise DataFileError(
            path, "missing: not a prepared dataset directory (run the prepare stage)"
        )
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataFileError(path, f"not readable JSON ({exc})") from exc
    if not isinstance(meta, dict):
        raise DataFileError(path, f"expected a JSON object, found {type(meta).__name__}")
    if problem := meta_problem(meta):
        raise DataFileError(path, problem)
    return meta


def load_split(path: Path, meta: dict, split: str) -> Split:
    if not path.is_file():
        raise DataFileError(path, "missing")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise DataFileError(
            path, f"torch.load failed, truncated or corrupt? ({type(exc).__name__}: {exc})"
        ) from exc
    if not isinstance(payload, dict) or set(payload) != {"images", "labels"}:
        found = sorted(payload) if isinstance(payload, dict) else type(payload).__name__
        raise DataFileError(path, f"expected a dict with keys ['images', 'labels'], found {found}")
    if problem := split_problem(payload["images"], payload["labels"], meta, split):
        raise DataFileError(path, problem)
    return Split(payload["images"], payload["labels"])


def load_prepared(out_dir: str | Path, splits: Iterable[str] = SPLITS) -> PreparedDataset:
    """Read back what save_prepared wrote (only the named splits), checking every file against meta.

    Anything missing, truncated or inconsistent raises DataFileError naming the file.
    """
    splits = tuple(splits)
    unknown = [s for s in splits if s not in SPLITS]
    if unknown:
        raise ValueError(f"unknown splits {unknown}; choose from {SPLITS}")
    meta = load_meta(out_dir)
    if meta.get("storage") == "shards" and splits:
        raise DataFileError(out_dir, "holds shards of encoded images (storage: shards), not "
                                     "tensors: read a split with training.sources.open_split")
    return PreparedDataset({s: load_split(split_path(out_dir, s), meta, s) for s in splits}, meta)


def _describe(x: object) -> str:
    if isinstance(x, torch.Tensor):
        return f"{x.dtype} tensor of shape {tuple(x.shape)}"
    return type(x).__name__
