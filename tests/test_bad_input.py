"""Bad params through a real stage: every malformed params.yaml of the table exits 2 with one
line naming the key, and the stage writes nothing (no output folder, no MLflow run file).

The stage runs in this process through the same `run_main` its `python -m` entry point
calls (tests/test_config.py runs one case as a real subprocess); a subprocess per case
would spend about 3 s each importing torch.
"""

from __future__ import annotations

import pytest
import yaml

from stages import train_dense
from stages._common import run_main
from tests.test_config import BAD, _with

# Beyond test_config's table: the pruning grid, CHIP rate configurations, transfer pairs.
MORE = [
    ("prune.budgets", ["flops-0"], "prune.budgets", "(0, 1]"),
    ("prune.budgets", ["flops-1.5"], "prune.budgets", "(0, 1]"),
    ("prune.budgets", ["flops"], "prune.budgets", "expected TYPE-TARGET"),
    ("prune.budgets", ["flops-half"], "prune.budgets", "is not a number"),
    ("prune.budgets", ["flops-0.5", "flops-0.5"], "prune.budgets", "listed twice"),
    ("transfer.pairs.digits-to-even.budget", "flops-0.125", "transfer.pairs",
     "come from the pruning grid"),
    ("prune.methods", ["chipnet", "magic"], "prune.methods", "'chipnet'"),
    ("prune.models", ["resnet9000"], "prune", "'resnet9000' is not defined"),
    ("prune.datasets", ["mnist"], "prune", "'mnist' is not defined"),
    ("prune.budgets", ["joules-0.5"], "prune.budgets", "'joules' is not one of channel"),
    ("learn_masks.gate_lr", 0, "learn_masks.gate_lr", "greater than 0"),
    ("learn_masks.finetune_from", "teacher", "learn_masks.finetune_from", "'learned'"),
    ("chip_rates.r20-light.rates", "[0.]+[0.15]*2+[0.4]*27", "chip_rates.r20-light.rates",
     "resnet20 takes 12 rates"),
    ("chip_rates.r20-light.rates", "[0.1]+oops", "chip_rates.r20-light.rates", "bad rates term"),
    ("transfer.pairs.digits-to-even.model", "vgg", "transfer",
     "'vgg' is not defined"),
    ("transfer.pairs.digits-to-even.student", "digits", "transfer",
     "teacher and student are the same"),
    ("transfer.pairs.digits-to-even.protocol", "finetune",
     "transfer.pairs.digits-to-even.protocol", "'scratch'"),
    ("models.resnet20.arch", "torchvision:resnet_nine", "models.resnet20",
     "torchvision has no classification model 'resnet_nine'"),
    ("models.resnet20.arch", "nets.small_cnn:nothing", "models.resnet20",
     "module 'nets.small_cnn' has no attribute 'nothing'"),
    ("models.resnet20.weights", "nets/no-such-weights.pt", "models.resnet20",
     "'nets/no-such-weights.pt' is not a file"),
]
CASES = BAD + MORE


@pytest.mark.parametrize(("path", "value", "key", "words"), CASES,
                         ids=[c[0] + "=" + repr(c[1])[:20] for c in CASES])
def test_bad_params_exit_2_name_the_key_and_write_nothing(tmp_path, capsys, path, value, key,
                                                          words):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(_with(path, value)))
    out = tmp_path / "out"
    rc = run_main(train_dense.main, ["digits", "resnet20", str(tmp_path / "data"), str(out),
                                     "--params", str(params)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1, err
    assert err[0].startswith(f"error: {params}: {key}"), err[0]
    assert words in err[0], err[0]
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def test_the_table_has_at_least_twenty_cases():
    assert len(CASES) >= 20 and len({c[0] for c in CASES}) >= 20
