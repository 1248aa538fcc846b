"""The mask file format: round trip, sorted indices from bool masks, and one clear error per
bad case that names the file and the group."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from chipprune.models import create_model
from chipprune.surgery.masks import (
    FORMAT,
    MaskError,
    kept_as_bool,
    load_masks,
    masks_from_keep,
    save_masks,
    validate_masks,
)

KWARGS = {"num_classes": 10, "in_channels": 1, "shortcut": "A"}
BUDGET = {"type": "flops", "target": 0.25, "achieved": 0.2531}


@pytest.fixture(scope="module")
def spec():
    return create_model("resnet20", **KWARGS).describe()


def make(spec, **changes):
    """resnet20 masks keeping every other channel (layer1: 5 channels, unsorted input)."""
    keep = {g: list(range(0, w, 2)) for g, w in spec.widths().items()}
    keep["layer1"] = [9, 0, 3, 15, 4]
    m = masks_from_keep(
        "resnet20", KWARGS, spec, keep, dataset="digits", method="chipnet", budget=BUDGET,
        extra={"epoch": 7, "z": [0.5, 1.0]},
    )  # fmt: skip
    return replace(m, **changes)


def test_masks_from_keep_sorts_and_counts_layers(spec):
    widths = spec.widths()
    bools = {g: torch.zeros(w, dtype=torch.bool) for g, w in widths.items()}
    for b in bools.values():
        b[[0, 3, 5]] = True
    bools["conv1"][:] = True
    m = masks_from_keep(
        "resnet20", KWARGS, spec, bools, dataset="digits", method="l1", budget=BUDGET
    )
    assert m.kept["conv1"] == tuple(range(16))
    assert m.kept["layer2"] == (0, 3, 5)
    assert m.layers["conv1"] == 16
    assert m.layers["layer2.1.conv2"] == m.layers["layer2.0.conv2"] == 3
    assert set(m.layers) == {c.conv for c in spec.convs}
    assert make(spec).kept["layer1"] == (0, 3, 4, 9, 15)
    # index tensors are accepted too, and bool masks convert back exactly
    again = masks_from_keep(
        "resnet20", KWARGS, spec, {g: b.nonzero().flatten() for g, b in bools.items()},
        dataset="digits", method="l1", budget=BUDGET,
    )  # fmt: skip
    assert again.kept == m.kept
    back = kept_as_bool(m, spec)
    assert all(torch.equal(back[g], bools[g]) for g in widths)


def test_a_removed_branch_is_an_empty_group_and_zero_layers(spec, tmp_path):
    keep = {g: [0] for g in spec.widths()}
    keep["layer2.1.conv1"] = []  # the branch of block layer2.1 goes as a whole
    m = masks_from_keep(
        "resnet20", KWARGS, spec, keep, dataset="digits", method="chipnet", budget=BUDGET
    )
    assert m.kept["layer2.1.conv1"] == ()
    assert m.layers["layer2.1.conv1"] == m.layers["layer2.1.conv2"] == 0
    assert m.layers["layer2.0.conv2"] == 1  # the stream itself keeps its channel
    path = tmp_path / "masks.json"
    save_masks(m, path)
    assert load_masks(path, spec) == m


def test_round_trip(spec, tmp_path):
    m = make(spec)
    path = tmp_path / "sub" / "masks.json"
    save_masks(m, path)
    doc = json.loads(path.read_text())
    assert doc["format"] == FORMAT
    assert doc["kept"]["layer1"] == [0, 3, 4, 9, 15]
    assert doc["budget"] == BUDGET and doc["model_kwargs"] == KWARGS
    loaded = load_masks(path, spec)
    assert loaded == m
    assert loaded.source == str(path)
    assert loaded.extra == {"epoch": 7, "z": [0.5, 1.0]}
    assert [p.name for p in path.parent.iterdir()] == ["masks.json"]  # no temp files left


def _write(tmp_path, doc) -> str:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(doc))
    return path


def _bad(spec, edit):
    doc = make(spec).as_dict()
    edit(doc)
    return doc


def _pop(d, key):
    d.pop(key)


BAD_CASES = {  # name: (edit of the JSON document, what the message must say)
    "unknown group": (lambda d: d["kept"].update({"layer9": [0]}), r"unknown groups \['layer9'\]"),
    "missing group": (lambda d: _pop(d["kept"], "layer2.1.conv1"), r"missing.*'layer2.1.conv1'"),
    "out of range": (
        lambda d: d["kept"].update({"layer2": [0, 5, 32]}),
        r"kept\['layer2'\].*\[32\] out of range \[0, 32\)",
    ),
    "negative": (
        lambda d: d["kept"].update({"conv1": [-1, 2]}),
        r"kept\['conv1'\].*\[-1\] out of range",
    ),
    "duplicates": (
        lambda d: d["kept"].update({"layer3": [1, 4, 4]}),
        r"kept\['layer3'\]: duplicate indices \[4\]",
    ),
    "empty": (
        lambda d: d["kept"].update({"layer1": []}),
        r"kept\['layer1'\] is empty: only the inner groups of a residual branch",
    ),
    "unsorted": (lambda d: d["kept"].update({"layer1": [3, 0]}), r"kept\['layer1'\].*sorted"),
    "layers disagree": (
        lambda d: d["layers"].update({"layer1.0.conv2": 4}),
        r"layers\['layer1.0.conv2'\] = 4 but its group keeps 5",
    ),
    "model mismatch (groups)": (lambda d: d.update(model="resnet32"), "unknown groups|missing"),
    "pruned kwargs": (
        lambda d: d["model_kwargs"].update(widths={"layer1": 5}),
        r"dense.*\['widths'\]",
    ),
}


@pytest.mark.parametrize("case", BAD_CASES, ids=list(BAD_CASES))
def test_validation_errors_name_the_file_and_the_group(spec, tmp_path, case):
    edit, message = BAD_CASES[case]
    if case == "model mismatch (groups)":
        # the masks say resnet20; validating against resnet32's spec fails on its groups
        path = _write(tmp_path, make(spec).as_dict())
        other = create_model("resnet32", **KWARGS).describe()
        with pytest.raises(MaskError, match=f"bad.json: .*({message})"):
            load_masks(path, other)
        with pytest.raises(MaskError, match="masks are for model 'resnet20', not 'resnet32'"):
            validate_masks(load_masks(path), other, model="resnet32")
        return
    path = _write(tmp_path, _bad(spec, edit))
    m = load_masks(path)  # the structure is fine; the fit to the model is not
    with pytest.raises(MaskError, match=f"bad.json: .*{message}"):
        validate_masks(m, spec)
    with pytest.raises(MaskError, match=message):
        load_masks(path, spec)


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda d: d.update(format="chipprune.masks/0"), "not a chipprune.masks/1 document"),
        (lambda d: _pop(d, "budget"), r"missing keys \['budget'\]"),
        (lambda d: _pop(d["budget"], "achieved"), r"budget lacks \['achieved'\]"),
        (
            lambda d: d["kept"].update({"layer1": [0, 1.5]}),
            r"kept\['layer1'\] must be a list of int",
        ),
        (lambda d: d["kept"].update({"layer1": [True]}), r"kept\['layer1'\] must be a list of int"),
        (lambda d: d["layers"].update({"conv1": "8"}), r"layers\['conv1'\] must be an integer"),
        (lambda d: d.update(model=None), "model must be a string"),
    ],
    ids=["format", "no budget", "budget keys", "float index", "bool index", "layer count", "model"],
)
def test_malformed_documents_are_refused_on_load(spec, tmp_path, edit, message):
    path = _write(tmp_path, _bad(spec, edit))
    with pytest.raises(MaskError, match=f"bad.json: .*{message}"):
        load_masks(path)


def test_unreadable_files_name_the_file(tmp_path):
    with pytest.raises(MaskError, match="absent.json: no such file"):
        load_masks(tmp_path / "absent.json")
    junk = tmp_path / "junk.json"
    junk.write_text('{"format": ')
    with pytest.raises(MaskError, match="junk.json: not valid JSON"):
        load_masks(junk)


def test_masks_transfer_to_other_classes_and_input_channels(spec):
    student = create_model("resnet20", num_classes=100, in_channels=3).describe()
    validate_masks(make(spec), student, model="resnet20")  # no error: same groups


def test_masks_from_keep_validates(spec):
    keep = {g: [0] for g in spec.widths()}
    with pytest.raises(MaskError, match=r"keep\['layer2'\]: bool mask of shape \(31,\)"):
        masks_from_keep(
            "resnet20", KWARGS, spec, {**keep, "layer2": torch.ones(31, dtype=torch.bool)},
            dataset="d", method="m", budget=BUDGET,
        )  # fmt: skip
    with pytest.raises(MaskError, match=r"masks: kept\['layer3'\] is empty"):
        masks_from_keep(
            "resnet20", KWARGS, spec, {**keep, "layer3": torch.zeros(64, dtype=torch.bool)},
            dataset="d", method="m", budget=BUDGET,
        )  # fmt: skip


def test_non_json_extra_is_refused_and_leaves_no_file(spec, tmp_path):
    m = replace(make(spec), extra={"z": torch.ones(2)})
    path = tmp_path / "masks.json"
    with pytest.raises(MaskError, match="masks.json: masks are not plain JSON"):
        save_masks(m, path)
    assert list(tmp_path.iterdir()) == []


def test_finetune_refuses_masks_naming_another_architecture_whose_groups_fit(
        tmp_path, capsys, mlflow_store):
    """A masks file that names resnet32 but whose groups fit the resnet20 checkpoint it is
    applied to: finetune refuses it (exit 2, both names), before any training or output."""
    from chipprune.data import prepare_dataset, save_prepared
    from chipprune.methods.baselines import random_scores
    from chipprune.surgery.masks import masks_from_keep, save_masks
    from chipprune.training.checkpoint import make_checkpoint, save_checkpoint
    from stages import finetune
    from stages._common import run_main
    from tests.conftest import REPO

    save_prepared(prepare_dataset("digits", image_size=16), tmp_path / "data")
    kw = {"num_classes": 10, "in_channels": 1, "shortcut": "A"}
    dense = create_model("resnet20", **kw)
    save_checkpoint(make_checkpoint(dense, "resnet20", kw), tmp_path / "dense.pt")
    spec = dense.describe()
    keep = {g: s >= s.median() for g, s in random_scores(spec.widths(), 0).items()}
    m = masks_from_keep("resnet20", kw, spec, keep, dataset="digits", method="random",
                        budget={"type": "flops", "target": 0.5, "achieved": 0.5})
    (tmp_path / "method").mkdir()
    save_masks(m, tmp_path / "method/masks.json")
    doc = json.loads((tmp_path / "method/masks.json").read_text())
    (tmp_path / "method/masks.json").write_text(json.dumps({**doc, "model": "resnet32"}))
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    out = tmp_path / "out"
    rc = run_main(finetune.main, [str(tmp_path / "method"), str(tmp_path / "dense.pt"),
                                  str(tmp_path / "data/"), str(out), "--params",
                                  str(tmp_path / "params.yaml")])
    assert rc == 2
    assert "masks are for model 'resnet32', not 'resnet20'" in capsys.readouterr().err
    assert not out.exists()
