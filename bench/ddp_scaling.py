"""Data-parallel scaling of the training loop: images/s of `train.fit` with 1 and 2 (or
more) processes on this machine, side by side, same model, same data, same global batch.

    python bench/ddp_scaling.py [--nprocs 1 2] [--model resnet20] [--batch-size 64]
                                [--epochs 2] [--repeats 3] [--device cpu] [--sync-bn]

Every configuration runs as its own group of ranks (chipprune.training.distributed.launch: gloo on
CPU, nccl on CUDA): one warm-up epoch, excluded, then one timed run of `--epochs` epochs
(empty validation set, so evaluation is not timed). The configurations take turns,
`--repeats` rounds, so drifting load hits all alike; the median is reported, with the
ratio to the first row. The global batch is fixed (strong scaling): N
ranks train on batch/N images each per step. Each rank gets cores/N threads, so 1 process
x 2 threads is compared with 2 processes x 1 thread on 2 cores; a row of 1 process with
the threads of one rank of the largest group is added (same threads per rank, so its
ratio is the parallel efficiency). Figures on a shared machine move with its load: compare
ratios taken in one run, and note the load.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chipprune.config import (  # noqa: E402
    AugmentConfig,
    DistributedConfig,
    ScheduleConfig,
    TrainConfig,
)
from chipprune.data import Split, prepare_dataset  # noqa: E402
from chipprune.models import create_model  # noqa: E402
from chipprune.training import distributed  # noqa: E402
from chipprune.training.loop import fit, resolve_device, seed_everything  # noqa: E402
from chipprune.training.sources import DeviceData


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def rank_main(args: argparse.Namespace) -> None:
    """One rank: warm-up, timed repeats; rank 0 writes the figures to args.result."""
    device = distributed.setup(resolve_device(args.device))
    seed_everything(0, device)
    ds = prepare_dataset("digits")
    meta = ds.meta
    train = DeviceData.from_split(ds.splits["train"], meta, device)
    empty_split = Split(ds.splits["val"].images[:0], ds.splits["val"].labels[:0])
    empty = DeviceData.from_split(empty_split, meta, device)
    world = distributed.world()
    cfg = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        device=args.device,
        schedule=ScheduleConfig(kind="cosine", warmup_epochs=1),
        distributed=DistributedConfig(nproc=world, sync_bn=args.sync_bn),
    )
    aug = AugmentConfig(crop_padding=2, flip=True)
    kwargs = {"num_classes": meta["num_classes"], "in_channels": meta["image_shape"][0]}
    steps = len(train) // args.batch_size

    def timed(c: TrainConfig) -> float:
        torch.manual_seed(0)
        model = create_model(args.model, **kwargs).to(device)
        distributed.barrier()
        sync(device)
        t0 = time.perf_counter()
        fit(model, train, empty, c, aug)
        sync(device)
        return c.epochs * steps * args.batch_size / (time.perf_counter() - t0)

    timed(cfg.model_copy(update={"epochs": 1}))  # warm-up, excluded
    rates = [timed(cfg)]
    if distributed.is_main():
        Path(args.result).write_text(
            json.dumps(
                {"world": world, "rates": rates, "threads": torch.get_num_threads(), "steps": steps}
            )
        )
    distributed.teardown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--nprocs", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--sync-bn", action="store_true")
    ap.add_argument("--result", help=argparse.SUPPRESS)  # set for the ranks
    args = ap.parse_args()
    if distributed.under_launcher():
        rank_main(args)
        return

    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    configs = [(n, max(1, cpus // n)) for n in args.nprocs]
    if (1, max(1, cpus // max(args.nprocs))) not in configs:
        configs.insert(1, (1, max(1, cpus // max(args.nprocs))))
    rows = {c: {"world": c[0], "threads": c[1], "rates": []} for c in configs}
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        for _round, (n, threads) in itertools.product(range(args.repeats), configs):
            result = Path(tmp) / f"{n}x{threads}.json"
            argv = [
                "--model", args.model, "--batch-size", str(args.batch_size),
                "--epochs", str(args.epochs), "--device", args.device, "--result", str(result),
            ] + (["--sync-bn"] if args.sync_bn else [])  # fmt: skip
            env = {
                **os.environ,
                "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
                "OMP_NUM_THREADS": str(threads),
            }
            rc = distributed.launch("bench.ddp_scaling", argv, n, env)
            if rc != 0:
                sys.exit(f"{n} processes: exit status {rc}")
            got = json.loads(result.read_text())
            rows[(n, threads)]["rates"] += got["rates"]
            rows[(n, threads)]["steps"] = got["steps"]
    rows = list(rows.values())

    base = statistics.median(rows[0]["rates"])
    print(
        f"device {args.device}, model {args.model}, global batch {args.batch_size}, "
        f"{args.epochs} epochs x {rows[0]['steps']} steps, median of {args.repeats}, "
        f"sync_bn {args.sync_bn}, {cpus} CPUs, "
        f"load average {load_start:.1f} at start, {os.getloadavg()[0]:.1f} at end"
    )
    print(f"{'processes':<12}{'threads/rank':>14}{'batch/rank':>12}{'images/s':>12}{'ratio':>8}")
    for r in rows:
        rate = statistics.median(r["rates"])
        per_rank = args.batch_size // r["world"]
        print(f"{r['world']:<12}{r['threads']:>14}{per_rank:>12}{rate:>12.1f}{rate / base:>8.3f}")


if __name__ == "__main__":
    main()
