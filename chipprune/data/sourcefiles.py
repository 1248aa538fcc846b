"""Source files on disk: presence (or download), and one checksum over everything read."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from pathlib import Path


def required_root(root: str | Path | None, source: str) -> Path:
    if root is None:
        raise ValueError(
            f"source {source!r} reads files: pass root (the directory that holds them)"
        )
    return Path(root).expanduser()


def ensure_files(
    paths: list[Path], *, download: bool, fetch: Callable[[], None] | None, dataset: str
) -> None:
    """Return when every path is a file; otherwise fetch() them (download=True) or raise.

    The FileNotFoundError names the first expected path, so a wrong root is obvious.
    """
    missing = [p for p in paths if not p.is_file()]
    if not missing:
        return
    if not download or fetch is None:
        how = (
            "set download: true to fetch it, or point root at a directory that holds it"
            if fetch is not None
            else "this source cannot be downloaded; point root at a directory that holds it"
        )
        raise FileNotFoundError(
            f"{dataset} data not found: expected {missing[0]} "
            f"({len(missing)} of {len(paths)} files missing); {how}"
        )
    fetch()
    still = [p for p in paths if not p.is_file()]
    if still:
        raise FileNotFoundError(f"{dataset} download finished but {still[0]} is still missing")


def file_sha256(path: Path, block: int = 1 << 20) -> bytes:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.digest()


def combined_sha256(named_digests: Iterable[tuple[str, bytes]]) -> str:
    """One hex checksum over (name, sha256 digest) pairs, in the order given.

    Names are paths relative to root, so moving the data elsewhere keeps the checksum.
    """
    h = hashlib.sha256()
    for name, digest in named_digests:
        h.update(name.encode("utf-8") + b"\0" + digest)
    return h.hexdigest()


def files_sha256(root: Path, paths: Iterable[Path]) -> str:
    return combined_sha256((p.relative_to(root).as_posix(), file_sha256(p)) for p in paths)
