"""The four models added after the first three families: ResNet-101, WRN-26-12 (ChipNet's wide
ResNet), MobileNetV2 for CIFAR (depthwise convs) and the pre-activation ResNet-164 (convs that
are described but never pruned). Exact params and MACs, budgets == counting, surgery ==
masking, removed residual branches, and the errors for grouped convs."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from chipprune.budgets.counting import count_params, measure_cost
from chipprune.budgets.exact import BudgetModel
from chipprune.models import ModelSpec, PrunableConv, PrunableNet, create_model
from chipprune.models.mobilenetv2 import MobileNetV2
from chipprune.models.slicing import slice_plan
from chipprune.surgery.masking import apply_hard_masks
from chipprune.surgery.masks import kept_as_bool, masks_from_keep
from chipprune.surgery.rebuild import prune_model


def wrn_params(depth: int, k: int, classes: int) -> int:
    """Closed form: 3x3 stem (16) + BN; per block two 3x3 convs + BN, a 1x1 conv + BN
    shortcut where the width or stride changes (every stage's first block when k > 1)."""
    n, total, cin = (depth - 2) // 6, 3 * 16 * 9 + 2 * 16, 16
    for s, c in enumerate((16 * k, 32 * k, 64 * k)):
        total += 9 * cin * c + 2 * c + 9 * c * c + 2 * c  # block 0
        total += (cin * c + 2 * c) if (cin != c or s > 0) else 0  # its shortcut
        total += (n - 1) * 2 * (9 * c * c + 2 * c)
        cin = c
    return total + cin * classes + classes


def preresnet_params(depth: int, classes: int) -> int:
    """Closed form: 3x3 stem (no BN); per bottleneck bn1 (stream), 1x1 + BN, 3x3 + BN, 1x1
    (no BN), a 1x1 projection (no BN) in every stage's first block; final BN; fc."""
    n, total, cin = (depth - 2) // 9, 3 * 16 * 9, 16
    for p in (16, 32, 64):
        for b in range(n):
            total += 2 * cin + cin * p + 2 * p + 9 * p * p + 2 * p + p * 4 * p
            total += cin * 4 * p if b == 0 else 0
            cin = 4 * p
    return total + 2 * cin + cin * classes + classes


# name, kwargs, input (C, H, W), params, MACs (conv + FC), MACs with BN
FIGURES = [
    ("wrn26_12", {}, (3, 32, 32), 52_520_538, 7_543_905_792, 7_550_131_712),
    ("mobilenetv2_cifar", {}, (3, 32, 32), 2_236_682, 87_976_448, 91_256_320),
    ("resnet101", {}, (3, 224, 224), 44_549_160, 7_801_405_440, 7_833_869_312),
    ("preresnet164", {}, (3, 32, 32), 1_703_258, 247_646_720, 253_946_368),
    ("preresnet164", {"num_classes": 100}, (3, 32, 32), 1_726_388, 247_669_760, 253_969_408),
]


@pytest.mark.parametrize(
    "name,kw,size,params,macs,macs_bn",
    FIGURES,
    ids=["wrn26_12", "mobilenetv2_cifar", "resnet101", "preresnet164", "preresnet164-c100"],
)
def test_exact_figures_and_torch_flop_counter(name, kw, size, params, macs, macs_bn):
    model = create_model(name, **kw)
    counter = FlopCounterMode(display=False)
    with counter:  # one forward: our hooks and torch's counter see the same one
        cost = measure_cost(model, size)
    assert (cost.params, cost.macs, cost.macs_with_bn) == (params, macs, macs_bn)
    # no conv of these models has a bias: torch's 2 FLOPs per MAC are the whole count
    assert not any(m.bias is not None for m in model.modules() if isinstance(m, nn.Conv2d))
    assert counter.get_total_flops() == 2 * macs


def test_figures_against_published_and_closed_forms():
    # torchvision's ResNet-101; network slimming's PreResNet-164: 1.70M (CIFAR-10), 1.73M
    # (CIFAR-100); MobileNetV2 on CIFAR-10: 2.24M
    assert count_params(torchvision.models.resnet101()) == 44_549_160
    assert round(1_703_258 / 1e6, 2) == 1.70 and round(1_726_388 / 1e6, 2) == 1.73
    assert round(2_236_682 / 1e6, 2) == 2.24
    assert wrn_params(26, 12, 10) == 52_520_538
    assert preresnet_params(164, 10) == 1_703_258
    assert preresnet_params(164, 100) == 1_726_388
    for depth, k in ((14, 2), (20, 1), (26, 3)):  # k = 1: no shortcut conv in layer1
        assert count_params(create_model("wrn", depth=depth, widen_factor=k)) == (
            wrn_params(depth, k, 10)
        )


IMAGENET_SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                     (6, 160, 3, 2), (6, 320, 1, 1))  # fmt: skip


def test_mobilenetv2_is_torchvisions_with_the_cifar_strides():
    """With the ImageNet strides back (stem and 24-channel stage at 2) our MobileNetV2 is
    torchvision's: the same tensors in the same order, the same outputs, params and MACs
    (3,504,872 and 300.77M at 224x224)."""
    ours = MobileNetV2(IMAGENET_SETTINGS, num_classes=1000, stem_stride=2).eval()
    ref = torchvision.models.mobilenet_v2().eval()
    sd_ours, sd_ref = ours.state_dict(), ref.state_dict()
    assert [t.shape for t in sd_ours.values()] == [t.shape for t in sd_ref.values()]
    ours.load_state_dict(dict(zip(sd_ours, sd_ref.values(), strict=True)))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x))
    assert measure_cost(ours, (3, 224, 224)) == measure_cost(ref, (3, 224, 224))
    assert count_params(ours) == 3_504_872
    # the CIFAR variant differs only in those two strides: 32x32 ends at 4x4
    assert create_model("mobilenetv2_cifar", num_classes=1000).describe() == ours.describe()


def test_resnet101_loads_torchvision_weights():
    ref = torchvision.models.resnet101().eval()
    model = create_model("resnet101").eval()
    model.load_state_dict(ref.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x))


def test_group_layouts():
    spec = create_model("wrn26_12").describe()
    widths = spec.widths()
    assert widths["conv1"] == 16 and [widths[f"layer{s}"] for s in (1, 2, 3)] == [192, 384, 768]
    assert len(spec.branches) == 12 and len(widths) == 1 + 3 + 12
    assert spec.conv("layer1.0.shortcut.0").group == "layer1"  # 16 -> 192 needs a conv
    # widen factor 1: the stem joins layer1 (layer1.0 adds it unchanged)
    assert create_model("wrn", depth=14, widen_factor=1).describe().conv("conv1").group == "layer1"

    spec = create_model("mobilenetv2_cifar").describe()
    # the t = 1 block has no expand conv: its depthwise conv reads, and is in, the stem group
    assert spec.conv("layer1.0.conv2").group == spec.conv("layer1.0.conv2").in_group == "conv1"
    dw = spec.conv("layer2.0.conv2")
    assert dw.group == dw.in_group == "layer2.0.conv1" == spec.conv("layer2.0.conv1").group
    assert spec.conv("layer2.1.conv3").group == spec.conv("layer2.0.conv3").group == "layer2"
    # only blocks with a residual add (all but a stage's first) are removable
    assert [br.block for br in spec.branches][:3] == ["layer2.1", "layer3.1", "layer3.2"]
    assert len(spec.branches) == sum(n - 1 for _, _, n, _ in IMAGENET_SETTINGS) == 10
    assert spec.branches[0].groups == ("layer2.1.conv1",)
    assert len(spec.widths()) == 1 + 7 + 16 + 1  # stem, streams, expand groups, head

    # the ChipNet authors' PreResNet: per block a selection of the stream and two inner
    # groups, and the classifier's own selection
    spec = create_model("preresnet164").describe()
    widths = spec.widths()
    assert len(widths) == 3 * 54 + 1 and spec.classifier_in_group == "select"
    assert (widths["layer1.0.select"], widths["layer1.1.select"], widths["select"]) == (16, 64, 256)
    assert spec.conv("layer1.1.conv1").in_group == "layer1.1.select"
    assert [f.conv for f in spec.fixed[:3]] == ["conv1", "layer1.0.conv3", "layer1.0.downsample.0"]
    assert spec.fixed[1].in_group == "layer1.0.conv2"
    br = spec.branches[0]
    assert br.groups == br.convs == ("layer1.0.select", "layer1.0.conv1", "layer1.0.conv2")
    assert br.also == ("layer1.0.conv3",)
    # the inner-only variant
    spec = create_model("preresnet164", select_inputs=False).describe()
    assert len(spec.widths()) == 2 * 54 and spec.classifier_in_group is None
    assert spec.branches[0].also == ("layer1.0.bn1", "layer1.0.conv3")


def _randomise_bn(model: PrunableNet, masks, size, gen: torch.Generator) -> None:
    """BN statistics from one batch of noise through the MASKED model (so the kept channels
    stay alive and the outputs depend on the image), then a random affine: a wrongly sliced
    BN shows in the outputs."""
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: one batch sets the statistics
    handles = apply_hard_masks(model, kept_as_bool(masks, model.describe()))
    model.train()
    with torch.no_grad():
        model(torch.randn(8, *size, generator=gen, dtype=torch.float64))
        for m in bns:
            m.momentum = 0.1
            m.weight.copy_(0.5 + torch.rand(m.num_features, generator=gen))
            m.bias.copy_(0.2 * torch.randn(m.num_features, generator=gen))
    for h in handles:
        h.remove()
    model.eval()


def _random_keep(spec: ModelSpec, gen: torch.Generator, remove: int) -> dict[str, list[int]]:
    """Random kept sets (at least one channel each); every `remove`-th branch (from the
    second) loses one of its groups in turn (the last first), which removes the branch as
    a whole."""
    keep = {}
    for g, c in spec.widths().items():
        k = int(torch.randint(1, c + 1, (1,), generator=gen))
        keep[g] = sorted(torch.randperm(c, generator=gen)[:k].tolist())
    for i, br in enumerate(spec.branches[1::remove]):
        keep[br.groups[-1 - i % len(br.groups)]] = []
    return keep


# model, kwargs, input (C, H, W); the small inputs keep each case around a second
CASES = [  # wrn26_12 is this code at widen factor 12: tests/test_surgery.py covers it
    ("wrn", {}, (3, 16, 16)),
    ("wrn", {"depth": 14, "widen_factor": 1}, (3, 16, 16)),
    ("mobilenetv2_cifar", {}, (3, 16, 16)),
    ("resnet101", {}, (3, 32, 32)),
    ("preresnet164", {}, (3, 16, 16)),  # the authors': every BN gated (channel selections)
    ("preresnet164", {"select_inputs": False}, (3, 16, 16)),  # inner groups only
]
IDS = ["wrn-14-2", "wrn-14-1", "mobilenetv2_cifar", "resnet101", "preresnet164",
       "preresnet164-inner"]


@pytest.mark.parametrize("name,kw,size", CASES, ids=IDS)
def test_budget_counts_and_surgery_equals_masking(name, kw, size):
    """Random keep-masks with removed branches: the pruned model computes the hard-masked
    dense model's outputs (float64, exact up to rounding), and the hard budget equals
    counting.py on it."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    kwargs = {"num_classes": 5, **kw}
    dense = create_model(name, **kwargs).double().eval()
    spec = dense.describe()
    bm = BudgetModel.from_model(dense, size)  # checks the dense polynomial against counting
    keep = _random_keep(spec, gen, remove=3)
    m = masks_from_keep(name, kwargs, spec, keep, dataset="-", method="random", budget={
        "type": "channel", "target": 0.5, "achieved": None})  # fmt: skip
    _randomise_bn(dense, m, size, gen)
    pruned, pruned_kw = prune_model(dense, name, kwargs, m.kept)

    removed = {br.block for br in spec.branches} - {br.block for br in pruned.describe().branches}
    assert removed == {br.block for br in spec.branches[1::3]} and removed
    assert all(not pruned.get_submodule(b).has_branch for b in removed)

    x = torch.randn(3, *size, generator=gen, dtype=torch.float64)
    handles = apply_hard_masks(dense, kept_as_bool(m, spec))
    with torch.no_grad():
        masked, out = dense(x), pruned(x)
    for h in handles:
        h.remove()
    assert out.std(0).max() > 1e-3  # the outputs depend on the image
    assert (masked - out).abs().max() <= 1e-10 * max(1.0, out.abs().max().item())

    cost = measure_cost(pruned, size)
    widths = {g: len(k) for g, k in keep.items()}
    assert bm.cost("params", widths) == cost.params
    assert bm.cost("flops", widths) == cost.macs
    assert bm.cost("channel", widths) == sum(c.out_channels for c in pruned.describe().convs)
    assert measure_cost(create_model(name, **pruned_kw), size) == cost


def _block_output(name: str, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What a block without its branch must compute."""
    if name == "mobilenetv2_cifar":
        return x
    if name == "preresnet164":
        return x if block.downsample is None else block.downsample(x)
    return torch.relu(block.shortcut(x))  # post-activation (WRN)


@pytest.mark.parametrize(
    "name,kw,group,block",
    [
        ("wrn", {}, "layer2.0.conv1", "layer2.0"),  # with a shortcut conv
        ("wrn", {}, "layer2.1.conv1", "layer2.1"),
        ("mobilenetv2_cifar", {}, "layer3.2.conv1", "layer3.2"),
        ("preresnet164", {}, "layer2.0.conv2", "layer2.0"),  # with its projection
        ("preresnet164", {}, "layer2.3.conv1", "layer2.3"),
        ("preresnet164", {}, "layer2.4.select", "layer2.4"),  # conv1 reads no channel
        ("preresnet164", {"select_inputs": False}, "layer3.1.conv2", "layer3.1"),
    ],
)
def test_removed_branch_is_the_shortcut(name, kw, group, block):
    model = create_model(name, widths={group: 0}, **kw).eval()
    dense = create_model(name, **kw)
    assert len(model.describe().branches) == len(dense.describe().branches) - 1
    assert block not in {br.block for br in model.describe().branches}
    b = model.get_submodule(block)
    assert not b.has_branch and not any(isinstance(m, nn.BatchNorm2d) for m in b.children())
    cin = next(m for m in dense.get_submodule(block).modules() if isinstance(m, nn.Conv2d))
    x = torch.randn(2, cin.in_channels, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(b(x), _block_output(name, b, x))
    # and the whole model still runs and trains
    model.train()(torch.randn(2, 3, 16, 16)).sum().backward()
    # only a removable branch's groups may be empty (PreResNet: all but the classifier's)
    other = "select" if name == "preresnet164" else "layer1"
    if name != "preresnet164" or kw.get("select_inputs", True):
        with pytest.raises(ValueError, match=r"must be in \[1,"):
            create_model(name, widths={other: 0}, **kw)


def test_mobilenetv2_stage_first_blocks_cannot_vanish():
    with pytest.raises(ValueError, match=r"layer3.0.conv1.*must be in \[1,"):
        create_model("mobilenetv2_cifar", widths={"layer3.0.conv1": 0})


def test_depthwise_budget_is_linear_in_its_width():
    model = create_model("mobilenetv2_cifar")
    bm = BudgetModel.from_model(model, (3, 32, 32))
    dense = dict(bm.dense_widths)
    g = "layer4.1.conv1"  # 384 channels: expand 64 -> 384, depthwise, project 384 -> 64
    one = dict(dense, **{g: dense[g] - 1})
    two = dict(dense, **{g: dense[g] - 2})
    # one channel of the group: expand 64 + BN 2 + depthwise 9 + BN 2 + project 64 params;
    # MACs at 8x8: (64 + 9 + 64) * 64 (a quadratic depthwise term would differ per step)
    assert bm.cost("params", dense) - bm.cost("params", one) == 64 + 2 + 9 + 2 + 64
    assert bm.cost("params", one) - bm.cost("params", two) == 64 + 2 + 9 + 2 + 64
    assert bm.cost("flops", dense) - bm.cost("flops", one) == (64 + 9 + 64) * 64
    assert bm.cost("flops", one) - bm.cost("flops", two) == (64 + 9 + 64) * 64


class _Grouped(PrunableNet):
    """conv1 (3 -> 8) then a conv2 8 -> 8 with `groups`, described as its own group."""

    def __init__(self, groups: int, same_group: bool = False):
        super().__init__()
        self.conv1, self.bn1, self.relu1 = (
            nn.Conv2d(3, 8, 3, bias=False),
            nn.BatchNorm2d(8),
            nn.ReLU(),
        )
        self.conv2 = nn.Conv2d(8, 8, 3, groups=groups, bias=False)
        self.bn2, self.relu2 = nn.BatchNorm2d(8), nn.ReLU()
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(8, 2)
        g2 = "conv1" if same_group else "conv2"
        convs = (
            PrunableConv("conv1", "bn1", "conv1", None, "relu1"),
            PrunableConv("conv2", "bn2", g2, "conv1", "relu2"),
        )
        self._spec = ModelSpec(convs, (), "fc", g2)

    def forward(self, x):
        x = self.relu1(self.bn1(self.conv1(x)))
        return self.fc(self.pool(self.relu2(self.bn2(self.conv2(x)))).flatten(1))


@pytest.mark.parametrize(
    "groups,same_group", [(2, False), (2, True), (8, False)], ids=["g2", "g2-same", "dw-own-group"]
)
def test_grouped_convs_other_than_depthwise_are_refused(groups, same_group):
    model = _Grouped(groups, same_group)
    with pytest.raises(
        ValueError, match="conv2: grouped convs are not supported, except depthwise"
    ):
        BudgetModel.from_model(model, (3, 8, 8))
    pos = {g: torch.arange(w) for g, w in model.describe().widths().items()}
    with pytest.raises(
        ValueError, match="conv2: grouped convs are not supported, except depthwise"
    ):
        slice_plan(model, pos)
    # described as depthwise (its output group is its input group): accepted
    ok = _Grouped(8, same_group=True)
    assert BudgetModel.from_model(ok, (3, 8, 8)).dense["params"] == count_params(ok)
    assert slice_plan(ok, {"conv1": torch.arange(8)})["conv2.weight"][1:] == ()
