"""Params and MACs against the published CHIP figures (DESIGN.md section 3), exactly, and
against torch's own FLOP counter for every registered model."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from chipprune.budgets.counting import count_macs, count_macs_with_bn, count_params, measure_cost
from chipprune.models import create_model, list_models


def chip_resnet_widths(depth: int, rates: list[float]) -> dict[str, int]:
    """CHIP's CIFAR ResNet rate list -> `widths`: stem, stage-1 and stage-2 streams (stage 3
    is never pruned), then one rate per block for its inner conv; width = int(C * (1 - r))."""
    n = (depth - 2) // 6
    assert len(rates) == 3 + 3 * n
    widths = {
        "conv1": int(16 * (1 - rates[0])),
        "layer1": int(16 * (1 - rates[1])),
        "layer2": int(32 * (1 - rates[2])),
    }
    for s, planes in enumerate((16, 32, 64)):
        for b in range(n):
            widths[f"layer{s + 1}.{b}.conv1"] = int(planes * (1 - rates[3 + s * n + b]))
    return widths


# name, kwargs, input size, params, MACs (conv + FC + conv bias), MACs with BN
REFERENCE = [
    ("resnet56", {}, 32, 853_018, 125_485_696, 126_550_656),
    ("resnet110", {}, 32, 1_727_962, 252_887_680, 254_984_832),
    ("vgg16_bn", {}, 32, 14_991_946, 313_740_288, 314_294_272),
    ("resnet50", {}, 224, 25_557_032, 4_089_184_256, 4_111_412_224),
    (
        "resnet56",
        {"widths": chip_resnet_widths(56, [0.0] + [0.15] * 2 + [0.4] * 27)},
        32,
        485_413,
        65_168_128,
        65_935_872,
    ),
    (
        "resnet56",
        {"widths": chip_resnet_widths(56, [0.0] + [0.4] * 2 + [0.5] * 9 + [0.6] * 9 + [0.7] * 9)},
        32,
        240_793,
        34_197_184,
        34_781_760,
    ),
]


@pytest.mark.parametrize(
    "name,kw,size,params,macs,macs_bn",
    REFERENCE,
    ids=[
        "resnet56",
        "resnet110",
        "vgg16_bn",
        "resnet50",
        "resnet56-chip-r0.4",
        "resnet56-chip-r0.5-0.7",
    ],
)
def test_reference_figures(name, kw, size, params, macs, macs_bn):
    cost = measure_cost(create_model(name, **kw), (3, size, size))
    assert (cost.params, cost.macs, cost.macs_with_bn) == (params, macs, macs_bn)


def test_published_roundings():
    # the figures as the papers print them
    assert round(125_485_696 / 1e6, 2) == 125.49 and round(252_887_680 / 1e6, 2) == 252.89
    assert round(313_740_288 / 1e6, 2) == 313.74 and round(4_089_184_256 / 1e9, 3) == 4.089
    assert round(65_168_128 / 1e6, 2) == 65.17 and round(65_935_872 / 1e6, 2) == 65.94
    assert round(34_197_184 / 1e6, 2) == 34.20


def test_count_functions_agree_and_restore_state():
    model = create_model("resnet20", widths={"layer2": 20}).train()
    model.layer1.eval()
    stats = model.bn1.running_mean.clone()
    cost = measure_cost(model, (3, 16, 16))
    assert count_params(model) == cost.params
    assert count_macs(model, (3, 16, 16)) == cost.macs
    assert count_macs_with_bn(model, (3, 16, 16)) == cost.macs_with_bn
    assert model.training and not model.layer1.training and model.layer2.training
    torch.testing.assert_close(model.bn1.running_mean, stats)
    # MACs of a 16x16 image are a quarter of a 32x32 one: every map scales with H*W; FC does not
    fc = model.fc.in_features * model.fc.out_features
    assert count_macs(model, (3, 32, 32)) - fc == 4 * (cost.macs - fc)


def test_small_model_by_hand():
    # conv 2->3, 3x3, pad 1, bias, on 4x4: 3*16*(2*9) + 3*16 bias adds; BN: 2 * 48; fc 3->5
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(3, 5),
    )
    cost = measure_cost(model, (2, 4, 4))
    assert cost.params == (2 * 9 * 3 + 3) + 2 * 3 + (3 * 5 + 5)
    assert cost.macs == 3 * 16 * 18 + 3 * 16 + 15
    assert cost.macs_with_bn == cost.macs + 2 * 48


def _bias_adds(model: nn.Module, x: torch.Tensor) -> int:
    """Conv bias adds of one forward, which torch's counter leaves out."""
    adds = 0

    def hook(m, _inp, out):
        nonlocal adds
        adds += out.numel() if m.bias is not None else 0

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return adds


@pytest.mark.parametrize("name", list_models())
def test_macs_match_torch_flop_counter(name):
    model = create_model(name).eval()
    x = torch.zeros(1, 3, 16, 16)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    # torch counts 2 FLOPs per conv / linear MAC, without biases
    assert counter.get_total_flops() == 2 * (count_macs(model, (3, 16, 16)) - _bias_adds(model, x))
