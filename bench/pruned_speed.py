"""Real speed of pruned models against their MACs, and the latency budget's prediction against
measurement. Prints two tables; never pass/fail.

    python bench/pruned_speed.py [--batch-sizes 1 256] [--rounds 3] [--repeats 3] [--device auto]
                                 [--no-published] [--no-grid] [--no-check] [--no-ort]
                                 [--check resnet56:3x32x32 vgg16_bn:3x32x32:64]
                                 [--runtimes torch onnxruntime] [--calibration 4] [--check-rounds 7]
                                 [--profile-rounds 5]
                                 [--attempts 3] [--max-check-error 0.1] [--cache-mb MB]

1. Speed against MACs, per model: CHIP's published ResNet-56 configurations (DESIGN.md
   section 5; the ResNet-110 and VGG-16 rate strings are not documented in this repo, so they
   are left out) and every pruned model of the default grid found as
   runs/finetune/*/checkpoint.pt. Each as pruned and with every width rounded up to a
   multiple of 8 ("r8"; a removed branch stays removed). Columns: MACs ratio (pruned / dense),
   the measured speedup (dense / pruned, same memory format) at each batch size in NCHW and
   channels_last, and speedup / MACs reduction = best-format speedup x MACs ratio (1.0: the
   hardware delivers the whole reduction); with ONNX Runtime (not --no-ort) the same models
   exported to ONNX and timed in it (CPU provider; CUDA on a GPU), dense and pruned
   interleaved: `ort<N>` speedup and `oeff<N>`.
2. The latency budget, ChipNet-free, per runtime (`--runtimes`): a latency table of the dense
   model on this device in that runtime (as the profile_latency stage builds it: every grid
   point and whole model timed in `--profile-rounds` rounds, calibrated on `--calibration`
   random whole models besides dense, quarter and three-quarter widths, and profiled again,
   up to `--attempts` tables, while the table has a fault (`table_faults`: its held-out
   half-width check misses by more than `--max-check-error`, its fit misses a calibration
   model by more than a quarter of the dense time, ...): the stage's defaults),
   random and L1 scores thresholded at a latency budget of 0.5 (round_to 8), and the pruned
   model's predicted latency against its measured one (same runtime) and against half of
   the dense model's. Goal: within 10%. `model:CxHxW:STEP` sets the table's grid step
   (default 8; VGG-16's 512-wide layers want 64 on a CPU: a 65x65 grid per layer is hours).
   In ONNX Runtime step and round_to are raised to its conv channel block (`nchwc_block`:
   16 on an AVX-512 CPU), which pads every width to a whole block; in PyTorch round_to is
   raised to oneDNN's (`onednn_block`) where the grid is coarser than round_to: off the
   block a width runs slower than the grid around it says, and a grid of step 8 times every
   width round_to 8 makes.

Timing: models are rebuilt from their widths with random weights (time does not depend on
them) on the device (CUDA: bf16 and channels_last/NCHW as measured; CPU: float32); every
figure is the fastest of `rounds` interleaved rounds of a median of `repeats` forwards, warm-up
excluded, and every ratio is against the dense model timed in the same rounds. On a shared
machine, load only adds time: the fastest round is the least disturbed one.
"""

from __future__ import annotations

import argparse
import glob
import math
import tempfile
import time
from pathlib import Path

import torch

from chipprune.budgets.counting import measure_cost
from chipprune.budgets.exact import BudgetModel
from chipprune.budgets.latency import last_level_cache_mb, median_latency_ms, onednn_round_to
from chipprune.budgets.latency_profile import (
    TorchTimer,
    best_checked,
    profile_model,
    weight_cost_bound,
)
from chipprune.budgets.rates import rates_to_widths
from chipprune.budgets.thresholding import keep_at_budget
from chipprune.config import LatencyBudgetConfig
from chipprune.deploy import ort_runtime
from chipprune.deploy.onnx_export import export_onnx
from chipprune.deploy.ort_latency import OrtTimer, nchwc_block
from chipprune.methods.baselines import l1_scores, random_scores
from chipprune.models import create_model
from chipprune.surgery.rebuild import prune_model
from chipprune.training.checkpoint import dense_kwargs, load_checkpoint
from chipprune.training.loop import resolve_device

PUBLISHED = {  # CHIP's ResNet-56 configurations (CIFAR-10), DESIGN.md section 5
    "CHIP r56 light": "[0.]+[0.15]*2+[0.4]*27",
    "CHIP r56 heavy": "[0.]+[0.4]*2+[0.5]*9+[0.6]*9+[0.7]*9",
}
FORMATS = ("nchw", "channels_last")


def round_up(widths: dict[str, int], dense: dict[str, int], to: int = 8) -> dict[str, int]:
    return {g: 0 if w == 0 else min(dense[g], math.ceil(w / to) * to) for g, w in widths.items()}


class Bench:
    """Interleaved timing: every (model, batch, format) once per round, the fastest kept."""

    def __init__(self, device, dtype, repeats: int):
        self.device, self.dtype, self.repeats = device, dtype, repeats
        self.models: dict[str, tuple[torch.nn.Module, tuple[int, int, int]]] = {}
        self.best: dict[tuple, float] = {}

    def add(self, key: str, model: torch.nn.Module, shape: tuple[int, int, int]) -> None:
        self.models[key] = (model.to(self.device, self.dtype).eval(), shape)

    def run(self, batch_sizes, rounds: int, quiet: bool = False) -> None:
        for r in range(rounds):
            for key, (model, shape) in self.models.items():
                for bs in batch_sizes:
                    for fmt in FORMATS:
                        ms = median_latency_ms(
                            model,
                            shape,
                            bs,
                            self.device,
                            3 if r == 0 else 1,
                            self.repeats,
                            fmt,
                            self.dtype,
                        )
                        k = (key, bs, fmt)
                        self.best[k] = min(self.best.get(k, math.inf), ms)
            if not quiet:
                print(f"  round {r + 1}/{rounds} done", flush=True)

    def ms(self, key: str, bs: int, fmt: str | None = None) -> float:
        if fmt is None:
            return min(self.best[(key, bs, f)] for f in FORMATS)
        return self.best[(key, bs, fmt)]


class OrtBench:
    """The same discipline in ONNX Runtime: each model exported once (float32), every (model,
    batch) once per round in a fresh session (warmed up; live sessions' idle thread pools slow
    the one being timed: chipprune.deploy.ort_latency.OrtTimer), the fastest round kept."""

    def __init__(self, device, repeats: int):
        self.device, self.repeats = "cuda" if device.type == "cuda" else "cpu", repeats
        self.scratch = tempfile.TemporaryDirectory(prefix="bench-ort-")
        self.models: dict[str, tuple[Path, tuple[int, int, int]]] = {}
        self.best: dict[tuple, float] = {}

    def add(self, key: str, model: torch.nn.Module, shape: tuple[int, int, int]) -> None:
        path = Path(self.scratch.name) / f"{len(self.models)}.onnx"
        export_onnx(model.float().cpu().eval(), shape, path)
        self.models[key] = (path, shape)

    def run(self, batch_sizes, rounds: int, quiet: bool = False) -> None:
        for r in range(rounds):
            for key, (path, shape) in self.models.items():
                for bs in batch_sizes:
                    sess = ort_runtime.session(path, self.device)
                    time.sleep(ort_runtime.QUIET_S)
                    ms = ort_runtime.median_latency_ms(sess, shape, bs, 3, self.repeats)
                    del sess
                    self.best[(key, bs)] = min(self.best.get((key, bs), math.inf), ms)
            if not quiet:
                print(f"  ONNX Runtime round {r + 1}/{rounds} done", flush=True)

    def ms(self, key: str, bs: int, fmt: str | None = None) -> float:
        return self.best[(key, bs)]


def speed_rows(args, device, dtype):
    """(label, model name, dense kwargs, input shape, widths) of every model to compare."""
    entries = []
    if not args.no_published:
        kw = {"num_classes": 10, "in_channels": 3}
        spec = create_model("resnet56", **kw).describe()
        for label, rates in PUBLISHED.items():
            entries.append(
                (label, "resnet56", kw, (3, 32, 32), rates_to_widths(spec, rates, "resnet56"))
            )
    if not args.no_grid:
        for path in sorted(glob.glob("runs/finetune/*/checkpoint.pt")):
            ckpt = load_checkpoint(path)
            kw = dense_kwargs(ckpt)
            widths = ckpt["model_kwargs"].get("widths")
            shape = tuple(ckpt.get("data_meta", {}).get("image_shape") or ())
            if widths and len(shape) == 3:
                entries.append((Path(path).parent.name, ckpt["model_name"], kw, shape, widths))
    return entries


def speed_table(args, device, dtype) -> None:
    entries = speed_rows(args, device, dtype)
    if not entries:
        print("no models to compare")
        return
    bench = Bench(device, dtype, args.repeats)
    ort = None if args.no_ort else OrtBench(device, args.repeats)
    rows = []
    for label, name, kw, shape, widths in entries:
        dense_key = f"dense {name} {shape}"
        if dense_key not in bench.models:
            bench.add(dense_key, create_model(name, **kw), shape)
            if ort:
                ort.add(dense_key, create_model(name, **kw), shape)
        dense_widths = create_model(name, **kw).describe().widths()
        dense_macs = measure_cost(create_model(name, **kw), shape).macs
        for r8 in (False, True):
            w = round_up(widths, dense_widths) if r8 else dict(widths)
            model = create_model(name, **kw, widths=w)
            key = f"{label} r8={r8}"
            bench.add(key, model, shape)
            if ort:
                ort.add(key, create_model(name, **kw, widths=w), shape)
            rows.append((label, r8, key, dense_key, measure_cost(model, shape).macs / dense_macs))
    print(
        f"timing {len(bench.models)} models x {len(args.batch_sizes)} batch sizes x 2 formats, "
        f"{args.rounds} rounds ...",
        flush=True,
    )
    t0 = time.perf_counter()
    bench.run(args.batch_sizes, args.rounds)
    if ort:
        ort.run(args.batch_sizes, args.rounds)
    print(f"  {time.perf_counter() - t0:.0f}s\n")

    head = f"{'model':<44}{'r8':>4}{'MACs':>7}"
    for bs in args.batch_sizes:
        head += f"{f'bs{bs} nchw':>11}{f'bs{bs} cl':>10}{f'eff{bs}':>8}"
        head += f"{f'ort{bs}':>8}{f'oeff{bs}':>8}" if ort else ""
    print(
        "speedup = dense / pruned in the same memory format; eff = best-format speedup x MACs"
        " ratio (1.0: all of the MACs reduction delivered); ort / oeff: the same in ONNX Runtime"
    )
    print(head)
    for label, r8, key, dense_key, macs in rows:
        line = f"{label[:43]:<44}{'y' if r8 else '':>4}{macs:>7.3f}"
        for bs in args.batch_sizes:
            s = {f: bench.ms(dense_key, bs, f) / bench.ms(key, bs, f) for f in FORMATS}
            eff = bench.ms(dense_key, bs) / bench.ms(key, bs) * macs
            line += f"{s['nchw']:>11.2f}{s['channels_last']:>10.2f}{eff:>8.2f}"
            if ort:
                o = ort.ms(dense_key, bs) / ort.ms(key, bs)
                line += f"{o:>8.2f}{o * macs:>8.2f}"
        print(line)
    print("\ndense models, ms (nchw / channels_last):")
    for key in bench.models:
        if key.startswith("dense "):
            print(
                f"  {key}: "
                + ", ".join(
                    f"bs{bs} {bench.ms(key, bs, 'nchw'):.3f} / {bench.ms(key, bs, 'channels_last'):.3f}"
                    + (f" / ORT {ort.ms(key, bs):.3f}" if ort else "")
                    for bs in args.batch_sizes
                )
            )


def latency_check(args, device, dtype) -> None:
    print("\nlatency budget 0.5 (round_to 8, or the conv channel block where wider: in ONNX Runtime"
          " step too, in PyTorch where step > 8):\nthe table's prediction against measurement")
    print(
        f"{'model':<26}{'bs':>5}{'fmt':>6}{'scores':>8}{'MACs':>7}{'pred':>8}{'meas':>8}"
        f"{'err':>8}{'pred ms':>10}{'meas ms':>10}{'dense/2':>10}{'table s':>9}"
    )
    for runtime in args.runtimes:
        for spec in args.check:
            check_model(args, device, dtype, runtime, spec)


def check_model(args, device, dtype, runtime: str, spec: str) -> None:
    """One model's latency-budget check in `runtime` at every batch size (rows printed)."""
    name, dims, *step = spec.split(":")
    step = int(step[0]) if step else 8
    shape = tuple(int(v) for v in dims.split("x"))
    kw = {"num_classes": 10, "in_channels": shape[0]}
    torch.manual_seed(0)
    dense = create_model(name, **kw).eval()

    def build(w, name=name, kw=kw):
        return create_model(name, widths=w, **kw)

    round_to = 8
    ort_device = "cuda" if device.type == "cuda" else "cpu"
    if runtime == "onnxruntime":  # widths cost what the next whole block costs
        block = nchwc_block(ort_device)
        step, round_to = max(step, block), max(round_to, block)
    else:  # off oneDNN's block a width costs more than a coarser grid interpolates
        round_to = onednn_round_to(step, round_to, device)
    for bs in args.batch_sizes:
        if runtime == "onnxruntime":
            fmt = "ort"
            timer = OrtTimer(ort_device, 3, args.repeats)
            bench = OrtBench(device, args.repeats)
        else:
            probe = Bench(device, dtype, args.repeats)
            probe.add("dense", create_model(name, **kw), shape)
            probe.run([bs], args.rounds, quiet=True)  # one round picked NCHW by noise
            fmt = min(FORMATS, key=lambda f: probe.ms("dense", bs, f))
            timer = TorchTimer(device, fmt, warmup=3, repeats=args.repeats, dtype=dtype)
            bench = Bench(device, dtype, args.repeats)
        t0 = time.perf_counter()
        table, attempts = best_checked(
            lambda _number, timer=timer, bs=bs, step=step: profile_model(
                dense,
                shape,
                bs,
                step=step,
                timer=timer,
                rounds=args.profile_rounds,
                calibration=args.calibration,
                weight_ms_per_mb_max=weight_cost_bound(device),
                cache_mb=last_level_cache_mb(device) if args.cache_mb is None else args.cache_mb,
                model_timer=timer.model_timer(build, shape, bs),
            ),
            args.attempts,
            args.max_check_error,
        )
        seconds = time.perf_counter() - t0
        bm = BudgetModel.from_model(dense, shape, latency=table)
        bench.add("dense", create_model(name, **kw), shape)
        results = []
        for label, scores in (
            ("random", random_scores(bm.dense_widths, 0)),
            ("l1", l1_scores(dense)),
        ):
            r = keep_at_budget(scores, bm, "latency", 0.5, round_to=round_to)
            kept = {g: k.nonzero().flatten().tolist() for g, k in r.keep.items()}
            pruned, _ = prune_model(dense, name, kw, kept)
            bench.add(label, pruned, shape)
            macs = bm.fraction("flops", {g: len(v) for g, v in kept.items()})
            results.append((label, r.achieved, macs))
        bench.run([bs], args.check_rounds, quiet=True)
        d = bench.ms("dense", bs, fmt)
        for label, pred, macs in results:
            m = bench.ms(label, bs, fmt)
            print(
                f"{name + ' ' + dims:<26}{bs:>5}{'cl' if fmt == 'channels_last' else fmt:>6}"
                f"{label:>8}{macs:>7.3f}{pred:>8.3f}{m / d:>8.3f}{(m / d) / pred - 1:>+8.1%}"
                f"{pred * table.dense_predicted_ms:>10.3f}{m:>10.3f}{d / 2:>10.3f}"
                f"{seconds:>9.0f}", flush=True,
            )
        check, cal = table.meta["check"], table.meta.get("calibration", {})
        tried = ", ".join(f"{t.meta['check']['error']:+.1%}" for t in attempts)
        print(
            f"{'':<26}table ({runtime}): dense {table.model_ms:.3f} ms, rest "
            f"{table.rest_ms:.3f} ms, scale {table.scale:.3f}, call {table.call_ms:+.4f} ms, "
            f"weights {table.weight_ms_per_mb:.4f} ms/MB, spill {table.spill_ms_per_mb:.4f} "
            f"ms/MB over {table.cache_mb:.1f} MB, calibration fit within "
            f"{cal.get('max_fit_error', 0.0):.1%} ({cal.get('max_fit_miss', 0.0):.1%} of dense), "
            f"{table.meta['timings']} timings (step {step}, round_to {round_to}); "
            f"its half-width check {check['error']:+.1%} (attempts: "
            f"{tried})",
            flush=True,
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 256])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--no-published", action="store_true")
    ap.add_argument("--no-grid", action="store_true")
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--no-ort", action="store_true", help="no ONNX Runtime columns")
    ap.add_argument("--runtimes", nargs="+", default=["torch", "onnxruntime"],
                    choices=["torch", "onnxruntime"], help="runtimes of the latency check")
    ap.add_argument("--check-rounds", type=int, default=7,
                    help="rounds of the check's dense-against-pruned measurement (cheap: 3 models)")
    defaults = LatencyBudgetConfig()
    ap.add_argument("--profile-rounds", type=int, default=defaults.rounds,
                    help="rounds over every grid point and whole model of a check's table "
                         "(the stage's)")
    ap.add_argument("--attempts", type=int, default=defaults.attempts,
                    help="tables profiled at most while a table has a fault (the stage's)")
    ap.add_argument("--max-check-error", type=float, default=defaults.max_check_error,
                    help="the held-out check's miss that triggers another attempt (the stage's)")
    ap.add_argument("--calibration", type=int, default=defaults.calibration,
                    help="random whole models each table is fitted to (0: no fit)")
    ap.add_argument("--cache-mb", type=float, default=None,
                    help="the last-level cache the tables' spill term is fitted against "
                         "(default: the device's; 0: no spill term)")
    ap.add_argument(
        "--check",
        nargs="+",
        default=["resnet20:1x16x16", "resnet56:3x32x32"],
        help="model:CxHxW[:STEP] for the latency-budget check",
    )
    args = ap.parse_args()

    device = resolve_device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"device {device} ({name}), {dtype}, {torch.get_num_threads()} threads, "
        f"batch sizes {args.batch_sizes}, {args.rounds} rounds x median of {args.repeats}"
    )
    if not (args.no_published and args.no_grid):
        speed_table(args, device, dtype)
    if not args.no_check:
        latency_check(args, device, dtype)


if __name__ == "__main__":
    main()
