"""Making a latency table: every layer of the model's plan (`latency_table._layer_plan`) timed
on its grid of (in-width, out-width) pairs, the monotone table built from the timings, and
its held-out check on a second whole model at about half of every width.

Timing is injected (`profile_model(..., timer=..., model_timer=...)`), so the math is tested
with synthetic timings; `TorchTimer` is the real one (median of repeats after warm-up, the
fastest of interleaved rounds).
"""

from __future__ import annotations

import platform
import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from chipprune.budgets.latency_table import (
    ConvOp,
    LatencyTable,
    LayerTable,
    _layer_plan,
    monotone,
    spill_fraction,
    width_grid,
)
from chipprune.models import PrunableNet

Timer = Callable[[ConvOp, int, int, int], float]  # (op, n_in, n_out, batch) -> ms


def _nearest(dense: int, step: int, fraction: float) -> int:
    """The grid width nearest `fraction` of `dense` (ties: the wider), never 0, and 1 only
    for a one-channel group: a one-channel layer is a corner no pruning with round_to > 1
    reaches, and whole models built on it pull the fit to that corner (ResNet-56 with its
    16-wide stage at width 1 missed its fit by 25% in ONNX Runtime at batch 256)."""
    grid = _no_single_channel(width_grid(dense, step))
    return min(grid, key=lambda w: (abs(w - fraction * dense), -w))


# The most passes over a layer's weights per forward the weight cost may stand for: eager
# PyTorch's oneDNN convs reorder their weights on every call (a read, a write and a read of
# the copy); measured here inside VGG-16-BN at batch 1, 0.09 ms per MB where one read of
# memory costs 0.03 ms per MB. ONNX Runtime packs weights once, at session start.
WEIGHT_PASSES = 4


def weight_cost_bound(device: torch.device) -> float:
    """The bound on a table's weight cost, ms per MB: WEIGHT_PASSES reads of memory."""
    from chipprune.budgets.latency import memory_read_ms_per_mb

    return WEIGHT_PASSES * memory_read_ms_per_mb(device)


def _no_single_channel(grid: Sequence[int]) -> list[int]:
    """The grid without width 1 unless it is the only width (see `_nearest`)."""
    return [w for w in grid if w != 1] or list(grid)


def check_widths(dense: Mapping[str, int], step: int) -> dict[str, int]:
    """The second model `profile_model` times whole: every group at the grid point nearest
    half its dense width (ties: the wider), about a quarter of the dense MACs."""
    return {g: _nearest(d, step, 0.5) for g, d in dense.items()}


def calibration_widths(dense: Mapping[str, int], step: int, n_random: int,
                       branches: Sequence[Sequence[str]] = (),
                       seed: int = 0) -> list[dict[str, int]]:
    """The whole models a table is calibrated on, besides the dense one: every group at the
    grid point nearest a quarter and three quarters of its width, and `n_random` models of
    independent random grid widths per group (seeded; never width 1 where a group has wider
    grid points, see `_nearest`: in VGG-16-BN at batch 1 a model with one 1-channel layer
    ran 9-22% over its fit in six of nine profiles), where in every other one (the 1st,
    3rd, ...) a group of a removable residual branch (`branches`: each one's groups) may draw
    0 too: uniform and uneven prunings, with and without removed branches, as masks make them
    (at batch 1 a removed branch saves per-module overhead a width never shows). Half of them
    keep every layer, so the fit sees widths move with the layer count fixed: with removals
    in all four, ResNet-56's scale at batch 1 came out anywhere from 0.25 to 1.02 between
    runs, its call taking the rest. With branches, two more: every other branch
    removed, the rest dense, so the fit tells a layer's call from its width (the quarter
    model narrows every layer and removes none); and every branch removed, the rest at its
    narrowest grid point (`_nearest` of 0): the smallest model masks can make, the corner a
    tight budget at batch 1 goes to, where a layer's width hardly counts and the search
    removes branches. Without it the fit extrapolated there: ResNet-20 in channels_last at
    batch 1, thresholded at half the latency, measured 0.37 of dense where its table said
    0.56."""
    rng = random.Random(seed)
    vanishing = {g for br in branches for g in br}
    out = [{g: _nearest(d, step, f) for g, d in dense.items()} for f in (0.25, 0.75)]
    out += [{g: rng.choice(_no_single_channel(width_grid(d, step, g in vanishing and i % 2 == 0)))
             for g, d in dense.items()} for i in range(n_random)]
    if branches:
        gone = {g for br in branches[1::2] for g in br}
        out.append({g: 0 if g in gone else d for g, d in dense.items()})
        out.append({g: 0 if g in vanishing else _nearest(d, step, 0.0) for g, d in dense.items()})
    return out


def fit_latency_model(layer_sums: Sequence[float], alive_layers: Sequence[float],
                      measured: Sequence[float], min_layer_ms: float = 0.0
                      ) -> tuple[float, float, float]:
    """(rest, scale, call): least squares of measured = rest + scale * layer_sum + call *
    alive_layers over whole models, with scale >= 0 (a time cannot fall as layers widen: at
    0 pruning is predicted to buy nothing but removed layers, which is then what the
    measurements say) and call >= -scale * min_layer_ms (the smallest table entry: every
    alive layer still adds a time >= 0, so the prediction stays monotone). A quadratic over
    two linear constraints: its minimum is the unconstrained one or lies on a constraint or
    both, so the feasible one of those four fits with the least squared error is it. A
    regressor that does not vary (every model has all its layers) gets coefficient 0."""
    x = torch.tensor(layer_sums, dtype=torch.float64)
    n = torch.tensor(alive_layers, dtype=torch.float64)
    y = torch.tensor(measured, dtype=torch.float64)
    if len(x) < 2:
        raise ValueError(f"a calibration needs at least 2 whole models, got {len(x)}")

    def varies(c: torch.Tensor) -> bool:
        return bool((c - c.mean()).abs().max() > 1e-12 * max(1.0, float(c.abs().max())))

    def fit(*columns: torch.Tensor) -> list[float]:  # [rest, coefficient per column]
        varying = [varies(c) for c in columns]
        kept = [c for c, v in zip(columns, varying, strict=True) if v]
        a = torch.stack([torch.ones_like(y), *kept], 1)
        sol = iter(torch.linalg.lstsq(a, y.unsqueeze(1), driver="gelsd").solution[:, 0].tolist())
        rest = next(sol)
        return [rest, *(next(sol) if v else 0.0 for v in varying)]

    if not varies(n):  # a call per layer is then indistinguishable from rest: 0
        rest, scale = fit(x)
        return (rest, scale, 0.0) if scale >= 0.0 else (float(y.mean()), 0.0, 0.0)
    rest, scale, call = fit(x, n)
    rest_c, call_c = fit(n)
    rest_s, scale_s = fit(x - min_layer_ms * n)
    candidates = [(rest, scale, call), (rest_c, 0.0, call_c),
                  (rest_s, scale_s, -scale_s * min_layer_ms), (float(y.mean()), 0.0, 0.0)]
    feasible = [c for c in candidates if c[1] >= 0.0 and c[2] >= -c[1] * min_layer_ms - 1e-12]
    return min(feasible, key=lambda c: float(((c[0] + c[1] * x + c[2] * n - y) ** 2).sum()))


def profile_model(
    model: PrunableNet,
    input_size: tuple[int, int, int],
    batch_size: int,
    *,
    step: int,
    timer: Timer,
    model_timer: Callable[[Mapping[str, int]], float],
    rounds: int = 1,
    calibration: int = 0,
    weight_ms_per_mb_max: float = 0.0,
    cache_mb: float = 0.0,
    meta: Mapping[str, Any] | None = None,
) -> LatencyTable:
    """The table of a dense `model`: `timer(op, n_in, n_out, batch_size)` at every grid
    point (equal ops and widths share one), and `model_timer(widths)`, the whole model built
    at those group widths: the dense model (its time fixes `rest`) and the `check_widths`
    model, whose predicted and measured times go to `meta["check"]`.

    With `calibration` > 0 the `calibration_widths` models (quarter and three-quarter widths
    plus `calibration` random ones and, with removable branches, one with every other branch
    gone and one with all of them gone) are timed too, and rest, scale and the per-layer call are fitted to them and the
    dense model (`fit_latency_model`; `meta["calibration"]`); the half-width check stays held
    out. With `weight_ms_per_mb_max` > 0 (`weight_cost_bound`) the fit also picks the cost of
    a MB of weights streamed from memory (`LatencyTable.weight_ms_per_mb`), at most that:
    where a layer's weights cost more than its lone time, they bound it; and with `cache_mb`
    > 0 too (`budgets.latency.last_level_cache_mb`), the cost per MB of weights once the
    model's outgrow that cache (`LatencyTable.spill_ms_per_mb`, same bound). With 0, scale is
    1, call 0 and rest closes the dense model's gap exactly. (A fit on
    the dense and half models alone was tried before: two points, one of them the check.)

    Each point is timed once per round, in the same order every round, and the fastest
    round is kept (each round's figure is itself a median of repeats): load from other
    processes only ever adds time, so on a shared machine the least disturbed round is the
    best estimate, and a burst of load spoils one round of every point instead of every
    repeat of a few points. Each other whole model is timed right after the dense one, and
    taken as its fraction of that dense time in the round where the pair was fastest, times
    the dense model's best time: a slow spell that outlasts a round (seen here: ResNet-20 at
    batch 1, every narrowed model of one profile 20-40% slower than the same models timed
    in a fresh process, the dense one timed before the spell) scales both alike, where the
    fastest time of each alone set a slow model against a fast dense one, and the fit then
    read width as free (scale 0)."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    spec, plan = _layer_plan(model, input_size)
    vanishing = {g for br in spec.branches for g in br.groups}
    grids = []
    points: dict[tuple, list[float]] = {}  # (op, n_in, n_out) -> one time per round
    for name, group, in_group, d_in, d_out, op, when in plan:
        in_w = width_grid(d_in, step, in_group in vanishing) if in_group else (d_in,)
        out_w = width_grid(d_out, step, group in vanishing) if group else (d_out,)
        if op.depthwise:
            in_w = (d_out,)
        grids.append((name, group, in_group, in_w, out_w, op, when))
        # width 0: the branch is gone and the layer costs nothing
        points |= {
            (op, a, b): [] for a in in_w for b in out_w if a and b and (op, a, b) not in points
        }
    dense_w = spec.widths()
    half_w = check_widths(dense_w, step)
    calib = calibration_widths(dense_w, step, calibration, [br.groups for br in spec.branches]) \
        if calibration > 0 else []
    others = {"half": half_w, **dict(enumerate(calib))}
    pairs: dict[Any, list[tuple[float, float]]] = {k: [] for k in others}  # (dense, model)
    for _ in range(rounds):
        for (op, a, b), times in points.items():
            times.append(float(timer(op, a, b, batch_size)))
        for key, w in others.items():
            pairs[key].append((float(model_timer(dense_w)), float(model_timer(w))))
    best = {k: min(v) for k, v in points.items()}
    model_ms = min(d for p in pairs.values() for d, _ in p)

    def measured(key) -> float:
        """The model's time as a fraction of the dense model timed just before it, in the
        least disturbed round (the pair's least sum), times the dense model's best time."""
        d, m = min(pairs[key], key=sum)
        return m / d * model_ms
    layers = []
    for name, group, in_group, in_w, out_w, op, when in grids:
        ms = torch.tensor(
            [[best[(op, a, b)] if a and b else 0.0 for b in out_w] for a in in_w],
            dtype=torch.float64,
        )
        layers.append(
            LayerTable(
                name,
                group,
                in_group,
                in_w,
                out_w,
                tuple(tuple(r) for r in monotone(ms).tolist()),
                op,
                when,
            )
        )
    half_ms = measured("half")
    table = LatencyTable(
        layers=tuple(layers),
        model_ms=model_ms,
        rest_ms=model_ms - sum(lt.ms[-1][-1] for lt in layers),
        cache_mb=cache_mb,
        meta={
            "input_shape": list(input_size),
            "batch_size": batch_size,
            "step": step,
            "rounds": rounds,
            "timings": len(points),
            **(meta or {}),
        },
    )
    groups = list(dense_w)

    def terms(widths: Mapping[str, int]) -> tuple[float, float, float]:
        """The unscaled layer sum, the alive layers and the MB of alive weights."""
        values, alive, weights_mb = table.layer_terms(
            torch.tensor([widths[g] for g in groups]), groups)
        return (float((values * alive).sum()), float(alive.sum()),
                float((weights_mb * alive).sum()))

    if calib:
        times = [model_ms, *(measured(i) for i in range(len(calib)))]

        def fits(weight_ms_per_mb: float):  # per spill: (error, costs, fit, terms, fitted)
            table.weight_ms_per_mb = weight_ms_per_mb
            sums, alive, weights = zip(*(terms(w) for w in (dense_w, *calib)), strict=True)
            spills = [m * spill_fraction(m, cache_mb) for m in weights]
            for spill in spill_candidates:
                rest_of = [t - spill * s for t, s in zip(times, spills, strict=True)]
                rest, scale, call = fit_latency_model(sums, alive, rest_of, table.min_entry_ms)
                fitted = [rest + scale * x + call * n + spill * s
                          for x, n, s in zip(sums, alive, spills, strict=True)]
                error = sum((f - m) ** 2 for f, m in zip(fitted, times, strict=True))
                yield (error, (weight_ms_per_mb, spill), (rest, scale, call),
                       (sums, alive, weights), fitted)

        # the weight cost and the spill are the terms the fit is not linear in (the weight
        # cost) or constrained in (both >= 0): the best of a geometric grid under their
        # bound, 0 (off) first, so each is on only where it fits better
        def grid(bound: float) -> list[float]:
            return [0.0] + [bound * 0.8**i for i in range(25)] if bound > 0.0 else [0.0]

        spill_candidates = grid(weight_ms_per_mb_max if cache_mb > 0.0 else 0.0)
        _, costs, coefficients, (sums, alive, weights), fitted = min(
            (f for c in grid(weight_ms_per_mb_max) for f in fits(c)), key=lambda f: f[0])
        table.weight_ms_per_mb, table.spill_ms_per_mb = costs
        table.rest_ms, table.scale, table.call_ms = coefficients
        misses = [abs(f - m) for f, m in zip(fitted, times, strict=True)]
        table.meta["calibration"] = {
            "models": len(sums), "random_models": calibration, "layer_sum_ms": list(sums),
            "alive_layers": list(alive), "weights_mb": list(weights), "measured_ms": times,
            "rest_ms": table.rest_ms, "scale": table.scale, "call_ms": table.call_ms,
            "weight_ms_per_mb": table.weight_ms_per_mb,
            "weight_ms_per_mb_max": weight_ms_per_mb_max,
            "spill_ms_per_mb": table.spill_ms_per_mb, "cache_mb": cache_mb,
            "max_fit_error": max(d / m for d, m in zip(misses, times, strict=True)),
            # the same miss in units of the dense model's time: what a budget's error is in
            "max_fit_miss": max(misses) / model_ms,
        }
    predicted = float(table.predict_ms(torch.tensor([half_w[g] for g in groups]), groups))
    table.meta["check"] = {
        "widths": half_w,
        "measured_ms": half_ms,
        "predicted_ms": predicted,
        "error": predicted / half_ms - 1.0,
    }
    return table


class TorchTimer:
    """The real timer: the op as a module on `device` in `dtype`, a random input in
    `memory_format`, synchronised, the median of `repeats` forwards (chipprune.budgets.latency).
    Modules are built once per point and warmed up (`warmup` forwards) on first use only,
    so later rounds of `profile_model` time them directly."""

    def __init__(
        self,
        device: torch.device,
        memory_format: str = "nchw",
        warmup: int = 3,
        repeats: int = 3,
        dtype: torch.dtype = torch.float32,
        min_ms: float | None = None,
    ):
        self.device, self.memory_format = device, memory_format
        self.warmup, self.repeats, self.dtype = warmup, repeats, dtype
        self.min_ms = min_ms  # None: budgets.latency.MIN_MS
        self._modules: dict[tuple, nn.Module] = {}

    def _time(self, cache: dict, key: tuple, build: Callable[[], nn.Module],
              shape: tuple[int, ...], batch_size: int) -> float:
        """The module cached under `key` (built and moved to the device on first use, then
        warmed up `warmup` times for at least min_ms; later calls re-warm its caches in one
        run, not min_ms: that was a third of a digits table's time), the median of
        `repeats`."""
        from chipprune.budgets.latency import median_latency_ms

        first = key not in cache
        if first:
            cache[key] = build().to(self.device, self.dtype).eval()
        return median_latency_ms(
            cache[key],
            shape,
            batch_size,
            self.device,
            max(1, self.warmup) if first else 1,
            self.repeats,
            memory_format=self.memory_format,
            dtype=self.dtype,
            min_ms=self.min_ms,
            warmup_ms=None if first else 0.0,
        )

    def __call__(self, op: ConvOp, n_in: int, n_out: int, batch_size: int) -> float:
        shape = (n_out if op.depthwise else n_in, *op.in_hw)
        return self._time(self._modules, (op, n_in, n_out), lambda: op.module(n_in, n_out),
                          shape, batch_size)

    def model_timer(
        self,
        build: Callable[[Mapping[str, int]], nn.Module],
        input_size: tuple[int, int, int],
        batch_size: int,
    ) -> Callable[[Mapping[str, int]], float]:
        """A `profile_model` model timer: `build(widths)` (random weights are fine: time does
        not depend on them) moved to the device once per widths, warmed up on first use."""
        built: dict[tuple, nn.Module] = {}

        def run(widths: Mapping[str, int]) -> float:
            return self._time(built, tuple(sorted(widths.items())),
                              lambda: build(dict(widths)), input_size, batch_size)

        return run


def device_meta(device: torch.device) -> dict[str, Any]:
    """What the timings depend on, recorded in the table (for people, not checked)."""
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or platform.machine()
    )
    return {
        "device": device.type,
        "device_name": name,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


# The largest miss of a table's calibration fit on one of its own whole models, as a fraction
# of the dense model's time (the unit a budget's error is in), that is still the model and
# not noise. Measured here (2-core shared CPU): the twelve tables of one bench run (ResNet-20,
# ResNet-56 and VGG-16-BN at batch 1 and 256 in both runtimes) missed their worst model by
# 0.8-5.0% of the dense time, every latency-0.5 budget within 10%, where in each model's own
# units the misses were 2-117% (the small models: ResNet-56 in ONNX Runtime); of seven
# ResNet tables at batch 1 whose fits missed a model by 62-302% of its own time, most
# profiled beside another process, four missed their latency-0.5 budgets by 16% to 91%.
MAX_FIT_MISS = 0.25


def table_faults(table: LatencyTable, max_error: float) -> list[str]:
    """Why a table makes a poor budget, if it does: its held-out check misses by more than
    `max_error`, its calibration fit misses one of its own whole models by more than
    `MAX_FIT_MISS` of the dense model's time (a timing taken in a burst of load), its rest
    is below -25% of the dense model (the lone layers' sum overstates the model by more than
    noise explains), or its scale is 0 (the fit read width as free: every pruning then
    predicts the same time, seen on ResNet-20 at batch 1 when the whole-model timings went
    through a slow spell)."""
    faults = []
    error = table.meta["check"]["error"]
    if abs(error) > max_error:
        faults.append(f"misses its half-width check by {error:+.0%}")
    miss = table.meta.get("calibration", {}).get("max_fit_miss", 0.0)  # older tables: none
    if miss > MAX_FIT_MISS:
        faults.append(f"its calibration fit misses a whole model by {miss:.0%} of the dense time")
    if table.rest_ms < -0.25 * table.model_ms:
        faults.append(f"rest {table.rest_ms:.3f} ms of a {table.model_ms:.3f} ms model")
    if table.scale == 0.0:
        faults.append("scale 0 (width fitted as free)")
    return faults


def best_checked(
    profile: Callable[[int], LatencyTable], attempts: int, max_error: float
) -> tuple[LatencyTable, list[LatencyTable]]:
    """Profile (`profile(attempt_number)`) until a table has no `table_faults` (its held-out
    check, a whole model at about half the widths, within `max_error` of its measured time,
    and a sound fit), at most `attempts` times; the best table (fault-free first, then the
    smallest check error), and every attempt. A fault means the timings went through noise
    (another process, a clock change), not that the model is unpredictable: a quiet attempt
    checks within a few percent."""
    tables, faulty = [], []
    for number in range(1, attempts + 1):
        tables.append(profile(number))
        faulty.append(bool(table_faults(tables[-1], max_error)))
        if not faulty[-1]:
            break
    best = min(range(len(tables)),
               key=lambda i: (faulty[i], abs(tables[i].meta["check"]["error"])))
    return tables[best], tables
