"""CHIP: channel independence against its definition (random, degenerate and real post-ReLU
maps), the streaming scorer, group sums, the authors' rate strings and layouts (exact
published parameter / MAC counts), and top-k selection."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from chipprune.budgets.counting import measure_cost
from chipprune.budgets.rates import parse_rates, rates_to_widths
from chipprune.data import prepare_dataset
from chipprune.methods.chip import (
    group_scores,
    score_channels,
    select_top,
)
from chipprune.methods.chip_ci import channel_independence, ci_definition, ci_gram
from chipprune.models import create_model
from chipprune.training.sources import DeviceData

TOL = 1e-9


def rel_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max over images of max_i |ours_i - ref_i| / max_i |ref_i| (0 for all-zero images)."""
    scale = ref.abs().amax(-1).clamp_min(torch.finfo(torch.float64).tiny)
    return ((ours - ref).abs().amax(-1) / scale).max().item()


def assert_matches_definition(maps: torch.Tensor, ranking: bool = True) -> None:
    ours, ref = channel_independence(maps), ci_definition(maps)
    assert ours.dtype == torch.float64 and ours.shape == maps.shape[:2]
    assert rel_error(ours, ref) <= TOL
    if ranking:
        order = torch.argsort(ours, dim=-1, stable=True)
        assert torch.equal(order, torch.argsort(ref, dim=-1, stable=True))


def relu_gauss(*shape: int, seed: int = 0, shift: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.relu(torch.randn(*shape, generator=g, dtype=torch.float64) - shift)


@pytest.mark.parametrize(
    "c,hw", [(1, 9), (3, 1), (5, 40), (16, 64), (24, 24), (32, 16), (40, 7), (64, 16)]
)
def test_ci_matches_definition_on_random_maps(c, hw):
    assert_matches_definition(relu_gauss(3, c, hw, seed=c * 100 + hw))


def degenerate_maps() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)

    def pos(*s: int) -> torch.Tensor:
        return torch.rand(*s, generator=g, dtype=torch.float64)

    zero_rows = relu_gauss(2, 24, 30, seed=2)
    zero_rows[:, ::3] = 0.0  # dead channels
    wide_zero = relu_gauss(2, 48, 12, seed=3)
    wide_zero[:, 1::4] = 0.0
    lone = relu_gauss(8, 40, 10, seed=4)  # C > HW, rows 7-9 alone at pixels 0-2: leverage one
    lone[:, :, :3] = 0.0
    lone[:, [7, 8, 9], [0, 1, 2]] = pos(8, 3) * 3
    scaled = relu_gauss(2, 24, 40, seed=5) * torch.logspace(-8, 0, 24, dtype=torch.float64)[:, None]
    orthogonal = torch.zeros(2, 12, 30, dtype=torch.float64)  # equal singular values
    orthogonal[:, torch.arange(12), torch.arange(12)] = 1.0
    orthogonal[:, 0, 20] = 0.5
    return {
        "zero_rows": zero_rows,
        "zero_rows_c_gt_hw": wide_zero,
        "low_rank": pos(2, 24, 3) @ pos(2, 3, 40),  # rank 3, non-negative like a ReLU map
        "low_rank_c_gt_hw": pos(2, 48, 4) @ pos(2, 4, 10),
        "leverage_one_row": lone,
        "sparse": relu_gauss(2, 32, 25, seed=6, shift=2.0),
        "dynamic_range": scaled,
        "repeated_singular_values": orthogonal,
    }


@pytest.mark.parametrize("name", sorted(degenerate_maps()))
def test_ci_matches_definition_on_degenerate_maps(name):
    maps = degenerate_maps()[name]
    # exact ties (equal rows, equal singular values) are ordered by rounding in both methods
    assert_matches_definition(maps, ranking=name != "repeated_singular_values")


def test_ci_exact_special_values():
    maps = relu_gauss(2, 6, 20, seed=7)
    maps[:, 2] = 0.0
    ci = channel_independence(maps)
    assert torch.all(ci[:, 2] == 0.0)  # a zero row is exactly 0, not rounding noise
    assert torch.all(ci >= 0)
    assert torch.equal(channel_independence(torch.zeros(2, 5, 9)), torch.zeros(2, 5).double())
    one = relu_gauss(3, 1, 11, seed=8)  # a single channel: CI = its row's norm
    torch.testing.assert_close(channel_independence(one)[:, 0], one[:, 0].norm(dim=-1))
    # orthogonal rows: CI = each row's norm
    diag = torch.diag(torch.tensor([3.0, 1.0, 2.0], dtype=torch.float64))[None]
    torch.testing.assert_close(channel_independence(diag)[0], diag[0].diagonal())


def test_ci_input_forms():
    maps = relu_gauss(2, 8, 4, 5, seed=9)
    ci = channel_independence(maps)
    assert torch.equal(ci, channel_independence(maps.flatten(2)))
    as_f32 = maps.float()
    torch.testing.assert_close(
        channel_independence(as_f32), channel_independence(as_f32.double()), rtol=0, atol=0
    )
    with pytest.raises(ValueError, match="float"):
        channel_independence(torch.ones(1, 2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="shape"):
        channel_independence(torch.ones(2, 3))
    with pytest.raises(ValueError, match="NaN"):
        channel_independence(torch.full((1, 2, 3), float("nan")))


def test_gram_route_is_exact_only_on_full_rank_maps():
    """Why `channel_independence` does not use eigvalsh of the Gram matrix."""
    full_rank = relu_gauss(2, 12, 30, seed=10)
    assert rel_error(ci_gram(full_rank), ci_definition(full_rank)) <= TOL
    low_rank = degenerate_maps()["low_rank"]
    assert rel_error(ci_gram(low_rank), ci_definition(low_rank)) > 100 * TOL


@pytest.fixture(scope="module")
def digits():
    return prepare_dataset("digits", image_size=32)


def post_relu_maps(model, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """score_at module -> its output for the batch x, collected explicitly."""
    maps: dict[str, torch.Tensor] = {}
    handles = [
        model.get_submodule(name).register_forward_hook(
            lambda _m, _i, out, name=name: maps.__setitem__(name, out.detach().clone())
        )
        for name in {c.score_at for c in model.describe().convs}
    ]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return maps


def test_ci_matches_definition_on_real_post_relu_maps(digits):
    torch.manual_seed(0)
    model = create_model("resnet20", in_channels=1).eval()
    data = DeviceData.from_split(digits.splits["train"], digits.meta, torch.device("cpu"))
    x = data.normalise(data.images[:4])  # (4, 1, 32, 32)
    maps = post_relu_maps(model, x)
    # the maps at 16 x 16 (C > HW at the last stage) come from the same model at half size
    small = post_relu_maps(model, torch.nn.functional.avg_pool2d(x, 2))
    picked = {
        "stem 16x1024": maps["relu"],
        "layer2 32x256": maps["layer2.0.relu1"],
        "layer3 64x64": maps["layer3.0.relu2"],
        "layer2 32x64": small["layer2.0.relu1"],
        "layer3 64x16": small["layer3.0.relu1"],
    }
    zero_rows = rank_deficient = 0
    for maps_ in picked.values():
        a = maps_.flatten(2).double()
        zero_rows += int((a.abs().amax(-1) == 0).sum())
        rank_deficient += int((torch.linalg.matrix_rank(a) < a.shape[1]).sum())
        assert_matches_definition(maps_)
    assert zero_rows > 0 and rank_deficient > 0  # the hard cases really occur


@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_score_channels_streams_what_explicit_maps_give(digits, shortcut):
    torch.manual_seed(1)
    model = create_model("resnet20", in_channels=1, shortcut=shortcut)
    model.train()
    spec = model.describe()
    data = DeviceData.from_split(digits.splits["val"], digits.meta, torch.device("cpu"))
    images = data.images[:10]
    batches = [images[:4], images[4:8], images[8:]]
    scores = score_channels(model, batches, data.normalise, spec)

    assert model.training and all(not m._forward_hooks for m in model.modules())
    model.eval()
    maps = post_relu_maps(model, data.normalise(images))
    assert set(scores) == {c.conv for c in spec.convs}
    for c in spec.convs:
        expected = channel_independence(maps[c.score_at]).mean(0)
        assert scores[c.conv].dtype == torch.float64
        torch.testing.assert_close(scores[c.conv], expected, rtol=1e-12, atol=0)


def test_score_channels_rejects_a_score_at_that_runs_twice(digits):
    model = create_model("resnet20", in_channels=1)
    data = DeviceData.from_split(digits.splits["val"], digits.meta, torch.device("cpu"))
    forward = model.forward
    model.forward = lambda x: (forward(x), forward(x))[1]
    with pytest.raises(ValueError, match="once per forward"):
        score_channels(model, [data.images[:2]], data.normalise, model.describe())
    assert all(not m._forward_hooks for m in model.modules())


def test_group_scores_sum_each_map_once():
    model = create_model("resnet20", in_channels=1, shortcut="B")
    spec = model.describe()
    per_conv = {c.conv: torch.rand(c.out_channels, dtype=torch.float64) for c in spec.convs}
    groups = group_scores(per_conv, spec)
    assert set(groups) == set(spec.groups())
    blocks = [per_conv[f"layer2.{b}.conv2"] for b in range(3)]
    # layer2.0.shortcut.0 scores at layer2.0.relu2 like layer2.0.conv2: counted once
    torch.testing.assert_close(groups["layer2"], blocks[0] + blocks[1] + blocks[2])
    torch.testing.assert_close(
        groups["layer1"], per_conv["conv1"] + sum(per_conv[f"layer1.{b}.conv2"] for b in range(3))
    )
    assert torch.equal(groups["layer1.0.conv1"], per_conv["layer1.0.conv1"])


def test_group_scores_normalised_weighs_every_map_the_same():
    model = create_model("resnet20", in_channels=1, shortcut="B")
    spec = model.describe()
    g = torch.Generator().manual_seed(0)
    per_conv = {c.conv: torch.rand(c.out_channels, generator=g, dtype=torch.float64)
                for c in spec.convs}
    # the deepest block's map at 1000x the scale: a plain sum follows it alone
    per_conv["layer2.2.conv2"] = per_conv["layer2.2.conv2"] * 1000
    plain = group_scores(per_conv, spec, "sum")
    norm = group_scores(per_conv, spec, "normalised")
    blocks = [per_conv[f"layer2.{b}.conv2"] for b in range(3)]
    torch.testing.assert_close(norm["layer2"], sum(m / m.mean() for m in blocks))
    assert norm["layer2"].mean().item() == pytest.approx(3.0)  # one per map
    assert torch.equal(plain["layer2"].argsort(), (blocks[0] + blocks[1] + blocks[2]).argsort())
    # one map per group: the same channel order either way
    one = "layer1.0.conv1"
    assert torch.equal(norm[one].argsort(), plain[one].argsort())
    torch.testing.assert_close(norm[one], per_conv[one] / per_conv[one].mean())
    per_conv["layer3.0.conv1"] = torch.zeros_like(per_conv["layer3.0.conv1"])  # a dead map
    assert torch.equal(group_scores(per_conv, spec, "normalised")["layer3.0.conv1"],
                       per_conv["layer3.0.conv1"])
    with pytest.raises(ValueError, match="combine must be one of"):
        group_scores(per_conv, spec, "max")


def test_parse_rates():
    assert parse_rates("[0.]+[0.15]*2+[0.4]*27") == [0.0] + [0.15] * 2 + [0.4] * 27
    assert parse_rates(" [0.1, .2] + [1e-1] * 3 ") == [0.1, 0.2, 0.1, 0.1, 0.1]
    assert parse_rates([0, 0.5]) == [0.0, 0.5]
    for text, piece in [
        ("[0.1]*2+__import__('os')", "__import__('os')"),
        ("[0.1]**2", "[0.1]**2"),
        ("[0.1]*2.5", "[0.1]*2.5"),
        ("0.1*[2]", "0.1*[2]"),
        ("[0.1]+", ""),
        ("[a]", "[a]"),
    ]:
        with pytest.raises(ValueError, match=re.escape(f"bad rates term {piece!r}")):
            parse_rates(text)
    with pytest.raises(ValueError, match="in \\[0, 1\\)"):
        parse_rates("[0.2]+[1.0]")
    with pytest.raises(ValueError, match="in \\[0, 1\\)"):
        parse_rates([-0.1])
    with pytest.raises(ValueError, match="numbers"):
        parse_rates([True])


@pytest.mark.parametrize(
    "rates,params,macs",
    [
        ("[0.]+[0.15]*2+[0.4]*27", 485_413, 65_168_128),
        ("[0.]+[0.4]*2+[0.5]*9+[0.6]*9+[0.7]*9", 240_793, 34_197_184),
    ],
)
def test_rates_to_widths_gives_the_published_resnet56_counts(rates, params, macs):
    widths = rates_to_widths(create_model("resnet56").describe(), rates, "resnet56")
    assert widths["layer3"] == 64 and widths["conv1"] == 16  # stem rate 0, last stream dense
    cost = measure_cost(create_model("resnet56", widths=widths), (3, 32, 32))
    assert (cost.params, cost.macs) == (params, macs)


def test_rates_to_widths_layouts_and_errors():
    spec56 = create_model("resnet56").describe()
    with pytest.raises(ValueError, match="resnet56 takes 30 rates"):
        rates_to_widths(spec56, [0.1] * 29, "resnet56")
    spec110 = create_model("resnet110").describe()
    with pytest.raises(ValueError, match="resnet110 takes 57 rates"):
        rates_to_widths(spec110, "[0.]+[0.15]*2+[0.4]*27", "resnet110")
    vgg = create_model("vgg16_bn").describe()
    w12 = rates_to_widths(vgg, [0.5] * 12, "vgg16_bn")
    assert w12["features.conv16"] == 512 and w12["features.conv0"] == 32
    assert rates_to_widths(vgg, [0.5] * 13, "vgg16_bn")["features.conv16"] == 256
    with pytest.raises(ValueError, match="vgg16_bn takes 13 rates, or 12"):
        rates_to_widths(vgg, [0.5] * 11, "vgg16_bn")
    spec50 = create_model("resnet50").describe()
    w50 = rates_to_widths(spec50, "[0.]+[0.5]*3+[0.6]*16", "resnet50")
    assert (w50["conv1"], w50["layer1"], w50["layer3"], w50["layer4"]) == (64, 128, 512, 2048)
    assert w50["layer1.0.conv1"] == w50["layer1.0.conv2"] == 25  # int(64 * 0.4)
    assert w50["layer4.2.conv1"] == w50["layer4.2.conv2"] == 204  # layer4's blocks: pruned
    with pytest.raises(ValueError, match=re.escape(
            "resnet50 takes 20 rates (1 stem, 3 stage streams, 16 bottlenecks), got 19")):
        rates_to_widths(spec50, "[0.]+[0.5]*3+[0.6]*15", "resnet50")
    with pytest.raises(ValueError, match="no CHIP rate layout"):
        rates_to_widths(spec56, [0.1] * 30, "resnet18")
    spec_b = create_model("resnet20", shortcut="B").describe()  # stem coupled to layer1
    assert rates_to_widths(spec_b, "[0.2]*2+[0.4]*10", "resnet20")["layer1"] == 12
    with pytest.raises(ValueError, match="two rates"):
        rates_to_widths(spec_b, "[0.]+[0.2]+[0.4]*10", "resnet20")


def test_select_top_breaks_ties_by_lower_index():
    scores = {
        "a": torch.tensor([1.0, 3.0, 3.0, 2.0, 3.0]),
        "b": torch.tensor([0.0, 0.0, 0.0]),
    }
    assert select_top(scores, {"a": 2, "b": 2}) == {"a": [1, 2], "b": [0, 1]}
    assert select_top(scores, {"a": 4}) == {"a": [1, 2, 3, 4]}
    with pytest.raises(ValueError, match="width"):
        select_top(scores, {"b": 4})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_ci_on_cuda_matches_definition():
    for c, hw in [(16, 256), (64, 16), (32, 64)]:
        maps = relu_gauss(8, c, hw, seed=c + hw)
        maps[:, ::5] = 0.0
        ours = channel_independence(maps.float().cuda())
        assert ours.device.type == "cuda" and ours.dtype == torch.float64
        ref = ci_definition(maps.float())
        assert rel_error(ours.cpu(), ref) <= TOL
        assert torch.equal(
            ours.cpu().argsort(dim=-1, stable=True), ref.argsort(dim=-1, stable=True)
        )


def test_scoring_points_are_the_authors():
    """CHIP's authors score VGG-16-BN's 12 pruned convs at features[2, 6, 9, 13, 16, 19, 23,
    26, 29, 33, 36, 39] (a conv followed by a max-pool after the pool), and ResNet-50's stem
    after its max-pool."""
    vgg = create_model("vgg16_bn")
    index = {f"features.{name}": i for i, (name, _) in enumerate(vgg.features.named_children())}
    points = [index[c.score_at] for c in vgg.describe().convs]
    assert points[:12] == [2, 6, 9, 13, 16, 19, 23, 26, 29, 33, 36, 39]
    assert all(isinstance(vgg.get_submodule(c.score_at), nn.MaxPool2d)
               for c in vgg.describe().convs if index[c.score_at] in (6, 13, 23, 33))
    assert create_model("resnet50").describe().convs[0].score_at == "maxpool"
    assert create_model("resnet50", cifar_stem=True).describe().convs[0].score_at == "relu"


def test_score_channels_stage_combines_as_params_say(tmp_path, mlflow_store):
    """The stage honours `chip.combine`: its groups are group_scores of its own per-conv CI
    with that combination, and scores.json says which."""
    import json

    import yaml

    from chipprune.data import save_prepared
    from chipprune.training.checkpoint import make_checkpoint, save_checkpoint
    from stages import score_channels
    from tests.conftest import REPO

    save_prepared(prepare_dataset("digits", image_size=16), tmp_path / "data")
    kwargs = {"num_classes": 10, "in_channels": 1, "shortcut": "A"}
    model = create_model("resnet20", **kwargs)
    save_checkpoint(make_checkpoint(model, "resnet20", kwargs), tmp_path / "dense.pt")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["chip"].update(batches=1, batch_size=8)
    groups = {}
    for combine in ("sum", "normalised"):
        params["chip"]["combine"] = combine
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
        out = tmp_path / combine
        score_channels.main(["digits", "resnet20", str(tmp_path / "dense.pt"),
                             str(tmp_path / "data"), str(out), "--params",
                             str(tmp_path / "params.yaml")])
        saved = json.loads((out / "scores.json").read_text())
        assert saved["combine"] == combine
        per_conv = {k: torch.tensor(v, dtype=torch.float64) for k, v in saved["convs"].items()}
        expected = group_scores(per_conv, model.describe(), combine)
        for g, v in saved["groups"].items():
            torch.testing.assert_close(torch.tensor(v, dtype=torch.float64), expected[g])
        groups[combine] = saved["groups"]
    assert groups["sum"]["layer2"] != groups["normalised"]["layer2"]
