"""Surgery and the masked reference, over every registered model: the hard-masked dense model
and the physically pruned one compute the same outputs; the pruned model has the kept widths,
the cost of a model built at those widths, trains, and round-trips through a checkpoint."""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from chipprune.budgets.counting import measure_cost
from chipprune.models import ChannelMapShortcut, PrunableNet, create_model, list_models
from chipprune.surgery.masking import apply_hard_masks, attach_channel_scales
from chipprune.surgery.masks import kept_as_bool, masks_from_keep
from chipprune.surgery.rebuild import prune_model
from chipprune.training.checkpoint import (
    load_checkpoint,
    make_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
)

MODELS = list_models()
INPUT = (1, 16, 16)  # (C, H, W): small and grey, every model takes it
# max abs difference, masked dense vs pruned, eval mode, per unit of output scale (max |logit|,
# at least 1): rounding grows with the size of the logits. float32, and float64 where float32
# rounding, amplified by the random BN, exceeds it (see test_masked_dense_equals_pruned)
ATOL, ATOL64 = 1e-5, 1e-10


def dense_kwargs(name: str) -> dict:
    kw = {"num_classes": 5, "in_channels": 1}
    return {**kw, "cifar_stem": True} if name in ("resnet18", "resnet50", "resnet101") else kw


def randomise_bn(model: PrunableNet, keep: dict[str, list[int]], gen: torch.Generator) -> None:
    """Non-trivial BN statistics and affine, so a wrongly sliced BN shows in the outputs.

    The statistics come from one batch of noise through the MASKED model (so the few kept
    channels of a group stay alive after their ReLU and the outputs depend on the image),
    then get perturbed; the affine is random.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: one batch sets the statistics
    handles = apply_hard_masks(model, keep_bool(model.describe().widths(), keep))
    model.train()
    with torch.no_grad():
        model(torch.randn(16, *INPUT, generator=gen))
        for m in bns:
            c = m.num_features
            m.momentum = 0.1
            m.running_mean.add_(0.1 * m.running_var.sqrt() * torch.randn(c, generator=gen))
            m.running_var.mul_(0.8 + 0.4 * torch.rand(c, generator=gen))
            m.weight.copy_(0.5 + torch.rand(c, generator=gen))
            m.bias.copy_(0.2 * torch.randn(c, generator=gen))
    for h in handles:
        h.remove()
    model.eval()


def keep_bool(widths: dict[str, int], keep: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    out = {g: torch.zeros(w, dtype=torch.bool) for g, w in widths.items()}
    for g, idx in keep.items():
        out[g][idx] = True
    return out


def random_keep(spec, gen: torch.Generator) -> dict[str, list[int]]:
    """Seeded random kept sets; every 4th group is cut to a single channel, and every third
    removable residual branch goes as a whole (one of its groups emptied)."""
    keep = {}
    for i, (g, c) in enumerate(spec.widths().items()):
        k = 1 if i % 4 == 1 else int(torch.randint(1, c + 1, (1,), generator=gen))
        keep[g] = sorted(torch.randperm(c, generator=gen)[:k].tolist())
    for br in spec.branches[1::3]:
        keep.update({g: [] for g in br.groups})
    return keep


@pytest.fixture(scope="module", params=MODELS)
def case(request):
    """A dense model with random BN, random keep sets, its masks and the pruned model."""
    name = request.param
    gen = torch.Generator().manual_seed(MODELS.index(name))
    torch.manual_seed(MODELS.index(name))
    kwargs = dense_kwargs(name)
    dense = create_model(name, **kwargs)
    spec = dense.describe()
    keep = random_keep(spec, gen)
    randomise_bn(dense, keep, gen)
    budget = {"type": "channel", "target": 0.5, "achieved": None}
    m = masks_from_keep(name, kwargs, spec, keep, dataset="digits", method="random", budget=budget)
    pruned, pruned_kwargs = prune_model(dense, m.model, m.model_kwargs, m.kept)
    x = torch.randn(4, *INPUT, generator=gen)
    return SimpleNamespace(
        name=name, kwargs=kwargs, dense=dense, spec=spec, masks=m, keep=keep,
        pruned=pruned, pruned_kwargs=pruned_kwargs, x=x,
    )  # fmt: skip


def test_masked_dense_equals_pruned(case):
    keep = kept_as_bool(case.masks, case.spec)
    handles = apply_hard_masks(case.dense, keep)
    with torch.no_grad():
        masked = case.dense(case.x)
        for h in handles:
            h.remove()
        dense = case.dense(case.x)
        pruned = case.pruned(case.x)
    assert not case.pruned.training
    assert pruned.shape == (4, 5) and torch.isfinite(pruned).all()
    # the outputs depend on the image, and the masks change them
    # (the unmasked model may overflow on deep nets: its BN statistics are the masked ones)
    spread = pruned.std(0).max().item()
    change = (masked - dense).abs().nan_to_num(nan=float("inf")).max().item()
    diff = (masked - pruned).abs().max().item()
    scale = max(1.0, pruned.abs().max().item())
    print(f"{case.name}: max |masked - pruned| {diff:.1e}, max |logit| {scale:.1f}")
    assert spread > 0.01 and change > 0.1
    if diff > ATOL * scale:
        # the identity is exact, but float32 rounding can be amplified past any fixed
        # tolerance by the random BN (a 1-channel bottleneck leaves a MobileNetV2 stream
        # rank 1 and BN gains of several hundred follow): then check it in float64
        dense64, x64 = copy.deepcopy(case.dense).double(), case.x.double()
        handles = apply_hard_masks(dense64, keep)
        with torch.no_grad():
            diff = (dense64(x64) - copy.deepcopy(case.pruned).double()(x64)).abs().max().item()
        for h in handles:
            h.remove()
        print(f"{case.name}: in float64, max |masked - pruned| {diff:.1e}")
        assert diff <= ATOL64 * scale


def test_pruned_channel_maps_gather_non_trivially(case):
    maps = [m for m in case.pruned.modules() if isinstance(m, ChannelMapShortcut)]
    assert len(maps) == len(case.spec.channel_maps)
    if maps:  # stem and streams keep different sets: some map gathers a few input channels,
        # dropping the rest, and some zero-fills outputs (index == in_channels: the zero channel)
        gathered = [len(set(m.index.tolist()) - {m.in_channels}) for m in maps]
        assert any(0 < n < m.in_channels for n, m in zip(gathered, maps, strict=True))
        assert any((m.index == m.in_channels).any() for m in maps)


def test_masked_channels_are_zero_at_every_scoring_relu(case):
    """Pruned channels are exactly 0 wherever a group's channels are read: the channel-map
    hook stops a stream channel coming back through a shortcut from another group."""
    seen = {}
    mods = dict(case.dense.named_modules())
    hooks = [
        mods[c.score_at].register_forward_hook(lambda _m, _i, o, c=c: seen.setdefault(c, o.clone()))
        for c in case.spec.convs
    ]
    hooks += apply_hard_masks(case.dense, kept_as_bool(case.masks, case.spec))
    with torch.no_grad():
        case.dense(case.x)
    for h in hooks:
        h.remove()
    alive = 0
    for c, out in seen.items():  # out: (N, C, H, W), post-ReLU
        dropped = torch.ones(out.shape[1], dtype=torch.bool)
        dropped[case.keep[c.group]] = False
        assert torch.count_nonzero(out[:, dropped]) == 0, c.conv
        alive += bool(out[:, ~dropped].any())  # a single kept channel may be dead after ReLU
    assert alive > len(seen) // 2


def test_pruned_widths_kwargs_and_cost(case):
    widths = {g: len(k) for g, k in case.keep.items()}
    # the groups of removed branches are gone from the pruned model (0 in its kwargs)
    assert case.pruned.describe().widths() == {g: w for g, w in widths.items() if w}
    assert case.pruned_kwargs["widths"] == widths
    assert case.pruned_kwargs["kept"] == case.keep
    assert {k: v for k, v in case.pruned_kwargs.items() if k not in ("widths", "kept")} == (
        case.kwargs
    )
    assert json.loads(json.dumps(case.pruned_kwargs)) == case.pruned_kwargs  # plain values
    same_widths = create_model(case.name, widths=widths, **case.kwargs)
    cost = measure_cost(case.pruned, INPUT)
    assert cost == measure_cost(same_widths, INPUT)
    assert cost.params < measure_cost(case.dense, INPUT).params


def test_pruned_model_trains(case):
    model = copy.deepcopy(case.pruned).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss = F.cross_entropy(model(case.x), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    for n, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    moved = [n for n, p in model.named_parameters() if p.grad.abs().max() > 1e-6]
    touched = [n for n, p in model.named_parameters() if p.grad.abs().max() > 0]
    # (a gradient that is zero in exact arithmetic may come out ~1e-9 and move nothing: the
    # stream BN biases of MobileNetV2, whose every reader is a conv and a train-mode BN)
    assert set(moved) <= set(changed) <= set(touched)
    assert "conv1.weight" in changed or "features.conv0.weight" in changed
    assert f"{case.spec.classifier}.weight" in changed


def test_checkpoint_round_trip(case, tmp_path):
    path = tmp_path / "pruned.pt"
    save_checkpoint(make_checkpoint(case.pruned, case.name, case.pruned_kwargs), path)
    rebuilt = model_from_checkpoint(load_checkpoint(path)).eval()
    assert rebuilt.describe() == case.pruned.describe()
    with torch.no_grad():
        assert torch.equal(rebuilt(case.x), case.pruned(case.x))


@pytest.mark.parametrize("name", ["resnet20", "vgg16_bn", "resnet18"])
def test_pruning_twice_equals_pruning_once(name):
    gen = torch.Generator().manual_seed(1)
    kwargs = dense_kwargs(name)
    dense = create_model(name, **kwargs)
    first = random_keep(dense.describe(), gen)
    randomise_bn(dense, first, gen)
    # the second cut: every other kept channel of a few groups, the rest carried over
    second = {g: idx[::2] for g, idx in list(first.items())[::3] if idx}
    once, once_kw = prune_model(dense, name, kwargs, {**first, **second})
    step, step_kw = prune_model(dense, name, kwargs, first)
    twice, twice_kw = prune_model(step, name, step_kw, second)
    assert twice_kw == once_kw
    sd_once, sd_twice = once.state_dict(), twice.state_dict()
    assert all(torch.equal(sd_once[k], sd_twice[k]) for k in sd_once)


def test_prune_errors_name_the_group():
    dense = create_model("resnet20")
    with pytest.raises(ValueError, match="unknown groups.*nope"):
        prune_model(dense, "resnet20", {}, {"nope": [0]})
    with pytest.raises(ValueError, match=r"kept\['layer1'\].*\[16\]"):
        prune_model(dense, "resnet20", {}, {"layer1": [0, 16]})
    with pytest.raises(ValueError, match="layer1"):
        prune_model(dense, "resnet20", {}, {"layer1": []})
    # kwargs that do not describe the model (a dense model passed with pruned kwargs)
    with pytest.raises(ValueError, match="do not describe this model.*'layer2'"):
        prune_model(dense, "resnet20", {"widths": {"layer2": 8}}, {"layer1": [0]})
    small, small_kw = prune_model(dense, "resnet20", {}, {"layer1": [1, 3, 5]})
    with pytest.raises(ValueError, match=r"kept\['layer1'\].*\[2\].*not in the source"):
        prune_model(small, "resnet20", small_kw, {"layer1": [1, 2]})


def test_soft_scales_are_recomputed_each_forward_and_get_gradients():
    model = create_model("resnet20", in_channels=1).eval()
    spec = model.describe()
    zeta = {g: torch.rand(w, requires_grad=True) for g, w in spec.widths().items()}
    calls = []

    def scale(g):
        calls.append(g)
        return torch.sigmoid(zeta[g])  # (C,)

    x = torch.randn(2, *INPUT)
    with torch.no_grad():
        dense = model(x)
    handles = attach_channel_scales(model, {g: (lambda g=g: scale(g)) for g in zeta})
    model(x).square().sum().backward()
    # once per BN of the group and once per channel map into it
    n_hooks = len(spec.convs) + len(spec.channel_maps)
    assert len(calls) == n_hooks
    assert all(z.grad is not None and z.grad.abs().sum() > 0 for z in zeta.values())
    for h in handles:
        h.remove()
    with torch.no_grad():
        assert torch.equal(model(x), dense)


def test_masking_rejects_unknown_groups_and_wrong_shapes():
    model = create_model("resnet20", in_channels=1).eval()
    with pytest.raises(ValueError, match="unknown groups.*nope"):
        attach_channel_scales(model, {"nope": lambda: torch.ones(3)})
    with pytest.raises(ValueError, match="layer1"):
        apply_hard_masks(model, {"layer1": torch.ones(15, dtype=torch.bool)})
    handles = attach_channel_scales(model, {"layer2": lambda: torch.ones(31)})
    with pytest.raises(ValueError, match="'layer2'.*32 channels"):
        model(torch.randn(1, *INPUT))
    for h in handles:
        h.remove()
