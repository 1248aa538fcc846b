"""Write one split's images into tar shards plus its byte-range index (see layout.py).

Images come as files (stored as they are, or re-encoded with the short side at most
`shard_side`) or as uint8 tensors (PNG, lossless). Every image is decoded once while it is
written, so a corrupt or truncated file is found here, named, and either stops the stage or
(skip_corrupt) is counted and left out. Worker processes do the decoding; the tar is written
in the listed order, so the same inputs give byte-identical shards."""

from __future__ import annotations

import hashlib
import io
import multiprocessing
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..dataset import DataFileError
from ..sourcefiles import file_sha256
from .layout import SHARDS_DIR, shard_name
from .transforms import MODES, decode, short_side_resized

JPEG_QUALITY = 90  # re-encoded at shard_side (ImageNet's own JPEGs are mostly around 90)


@dataclass(frozen=True)
class Source:
    """One image to shard: a file (`path`, named relative to `root`) or a uint8 (C, H, W) tensor."""

    name: str
    label: int
    path: Path | None = None
    pixels: torch.Tensor | None = None


@dataclass
class Encoded:
    name: str
    label: int
    data: bytes | None  # None: unreadable (problem says why)
    ext: str = ""
    digest: bytes = b""  # sha256 of the source bytes
    sums: np.ndarray | None = None  # (C, 2) per channel: sum and sum of squares, 0..1 scale
    npix: int = 0  # pixels per channel the sums are over
    problem: str = ""
    where: str = ""  # the unreadable file's full path


@dataclass
class WrittenSplit:
    index: dict[str, torch.Tensor]
    shards: list[dict]
    digests: list[tuple[str, bytes]]
    skipped: list[str] = field(default_factory=list)
    sums: np.ndarray | None = None  # (C, 2) channel sums, and the pixel count in `pixels`
    pixels: int = 0
    formats: list[str] = field(default_factory=list)  # the stored files' extensions


def _encode(job: tuple[Source, int, int | None]) -> Encoded:
    src, channels, side = job
    try:
        if src.pixels is not None:
            arr = src.pixels.permute(1, 2, 0).numpy()
            img = Image.fromarray(arr[:, :, 0] if channels == 1 else arr, MODES[channels])
            buf = io.BytesIO()
            img.save(buf, format="PNG", compress_level=1)
            data, ext = buf.getvalue(), "png"
        else:
            data = src.path.read_bytes()
            ext = src.path.suffix.lower().lstrip(".") or "img"
        digest = hashlib.sha256(data).digest()
        img = decode(data, channels)
        if side is not None and src.pixels is None and min(img.size) > side:
            img = short_side_resized(img, side)
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=JPEG_QUALITY)
            data, ext = buf.getvalue(), "jpg"
        x = np.asarray(img, dtype=np.float64).reshape(-1, channels) / 255.0
        sums = np.stack([x.sum(0), (x * x).sum(0)], axis=1)  # (C, 2)
        return Encoded(src.name, src.label, data, ext, digest, sums, x.shape[0])
    except Exception as exc:  # PIL raises many types for bad files
        return Encoded(src.name, src.label, None, problem=f"{type(exc).__name__}: {exc}",
                       where=str(src.path or src.name))


def _encoded(jobs: list, workers: int) -> Iterator[Encoded]:
    if workers <= 1 or len(jobs) < 64:
        yield from map(_encode, jobs)
        return
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        yield from pool.imap(_encode, jobs, chunksize=16)


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> int:
    """Append one member with a fixed header (no time, owner or mode from this machine);
    returns the byte offset of its data in the tar."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    header = info.tobuf(tar.format, tar.encoding, tar.errors)
    offset = tar.offset + len(header)
    tar.addfile(info, io.BytesIO(data))
    return offset


def write_split(
    out_dir: Path,
    split: str,
    sources: Sequence[Source],
    *,
    channels: int,
    shard_size: int,
    shard_side: int | None,
    workers: int = 1,
    skip_corrupt: bool = False,
) -> WrittenSplit:
    """Write `sources` into out_dir/shards/<split>-NNNNN.tar, `shard_size` images each."""
    (out_dir / SHARDS_DIR).mkdir(parents=True, exist_ok=True)
    shard, offset, size, label = [], [], [], []
    shards: list[dict] = []
    digests: list[tuple[str, bytes]] = []
    skipped: list[str] = []
    sums = np.zeros((channels, 2))
    pixels = 0
    tar: tarfile.TarFile | None = None
    count = 0
    formats: set[str] = set()

    def close() -> None:
        assert tar is not None
        tar.close()
        f = out_dir / shards[-1]["file"]
        shards[-1].update(bytes=f.stat().st_size, sha256=file_sha256(f).hex(), count=count)

    jobs = [(s, channels, shard_side) for s in sources]
    for enc in _encoded(jobs, workers):
        if enc.data is None:
            if not skip_corrupt:
                if tar is not None:
                    tar.close()
                raise DataFileError(enc.where, f"not a readable image ({enc.problem}); set "
                                              "skip_corrupt: true to leave such files out")
            skipped.append(enc.name)
            continue
        if tar is None or count == shard_size:
            if tar is not None:
                close()
            shards.append({"file": shard_name(split, len(shards))})
            tar = tarfile.open(out_dir / shards[-1]["file"], "w", format=tarfile.USTAR_FORMAT)
            count = 0
        key = f"{len(label):08d}"
        offset.append(_add(tar, f"{key}.{enc.ext}", enc.data))
        _add(tar, f"{key}.cls", str(enc.label).encode())
        formats.add(enc.ext)
        shard.append(len(shards) - 1)
        size.append(len(enc.data))
        label.append(enc.label)
        digests.append((enc.name, enc.digest))
        sums += enc.sums
        pixels += enc.npix
        count += 1
    if tar is not None:
        close()
    index = {
        "shard": torch.tensor(shard, dtype=torch.int32),
        "offset": torch.tensor(offset, dtype=torch.int64),
        "size": torch.tensor(size, dtype=torch.int64),
        "label": torch.tensor(label, dtype=torch.int64),
    }
    return WrittenSplit(index, shards, digests, skipped, sums, pixels, sorted(formats))

