"""params.yaml validation: every bad input is one message naming the key, and the shipped
params.yaml is valid."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import yaml

from chipprune.config import ConfigError, load_params, parse_params
from tests.conftest import REPO

BASE = yaml.safe_load((REPO / "params.yaml").read_text())


def test_shipped_params_are_valid():
    p = load_params(REPO / "params.yaml")
    assert "digits" in p.datasets and p.dense.models


def _with(path: str, value):
    raw = copy.deepcopy(BASE)
    *parents, last = path.split(".")
    node = raw
    for key in parents:
        node = node.setdefault(key, {})
    if value is DELETE:
        del node[last]
    else:
        node[last] = value
    return raw


DELETE = object()

BAD = [
    ("datasets.digits.synthetic", {"channels": 1, "classes": 10, "train": 8, "test": 4},
     "datasets.digits", "only with, source 'synthetic'"),
    ("datasets.digits.source", "synthetic", "datasets.digits", "only with, source 'synthetic'"),
    ("train_dense.epochs", 0, "train_dense.epochs", "greater than or equal to 1"),
    ("train_dense.epochs", "ten", "train_dense.epochs", "valid integer"),
    ("train_dense.optimizer.lr", -0.1, "train_dense.optimizer.lr", "greater than 0"),
    ("train_dense.optimizer.momentum", 1.5, "train_dense.optimizer.momentum", "less than 1"),
    ("train_dense.schedule.kind", "linear", "train_dense.schedule.kind", "'cosine'"),
    ("train_dense.bogus", 1, "train_dense.bogus", "unknown key"),
    ("train_dense.device", "tpu", "train_dense.device", "'cpu'"),
    ("datasets.digits.source", "mnist", "datasets.digits.source", "'cifar10'"),
    ("datasets.digits.val_size", 1.5, "datasets.digits.val_size", "(0, 1)"),
    ("datasets.digits.classes", [1], "datasets.digits.classes", "at least 2"),
    ("datasets.digits.augment.crop_padding", -1, "datasets.digits.augment.crop_padding", "greater than or equal"),
    ("datasets.cifar10", {"source": "cifar10"}, "datasets.cifar10", "needs `root`"),
    ("datasets.cifar10", {"source": "cifar10", "root": "/nonexistent/x"}, "datasets.cifar10", "does not exist"),
    ("models.resnet20.arch", "resnet9000", "models.resnet20", "known: "),
    ("models.resnet20.kwargs", {"depth": 3}, "models.resnet20", "rejected by resnet20"),
    ("models.resnet20.kwargs", {"num_classes": 3}, "models.resnet20", "come from the dataset"),
    ("dense.models", ["vgg"], "dense", "'vgg' is not defined"),
    ("dense.datasets", [], "dense.datasets", "at least 1"),
    ("dense", DELETE, "dense", "required key is missing"),
    ("evaluate.latency.batch_sizes", [0], "evaluate.latency", "positive"),
    ("surprise", {}, "surprise", "unknown key"),
    ("chip_rates.r20-light.rates", "[0.]+[0.4]*x", "chip_rates.r20-light.rates", "bad rates term"),
    ("chip_rates.r20-light.rates", [0.2, 1.0], "chip_rates.r20-light.rates", "[0, 1)"),
    ("chip_rates.r20-light.model", "resnet56", "chip_rates.r20-light.model", "no CHIP scores"),
    ("chip.combine", "max", "chip.combine", "'normalised'"),
    ("finetune.chip.keep", "best_test", "finetune.chip.keep", "'best_val'"),
    ("models.resnet20.kwargs", {"stem_pool": True}, "models.resnet20", "rejected by resnet20"),
]


@pytest.mark.parametrize(("path", "value", "key", "words"), BAD, ids=[b[0] + "=" + repr(b[1])[:20] for b in BAD])
def test_bad_params_name_the_key(path, value, key, words):
    with pytest.raises(ConfigError) as err:
        parse_params(_with(path, value))
    msg = str(err.value)
    assert msg.startswith(f"params.yaml: {key}"), msg
    assert words in msg, msg


def test_bad_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("datasets: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)
    with pytest.raises(ConfigError, match="no such file"):
        load_params(tmp_path / "absent.yaml")


def test_stage_exits_2_and_writes_nothing(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(_with("datasets.digits.val_size", 0.0)))
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "stages.prepare", "digits", str(out), str(tmp_path / "run.json"),
         "--params", str(params)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "datasets.digits.val_size" in lines[0], proc.stderr
    assert not out.exists() and not (tmp_path / "run.json").exists()
