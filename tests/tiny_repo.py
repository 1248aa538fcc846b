"""A git+DVC repo holding the project's pipeline (its code, dvc.yaml) with 1-epoch params
and one ChipNet chain, for the orchestration tests: `dvc repro evaluate` then runs six small
stages."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import REPO

BIN = Path(sys.executable).parent
# The ChipNet chain for one grid point: these targets keep a run small whatever else
# dvc.yaml holds (baselines, CHIP, transfer, report); their upstream stages come along.
TARGETS = ["evaluate"]
STAGES = [
    "prepare@digits",
    "train_dense@digits-resnet20",
    "profile_latency@digits-resnet20",
    "learn_masks@flops-0.5-digits-resnet20",
    "finetune@chipnet-flops-0.5-digits-resnet20",
    "evaluate",
]


def tiny_params() -> dict:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["train_dense"]["epochs"] = 1
    params["learn_masks"]["epochs"] = 1  # orchestration is under test, not the gates
    params["finetune"]["chipnet"]["epochs"] = 1
    # one ChipNet chain: evaluate's upstream is then the six stages of STAGES
    del params["datasets"]["digits_even"]
    params["dense"]["datasets"] = ["digits"]
    params["prune"].update(methods=["chipnet"], baselines=[], budgets=["flops-0.5"])
    params["chip_rates"] = {}
    params["transfer"]["pairs"] = {}
    params["evaluate"]["latency"] = {"batch_sizes": [1, 8], "warmup": 1, "repeats": 2}
    params["latency_budget"].update(batch_size=8, step=16, warmup=1, repeats=1, rounds=1,
                                    min_ms=0)
    return params


def git_env() -> dict[str, str]:
    return {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
            "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}


def make_tiny_repo(root: Path, dvc_remote: Path | None = None) -> Path:
    """The repo at root, committed; with dvc_remote, a local-directory DVC remote as its
    default (in .dvc/config, so clones have it too)."""
    root.mkdir(parents=True, exist_ok=True)
    for name in ("chipprune", "stages", "pipelines", "nets"):
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", ".gitignore"):
        shutil.copy(REPO / name, root / name)
    (root / "params.yaml").write_text(yaml.safe_dump(tiny_params()))
    git_dvc_init(root, dvc_remote)
    return root


def git_dvc_init(root: Path, dvc_remote: Path | None = None) -> None:
    """git init + dvc init (+ the default remote), everything committed."""
    dvc = [str(BIN / "dvc")]
    cmds = [["git", "init", "-q"], [*dvc, "init", "-q"]]
    if dvc_remote is not None:
        cmds.append([*dvc, "remote", "add", "-d", "shared", str(dvc_remote)])
    cmds += [["git", "add", "-A"], ["git", "commit", "-qm", "init"]]
    for cmd in cmds:
        subprocess.run(cmd, cwd=root, env=git_env(), check=True, capture_output=True, timeout=120)
