"""Latency budgets: a per-layer lookup table of measured time, and the model's latency
predicted from it as a function of the group widths.

For every conv of the model's description (`ModelSpec.convs` and `.fixed`) the table holds
the time of that layer as the model runs it, measured alone on the target device at the
target batch size, on a grid of (in-width, out-width) pairs:

- a prunable conv is timed as conv + BN + ReLU (eval mode); the ReLU stands in for ReLU6
  or no activation (a linear bottleneck's last conv) too;
- the conv whose output a residual block adds to its shortcut (the last conv of a removable
  branch, writing the stream) as conv + BN + add + ReLU, the add out of place as the blocks
  run it;
- a `FixedConv` (no BN of its own) as the conv alone (+ the add when it ends a branch);
- a depthwise conv (in-width = out-width) has a one-dimensional grid.

Not per layer: the stem's input, pooling, the classifier, option-A shortcuts, pre-activation
BNs, a removed branch's relu(shortcut) and the Python between modules.

The grid of a width is 1, every multiple of `step` below the dense width, and the dense
width; groups of a removable residual branch also have 0, at which the layer costs 0 (the
branch is gone). Timings are made monotone (a running max along both axes), so adding a
channel never makes the prediction faster and the budget thresholding stays a search on a
monotone function.

    predicted(w) = rest + sum_l alive_l(w) * (scale * max(T_l(w_in(l), w_out(l)),
                                                       weight_ms_per_mb * P_l(w)) + call)
                   + spill_ms_per_mb * P(w) * spill_fraction(P(w), cache_mb)

T_l is the bilinear interpolation of layer l's table (linear extrapolation outside the
grid, so soft widths below 1 keep a gradient); alive_l is the orphan-removal factor of the
polynomial budgets (`budgets.Term.when`: 1 or 0 for integer widths, prod min(w, 1) for soft
ones). Uncalibrated (scale 1, call 0), `rest` = the whole dense model's measured time minus
the sum of its layers' entries: what is not per layer, taken as constant. Calibrated, `rest`,
`scale` and `call` are fitted to whole models timed at several widths, some with residual
branches removed (least squares, `latency_profile.fit_latency_model`): a layer timed alone
pays what it does not pay inside the model (ONNX Runtime converts its input to a blocked
layout and back, PyTorch's caches are cold, each timed call has its own dispatch), so the sum
of the layers overstates every model, by more the wider it is (`scale` < 1), and by a fixed
amount per layer (`call` < 0); or a layer costs the model more than its own time, a dispatch
or a layout change between layers that no single layer shows (`call` > 0), which is what a
removed branch saves at batch 1 whatever its widths. P_l is the MB of the layer's weights
at those widths and `weight_ms_per_mb` what streaming a MB of weights costs inside the model
(fitted, at most `WEIGHT_PASSES` reads at the measured memory bandwidth; 0: off): timed alone,
a layer's weights stay in cache between repeats; inside a model whose weights outgrow the
cache they come from memory on every forward, and at batch 1 that bounds the wide layers
(VGG-16-BN at batch 1 in channels_last here: its 2x2 convs took 1.8-2.1x their lone time
inside the model, about 0.09 ms per MB of weights at every width, where one read of memory
costs 0.03 ms per MB). P(w) = sum_l alive_l(w) * P_l(w) is the model's weights and the
spill term what they cost once they outgrow the last-level cache (`cache_mb`, read off the
device): a forward reads every weight once, in order, and a cache smaller than the model
evicts each before its next use, so every layer pays for its weights coming from memory
while a model that fits pays nothing, whatever a single layer's size (`spill_fraction`;
fitted likewise, VGG-16-BN in ONNX Runtime at batch 1 here: its 59 MB dense model ran 1.6x
its layers' lone sum, a model of 15 MB at it). A second
whole model, every width about halved, is timed too and the table's prediction for it
recorded (`meta["check"]`): the table's held-out error. The hard form (integer widths on the grid: `step` = `prune.round_to`) is an
exact sum of table entries; the soft form is the same function of float tensors and equals
it at grid widths; off the grid both interpolate.

Making a table (timing every grid point) is `chipprune.budgets.latency_profile`; this module is the
table itself: its format, the layer plan it is checked against, and the prediction.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from chipprune.budgets.counting import conv_feature_sizes
from chipprune.config import ConfigError
from chipprune.models import PrunableNet

FORMAT = "chipprune.latency_table/1"
# What profile_latency writes when the grid has no latency budget: profiling costs minutes
# to hours (every width pair of every layer), and no stage would read the table.
NOT_PROFILED = "chipprune.latency_table/not-profiled"


class LatencyTableError(ConfigError):
    """A latency table that is missing, malformed or made for another model or input size.

    A ConfigError, so every stage reports it as one line with exit code 2."""


@dataclass(frozen=True)
class ConvOp:
    """What one timing runs, apart from the widths: layers with equal ops share timings."""

    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    bias: bool
    in_hw: tuple[int, int]  # input height and width
    depthwise: bool = False  # groups = channels; the in-width is the out-width
    bn_relu: bool = True  # conv + BN + ReLU (a prunable conv) or the conv alone (FixedConv)
    residual: bool = False  # + the residual add before the ReLU (a branch's last conv)
    groups: int = 1  # a grouped conv whose input and output widths are both fixed

    @property
    def out_hw(self) -> tuple[int, int]:
        """Output height and width (the conv arithmetic, per axis)."""
        return tuple(  # type: ignore[return-value]
            (s + 2 * p - d * (k - 1) - 1) // st + 1 for s, k, st, p, d in
            zip(self.in_hw, self.kernel, self.stride, self.padding, self.dilation, strict=True))

    def module(self, n_in: int, n_out: int) -> nn.Module:
        """The layer at these widths, eval mode (for a depthwise op n_in is ignored)."""
        if self.depthwise:
            n_in = n_out
        conv = nn.Conv2d(
            n_in,
            n_out,
            self.kernel,
            self.stride,
            self.padding,
            self.dilation,
            groups=n_out if self.depthwise else self.groups,
            bias=self.bias,
        )
        return _TimedLayer(
            conv, nn.BatchNorm2d(n_out) if self.bn_relu else None, self.bn_relu, self.residual
        ).eval()

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ConvOp:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


@dataclass(frozen=True)
class LayerTable:
    """One conv's measured times on its (in-width, out-width) grid, in ms."""

    conv: str
    group: str | None  # output group; None: the output width is fixed (FixedConv)
    in_group: str | None  # None: a fixed input width (the image, a fixed stream, depthwise)
    in_widths: tuple[int, ...]  # ascending; one value when the input width is fixed
    out_widths: tuple[int, ...]
    ms: tuple[tuple[float, ...], ...]  # (len(in_widths), len(out_widths)), monotone
    op: ConvOp
    when: tuple[str, ...] = ()  # groups of the removable branch this conv belongs to

    def at(self, n_in: int, n_out: int) -> float:
        """The entry at a grid point."""
        return self.ms[self.in_widths.index(n_in)][self.out_widths.index(n_out)]

    @property
    def weight_mb_per_width(self) -> float:
        """MB of float32 weights per (in-width x out-width) pair; per out-width if depthwise."""
        kh, kw = self.op.kernel
        return kh * kw * 4e-6 / (1 if self.op.depthwise else self.op.groups)

    def weight_mb(self, n_in: float, n_out: float) -> float:
        """MB of the conv's float32 weights at these widths (bias and BN left out)."""
        return self.weight_mb_per_width * (n_out if self.op.depthwise else n_in * n_out)


class _TimedLayer(nn.Module):
    """conv [-> BN] [-> + residual] [-> ReLU], as a residual block runs its last conv:
    relu(bn(conv(x)) + shortcut) with an out-of-place add and an in-place ReLU."""

    def __init__(self, conv: nn.Conv2d, bn: nn.Module | None, relu: bool, residual: bool):
        super().__init__()
        self.conv, self.bn, self.relu, self.residual = conv, bn, relu, residual
        self._shortcut: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if self.bn is not None:
            y = self.bn(y)
        if self.residual:
            if self._shortcut is None or self._shortcut.shape != y.shape:
                self._shortcut = torch.randn_like(y)  # same memory format as y
            y = y + self._shortcut
        return torch.relu_(y) if self.relu else y


def width_grid(dense: int, step: int, may_vanish: bool = False) -> tuple[int, ...]:
    """0 (removable-branch groups only), 1, the multiples of `step` below `dense`, `dense`."""
    if step < 1 or dense < 1:
        raise ValueError(f"width_grid needs step >= 1 and dense >= 1, got {step}, {dense}")
    points = {1, dense, *range(step, dense, step)} | ({0} if may_vanish else set())
    return tuple(sorted(points))


def monotone(ms: torch.Tensor) -> torch.Tensor:
    """Running max along both axes: non-decreasing in each width."""
    return ms.cummax(dim=0).values.cummax(dim=1).values


def _layer_plan(model: PrunableNet, input_size: tuple[int, int, int]):
    """Per described conv: (name, group, in_group, dense in, dense out, op, when)."""
    spec = model.describe()
    in_hw = {n: i for n, (i, _) in conv_feature_sizes(model, input_size).items()}
    when = {c: br.groups for br in spec.branches for c in (*br.convs, *br.also)}
    # the conv whose output a block adds to its shortcut: the last of its branch, writing
    # the stream (a group outside the branch's own) -- or a FixedConv the branch ends with
    ends = set()
    for br in spec.branches:
        fixed_end = [n for n in br.also if n in {f.conv for f in spec.fixed}]
        last = fixed_end[-1] if fixed_end else br.convs[-1]
        if fixed_end or spec.conv(last).group not in br.groups:
            ends.add(last)
    plan = []
    for c in (*spec.convs, *spec.fixed):
        m = model.get_submodule(c.conv)
        if not isinstance(m, nn.Conv2d):
            raise ValueError(
                f"{c.conv}: a {type(m).__name__} has no latency table (only convs are timed); "
                "for a latency budget describe the model without channel selections "
                "(preresnet164: select_inputs: false)"
            )
        prunable = hasattr(c, "bn")
        group = c.group if prunable else c.out_group  # a follower's output follows a group
        depthwise = (
            prunable and c.group == c.in_group and m.groups == m.in_channels == m.out_channels
        )
        if m.groups != 1 and not depthwise and (group is not None or c.in_group is not None):
            raise ValueError(f"{c.conv}: grouped convs other than depthwise have no latency table")
        op = ConvOp(
            tuple(m.kernel_size),
            tuple(m.stride),
            tuple(m.padding),
            tuple(m.dilation),
            m.bias is not None,
            in_hw[c.conv],
            depthwise,
            prunable,
            c.conv in ends,
            1 if depthwise else m.groups,
        )
        in_group = None if depthwise else c.in_group
        plan.append(
            (c.conv, group, in_group, m.in_channels, m.out_channels, op, when.get(c.conv, ()))
        )
    return spec, plan


@dataclass
class LatencyTable:
    """Per-layer tables plus the constant rest; `predict_ms` is the latency model."""

    layers: tuple[LayerTable, ...]
    model_ms: float  # measured, whole dense model
    rest_ms: float  # uncalibrated: model_ms - sum of the layers' dense entries; else fitted
    meta: dict[str, Any] = field(default_factory=dict)
    source: str = field(default="latency table", compare=False)  # the file, for messages
    _compiled: dict = field(default_factory=dict, repr=False, compare=False)
    scale: float = 1.0  # on the layers' sum; fitted to whole models when calibrated
    call_ms: float = 0.0  # per alive layer, on top of its scaled entry; fitted likewise
    weight_ms_per_mb: float = 0.0  # a layer costs at least its weights' MB times this

    spill_ms_per_mb: float = 0.0  # per MB of the model's weights, by how far they outgrow
    cache_mb: float = 0.0  # the cache they outgrow (`spill_fraction`); 0: no spill term

    @property
    def dense_predicted_ms(self) -> float:
        """The prediction at the dense widths (every layer at its last grid point, alive):
        what latency fractions are fractions of. model_ms itself when uncalibrated."""
        mb = [lt.weight_mb(lt.in_widths[-1], lt.out_widths[-1]) for lt in self.layers]
        return (self.rest_ms + self.call_ms * len(self.layers) + self.scale * sum(
            max(lt.ms[-1][-1], self.weight_ms_per_mb * m) for lt, m in zip(self.layers, mb, strict=True))
            + self.spill_ms(sum(mb)))

    def spill_ms(self, weights_mb):
        """What a model with `weights_mb` MB of conv weights pays for them coming from
        memory on every forward (a float, or a tensor of any float dtype)."""
        return self.spill_ms_per_mb * weights_mb * spill_fraction(weights_mb, self.cache_mb)

    @property
    def min_entry_ms(self) -> float:
        """The smallest time of an alive layer in the table (entries of 0 are removed ones)."""
        return min((v for lt in self.layers for row in lt.ms for v in row if v > 0), default=0.0)

    @property
    def min_call_ms(self) -> float:
        """The lowest `call_ms` that keeps the prediction monotone: every alive layer then
        adds at least 0 (a branch that comes back never predicts a faster model)."""
        return -self.scale * self.min_entry_ms

    # -- the latency model -------------------------------------------------------------
    def _compile(self, groups: Sequence[str], device, dtype) -> tuple[torch.Tensor, ...]:
        """Every layer's grid padded to one size: (L, I) and (L, O) grids, (L, I, O) times,
        index tensors into a width vector whose slot len(groups) holds the constant 1."""
        key = (tuple(groups), str(device), dtype)
        if key in self._compiled:
            return self._compiled[key]
        slot = {g: i for i, g in enumerate(groups)}
        one = len(groups)
        missing = sorted(
            {
                g
                for lt in self.layers
                for g in (lt.group, lt.in_group, *lt.when)
                if g is not None and g not in slot
            }
        )
        if missing:
            raise LatencyTableError(f"latency table: groups {missing} are not in the model")

        def axis(widths: tuple[int, ...]) -> list[float]:
            # a fixed width becomes a two-point axis (w, w + 1) with equal times
            return [float(w) for w in widths] if len(widths) > 1 else [widths[0], widths[0] + 1.0]

        n_i = max(max(len(lt.in_widths), 2) for lt in self.layers)
        n_o = max(max(len(lt.out_widths), 2) for lt in self.layers)
        L = len(self.layers)
        gi = torch.full((L, n_i), float("inf"), dtype=torch.float64)
        go = torch.full((L, n_o), float("inf"), dtype=torch.float64)
        tab = torch.zeros(L, n_i, n_o, dtype=torch.float64)
        last_i, last_o = torch.zeros(L, dtype=torch.long), torch.zeros(L, dtype=torch.long)
        k = max([len(lt.when) for lt in self.layers] + [1])
        when = torch.full((L, k), one, dtype=torch.long)
        in_slot, out_slot = torch.full((L,), one), torch.full((L,), one)
        in_scale, out_scale = torch.ones(L, dtype=torch.float64), torch.ones(L, dtype=torch.float64)
        mb = torch.tensor([lt.weight_mb_per_width for lt in self.layers], dtype=torch.float64)
        depthwise = torch.tensor([lt.op.depthwise for lt in self.layers])
        for row, lt in enumerate(self.layers):
            ai, ao = axis(lt.in_widths), axis(lt.out_widths)
            gi[row, : len(ai)], go[row, : len(ao)] = torch.tensor(ai), torch.tensor(ao)
            t = torch.tensor(lt.ms, dtype=torch.float64)
            t = t.expand(len(ai), len(ao)) if t.shape != (len(ai), len(ao)) else t
            tab[row, : len(ai), : len(ao)] = t
            last_i[row], last_o[row] = len(ai) - 2, len(ao) - 2  # the last cell's index
            if lt.in_group is None:
                in_scale[row] = lt.in_widths[0]
            else:
                in_slot[row] = slot[lt.in_group]
            if lt.group is None:
                out_scale[row] = lt.out_widths[0]
            else:
                out_slot[row] = slot[lt.group]
            when[row, : len(lt.when)] = torch.tensor([slot[g] for g in lt.when], dtype=torch.long)
        out = tuple(
            t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
            for t in (gi, go, tab, last_i, last_o, in_slot, out_slot, in_scale, out_scale, when,
                      mb, depthwise)
        )
        self._compiled[key] = out
        return out

    def layer_terms(self, widths: torch.Tensor, groups: Sequence[str]
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per layer at `widths` (a (G,) tensor in `groups` order): its interpolated table
        entry, or its weights' streaming time where that is more; its alive factor; and the
        MB of its weights: three (L,) tensors in the widths' float dtype."""
        w = widths if widths.is_floating_point() else widths.to(torch.float64)
        (gi, go, tab, last_i, last_o, in_slot, out_slot, in_scale, out_scale, when, mb,
         depthwise) = self._compile(groups, w.device, w.dtype)
        ext = torch.cat([w, w.new_ones(1)])  # (G + 1,)
        x, y = ext[in_slot] * in_scale, ext[out_slot] * out_scale  # (L,) each
        values = _bilinear(gi, go, tab, last_i, last_o, x, y)
        weights_mb = mb * torch.where(depthwise, y, x * y)
        if self.weight_ms_per_mb > 0.0:
            values = torch.maximum(values, self.weight_ms_per_mb * weights_mb)
        return values, ext.clamp(max=1.0)[when].prod(dim=1), weights_mb

    def predict_ms(self, widths: torch.Tensor, groups: Sequence[str]) -> torch.Tensor:
        """Predicted latency (ms) at `widths`, a (G,) tensor in `groups` order: float64 for
        integer widths (the hard form), differentiable in the dtype of float widths (the
        soft form)."""
        values, alive, weights_mb = self.layer_terms(widths, groups)
        return (self.rest_ms + (alive * (self.scale * values + self.call_ms)).sum()
                + self.spill_ms((alive * weights_mb).sum()))

    # -- checks and files ----------------------------------------------------------------
    def check_model(self, model: PrunableNet, input_size: tuple[int, int, int]) -> None:
        """The table must describe this (dense) model at this input size."""
        where = self.source
        shape = list(self.meta.get("input_shape", []))
        if shape != list(input_size):
            raise LatencyTableError(
                f"{where}: made for input shape {shape}, the model runs at "
                f"{list(input_size)}; rebuild it (stage profile_latency)"
            )
        _, plan = _layer_plan(model, input_size)
        have = {lt.conv: lt for lt in self.layers}
        want = {p[0] for p in plan}
        if set(have) != want:
            odd = sorted(set(have) ^ want)[:3]
            raise LatencyTableError(
                f"{where}: its layers differ from the model's (e.g. {odd}); "
                "made for another architecture?"
            )
        for name, group, in_group, d_in, d_out, op, _ in plan:
            lt = have[name]
            if (lt.group, lt.in_group, lt.op) != (group, in_group, op) or (
                lt.out_widths[-1],
                lt.in_widths[-1],
            ) != (d_out, d_out if op.depthwise else d_in):
                raise LatencyTableError(
                    f"{where}: layer {name} does not match the model (model {d_in}->{d_out} "
                    f"channels, table {lt.in_widths[-1]}->{lt.out_widths[-1]}; or its kernel, "
                    "stride or input size differ)"
                )

    def as_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "meta": self.meta, "model_ms": self.model_ms,
            "rest_ms": self.rest_ms, "scale": self.scale, "call_ms": self.call_ms,
            "weight_ms_per_mb": self.weight_ms_per_mb, "spill_ms_per_mb": self.spill_ms_per_mb,
            "cache_mb": self.cache_mb,
            "layers": [{**{k: v for k, v in asdict(lt).items() if k != "op"},
                        "op": asdict(lt.op)} for lt in self.layers],
        }  # fmt: skip

    @classmethod
    def from_dict(cls, d: Any, source: str = "latency table") -> LatencyTable:
        try:
            if d.get("format") != FORMAT:
                raise ValueError(f"not a {FORMAT} file")
            layers = []
            for x in d["layers"]:
                in_w, out_w = (
                    tuple(int(v) for v in x["in_widths"]),
                    tuple(int(v) for v in x["out_widths"]),
                )
                ms = tuple(tuple(float(v) for v in row) for row in x["ms"])
                if len(ms) != len(in_w) or any(len(r) != len(out_w) for r in ms):
                    raise ValueError(f"layer {x['conv']}: times do not fit its grid")
                if list(in_w) != sorted(set(in_w)) or list(out_w) != sorted(set(out_w)):
                    raise ValueError(f"layer {x['conv']}: grid not ascending")
                t = torch.tensor(ms, dtype=torch.float64)
                if not bool(torch.isfinite(t).all()) or not torch.equal(monotone(t), t):
                    raise ValueError(f"layer {x['conv']}: times not finite and monotone")
                layers.append(
                    LayerTable(
                        str(x["conv"]),
                        x["group"],
                        x["in_group"],
                        in_w,
                        out_w,
                        ms,
                        ConvOp.from_dict(x["op"]),
                        tuple(x.get("when", ())),
                    )
                )
            if not layers:
                raise ValueError("no layers")
            scale = float(d.get("scale", 1.0))  # tables made before calibration: 1
            if not scale >= 0.0:
                raise ValueError(f"scale {scale} is not >= 0")
            # older tables: 0 (the terms off)
            extra = {k: float(d.get(k, 0.0))
                     for k in ("weight_ms_per_mb", "spill_ms_per_mb", "cache_mb")}
            for k, v in extra.items():
                if not v >= 0.0:
                    raise ValueError(f"{k} {v} is not >= 0")
            table = cls(tuple(layers), float(d["model_ms"]), float(d["rest_ms"]),
                        dict(d["meta"]), source, scale=scale,
                        call_ms=float(d.get("call_ms", 0.0)), **extra)  # older tables: 0
            if not table.call_ms >= table.min_call_ms - 1e-12:
                raise ValueError(f"call_ms {table.call_ms} is below {table.min_call_ms} "
                                 "(a layer would cost less than nothing)")
            return table
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            raise LatencyTableError(f"{source}: not a latency table ({e})") from None

    def save(self, path: str | Path) -> None:
        from chipprune.atomic import write_json

        write_json(path, self.as_dict())


def load_table(path: str | Path) -> LatencyTable:
    path = Path(path)
    if not path.is_file():
        raise LatencyTableError(
            f"{path}: no such latency table; the profile_latency stage makes it "
            "(`dvc repro profile_latency` or `python -m stages.profile_latency ...`)"
        )
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise LatencyTableError(f"{path}: not a latency table ({e})") from None
    if isinstance(doc, dict) and doc.get("format") == NOT_PROFILED:
        raise LatencyTableError(
            f"{path}: not profiled ({doc.get('reason')}); list a latency budget in "
            "prune.budgets and `dvc repro` profiles it"
        )
    return LatencyTable.from_dict(doc, str(path))


TABLE_ROOT = Path("runs") / "latency"


def table_path(runtime: str, device: str, batch_size: int, dataset: str, model: str,
               root: str | Path = TABLE_ROOT) -> Path:
    """Where the profile_latency stage writes a table: keyed by runtime, device and batch."""
    return Path(root) / f"{runtime}-{device}-bs{batch_size}-{dataset}-{model}" / "table.json"


def table_for_budget(
    kind: str, path: str | Path | None, cfg: Any, dataset: str, model: str
) -> LatencyTable | None:
    """What a stage passes to `BudgetModel.from_model(..., latency=)`: for budget type
    latency, the table at `path` or else where profile_latency writes it for `cfg` (the
    params' `latency_budget`); for every other type None (no table is read)."""
    if kind != "latency":
        return None
    return load_table(path or table_path(cfg.runtime, cfg.device, cfg.batch_size, dataset, model))


def latency_budget_doc(table: LatencyTable | None, achieved: float) -> dict[str, Any]:
    """What a mask file's budget records beside type/target/achieved for a latency budget:
    the table it was met on and the predicted time at the table's device and batch size."""
    if table is None:
        return {}
    return {
        "table": table.source,
        "predicted_ms": achieved * table.dense_predicted_ms,
        "device": table.meta.get("device"),
        "batch_size": table.meta.get("batch_size"),
    }


def spill_fraction(weights_mb, cache_mb: float):
    """The share of a model's weights that come from memory on every forward, as a
    function of their MB: 0 up to three quarters of the cache, all of them from the cache's
    size on, linear between (continuous, so the soft form keeps a gradient; 0 everywhere
    with `cache_mb` 0). A forward reads every weight once, in the same order each time: once
    they outgrow the last-level cache, each is evicted before its next use. Measured here
    (32 MiB L3; VGG-16-BN at batch 1 in ONNX Runtime, whole models against their layers'
    lone sum at uniform widths): 24 MB of weights ran at their lone sum, 34, 47 and 59 MB
    0.026-0.031 ms per MB of their weights over it, about one read of memory."""
    if cache_mb <= 0.0:
        return weights_mb * 0.0
    ramp = (weights_mb - 0.75 * cache_mb) / (0.25 * cache_mb)
    return ramp.clamp(0.0, 1.0) if isinstance(ramp, torch.Tensor) else min(max(ramp, 0.0), 1.0)


def _bilinear(gi, go, tab, last_i, last_o, x, y) -> torch.Tensor:
    """Per layer l: the bilinear interpolation of tab[l] on the grid gi[l] x go[l] at
    (x[l], y[l]); outside the grid, the edge cell's plane (linear extrapolation)."""
    L = tab.shape[0]
    rows = torch.arange(L, device=tab.device)
    # cell: the last grid point <= the width, within [0, last]; exact at grid points
    i = torch.searchsorted(gi, x.detach().unsqueeze(1), right=True).squeeze(1) - 1
    j = torch.searchsorted(go, y.detach().unsqueeze(1), right=True).squeeze(1) - 1
    i = torch.minimum(i.clamp(min=0), last_i)
    j = torch.minimum(j.clamp(min=0), last_o)
    x0, x1 = gi[rows, i], gi[rows, i + 1]
    y0, y1 = go[rows, j], go[rows, j + 1]
    tx, ty = (x - x0) / (x1 - x0), (y - y0) / (y1 - y0)
    t00, t01 = tab[rows, i, j], tab[rows, i, j + 1]
    t10, t11 = tab[rows, i + 1, j], tab[rows, i + 1, j + 1]
    return (1 - tx) * ((1 - ty) * t00 + ty * t01) + tx * ((1 - ty) * t10 + ty * t11)
