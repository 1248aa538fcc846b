"""Every registered model: shapes, gradients, a `describe()` that matches its module tree,
reduced widths, rebuild from plain kwargs, option-A channel maps, torch-pruning coupling."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
import torch_pruning as tp
import torchvision
from torch import nn

from chipprune.models import ChannelMapShortcut, ChannelSelect, create_model, list_models

MODELS = list_models()
# every family and shortcut kind the registry offers
VARIANTS = [(n, {}) for n in MODELS] + [
    ("resnet20", {"shortcut": "B"}),
    ("resnet18", {"cifar_stem": True}),
    ("resnet50", {"cifar_stem": True, "stem_pool": True}),  # the ChipNet authors' CIFAR net
    ("preresnet164", {"select_inputs": False}),  # gates the blocks' inner channels only
]
IDS = [n + "".join(f"-{k}={v}" for k, v in kw.items()) for n, kw in VARIANTS]


ACTS = (nn.ReLU, nn.ReLU6)  # MobileNetV2 uses ReLU6
# where channels are scored: an activation, or an nn.Identity tap on a linear bottleneck
SCORE_AT = (*ACTS, nn.Identity, nn.MaxPool2d)


def _named(model: nn.Module) -> dict[str, nn.Module]:
    return dict(model.named_modules())


def _forward_backward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.train()
    out = model(x)
    out.square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    return out


def test_registry_lists_every_family():
    expected = {"resnet20", "resnet32", "resnet56", "resnet110", "vgg16_bn", "resnet18", "resnet50"}
    expected |= {"resnet101", "wrn26_12", "wrn", "mobilenetv2_cifar", "preresnet164"}
    assert set(MODELS) == expected


def test_unknown_model_names_the_known_ones():
    with pytest.raises(ValueError, match="resnet56"):
        create_model("resnet57")


@pytest.mark.parametrize("name", MODELS)
def test_unknown_group_in_widths_is_an_error(name):
    with pytest.raises(ValueError, match="unknown groups"):
        create_model(name, widths={"no.such.group": 3})


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("in_channels,size", [(1, 16), (3, 32)])
def test_output_shape_finite_and_backward(name, in_channels, size):
    torch.manual_seed(0)
    model = create_model(name, num_classes=7, in_channels=in_channels)
    out = _forward_backward(model, torch.randn(2, in_channels, size, size))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name,kw", VARIANTS, ids=IDS)
def test_describe_matches_module_tree(name, kw):
    model = create_model(name, in_channels=1, **kw)
    spec, mods = model.describe(), _named(model)
    widths = spec.widths()
    assert spec.in_channels == 1
    # every conv of the model is described exactly once (prunable, or fixed: never pruned)
    all_convs = [n for n, m in mods.items() if isinstance(m, nn.Conv2d | ChannelSelect)]
    assert sorted(c.conv for c in (*spec.convs, *spec.fixed)) == sorted(all_convs)
    assert bool(spec.fixed) == (name == "preresnet164")
    for f in spec.fixed:  # its outputs are never pruned; its input may be
        conv = mods[f.conv]
        assert isinstance(conv, nn.Conv2d) and conv.groups == 1, f
        assert f.in_group is None or conv.in_channels == widths[f.in_group], f
    selections = [c for c in spec.convs if isinstance(mods[c.conv], ChannelSelect)]
    for c in spec.convs:
        conv, bn, relu = mods[c.conv], mods[c.bn], mods[c.score_at]
        assert isinstance(conv, nn.Conv2d | ChannelSelect) and isinstance(bn, nn.BatchNorm2d), c
        assert isinstance(relu, SCORE_AT), c
        assert conv.out_channels == bn.num_features == c.out_channels == widths[c.group], c
        if c.in_group is not None:  # else the image, or a stream that is never pruned
            assert conv.in_channels == widths[c.in_group], c
    # the ChipNet authors' PreResNet gates every BN: a block's bn1 and the final bn select
    # their reader's stream channels (54 blocks + 1), 12,112 gates in all
    authors_preresnet = name == "preresnet164" and kw.get("select_inputs", True)
    assert len(selections) == (55 if authors_preresnet else 0)
    assert all(c.in_group is None for c in selections)
    if authors_preresnet:
        assert sum(widths.values()) == 12112
        assert spec.classifier_in_group == "select"
    elif name == "preresnet164":
        assert sum(widths.values()) == 4032
    # the stem is the first conv with an unpruned input (fixed convs first), fed by the image
    stem = next(c for c in (*spec.fixed, *spec.convs) if c.in_group is None)
    assert stem.conv == ("features.conv0" if name == "vgg16_bn" else "conv1")
    assert mods[stem.conv].in_channels == 1
    unpruned_in = [c.conv for c in spec.convs if c.in_group is None and c not in selections]
    if not spec.fixed:  # the stem is the only one
        assert unpruned_in == [stem.conv]
    elif authors_preresnet:  # the blocks' conv1 read their selection
        assert unpruned_in == []
    else:  # PreResNet: the blocks' conv1 read the (unpruned) stream
        assert all(n.endswith(".conv1") for n in unpruned_in) and len(unpruned_in) == 54
    fc = mods[spec.classifier]
    assert isinstance(fc, nn.Linear)
    assert fc is next(m for m in model.modules() if isinstance(m, nn.Linear))
    if spec.classifier_in_group is not None:  # else it reads a stream that is never pruned
        assert fc.in_features == widths[spec.classifier_in_group]
    for cm in spec.channel_maps:
        sc = mods[cm.module]
        assert isinstance(sc, ChannelMapShortcut)
        assert (sc.in_channels, sc.out_channels) == (widths[cm.in_group], widths[cm.out_group])
        assert (sc.offset, sc.stride) == (cm.offset, cm.stride)
    assert bool(spec.channel_maps) == (
        name.startswith("resnet")
        and name not in ("resnet18", "resnet50", "resnet101")
        and kw.get("shortcut") != "B"
    )


@pytest.mark.parametrize("name,kw", VARIANTS, ids=IDS)
def test_every_relu_is_its_own_module_called_once_and_scores_its_conv(name, kw):
    model = create_model(name, **kw).eval()
    relus = [m for _, m in model.named_modules(remove_duplicate=False) if isinstance(m, ACTS)]
    assert len({id(m) for m in relus}) == len(relus)
    mods = _named(model)
    taps = {mods[c.score_at] for c in model.describe().convs} - set(relus)
    # no other kind of scoring module: an Identity tap, or the max-pool right after a ReLU
    assert all(type(m) in (nn.Identity, nn.MaxPool2d) for m in taps)
    relus += list(taps)
    calls: dict[nn.Module, list[torch.Size]] = {m: [] for m in relus}
    handles = [m.register_forward_hook(lambda m, i, o: calls[m].append(o.shape)) for m in relus]
    with torch.no_grad():
        model(torch.zeros(1, 3, 16, 16))
    for h in handles:
        h.remove()
    assert all(len(shapes) == 1 for shapes in calls.values())
    mods = _named(model)
    for c in model.describe().convs:  # the scoring map has this conv's channels
        assert calls[mods[c.score_at]][0][1] == c.out_channels, c


EXPECTED_GROUPS = {  # a few exact group layouts, with the stem's group and the biggest group
    ("resnet20", "A"): ("conv1", ["layer1", "layer2", "layer3"], 1 + 3 + 9),
    ("resnet20", "B"): ("layer1", ["layer1", "layer2", "layer3"], 3 + 9),
    ("resnet18", None): ("layer1", [f"layer{s}" for s in range(1, 5)], 4 + 8),
    ("resnet50", None): ("conv1", [f"layer{s}" for s in range(1, 5)], 1 + 4 + 2 * 16),
}


@pytest.mark.parametrize("key", EXPECTED_GROUPS, ids=lambda k: f"{k[0]}-{k[1]}")
def test_group_names(key):
    name, shortcut = key
    stem_group, streams, n_groups = EXPECTED_GROUPS[key]
    model = create_model(name, **({"shortcut": shortcut} if shortcut else {}))
    groups = model.describe().groups()
    assert model.describe().conv("conv1").group == stem_group
    assert len(groups) == n_groups
    assert all(s in groups for s in streams)
    singletons = [g for g in groups if g not in streams and g != "conv1"]
    assert all(groups[g][0].conv == g and len(groups[g]) == 1 for g in singletons)
    assert "layer1.0.conv1" in singletons


@pytest.mark.parametrize("name,kw", VARIANTS, ids=IDS)
def test_halved_widths_build_run_and_are_described(name, kw):
    dense = create_model(name, **kw).describe().widths()
    half = {g: max(1, w // 2) for g, w in dense.items()}
    model = create_model(name, widths=half, **kw)
    assert model.describe().widths() == half
    out = _forward_backward(model, torch.randn(2, 3, 16, 16))
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name,kw", VARIANTS, ids=IDS)
def test_rebuild_from_plain_kwargs(name, kw):
    dense = create_model(name, **kw).describe().widths()
    groups = list(dense)
    widths = {g: dense[g] - 1 for g in groups[::3]}
    kept = {groups[1]: list(range(1, dense[groups[1]]))[::2]}  # original indices 1, 3, 5, ...
    kwargs = json.loads(json.dumps({"num_classes": 4, "widths": widths, "kept": kept, **kw}))
    torch.manual_seed(0)
    a = create_model(name, **kwargs).eval()
    b = create_model(name, **kwargs).eval()
    b.load_state_dict(a.state_dict())
    assert b.describe() == a.describe()
    assert b.describe().widths()[groups[1]] == len(kept[groups[1]])
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


def test_widths_and_kept_must_agree():
    with pytest.raises(ValueError, match="kept"):
        create_model("resnet20", widths={"layer1": 4}, kept={"layer1": [0, 1, 2]})
    with pytest.raises(ValueError, match="kept"):
        create_model("resnet20", kept={"layer1": [0, 16]})


def test_channel_map_dense_is_the_classic_option_a_pad():
    x = torch.randn(2, 16, 8, 8)
    sc = ChannelMapShortcut(list(range(16)), list(range(32)), offset=8, stride=2)
    torch.testing.assert_close(sc(x), F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 8, 8)))
    same = ChannelMapShortcut(list(range(16)), list(range(16)), offset=0, stride=1)
    assert same.identity and same(x) is x


def test_channel_map_with_kept_indices_exact():
    # input keeps original channels 1, 4, 7 of 16; output keeps 0, 9, 12, 20 of 32; offset 8:
    # out orig 9 <- in orig 1 (pos 0), out orig 12 <- in orig 4 (pos 1); orig 7 -> 15 is dropped
    sc = ChannelMapShortcut([1, 4, 7], [0, 9, 12, 20], offset=8, stride=2)
    x = torch.arange(3 * 16, dtype=torch.float32).reshape(1, 3, 4, 4)
    y = sc(x)
    assert y.shape == (1, 4, 2, 2)
    sub = x[:, :, ::2, ::2]
    expected = torch.stack([torch.zeros(2, 2), sub[0, 0], sub[0, 1], torch.zeros(2, 2)])
    torch.testing.assert_close(y[0], expected)


def test_model_wires_kept_indices_into_its_channel_maps():
    kept = {"layer1": [2, 5, 9, 15], "layer2": [7, 10, 13, 31]}
    model = create_model("resnet20", kept=kept)
    # layer2.0: out orig 10 <- in orig 2 (pos 0), out orig 13 <- in orig 5 (pos 1)
    assert model.layer2[0].shortcut.index.tolist() == [4, 0, 1, 4]  # 4 = the zero channel
    # inside layer1 the map is the identity on the kept channels
    assert model.layer1[1].shortcut.identity
    # stem (16, dense) -> layer1: kept originals 2, 5, 9, 15 are read from stem positions
    assert model.layer1[0].shortcut.index.tolist() == [2, 5, 9, 15]


def test_torchvision_state_dicts_load_into_dense_models():
    x = torch.randn(1, 3, 16, 16)
    for name in ("resnet18", "resnet50"):
        ref = getattr(torchvision.models, name)().eval()
        model = create_model(name).eval()
        model.load_state_dict(ref.state_dict())
        with torch.no_grad():
            torch.testing.assert_close(model(x), ref(x))


def _coupled_out_channels(graph: tp.DependencyGraph, conv: nn.Module, names) -> set[str]:
    group = graph.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=[0])
    return {
        names[dep.target.module]
        for dep, _ in group
        if isinstance(dep.target.module, nn.Conv2d) and graph.is_out_channel_pruning_fn(dep.handler)
    }


@pytest.mark.parametrize(
    "name,kw",
    [
        ("resnet20", {"shortcut": "B"}),
        ("resnet18", {}),
        ("resnet50", {}),
        ("vgg16_bn", {}),
        ("wrn", {}),
        ("wrn", {"widen_factor": 1}),
        ("mobilenetv2_cifar", {}),  # depthwise convs couple their input and output
        ("preresnet164", {}),
    ],
    ids=[
        "resnet20-B",
        "resnet18",
        "resnet50",
        "vgg16_bn",
        "wrn",
        "wrn-k1",
        "mobilenetv2",
        "preresnet",
    ],
)
def test_groups_equal_torch_pruning_dependencies(name, kw):
    model = create_model(name, **kw).eval()
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=torch.zeros(1, 3, 16, 16))
    names = {m: n for n, m in model.named_modules()}
    for group, convs in model.describe().groups().items():
        first = model.get_submodule(convs[0].conv)
        if isinstance(first, ChannelSelect):  # a selection: no conv output to couple
            continue
        found = _coupled_out_channels(graph, first, names)
        assert found == {c.conv for c in convs}, group
