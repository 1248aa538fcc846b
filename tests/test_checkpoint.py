"""The checkpoint format: rebuilt from the file alone, weights_only loading, clear errors."""

from __future__ import annotations

import pickle

import pytest
import torch

from chipprune.models import create_model, weights_uninitialised
from chipprune.training.checkpoint import (
    CheckpointError,
    load_checkpoint,
    make_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
)


def test_round_trip_rebuilds_model_from_file_alone(tmp_path):
    kwargs = {"num_classes": 3, "in_channels": 1, "shortcut": "A"}
    model = create_model("resnet20", **kwargs).eval()
    path = tmp_path / "ckpt.pt"
    save_checkpoint(make_checkpoint(model, "resnet20", kwargs, config={"a": {"b": 1}}), path)
    ckpt = load_checkpoint(path)
    rebuilt = model_from_checkpoint(ckpt).eval()
    x = torch.randn(2, 1, 16, 16)
    assert torch.equal(model(x), rebuilt(x))
    assert ckpt["config"] == {"a": {"b": 1}}


def test_rebuilding_skips_the_random_fill_and_the_initialisers_come_back(tmp_path):
    """The rebuilt model's every weight is the file's (strict load), so it is not
    random-filled first: the global RNG is not drawn from. The initialisers are torch's
    again after the block, after an error too."""
    kwargs = {"num_classes": 10, "in_channels": 3}
    model = create_model("vgg16_bn", **kwargs)
    path = tmp_path / "ckpt.pt"
    save_checkpoint(make_checkpoint(model, "vgg16_bn", kwargs), path)
    ckpt = load_checkpoint(path)
    before = torch.get_rng_state()
    rebuilt = model_from_checkpoint(ckpt)
    assert torch.equal(torch.get_rng_state(), before)
    want = model.state_dict()
    assert all(torch.equal(t, want[k]) for k, t in rebuilt.state_dict().items())
    create_model("vgg16_bn", **kwargs)  # outside: drawn from, as ever
    assert not torch.equal(torch.get_rng_state(), before)
    original = torch.nn.init.kaiming_normal_
    with pytest.raises(RuntimeError, match="inside"), weights_uninitialised():
        assert torch.nn.init.kaiming_normal_ is not original
        raise RuntimeError("inside")
    assert torch.nn.init.kaiming_normal_ is original


class RunsCode:
    def __reduce__(self):
        import os

        return (os.system, ("touch PWNED",))


def test_pickled_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    torch.save({"format": "chipprune.checkpoint/1", "payload": RunsCode()}, path)
    with pytest.raises(CheckpointError, match="evil.pt"):
        load_checkpoint(path)
    assert not (tmp_path / "PWNED").exists()


def test_truncated_and_garbage_files_name_the_file(tmp_path):
    good = tmp_path / "good.pt"
    model = create_model("resnet20", num_classes=2, in_channels=1)
    save_checkpoint(make_checkpoint(model, "resnet20", {"num_classes": 2, "in_channels": 1}), good)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="cut.pt"):
        load_checkpoint(cut)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(pickle.dumps([1, 2, 3]) + b"garbage")
    with pytest.raises(CheckpointError, match="junk.pt"):
        load_checkpoint(junk)
    with pytest.raises(CheckpointError, match="absent.pt: no such file"):
        load_checkpoint(tmp_path / "absent.pt")


def test_foreign_dict_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match="not a chipprune.checkpoint/1 file"):
        load_checkpoint(path)
