"""Torch-Pruning's criteria as our baselines: the scores equal torch-pruning's own importance
classes on its own dependency-graph groups, wherever its graph follows the model; through
the real baseline_masks stage they meet the budget like every method."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
import torch_pruning as tp
import yaml

from chipprune.config import ConfigError, parse_params
from chipprune.methods.baselines import BASELINES, baseline_scores
from chipprune.methods.peers import PEER_CRITERIA, accumulate_gradients, tp_scores
from chipprune.models import create_model
from tests.conftest import REPO

TORCH_PRUNING = {
    "tp_magnitude": tp.importance.GroupMagnitudeImportance,
    "tp_taylor": tp.importance.GroupTaylorImportance,
    "tp_bn_scale": tp.importance.BNScaleImportance,
}
# models whose coupling torch-pruning's graph follows: residual adds, depthwise convs,
# squeeze-and-excitation, a classifier over a flattened map (VGG), no option-A shortcut
MODELS = [
    ("torchvision:resnet18", {}),
    ("resnet56", {"shortcut": "B"}),
    ("vgg16_bn", {}),
    ("torchvision:mobilenet_v2", {}),
    ("torchvision:efficientnet_b0", {}),
    ("nets.small_cnn:build", {}),
]


def test_every_peer_criterion_is_a_baseline_and_a_method():
    assert set(PEER_CRITERIA) <= set(BASELINES)
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["prune"]["methods"] += list(PEER_CRITERIA)
    raw["prune"]["baselines"] += list(PEER_CRITERIA)
    for name in PEER_CRITERIA:
        raw["finetune"][name] = raw["finetune"]["l1"]
    assert parse_params(raw).prune.baselines[-3:] == list(PEER_CRITERIA)
    raw["prune"]["baselines"].append("tp_hessian")
    with pytest.raises(ConfigError, match="prune.baselines"):
        parse_params(raw)


@pytest.mark.parametrize("name, kwargs", MODELS, ids=[m[0] for m in MODELS])
def test_scores_equal_torch_prunings_own(name, kwargs):
    torch.manual_seed(0)
    in_channels = 1 if name.startswith("nets.") else 3
    model = create_model(name, num_classes=10, in_channels=in_channels, **kwargs).eval()
    for m in model.modules():  # BN scales that differ, so BN-scale ranks something
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(0.2, 1.5)
    x = torch.randn(4, in_channels, 32, 32)
    F.cross_entropy(model(x), torch.arange(4)).backward()
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=x[:1])
    spec = model.describe()
    for criterion, importance in TORCH_PRUNING.items():
        ours = tp_scores(model, criterion)
        assert set(ours) == set(spec.widths())
        for group, convs in spec.groups().items():
            first = model.get_submodule(next(c.conv for c in convs if c.in_group != c.group))
            theirs = importance()(graph.get_pruning_group(
                first, tp.prune_conv_out_channels, idxs=list(range(first.out_channels))))
            assert torch.allclose(ours[group], theirs.double(), rtol=1e-5, atol=0), (
                criterion, group)


def test_taylor_needs_gradients_and_accumulates_them_over_batches():
    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=10, in_channels=1)
    with pytest.raises(ValueError, match="tp_taylor needs gradients"):
        tp_scores(model, "tp_taylor")
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randint(0, 256, (8, 1, 16, 16), dtype=torch.uint8, generator=g),
                torch.randint(0, 10, (8,), generator=g)) for _ in range(2)]
    accumulate_gradients(model, batches, lambda x: x.float() / 255)
    both = model.conv1.weight.grad.clone()
    accumulate_gradients(model, batches[:1], lambda x: x.float() / 255)
    first = model.conv1.weight.grad.clone()
    accumulate_gradients(model, batches[1:], lambda x: x.float() / 255)
    assert torch.allclose(both, first + model.conv1.weight.grad, atol=1e-6)
    assert model.training  # the mode it had; BN statistics were not touched (eval mode)
    scores = baseline_scores("tp_taylor", model)
    assert all(s.mean().item() == pytest.approx(1.0) for s in scores.values())


def test_peer_baselines_through_the_stage_meet_the_budget(tmp_path, mlflow_store, monkeypatch):
    """baseline_masks tp_taylor and tp_bn_scale on a digits ResNet-20 (option-A shortcuts,
    which torch-pruning's own graph cannot follow): masks at the budget, from above."""
    from chipprune.data import prepare_dataset, save_prepared
    from chipprune.training.checkpoint import make_checkpoint, save_checkpoint
    from stages import baseline_masks
    from stages._common import run_main

    monkeypatch.chdir(tmp_path)
    save_prepared(prepare_dataset("digits", image_size=16), tmp_path / "data/digits")
    kwargs = {"shortcut": "A", "num_classes": 10, "in_channels": 1}
    model = create_model("resnet20", **kwargs)
    (tmp_path / "dense/digits-resnet20").mkdir(parents=True)
    save_checkpoint(make_checkpoint(model, "resnet20", kwargs),
                    tmp_path / "dense/digits-resnet20/checkpoint.pt")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["prune"].update(methods=["tp_taylor", "tp_bn_scale"],
                           baselines=["tp_taylor", "tp_bn_scale"], budgets=["flops-0.25"])
    params["finetune"] = {m: params["finetune"]["l1"] for m in ("tp_taylor", "tp_bn_scale")}
    params["baselines"] = {"seed": 0, "taylor_batches": 2, "taylor_batch_size": 16}
    params["chip_rates"], params["transfer"] = {}, {"pairs": {}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    for method in ("tp_taylor", "tp_bn_scale"):
        rc = run_main(baseline_masks.main, [method, "dense", "data", f"out/{method}",
                                            "--params", "params.yaml"])
        assert rc == 0
        masks = json.loads((tmp_path / f"out/{method}/flops-0.25-digits-resnet20/masks.json")
                           .read_text())
        assert masks["method"] == method
        assert 0.25 <= masks["budget"]["achieved"] <= 0.26
