"""ModelOpt's FastNAS as a peer method: its own search under our budget, read back as our
masks. Surgery with those masks rebuilds FastNAS's own export parameter for parameter; the
real baseline_masks stage writes them for a digits ResNet-20; a grid it cannot search and a
missing extra are params errors naming what is allowed."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
import yaml

from chipprune.budgets.exact import BudgetModel
from chipprune.config import ConfigError, parse_params
from chipprune.methods import fastnas
from chipprune.methods.baselines import BASELINES, baseline_scores
from chipprune.models import create_model
from chipprune.surgery.rebuild import prune_model
from tests.conftest import REPO

pytestmark = pytest.mark.slow(cost=70)  # seconds alone, for test ordering

KWARGS = {"num_classes": 10, "in_channels": 1}


def _dense(shortcut: str, seed: int = 0):
    return _trained_like("resnet20", {"shortcut": shortcut, **KWARGS}, seed)


def _trained_like(arch: str, kwargs: dict, seed: int = 0):
    """A model whose BNs have distinct (gamma, beta) per channel, as training gives."""
    torch.manual_seed(seed)
    model = create_model(arch, **kwargs)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0.0, 0.1)
    return model.eval()


def test_kept_channels_reads_an_export_in_its_own_order():
    """An export keeping channels in a shuffled order (FastNAS copies them in importance
    order) is read back index for index; a changed gamma is a clear error."""
    dense = _dense("B")
    widths = dense.describe().widths()
    g = torch.Generator().manual_seed(1)
    kept = {group: torch.randperm(w, generator=g)[: max(1, w // 3)].tolist()
            for group, w in widths.items()}
    export, _ = prune_model(dense, "resnet20", {"shortcut": "B", **KWARGS}, kept)
    assert fastnas.kept_channels(dense, export) == kept
    assert {gr: int(k.sum()) for gr, k in fastnas.as_keep(kept, widths).items()} == {
        gr: len(i) for gr, i in kept.items()}

    export.layer2[0].bn1.weight.data[0] += 1e-3
    with pytest.raises(ValueError, match="group 'layer2.0.conv1': a kept channel matches no dense"):
        fastnas.kept_channels(dense, export)


# divisors above 1 (prune.round_to) cut the search (its candidates per group) 40-50%; the
# stage test below searches at the default, 1
@pytest.mark.parametrize("arch,kwargs,shape,kind,target,divisor", [
    ("resnet20", {"shortcut": "B", **KWARGS}, (1, 8, 8), "flops", 0.3, 1),
    ("resnet20", {"shortcut": "B", **KWARGS}, (1, 8, 8), "params", 0.5, 4),
    ("torchvision:resnet18", {"num_classes": 10}, (3, 32, 32), "flops", 0.5, 8),  # traced
])
def test_surgery_with_its_masks_rebuilds_fastnas_export(arch, kwargs, shape, kind, target,
                                                         divisor):
    """The real search (option-B shortcuts and torchvision's ResNet, which FastNAS traces
    through): every weight, gamma and beta of our pruned model equals FastNAS's export; our
    exact count of the masks agrees with the count FastNAS searched under, which met the
    target; every width it chose is a multiple of the divisor."""
    dense = _trained_like(arch, kwargs)
    torch.manual_seed(2)
    images = torch.randn(48 if shape[0] == 1 else 16, *shape)
    labels = dense(images).argmax(1)  # a score with something to lose when a layer narrows

    def score(model) -> float:
        with torch.no_grad():
            return float((model(images).argmax(1) == labels).float().mean())

    before = {k: v.clone() for k, v in dense.state_dict().items()}
    result = fastnas.search(dense, kind, target, score=score, calibration=[images[:32]],
                            dummy_input=images[:1], channel_divisor=divisor)
    assert all(torch.equal(v, dense.state_dict()[k]) for k, v in before.items())  # untouched

    ours, _ = prune_model(dense, arch, kwargs, result.kept)
    mine, theirs = ours.state_dict(), result.subnet.state_dict()
    assert set(mine) == set(theirs)
    learned = [k for k in mine if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert all(torch.equal(mine[k], theirs[k]) for k in learned)

    widths = {g: len(i) for g, i in result.kept.items()}
    assert widths != dense.describe().widths()  # it did prune
    assert all(w % divisor == 0 for w in widths.values())
    ours_fraction = BudgetModel.from_model(dense, shape).fraction(kind, widths)
    assert result.its_fraction <= target
    # our convention counts what torchprofile and a parameter sum count, up to BN affine
    # terms (params) and the classifier bias (MACs)
    assert ours_fraction == pytest.approx(result.its_fraction, abs=0.005)


def test_fastnas_gives_masks_not_scores():
    assert "fastnas" in BASELINES
    with pytest.raises(ValueError, match="searches for its masks"):
        baseline_scores("fastnas", _dense("A"))


def _grid(raw: dict, budgets: list[str]) -> dict:
    raw["prune"].update(methods=["fastnas"], baselines=["fastnas"], budgets=budgets)
    raw["finetune"]["fastnas"] = raw["finetune"]["l1"]
    raw["transfer"], raw["chip_rates"] = {"pairs": {}}, {}
    return raw


def test_a_grid_fastnas_cannot_search_is_a_params_error(monkeypatch):
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    assert parse_params(_grid(raw, ["flops-0.25", "params-0.5"])).prune.baselines == ["fastnas"]
    with pytest.raises(ConfigError, match=r"fastnas searches under a flops or params constraint; "
                                          r"budgets \['latency-0.5', 'channel-0.5'\]"):
        parse_params(_grid(raw, ["flops-0.25", "latency-0.5", "channel-0.5"]))

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "modelopt" else real(name, *a))
    with pytest.raises(ConfigError, match=r"nvidia-modelopt.*extra 'peers'.*\.\[peers\]"):
        parse_params(_grid(raw, ["flops-0.25"]))


def test_fastnas_through_the_stage(tmp_path, mlflow_store, monkeypatch):
    """baseline_masks fastnas on a digits ResNet-20 with option-A shortcuts (FastNAS searches
    the blocks' inner convs; the streams keep every channel): masks under the budget, what
    FastNAS counted recorded beside our count; a budget below its floor searches at the floor."""
    from chipprune.data import prepare_dataset, save_prepared
    from chipprune.training.checkpoint import make_checkpoint, save_checkpoint
    from stages import baseline_masks
    from stages._common import run_main

    monkeypatch.chdir(tmp_path)
    save_prepared(prepare_dataset("digits", image_size=16), tmp_path / "data/digits")
    (tmp_path / "dense/digits-resnet20").mkdir(parents=True)
    save_checkpoint(make_checkpoint(_dense("A"), "resnet20", {"shortcut": "A", **KWARGS}),
                    tmp_path / "dense/digits-resnet20/checkpoint.pt")
    params = _grid(yaml.safe_load((REPO / "params.yaml").read_text()), ["flops-0.3", "flops-0.01"])
    params["baselines"].update(fastnas_score_images=64, fastnas_calibration_batches=1,
                               fastnas_batch_size=32)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    rc = run_main(baseline_masks.main, ["fastnas", "dense", "data", "out/fastnas",
                                        "--params", "params.yaml"])
    assert rc == 0
    masks = json.loads((tmp_path / "out/fastnas/flops-0.3-digits-resnet20/masks.json").read_text())
    assert masks["method"] == "fastnas"
    achieved, its = masks["budget"]["achieved"], masks["extra"]["fastnas_flops_fraction"]
    assert its <= 0.3 and achieved == pytest.approx(its, abs=0.005)
    assert masks["extra"]["search_seconds"] > 0
    # below the smallest subnet FastNAS searches: a search at that floor, which FastNAS
    # refuses by itself; its binary search stops at or above the floor
    floor = json.loads((tmp_path / "out/fastnas/flops-0.01-digits-resnet20/masks.json").read_text())
    its_floor = floor["extra"]["fastnas_flops_floor"]
    assert 0.01 < its_floor <= floor["extra"]["fastnas_flops_fraction"] < 0.3
    assert floor["budget"]["achieved"] == pytest.approx(
        floor["extra"]["fastnas_flops_fraction"], abs=0.005)
    assert masks["extra"]["fastnas_flops_floor"] == its_floor

    widths = _dense("A").describe().widths()
    streams = ("layer1", "layer2", "layer3")
    assert all(masks["kept"][s] == list(range(widths[s])) for s in streams)
    assert any(len(masks["kept"][g]) < w for g, w in widths.items() if g not in streams)
