"""Describe any traceable CNN from its torch.fx graph: the coupling groups, where each gate acts,
where CHIP scores, and what is never pruned.

Every tensor of the graph carries where its channels come from: a group (the output channels
of a conv, joined by every residual add or channel-wise product they meet) or nothing that
pruning touches (the image, a concat, anything we do not model). One rule keeps this exact:
a group whose channels reach an operation we cannot slice (a concat, a channel shuffle, a
grouped conv, a BN away from its conv, a per-channel parameter such as a layer scale, the
model's output) is *pinned*: it keeps every channel, and its convs become `FixedConv`s. So
every model is described, exactly; what a model loses to pins is only how much can be pruned.

A pruned channel must carry zeros wherever it is read, so the pruned model (which has no such
channel) computes what the masked one does: the gate acts on the BN after the conv (or the
conv where there is none), and a group's values stay zero through ReLU-like activations,
pooling, residual adds and products; a reader of values that are not zero there (after a
sigmoid, or a bias added) pins the group instead. A squeeze-and-excitation block's
excitation conv, whose output scales its input's channels, is a follower: sliced with that
group, never gated.
"""

from __future__ import annotations

import operator
import sys
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from chipprune.models.spec import FixedConv, ModelSpec, PrunableConv

TAPS = "chipprune_taps"  # the GraphModule's submodule holding the scoring taps

# channel-wise, f(0) = 0: activations (where CHIP scores) ...
ACTIVATION_MODULES = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish, nn.GELU, nn.LeakyReLU, nn.ELU,
                      nn.Mish, nn.Tanh, nn.Hardtanh)  # fmt: skip
ACTIVATION_FUNCTIONS = {F.relu, torch.relu, F.relu_, torch.relu_, F.relu6, F.silu, F.hardswish,
                        F.gelu, F.leaky_relu, F.elu, F.mish, F.hardtanh, torch.tanh}  # fmt: skip
ACTIVATION_METHODS = {"relu", "relu_", "tanh", "tanh_"}
# ... and what passes channels through unchanged in number and keeps zeros zero
PASS_MODULES = (nn.Dropout, nn.Dropout2d, nn.Identity, nn.MaxPool2d, nn.AvgPool2d,
                nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)  # fmt: skip
PASS_FUNCTIONS = {F.dropout, F.dropout2d, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d,
                  F.adaptive_max_pool2d, torch.mean, torch.amax, torch.sum}  # fmt: skip
PASS_METHODS = {"contiguous", "clone", "mean", "amax", "sum", "detach"}
# channel-wise but f(0) != 0: the result is no longer zero at a pruned channel
NONZERO_MODULES = (nn.Sigmoid, nn.Hardsigmoid)
NONZERO_FUNCTIONS = {torch.sigmoid, F.sigmoid, F.hardsigmoid}
NONZERO_METHODS = {"sigmoid", "sigmoid_"}
ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add, operator.sub, operator.isub, torch.sub}
ADD_METHODS = {"add", "add_", "sub", "sub_"}
MUL_FUNCTIONS = {operator.mul, operator.imul, torch.mul}
MUL_METHODS = {"mul", "mul_"}
FLATTEN_FUNCTIONS = {torch.flatten}
FLATTEN_METHODS = {"flatten", "view", "reshape"}
SHAPE_METHODS = {"size", "dim"}  # read the shape only: no channel value flows through


class TraceError(ValueError):
    """A network torch.fx cannot trace, or one with no conv left to prune."""


def _leaf_types() -> tuple[type, ...]:
    # torchvision's stochastic depth reads self.training inside its forward: traced through,
    # the flag would be frozen at trace time, so it stays a call. Looked up, not imported: a
    # model can only hold one once its module is loaded, and importing torchvision.ops costs
    # a second (it loads torch._dynamo) in every process tracing a network of its own
    loaded = sys.modules.get("torchvision.ops.stochastic_depth")
    return (loaded.StochasticDepth,) if loaded else ()


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, _leaf_types()) or super().is_leaf_module(m, qualname)


def trace(model: nn.Module) -> fx.GraphModule:
    """The model as a GraphModule with the same submodule names (traced in eval mode, so
    Python branches on `self.training` take their inference side, as ONNX export does)."""
    was_training = model.training
    model.eval()
    try:
        graph = _Tracer().trace(model)
    except Exception as e:  # fx raises TraceError, TypeError, NotImplementedError ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TraceError(f"torch.fx cannot trace {type(model).__name__}: {first}") from None
    finally:
        model.train(was_training)
    gm = fx.GraphModule(model, graph, type(model).__name__)
    gm.train(was_training)
    return gm


@dataclass
class _Value:
    group: int | None  # union-find id of the group its channels come from; None: fixed
    repeat: int = 1  # features per channel (a flattened map)
    zero: bool = True  # zero at a pruned channel (gated), so a reader may drop the channel


@dataclass
class _Conv:
    name: str
    node: fx.Node
    kind: str  # "member" (gated, in its group), "depthwise" (a member reading its own
    # group), "follower" (sliced with a group, never gated) or "fixed"
    group: int | None  # its output group (members, depthwise convs, followers)
    reads: int | None  # the group it reads (None: fixed input)
    bn: str | None = None  # the BN right after it, where the gate acts
    squeeze: bool = False  # reads a pooled 1x1 map: kept whole unless it is a follower


@dataclass
class _Analysis:
    parent: list[int] = field(default_factory=list)
    pinned: set[int] = field(default_factory=set)
    reasons: dict[int, str] = field(default_factory=dict)  # pinned root -> why, first reason
    convs: list[_Conv] = field(default_factory=list)
    values: dict[fx.Node, _Value | None] = field(default_factory=dict)
    kinds: dict[fx.Node, str] = field(default_factory=dict)  # for the scoring walk
    classifier: tuple[str, int, int] | None = None  # (linear, group, repeat)
    stem: str | None = None

    def new_group(self) -> int:
        self.parent.append(len(self.parent))
        return len(self.parent) - 1

    def find(self, g: int) -> int:
        while self.parent[g] != g:
            self.parent[g] = self.parent[self.parent[g]]
            g = self.parent[g]
        return g

    def union(self, a: int, b: int) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)
            if max(ra, rb) in self.pinned:
                self.pinned.add(min(ra, rb))
                self.reasons.setdefault(min(ra, rb), self.reasons.get(max(ra, rb), ""))
        return min(ra, rb)

    def pin(self, value: _Value | None, why: str = "") -> None:
        if value is not None and value.group is not None:
            self.pin_group(value.group, why)

    def pin_group(self, group: int, why: str) -> None:
        root = self.find(group)
        self.pinned.add(root)
        self.reasons.setdefault(root, why)

    def is_pinned(self, g: int | None) -> bool:
        return g is None or self.find(g) in self.pinned


def _shape(node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _where(node: fx.Node) -> str:
    """The node as a user reads it: the module's name, or the function or method called."""
    if node.op == "call_module":
        return str(node.target)
    target = getattr(node.target, "__name__", str(node.target))
    return f"{target} (node {node.name})"


def _category(node: fx.Node, gm: fx.GraphModule) -> str:
    """What the node does to channels: act, pass, nonzero, add, mul, flatten, shape,
    conv, bn, linear, module (other parameterised module) or other."""
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        if isinstance(m, nn.Conv2d):
            return "conv"
        if isinstance(m, nn.BatchNorm2d):
            return "bn"
        if isinstance(m, nn.Linear):
            return "linear"
        if isinstance(m, ACTIVATION_MODULES):
            return "act"
        if isinstance(m, nn.MaxPool2d | nn.AdaptiveMaxPool2d):
            return "maxpool"
        if isinstance(m, PASS_MODULES) or isinstance(m, _leaf_types()):
            return "pass"
        if isinstance(m, NONZERO_MODULES):
            return "nonzero"
        if isinstance(m, nn.Flatten):
            return "flatten"
        return "other"
    table = (
        (ACTIVATION_FUNCTIONS, ACTIVATION_METHODS, "act"),
        (PASS_FUNCTIONS, PASS_METHODS, "pass"),
        (NONZERO_FUNCTIONS, NONZERO_METHODS, "nonzero"),
        (ADD_FUNCTIONS, ADD_METHODS, "add"),
        (MUL_FUNCTIONS, MUL_METHODS, "mul"),
        (FLATTEN_FUNCTIONS, FLATTEN_METHODS, "flatten"),
        ((), SHAPE_METHODS, "shape"),
    )
    for functions, methods, kind in table:
        if (node.op == "call_function" and node.target in functions) or (
            node.op == "call_method" and node.target in methods
        ):
            if kind == "pass" and node.target in (F.max_pool2d, torch.amax, "amax"):
                return "maxpool"
            return kind
    if node.op == "call_function" and node.target is getattr:
        return "shape"  # x.shape, x.ndim ...
    return "other"


def _analyse(gm: fx.GraphModule) -> _Analysis:
    a = _Analysis()
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    for node in gm.graph.nodes:
        kind = _category(node, gm) if node.op != "placeholder" else "input"
        a.kinds[node] = kind
        ins = [a.values.get(n) for n in node.all_input_nodes]
        is_tensor = _shape(node) is not None
        out: _Value | None = _Value(None) if is_tensor else None
        if node.op in ("placeholder", "get_attr"):
            pass
        elif node.op == "output":
            for v in ins:
                a.pin(v, "reaches the network's output")  # never pruned
        elif kind == "conv":
            out = _conv(a, gm, node, ins[0], calls)
        elif kind == "bn":
            x = ins[0]
            owner = next((c for c in a.convs if c.node is node.args[0]), None)
            if owner is not None and owner.bn == node.target:
                out = _Value(x.group)  # the gate acts here: zero at pruned channels
            else:
                a.pin(x, f"normalised by {_where(node)} away from its conv")
        elif kind == "linear":
            x = ins[0]
            if x is not None and x.group is not None:
                # the first linear reader of zero-at-pruned values, called once (a flatten
                # already checked its inputs are channel-major blocks of `repeat`)
                if a.classifier is None and x.zero and calls[node.target] == 1:
                    a.classifier = (node.target, x.group, x.repeat)
                else:
                    a.pin(x, f"read by another linear layer, {_where(node)}")
        elif kind in ("act", "pass", "maxpool") and ins and ins[0] is not None:
            out = _Value(ins[0].group, ins[0].repeat, ins[0].zero)
            others = [v for v in ins[1:] if v is not None and v.group is not None]
            for v in others:  # a group in an extra argument: not modelled
                a.pin(v, f"an extra argument of {_where(node)}")
            shape_in, shape_out = _shape(node.all_input_nodes[0]), _shape(node)
            if ins[0].group is not None and (
                shape_out is None or shape_in is None or shape_out[:2] != shape_in[:2]
            ):
                a.pin(ins[0], f"reduced over channels by {_where(node)}")
                out = _Value(None) if is_tensor else None
        elif kind == "nonzero" and ins and ins[0] is not None:
            out = _Value(ins[0].group, ins[0].repeat, zero=False)
        elif kind in ("add", "mul"):
            out = _binary(a, node, kind, ins)
        elif kind == "flatten":
            out = _flatten(a, node, ins)
        elif kind == "shape":
            pass  # x.size(), x.shape: no channel value flows
        else:
            for v in ins:
                a.pin(v, f"reaches {_where(node)}, which is not sliced")
        a.values[node] = out
    return a


def _conv(a: _Analysis, gm: fx.GraphModule, node: fx.Node, x: _Value, calls) -> _Value:
    m = gm.get_submodule(node.target)
    name = node.target
    if a.stem is None and node.args[0].op == "placeholder":
        a.stem = name
    depthwise = m.groups == m.in_channels == m.out_channels and m.groups > 1
    if calls[name] > 1 or (m.groups != 1 and not (depthwise and x.group is not None)):
        why = "a conv used twice" if calls[name] > 1 else "a grouped conv"
        a.pin(x, f"read by {why}, {name}")  # channels kept whole on both sides
        a.convs.append(_Conv(name, node, "fixed", None, None))
        return _Value(None)
    users = list(node.users)
    bn = None
    if len(users) == 1 and _category(users[0], gm) == "bn" and calls[users[0].target] == 1:
        bn_module = gm.get_submodule(users[0].target)
        if bn_module.affine and bn_module.track_running_stats:
            bn = users[0].target
    if depthwise:  # channel i reads only input channel i: in the group it reads
        a.convs.append(_Conv(name, node, "depthwise", x.group, x.group, bn))
        return _Value(x.group, zero=bn is None)
    if x.group is not None and (not x.zero or x.repeat != 1):
        # its input is not zero at a pruned channel: it may not drop one
        a.pin(x, f"read by {name} after an op that maps zero elsewhere (a sigmoid, a + c)")
    shape_in = _shape(node.args[0])
    squeeze = shape_in is not None and len(shape_in) == 4 and shape_in[2] * shape_in[3] == 1
    group = a.new_group()
    a.convs.append(_Conv(name, node, "member", group, x.group, bn, squeeze))
    return _Value(group, zero=bn is None)


def _binary(a: _Analysis, node: fx.Node, kind: str, ins: list[_Value | None]) -> _Value | None:
    tensors = [v for v in ins if v is not None]
    if _shape(node) is None:
        return None
    if len(tensors) == 1:  # with a number: x + c is not zero at a pruned channel, c * x is
        (v,) = tensors
        constant = [arg for arg in node.args if not isinstance(arg, fx.Node)]
        if not constant and len(node.all_input_nodes) > 1:  # a non-tensor node (a size)
            a.pin(v, f"combined with a non-tensor value by {_where(node)}")
            return _Value(None)
        return _Value(v.group, v.repeat, zero=v.zero and kind == "mul")
    if len(tensors) != 2:
        for v in tensors:
            a.pin(v, f"one of several operands of {_where(node)}")
        return _Value(None)
    (x, y), (nx, ny) = tensors, node.all_input_nodes[:2]
    if x.group is None and y.group is None:
        return _Value(None)
    sx, sy = _shape(nx), _shape(ny)
    if (x.group is None or y.group is None or x.repeat != 1 or y.repeat != 1 or sx is None
            or sy is None or len(sx) != 4 or len(sy) != 4 or sx[1] != sy[1]):
        why = (f"combined at {_where(node)} with channels kept whole"
               if (x.group is None) != (y.group is None) else
               f"{_where(node)} with a per-channel constant (a layer scale) or another shape")
        a.pin(x, why)
        a.pin(y, why)
        return _Value(None)
    if kind == "mul" and (sx[2] * sx[3] == 1) != (sy[2] * sy[3] == 1):
        scale = x if sx[2] * sx[3] == 1 else y  # (N, C, 1, 1) scaling a (N, C, H, W) map
        root = a.find(scale.group)
        for c in a.convs:
            if c.kind == "member" and c.group is not None and a.find(c.group) == root:
                if c.bn is not None:
                    why = f"scaled at {_where(node)} by a conv with a BN ({c.name})"
                    a.pin(x, why)
                    a.pin(y, why)
                    return _Value(None)
                c.kind = "follower"
    group = a.union(x.group, y.group)
    zero = (x.zero or y.zero) if kind == "mul" else (x.zero and y.zero)
    return _Value(group, zero=zero)


def _flatten(a: _Analysis, node: fx.Node, ins: list[_Value | None]) -> _Value | None:
    x = ins[0] if ins else None
    if x is None or x.group is None:
        return _Value(None) if _shape(node) is not None else None
    s_in, s_out = _shape(node.all_input_nodes[0]), _shape(node)
    if s_in is not None and s_out == s_in:
        return _Value(x.group, x.repeat, x.zero)
    if (s_in is not None and s_out is not None and len(s_in) == 4 and len(s_out) == 2
            and x.repeat == 1 and s_out[0] == s_in[0] and s_out[1] == s_in[1] * s_in[2] * s_in[3]):
        return _Value(x.group, s_in[2] * s_in[3], x.zero)  # channel-major: (C, H, W) -> C*H*W
    a.pin(x, f"reshaped by {_where(node)} other than a flatten of (C, H, W)")
    return _Value(None)


def _score_node(a: _Analysis, gate: fx.Node) -> fx.Node:
    """Where CHIP scores a gate's channels: after the activation that follows it (through a
    residual add first; then a max-pool right after it, as the CHIP authors score VGG),
    else where the chain of single uses ends (a linear bottleneck's add)."""
    cur, activated = gate, False
    while len(cur.users) == 1:
        user = next(iter(cur.users))
        kind = a.kinds.get(user)
        if kind == "act" and not activated:
            cur, activated = user, True
        elif kind == "maxpool" and activated:
            return user
        elif kind == "add" and not activated and a.values.get(user) is not None and (
                a.values[user].group is not None):
            cur = user
        elif kind == "pass" and not activated and user.op == "call_module" and isinstance(
                user.graph.owning_module.get_submodule(user.target), nn.Dropout | nn.Identity):
            cur = user
        else:
            break
    return cur


@dataclass(frozen=True)
class Described:
    spec: ModelSpec
    stem: str  # the conv the image feeds
    kept_whole: dict[str, str]  # conv -> why its channels are pinned (convs that are not
    # followers, grouped or shared, whose group reaches something that cannot be sliced)


def describe_graph(gm: fx.GraphModule, example: torch.Tensor, prefix: str) -> Described:
    """The description of the traced network, with scoring taps (nn.Identity) inserted into
    `gm`; names in the description are qualified with `prefix` (the GraphModule's name in
    its parent), those of `stem` and `kept_whole` are not."""
    was_training = gm.training
    gm.eval()  # eval-mode BN: a one-image probe is fine, no statistic changes
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(example)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TraceError(
            f"the network does not run on a {tuple(example.shape[1:])} probe image "
            f"(set the model kwarg probe_size to a side it takes): {first}"
        ) from None
    finally:
        gm.train(was_training)
    a = _analyse(gm)
    for c in a.convs:  # a gated conv reading a pooled 1x1 map (an SE block's squeeze) has
        if c.kind == "member" and c.squeeze:  # no map for CHIP to score: kept whole
            a.pin_group(c.group, f"{c.name} reads a pooled 1x1 map (a squeeze)")
    if a.stem is None:
        raise TraceError("no nn.Conv2d reads the image")
    live = [c for c in a.convs if c.kind in ("member", "depthwise") and not a.is_pinned(c.group)]
    kept_whole = {c.name: a.reasons.get(a.find(c.group), "")
                  for c in a.convs if c.kind in ("member", "depthwise") and c not in live}
    if not live:
        first = "; ".join(f"{k}: {v}" for k, v in list(kept_whole.items())[:3])
        raise TraceError(
            "no conv left to prune: every conv's channels reach something kept whole "
            f"(a concat, a grouped conv, a normalisation or scale away from its conv, the "
            f"output), e.g. {first}"
        )
    # group names: the first conv of each group, in forward order
    names: dict[int, str] = {}
    for c in live:
        names.setdefault(a.find(c.group), c.name)

    def group_of(g: int | None) -> str | None:
        return None if a.is_pinned(g) else names.get(a.find(g))

    # where each conv is scored, found before the taps go in (the walk would meet them)
    score = {c.name: _score_node(a, next(iter(c.node.users)) if c.bn else c.node) for c in live}
    taps = {node: f"{TAPS}.{node.name}" for node in dict.fromkeys(score.values())}
    gm.add_submodule(TAPS, nn.Module())
    for node, target in taps.items():
        gm.add_submodule(target, nn.Identity())
        with gm.graph.inserting_after(node):
            tap = gm.graph.call_module(target, (node,))
        node.replace_all_uses_with(tap, delete_user_cb=lambda user, tap=tap: user is not tap)
    gm.recompile()

    convs, fixed = [], []
    for c in a.convs:
        group = group_of(c.group)
        reads = group_of(c.reads)
        if c in live:
            convs.append(PrunableConv(
                conv=prefix + c.name, bn=prefix + (c.bn or c.name), group=group,
                in_group=reads, score_at=prefix + taps[score[c.name]],
            ))
        else:
            fixed.append(FixedConv(
                conv=prefix + c.name, in_group=reads,
                out_group=group if c.kind == "follower" else None,
            ))
    classifier, classifier_group, repeat = "", None, 1
    if a.classifier is not None:
        name, g, repeat = a.classifier
        classifier, classifier_group = prefix + name, group_of(g)
        repeat = repeat if classifier_group is not None else 1
    spec = ModelSpec(
        convs=tuple(convs), channel_maps=(), classifier=classifier,
        classifier_in_group=classifier_group, in_channels=int(example.shape[1]),
        fixed=tuple(fixed), classifier_repeat=repeat,
    )
    return Described(spec, a.stem, kept_whole)

