"""CHIP channel independence: our batched float64 route against the definition and the
authors' procedure, on identical post-ReLU-like maps (relu of a gaussian), per image.

    python bench/chip_ci.py [--device auto] [--repeats 5] [--images 32] [--threads N]
                            [--dead 0.25]
    python bench/chip_ci.py --model resnet56 --images 640 [--batch-size 128]

Columns: ms/image of (a) the definition (float64, one nuclear norm per channel with its row
zeroed), (b) the authors' procedure reproduced from its description (per image and channel
of a 128-image batch: a copy of the whole batch, the row zeroed, a float32 nuclear norm of
that image; timed on a few images), (c) ours (`channel_independence`, batched over images),
the Gram/eigvalsh route for reference; speedup of ours over (a); max relative error of ours
and of the Gram route against (a), relative to each image's largest CI (--dead zeroes that
fraction of channels, as dead ReLU channels do: the maps become rank deficient). Medians of repeats,
warm-up excluded, CUDA synchronised. On CPU ours always runs on one thread (see
`chip_ci.single_threaded`); --threads sets the others' threads (on 2 shared cores MKL's
threaded LAPACK made them 10-500x slower, so compare with --threads 1). The model mode times `score_channels` end to end and
reports the process's peak resident memory.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
from collections.abc import Callable

import torch

from chipprune.methods.chip import score_channels
from chipprune.methods.chip_ci import channel_independence, ci_definition, ci_gram
from chipprune.models import create_model
from chipprune.training.loop import resolve_device

SHAPES = ((16, 1024), (32, 256), (64, 64), (128, 64), (256, 196))
AUTHORS_BATCH = 128


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_seconds(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def authors_procedure(batch: torch.Tensor, images: int) -> torch.Tensor:
    """(images, C) CI the authors' way: batch (128, C, HW) float32; for each image and channel
    a copy of the whole batch with that row zeroed, then that image's float32 nuclear norm."""
    c = batch.shape[1]
    out = torch.empty(images, c)
    for j in range(images):
        full = torch.linalg.matrix_norm(batch[j], ord="nuc")
        for i in range(c):
            x = batch.clone()
            x[j, i] = 0.0
            out[j, i] = full - torch.linalg.matrix_norm(x[j], ord="nuc")
    return out


def max_rel_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max over images of max_i |ours_i - ref_i| / max_i |ref_i|."""
    scale = ref.abs().amax(-1).clamp_min(torch.finfo(torch.float64).tiny)
    return ((ours - ref).abs().amax(-1) / scale).max().item()


def shape_table(device: torch.device, repeats: int, images: int, dead: float) -> None:
    gen = torch.Generator().manual_seed(0)
    print(
        f"device {device}, {torch.get_num_threads()} threads, ours batched over {images} "
        f"images, {dead:.0%} of channels dead (zero rows)"
    )
    head = (
        f"{'C x HW':>9} {'def ms':>9} {'authors ms':>11} {'ours ms':>8} {'gram ms':>8} "
        f"{'ours/def x':>10} {'err ours':>9} {'err gram':>9}"
    )
    print(head)
    for c, n in SHAPES:
        maps = torch.relu(torch.randn(AUTHORS_BATCH, c, n, generator=gen))
        maps[:, torch.rand(c, generator=gen) < dead] = 0.0
        maps = maps.to(device)
        few = 2 if c * n <= 64 * 64 else 1  # images for the slow per-channel loops
        ref = ci_definition(maps[:few])
        t_def = median_seconds(lambda m=maps[:few]: ci_definition(m), repeats, device) / few
        t_auth = median_seconds(lambda m=maps: authors_procedure(m, 1), 1, device)
        batch = maps[:images]
        t_ours = median_seconds(lambda m=batch: channel_independence(m), repeats, device) / images
        t_gram = median_seconds(lambda m=maps[:few]: ci_gram(m), repeats, device) / few
        err = max_rel_error(channel_independence(maps[:few]), ref)
        err_gram = max_rel_error(ci_gram(maps[:few]), ref)
        print(
            f"{f'{c}x{n}':>9} {t_def * 1e3:9.2f} {t_auth * 1e3:11.1f} {t_ours * 1e3:8.3f} "
            f"{t_gram * 1e3:8.2f} {t_def / t_ours:10.1f} {err:9.1e} {err_gram:9.1e}",
            flush=True,
        )


def model_run(name: str, n_images: int, batch_size: int, device: torch.device) -> None:
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    model = create_model(name).to(device)
    spec = model.describe()
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n_images, 3, 32, 32), dtype=torch.uint8, generator=gen)
    mean = torch.tensor([0.49, 0.48, 0.45], device=device).view(1, 3, 1, 1)
    std = torch.tensor([0.25, 0.24, 0.26], device=device).view(1, 3, 1, 1)

    def normalise(x: torch.Tensor) -> torch.Tensor:
        return (x.float() / 255.0 - mean) / std

    batches = [images[i : i + batch_size] for i in range(0, n_images, batch_size)]
    sync(device)
    t0 = time.perf_counter()
    scores = score_channels(model, batches, normalise, spec)
    sync(device)
    wall = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB on Linux
    print(
        f"{name}: score_channels on {n_images} images (batch {batch_size}, {device}, "
        f"{torch.get_num_threads()} threads): {wall:.1f} s, {wall / n_images * 1e3:.1f} ms/image; "
        f"{len(scores)} convs; peak RSS {rss:.0f} MiB (at start {rss0:.0f} MiB)"
    )
    if device.type == "cuda":
        print(f"peak CUDA memory {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--images", type=int, default=None, help="32 for the table, 640 for --model")
    ap.add_argument("--model", default=None, help="time score_channels on this model instead")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all)")
    ap.add_argument("--dead", type=float, default=0.0, help="fraction of zero channels")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if args.model:
        model_run(args.model, args.images or 640, args.batch_size, device)
    else:
        shape_table(device, args.repeats, args.images or 32, args.dead)


if __name__ == "__main__":
    main()
