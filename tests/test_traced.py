"""Any CNN, traced: every family of torchvision that Torch-Pruning's own test prunes (and
ShuffleNet, its failure case), and a CNN of the user's own, described from the torch.fx
graph; surgery computes what the masked model does, the budgets are exact and met, CHIP and
ChipNet work on them and their checkpoints round-trip with weights_only."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from chipprune.budgets.counting import forward_zero_image, measure_cost
from chipprune.budgets.exact import BudgetModel
from chipprune.budgets.thresholding import keep_at_budget
from chipprune.config import ConfigError, parse_params
from chipprune.methods.chip import group_scores, score_channels
from chipprune.methods.gates import ChannelGates
from chipprune.models import create_model
from chipprune.surgery.masking import apply_hard_masks
from chipprune.surgery.rebuild import prune_model
from chipprune.training.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_pretrained,
    make_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
)
from tests.conftest import REPO

# ~60 s for the module (18 families, each traced, pruned and counted): queued among the heavy
# groups, not last, where it held one of the two workers while the other sat idle
pytestmark = pytest.mark.slow(cost=60)  # seconds alone, for test ordering

# builder -> image side (the smallest each runs at, at most 32; inception_v3 needs 75)
FAMILIES = {
    "alexnet": 64, "vgg11": 32, "vgg11_bn": 32, "resnet18": 32, "resnext50_32x4d": 32,
    "wide_resnet50_2": 32, "regnet_x_400mf": 32, "regnet_y_400mf": 32, "mobilenet_v2": 32,
    "mobilenet_v3_small": 32, "efficientnet_b0": 32, "efficientnet_v2_s": 32,
    "mnasnet0_5": 32, "densenet121": 32, "googlenet": 32, "inception_v3": 96,
    "squeezenet1_1": 32, "shufflenet_v2_x0_5": 32,
}  # fmt: skip
REFUSED = {"convnext_tiny": "no conv left to prune.*features.0.0: reaches permute"}  # LayerNorm and layer scale on every stream
OWN = "nets.small_cnn:build"
CLASSES = 5
RTOL = 1e-5  # max |masked - pruned| per unit of max |logit|, float32


def _kwargs(builder: str) -> dict:
    side = FAMILIES[builder]
    return {"num_classes": CLASSES, "in_channels": 3, **({"probe_size": side} if side > 64 else {})}


_CACHE: dict[str, nn.Module] = {}


@pytest.fixture(scope="module", params=list(FAMILIES))
def builder(request) -> str:
    """A family, as a module-scoped parameter: pytest then runs every test of one family
    before the next family's, so `dense` builds each model once, not once per test."""
    return request.param


def dense(builder: str) -> nn.Module:
    """The family's model at random weights, with non-trivial BN statistics (a wrongly
    sliced BN shows in the outputs), eval mode; built once per test process."""
    if builder not in _CACHE:
        torch.manual_seed(0)
        m = create_model(f"torchvision:{builder}", **_kwargs(builder)).eval()
        g = torch.Generator().manual_seed(1)
        for bn in m.modules():
            if isinstance(bn, nn.BatchNorm2d):
                c = bn.num_features
                bn.running_mean.copy_(0.1 * torch.randn(c, generator=g))
                bn.running_var.copy_(0.5 + torch.rand(c, generator=g))
                bn.weight.data.copy_(0.5 + torch.rand(c, generator=g))
                bn.bias.data.copy_(0.1 * torch.randn(c, generator=g))
        _CACHE.clear()  # one family at a time: the big ones hold hundreds of MB
        _CACHE[builder] = m
    return _CACHE[builder]


def random_keep(widths: dict[str, int], fraction: float, seed: int = 0) -> dict[str, list[int]]:
    g = torch.Generator().manual_seed(seed)
    return {k: sorted(torch.randperm(n, generator=g)[: max(1, int(n * fraction))].tolist())
            for k, n in widths.items()}


def as_bool(widths: dict[str, int], keep: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    return {k: torch.zeros(n, dtype=torch.bool).index_fill_(0, torch.tensor(keep[k]), True)
            for k, n in widths.items()}


def flop_counter_macs(model: nn.Module, side: int) -> int:
    """torch.utils.flop_counter's count, as MACs (it counts 2 per multiply-add) plus the conv
    bias adds our convention counts and it does not."""
    bias_adds = 0

    def on_conv(m, _inp, out):
        nonlocal bias_adds
        bias_adds += out.numel() if m.bias is not None else 0

    handles = [m.register_forward_hook(on_conv) for m in model.modules()
               if isinstance(m, nn.Conv2d)]
    try:
        with FlopCounterMode(display=False) as counter:
            forward_zero_image(model, (3, side, side))
    finally:
        for h in handles:
            h.remove()
    total = counter.get_total_flops()
    assert total % 2 == 0
    return total // 2 + bias_adds


def test_surgery_counting_and_checkpoint(builder, tmp_path):
    """Pruned = masked (eval, random BN), the count of the pruned model equals the budget
    polynomial and torch.utils.flop_counter, and the checkpoint rebuilds it (weights_only)."""
    model, side, name = dense(builder), FAMILIES[builder], f"torchvision:{builder}"
    spec = model.describe()
    widths = spec.widths()
    assert widths and all(c.group in widths for c in spec.convs)
    keep = random_keep(widths, 0.5)
    x = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(2))
    handles = apply_hard_masks(model, as_bool(widths, keep))
    try:
        with torch.no_grad():
            masked = model(x)
    finally:
        for h in handles:
            h.remove()
    pruned, kwargs = prune_model(model, name, _kwargs(builder), keep)
    with torch.no_grad():
        out = pruned.eval()(x)
    scale = max(1.0, masked.abs().max().item())
    assert (masked - out).abs().max().item() <= RTOL * scale

    budget = BudgetModel.from_model(model, (3, side, side))  # checks itself at dense widths
    cost = measure_cost(pruned, (3, side, side))
    kept = {g: len(k) for g, k in keep.items()}
    assert (budget.cost("params", kept), budget.cost("flops", kept)) == (cost.params, cost.macs)
    assert cost.params < budget.dense["params"]
    assert flop_counter_macs(model, side) == budget.dense["flops"]
    assert flop_counter_macs(pruned, side) == cost.macs

    save_checkpoint(make_checkpoint(pruned, name, kwargs), tmp_path / "ckpt.pt")
    raw = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert raw["model_kwargs"]["widths"] == kept
    rebuilt = model_from_checkpoint(load_checkpoint(tmp_path / "ckpt.pt")).eval()
    with torch.no_grad():
        assert torch.equal(rebuilt(x), out)


def test_budgets_met_by_surgery(builder):
    """channel, params and flops at 0.5 and 0.25: thresholding random scores meets each in
    [target, target + 0.01], as the pruned model counts it; where a target is below what
    the model can reach (its channels kept whole by pins), the smallest model is reached."""
    model, side, name = dense(builder), FAMILIES[builder], f"torchvision:{builder}"
    budget = BudgetModel.from_model(model, (3, side, side))
    widths = budget.dense_widths
    g = torch.Generator().manual_seed(3)
    scores = {k: torch.rand(n, generator=g) for k, n in widths.items()}
    smallest = {k: 1 for k in widths}
    for kind in ("channel", "params", "flops"):
        floor = budget.fraction(kind, smallest)
        for target in (0.5, 0.25):
            res = keep_at_budget(scores, budget, kind, target)
            kept = {k: torch.nonzero(v).flatten().tolist() for k, v in res.keep.items()}
            if kind == "channel":
                counted = budget.fraction(kind, {k: len(v) for k, v in kept.items()})
            else:
                pruned, _ = prune_model(model, name, _kwargs(builder), kept)
                cost = measure_cost(pruned, (3, side, side))
                counted = (cost.params if kind == "params" else cost.macs) / budget.dense[kind]
            assert counted == pytest.approx(res.achieved, abs=1e-12)
            if floor <= target:
                assert target <= counted <= target + 0.01, (kind, target, counted)
            else:
                assert counted == pytest.approx(floor, abs=1e-12), (kind, target, floor)


def test_chip_scores_and_chipnet_moves_every_group(builder):
    model, side = dense(builder), FAMILIES[builder]
    spec = model.describe()
    g = torch.Generator().manual_seed(4)
    batches = [torch.randint(0, 256, (2, 3, side, side), dtype=torch.uint8, generator=g)
               for _ in range(2)]
    per_conv = score_channels(model, batches, lambda x: x.float() / 255 - 0.5, spec)
    scores = group_scores(per_conv, spec)
    assert set(scores) == set(spec.widths())
    for k, s in scores.items():
        assert s.shape == (spec.widths()[k],) and bool(torch.isfinite(s).all()), k

    trained = create_model(f"torchvision:{builder}", **_kwargs(builder)).train()
    gates = ChannelGates.for_model(trained, generator=torch.Generator().manual_seed(5))
    before = {k: v.clone() for k, v in gates.all_zeta().items()}
    handles = gates.attach(trained)
    budget = BudgetModel.from_model(trained, (3, side, side))
    opt = torch.optim.Adam(gates.parameters(), lr=0.1)
    x = torch.randn(4, 3, side, side, generator=g)
    loss = F.cross_entropy(trained(x), torch.arange(4) % CLASSES)
    loss = loss + (budget.fraction("flops", gates.soft_counts()) - 0.5) ** 2
    loss.backward()
    opt.step()
    for h in handles:
        h.remove()
    moved = {k for k, v in gates.all_zeta().items() if not torch.equal(v, before[k])}
    assert moved == set(before)


@pytest.mark.parametrize("builder", REFUSED)
def test_a_family_with_nothing_prunable_is_refused_by_name(builder):
    with pytest.raises(ValueError, match=f"torchvision:{builder}.*{REFUSED[builder]}"):
        create_model(f"torchvision:{builder}", num_classes=CLASSES)


def _partition(spec, key) -> set[frozenset[str]]:
    out: dict[str, set[str]] = {}
    for c in spec.convs:
        out.setdefault(key(c), set()).add(c.conv.removeprefix("net."))
    return {frozenset(v) for v in out.values()}


def _reads(spec) -> dict[str, frozenset[str] | None]:
    """conv -> the convs of the group it reads (names without the traced prefix)."""
    members = {g: frozenset(c.conv.removeprefix("net.") for c in cs)
               for g, cs in spec.groups().items()}
    return {c.conv.removeprefix("net."): members.get(c.in_group) for c in spec.convs}


@pytest.mark.parametrize("hand, traced, kwargs", [
    ("resnet18", "torchvision:resnet18", {}),
    ("resnet56", "chipprune.models.resnet_cifar:resnet56", {"shortcut": "B"}),
    ("resnet50", "chipprune.models.resnet:resnet50", {}),
])
def test_traced_description_agrees_with_the_hand_written_one(hand, traced, kwargs):
    a = create_model(hand, num_classes=10, **kwargs).describe()
    b = create_model(traced, num_classes=10, **kwargs).describe()
    assert _partition(a, lambda c: c.group) == _partition(b, lambda c: c.group)
    assert _reads(a) == _reads(b)
    assert _partition(a, lambda c: c.score_at) == _partition(b, lambda c: c.score_at)
    assert {c.conv: c.bn for c in a.convs} == {
        c.conv.removeprefix("net."): c.bn.removeprefix("net.") for c in b.convs}
    assert (a.classifier, a.classifier_in_group is None) == (
        b.classifier.removeprefix("net."), b.classifier_in_group is None)


def test_the_users_own_cnn_is_described_exactly():
    """Residual add, concat, depthwise conv and SE block: the stream and the expansions are
    pruned; the concat's branches are kept whole; the SE excitation follows its group."""
    spec = create_model(OWN, num_classes=CLASSES, in_channels=1).describe()
    groups = {g: sorted(c.conv.removeprefix("net.") for c in cs)
              for g, cs in spec.groups().items()}
    assert groups == {
        "stem.0": ["block1.project.0", "stem.0"],
        "block1.expand.0": ["block1.depthwise.0", "block1.expand.0"],
        "down.mix.0": ["block2.project.0", "down.mix.0"],
        "block2.expand.0": ["block2.depthwise.0", "block2.expand.0"],
    }
    fixed = {f.conv.removeprefix("net."): (f.in_group, f.out_group) for f in spec.fixed}
    assert fixed == {
        "block1.se.reduce": ("block1.expand.0", None),
        "block1.se.expand": (None, "block1.expand.0"),
        "down.wide.0": ("stem.0", None),
        "down.narrow.0": ("stem.0", None),
        "block2.se.reduce": ("block2.expand.0", None),
        "block2.se.expand": (None, "block2.expand.0"),
    }
    assert (spec.classifier, spec.classifier_in_group, spec.in_channels) == (
        "net.fc", "down.mix.0", 1)
    assert create_model(OWN, num_classes=CLASSES).kept_whole == {
        "block1.se.reduce": "block1.se.reduce reads a pooled 1x1 map (a squeeze)",
        "down.wide.0": "reaches cat (node cat), which is not sliced",
        "down.narrow.0": "reaches cat (node cat), which is not sliced",
        "block2.se.reduce": "block2.se.reduce reads a pooled 1x1 map (a squeeze)",
    }


def test_the_users_own_cnn_prunes_exactly():
    model = create_model(OWN, num_classes=CLASSES, in_channels=1).eval()
    widths = model.describe().widths()
    keep = random_keep(widths, 0.4, seed=7)
    x = torch.randn(3, 1, 16, 16)
    handles = apply_hard_masks(model, as_bool(widths, keep))
    with torch.no_grad():
        masked = model(x)
    for h in handles:
        h.remove()
    pruned, _ = prune_model(model, OWN, {"num_classes": CLASSES, "in_channels": 1}, keep)
    with torch.no_grad():
        assert torch.allclose(pruned.eval()(x), masked, atol=1e-6)
    budget = BudgetModel.from_model(model, (1, 16, 16))
    cost = measure_cost(pruned, (1, 16, 16))
    kept = {k: len(v) for k, v in keep.items()}
    assert (budget.cost("params", kept), budget.cost("flops", kept)) == (cost.params, cost.macs)


def test_first_conv_is_adapted_to_the_datasets_channels():
    m = create_model("torchvision:resnet18", num_classes=CLASSES, in_channels=1)
    assert m.adapted_conv == "conv1" and m.describe().in_channels == 1
    assert m(torch.zeros(2, 1, 32, 32)).shape == (2, CLASSES)
    own = create_model(OWN, num_classes=CLASSES, in_channels=1)  # takes in_channels itself
    assert own.adapted_conv is None


def test_pretrained_weights_load_with_a_new_classifier_and_stem(tmp_path):
    import torchvision

    torch.manual_seed(0)
    source = torchvision.models.resnet18(num_classes=1000)
    torch.save(source.state_dict(), tmp_path / "resnet18.pth")
    m = create_model("torchvision:resnet18", num_classes=CLASSES, in_channels=1)
    report = load_pretrained(m, tmp_path / "resnet18.pth")
    assert sorted(report["reinitialised"]) == ["net.conv1.weight", "net.fc.bias", "net.fc.weight"]
    assert report["unused"] == [] and report["loaded"] == len(m.state_dict()) - 3
    assert torch.equal(m.get_submodule("net.layer1.0.conv1").weight, source.layer1[0].conv1.weight)

    # a tensor of another shape anywhere else is an error naming it; so is code in the file
    bad = source.state_dict()
    bad["layer1.0.conv1.weight"] = bad["layer1.0.conv1.weight"][:, :10]
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match="layer1.0.conv1.weight"):
        load_pretrained(create_model("torchvision:resnet18", num_classes=CLASSES), tmp_path / "bad.pth")
    torch.save({"state_dict": source.state_dict(), "hook": print}, tmp_path / "code.pth")
    with pytest.raises(CheckpointError, match="weights_only"):
        load_pretrained(m, tmp_path / "code.pth")


@pytest.mark.parametrize("arch, message", [
    ("torchvision:resnet_nine", "torchvision has no classification model 'resnet_nine'"),
    ("no_such_module_here:build", "cannot import module 'no_such_module_here'"),
    ("nets.small_cnn:nothing", "has no attribute 'nothing'"),
    ("nets.small_cnn:__doc__", "is a str, not a callable"),
    ("torch:zeros", "returned a Tensor, not an nn.Module|rejected its arguments"),
    ("torch.nn:Linear", "rejected its arguments"),
    ("tests.test_traced:not_a_module", "returned a list, not an nn.Module"),
    ("torchvision:convnext_tiny", "no conv left to prune"),
    ("tests.test_traced:untraceable", "torch.fx cannot trace"),
])
def test_bad_arch_is_a_params_error_naming_the_key(arch, message):
    raw = {"datasets": {"d": {"source": "digits"}}, "models": {"m": {"arch": arch}},
           "dense": {"datasets": ["d"], "models": ["m"]}}
    with pytest.raises(ConfigError, match=f"models.m: .*({message})"):
        parse_params(raw)


def not_a_module(num_classes: int = 10) -> list:
    return [num_classes]


def untraceable(num_classes: int = 10) -> nn.Module:
    """A network whose forward branches on a tensor's value: torch.fx cannot trace it."""

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)
            self.fc = nn.Linear(8, num_classes)

        def forward(self, x):
            y = self.conv(x)
            if y.sum() > 0:
                y = -y
            return self.fc(y.mean((2, 3)))

    return Branchy()


def test_weights_must_be_a_file(tmp_path):
    raw = {"datasets": {"d": {"source": "digits"}},
           "models": {"m": {"arch": OWN, "weights": str(tmp_path / "none.pt")}},
           "dense": {"datasets": ["d"], "models": ["m"]}}
    with pytest.raises(ConfigError, match="models.m: .*weights: .* is not a file"):
        parse_params(raw)


def test_nets_folder_is_a_dependency_of_every_stage_that_builds_a_model():
    import yaml

    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    builders = [k for k, s in stages.items()
                if "chipprune/models" in (s.get("deps") or s.get("do", {}).get("deps", []))]
    assert builders
    for k in builders:
        deps = stages[k].get("deps") or stages[k]["do"]["deps"]
        assert "nets" in deps, k


def test_train_dense_starts_from_pretrained_weights(tmp_path, mlflow_store, monkeypatch, capsys):
    """The stage loads `models.<name>.weights` before training (at lr 1e-12 the trained
    conv is the file's), records the file's sha256 in the run; a file that does not fit is
    exit 2 naming the tensor, with no output written."""
    import json

    import torchvision
    import yaml

    from chipprune.data import prepare_dataset, save_prepared
    from stages import train_dense
    from stages._common import run_main

    monkeypatch.chdir(tmp_path)
    spec = {"channels": 3, "classes": CLASSES, "train": 16, "test": 4}
    save_prepared(prepare_dataset("synthetic", image_size=32, val_size=4, synthetic=spec),
                  tmp_path / "data")
    torch.manual_seed(0)
    source = torchvision.models.resnet18(num_classes=1000)
    torch.save(source.state_dict(), tmp_path / "resnet18.pth")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["datasets"] = {"syn": {"source": "synthetic", "synthetic": spec, "image_size": 32,
                                  "val_size": 4}}
    params["models"] = {"tv": {"arch": "torchvision:resnet18", "weights": "resnet18.pth"}}
    params["dense"] = {"datasets": ["syn"], "models": ["tv"]}
    params["train_dense"].update(epochs=1, batch_size=8, device="cpu",
                                 optimizer={"lr": 1e-12, "momentum": 0.0, "weight_decay": 0.0})
    params["train_dense"]["schedule"] = {"kind": "cosine"}
    for key in ("prune", "chip_rates", "transfer"):
        params.pop(key, None)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    rc = run_main(train_dense.main, ["syn", "tv", "data", "out", "--params", "params.yaml"])
    assert rc == 0, capsys.readouterr().err
    n = len(source.state_dict()) - 2  # all but the classifier (5 classes, not 1000)
    assert (f"tv: {n} tensors from resnet18.pth, re-initialised ['net.fc.weight', "
            "'net.fc.bias'], 0 unused") in capsys.readouterr().out
    ckpt = torch.load(tmp_path / "out/checkpoint.pt", weights_only=True)
    w = ckpt["state_dict"]["net.layer1.0.conv1.weight"]
    assert torch.allclose(w, source.layer1[0].conv1.weight.detach(), atol=1e-6)
    assert len(ckpt["config"]["model"]["weights_sha256"]) == 64
    assert json.loads((tmp_path / "out/mlflow_run.json").read_text())["run_id"]

    bad = source.state_dict()
    bad["layer2.0.conv1.weight"] = bad["layer2.0.conv1.weight"][:5]
    torch.save(bad, tmp_path / "resnet18.pth")
    rc = run_main(train_dense.main, ["syn", "tv", "data", "out2", "--params", "params.yaml"])
    assert rc == 2
    assert "layer2.0.conv1.weight" in capsys.readouterr().err
    assert not (tmp_path / "out2").exists()


def test_stochastic_depth_stays_a_call_so_it_reads_the_mode_when_run():
    """torchvision's StochasticDepth branches on self.training inside its forward: traced
    through, eval mode would be frozen in; kept a call, the traced model still drops rows
    in training."""
    from torchvision.ops import StochasticDepth

    from chipprune.models.traced.graph import trace

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.drop = StochasticDepth(0.5, "row")

        def forward(self, x):
            return self.drop(self.conv(x))

    gm = trace(Net())
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["conv", "drop"]
    torch.manual_seed(0)
    out = gm.train()(torch.ones(64, 3, 5, 5))
    dropped = (out.flatten(1).abs().sum(1) == 0).sum().item()
    assert 0 < dropped < 64  # rows dropped at run time, not all
