"""The shard loader against a bare decode loop, and its memory against the dataset's size.

    python bench/data_throughput.py [--images 20000] [--workers 2] [--batch 64]
                                    [--read 4000] [--rounds 3] [--root /tmp/chipprune-bench]

1. Writes (once; kept under --root) an ImageNet-layout folder of --images JPEGs at 500x375
   and 375x500 (textured, ~100 KB each, quality 90), 100 classes.
2. Shards it with the prepare code (`prepare_shards`, source imagenet, the JPEGs as they
   come, --workers processes), timed.
3. images/s of the training loader (StreamData.train_epoch: workers read each image's bytes
   from its shard, decode, random-resized crop to 224, flip; uint8 batches of --batch)
   against a bare loop that decodes and crops the same files with PIL in --workers processes
   (a multiprocessing pool, no DataLoader, no shards), over --read images each, rounds
   interleaved; medians and the ratio (goal >= 0.9).
4. The peak resident memory of a training epoch (the training loop, `fit`, on a one-conv
   model so decoding dominates) over the first 2,000 and over all --images images, each in
   a fresh process; main process and the largest worker (goal: equal within 10%).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CLASSES = 100
SIZE = 224


def _write_jpeg(job: tuple[Path, int]) -> int:
    path, seed = job
    rng = np.random.default_rng(seed)
    w, h = (500, 375) if seed % 3 else (375, 500)
    base = rng.integers(0, 256, (h // 25 + 1, w // 25 + 1, 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(base).resize((w, h), Image.Resampling.BICUBIC), np.int16)
    img = np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)  # texture
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path, format="JPEG", quality=90)
    return path.stat().st_size


def image_folder(root: Path, n: int, workers: int) -> Path:
    folder = root / f"imagenet-{n}"
    if (folder / "done").is_file():
        return folder
    jobs = []
    for i in range(n):
        c = i % CLASSES
        jobs.append((folder / "train" / f"n{c:08d}" / f"n{c:08d}_{i}.JPEG", i))
    for i in range(max(CLASSES, n // 50)):  # a val split (the test split), class folders
        c = i % CLASSES
        jobs.append((folder / "val" / f"n{c:08d}" / f"ILSVRC2012_val_{i:08d}.JPEG", 10**7 + i))
    t0 = time.perf_counter()
    with multiprocessing.Pool(workers) as pool:
        sizes = pool.map(_write_jpeg, jobs, chunksize=64)
    print(f"wrote {len(jobs)} JPEGs (median {statistics.median(sizes) / 1e3:.0f} KB) in "
          f"{time.perf_counter() - t0:.0f} s: {folder}", flush=True)
    (folder / "done").write_text("")
    return folder


def sharded(folder: Path, workers: int, limit: int | None = None) -> Path:
    from chipprune.data.prepare import prepare_shards

    out = folder.parent / f"{folder.name}-shards"
    if (out / "meta.json").is_file():
        return out
    t0 = time.perf_counter()
    meta = prepare_shards("imagenet", out, root=folder, image_size=SIZE, val_size=0.02,
                          workers=workers)
    (out / "meta.json").write_text(json.dumps(meta))
    total = sum(meta["sizes"].values())
    took = time.perf_counter() - t0
    print(f"sharded {total} images in {took:.0f} s ({total / took:.0f} images/s, "
          f"{workers} workers): {out}", flush=True)
    return out


def _bare(job: tuple[str, int]) -> int:
    from chipprune.data.shards.transforms import train_view

    path, seed = job
    with Image.open(path) as img:
        train_view(img.convert("RGB"), SIZE, seed, True)
    return 1


def bare_rate(files: list[str], workers: int, pool) -> float:
    jobs = [(f, i) for i, f in enumerate(files)]
    t0 = time.perf_counter()
    sum(pool.imap_unordered(_bare, jobs, chunksize=16))
    return len(files) / (time.perf_counter() - t0)


def loader_rate(data, n: int, batch: int, seed: int) -> float:
    import torch

    from chipprune.config import AugmentConfig

    steps = n // batch
    t0 = time.perf_counter()
    for _ in data.train_epoch(torch.Generator().manual_seed(seed), batch, steps, AugmentConfig()):
        pass
    return steps * batch / (time.perf_counter() - t0)


def memory_probe(shards: str, limit: int, batch: int, workers: int) -> None:
    """In a fresh process: one epoch of `fit` over the first `limit` training images."""
    import torch
    from torch import nn

    from chipprune.config import AugmentConfig, TrainConfig
    from chipprune.training.loop import fit
    from chipprune.training.stream import StreamData

    meta = json.loads((Path(shards) / "meta.json").read_text())
    train = StreamData(shards, "train", meta, torch.device("cpu"), workers=workers)
    val = StreamData(shards, "val", meta, torch.device("cpu"), workers=0)
    # the first `limit` images: the stream's length is the index's, so cut the index
    train.split.offset = train.split.offset[:limit]
    train.split.labels = train.labels = train.labels[:limit]
    val.split.offset = val.split.offset[:batch]
    val.split.labels = val.labels = val.labels[:batch]
    model = nn.Sequential(nn.Conv2d(3, 8, 7, stride=8), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, meta["num_classes"]))
    t0 = time.perf_counter()
    fit(model, train, val, TrainConfig(epochs=1, batch_size=batch, eval_batch_size=batch),
        AugmentConfig())
    took = time.perf_counter() - t0
    me = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps({"images": limit, "seconds": took, "main_mib": me, "worker_mib": kids}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=20000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--read", type=int, default=4000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--root", type=Path, default=Path("/tmp/chipprune-bench"))
    ap.add_argument("--probe", nargs=2, metavar=("SHARDS", "LIMIT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.probe:
        memory_probe(args.probe[0], int(args.probe[1]), args.batch, args.workers)
        return

    import torch

    from chipprune.training.stream import StreamData

    torch.set_num_threads(1)
    folder = image_folder(args.root, args.images, args.workers)
    shards = sharded(folder, args.workers)
    meta = json.loads((shards / "meta.json").read_text())
    files = sorted(str(p) for p in (folder / "train").rglob("*.JPEG"))
    random.Random(0).shuffle(files)  # the loader reads in a random order too
    data = StreamData(shards, "train", meta, torch.device("cpu"), workers=args.workers)
    loader_rate(data, args.batch * args.workers * 2, args.batch, 99)  # start the workers
    bare, ours = [], []
    with multiprocessing.get_context("fork").Pool(args.workers) as pool:
        for r in range(args.rounds):
            chunk = files[r * args.read:(r + 1) * args.read]
            bare.append(bare_rate(chunk, args.workers, pool))
            ours.append(loader_rate(data, args.read, args.batch, r))
            print(f"round {r + 1}: bare {bare[-1]:.0f} images/s, loader {ours[-1]:.0f} images/s",
                  flush=True)
    b, o = statistics.median(bare), statistics.median(ours)
    print(f"\nthroughput, {args.workers} workers, median of {args.rounds}: bare decode+crop "
          f"{b:.0f} images/s, shard loader {o:.0f} images/s, ratio {o / b:.3f} (goal >= 0.9)")

    rows = []
    for limit in (2000, args.images):
        out = subprocess.run([sys.executable, __file__, "--probe", str(shards), str(limit),
                              "--batch", str(args.batch), "--workers", str(args.workers)],
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"epoch over {limit} images: {r['seconds']:.0f} s, peak RSS main "
              f"{r['main_mib']:.0f} MiB, largest worker {r['worker_mib']:.0f} MiB", flush=True)
    small, large = rows
    print(f"peak RSS ratio {args.images} / 2000 images: main "
          f"{large['main_mib'] / small['main_mib']:.3f}, worker "
          f"{large['worker_mib'] / small['worker_mib']:.3f} (goal within 1 +- 0.10)")


if __name__ == "__main__":
    main()
