"""What the sweep and experiment flows are made of: params overrides, checked with
chipprune.config exactly as DVC's `-S` would apply them; the stages a set of experiments
shares (computed once); one temporary DVC workspace per experiment, sharing its machine's DVC
cache (so unchanged stages are skipped and every result lands in the cache); what `dvc repro`
did with each stage; and one table of every experiment's DVC metrics.

Why not `dvc exp run --queue`: the project's .gitignore ignores `runs/`, so the metrics never
reach an experiment's commit and `dvc exp show` has nothing to show, and the queue's
workers are local Celery processes, not Prefect's workers on other machines."""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import yaml
from prefect import task
from prefect.cache_policies import NO_CACHE

from chipprune.config import ConfigError, has_key, parse_params
from pipelines.graph import StageSpec, plan_stages
from pipelines.tasks import dvc, run_cli, tool_env

# What a grid's seed sets, where params.yaml has the key: the mask seeds of every method
# (ChipNet's training, CHIP's image sample, the baselines') and the method's fine-tuning.
SEED_KEYS = ("learn_masks.seed", "chip.seed", "baselines.seed", "finetune.{method}.seed")
TABLE_COLUMNS = (
    "experiment", "overrides", "run", "method", "test_top1", "test_top5", "params",
    "params_fraction", "macs", "macs_fraction", "latency_ms_bs1", "worker", "attempts",
)
# How `dvc repro` reports each stage (dvc/stage/__init__.py, dvc/stage/cache.py): run, checked
# out from the run-cache (this machine's, or the remote's with --pull), or already up to date.
REPRO_OUTCOMES = {
    "ran": re.compile(r"^Running stage '(.+?)':", re.M),
    "restored": re.compile(r"^Stage '(.+?)' is cached - skipping run", re.M),
    "unchanged": re.compile(r"^Stage '(.+?)' didn't change, skipping", re.M),
}
_BARE = re.compile(r"[A-Za-z_][\w.\-/]*")


def hydra_value(value: Any) -> str:
    """A Python value in Hydra's override grammar (what `dvc exp run -S key=value` parses)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, int | float):
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"override value {value!r}: only finite numbers")
        return repr(value)
    if isinstance(value, str):
        if _BARE.fullmatch(value) and value.lower() not in ("true", "false", "null", "nan", "inf"):
            return value
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if isinstance(value, list | tuple):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{hydra_value(v)}" for k, v in value.items()) + "}"
    raise ConfigError(f"override value {value!r}: not a YAML scalar, list or mapping")


def set_params_args(overrides: dict[str, Any]) -> list[str]:
    """`key=value` strings; a key must exist in params.yaml unless written `+key` (add)."""
    return [f"{key}={hydra_value(value)}" for key, value in overrides.items()]


def label(overrides: dict[str, Any]) -> str:
    return " ".join(set_params_args(overrides))


def apply_overrides(params_path: Path, overrides: dict[str, Any]) -> None:
    """Rewrite params_path in place with DVC's own `-S` code (Hydra, strict keys)."""
    from dvc.exceptions import InvalidArgumentError
    from dvc.utils.hydra import apply_overrides as dvc_apply_overrides

    try:
        dvc_apply_overrides(params_path, set_params_args(overrides))
    except InvalidArgumentError as e:
        cause = str(e.__cause__ or e).strip().splitlines()[0]
        raise ConfigError(f"params.yaml: cannot apply `{label(overrides)}`: {cause}") from None


def overridden_params(repo: Path, overrides: dict[str, Any]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        params = Path(tmp) / "params.yaml"
        shutil.copyfile(repo / "params.yaml", params)
        apply_overrides(params, overrides)
        return yaml.safe_load(params.read_text())


def grid_overrides(
    repo: str | Path,
    methods: list[str] | None = None,
    budgets: list[str] | None = None,
    seeds: list[int] | None = None,
) -> list[dict[str, Any]]:
    """One override dict per methods x budgets x seeds point (a budget is TYPE-TARGET, as in
    prune.budgets); an axis left out keeps params.yaml's value. A seed sets each of
    SEED_KEYS that params.yaml has."""
    if not any((methods, budgets, seeds)):
        raise ConfigError("sweep: give `overrides` or at least one grid axis")
    params = yaml.safe_load((Path(repo) / "params.yaml").read_text()) or {}
    prune = params.get("prune") or {}
    points = []
    for method, budget, seed in itertools.product(
        methods or [None], budgets or [None], seeds or [None]
    ):
        point: dict[str, Any] = {}
        if method is not None:
            point["prune.methods"] = [method]
        if budget is not None:
            point["prune.budgets"] = [budget]
        if seed is not None:
            for key in SEED_KEYS:
                for m in [method] if method else prune.get("methods") or []:
                    if has_key(params, key.format(method=m)):
                        point[key.format(method=m)] = seed
        points.append(point)
    return points


@task(cache_policy=NO_CACHE)
def validate_overrides(repo: str, experiments: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every experiment's params.yaml, as DVC would write it, through chipprune.config: the
    first ConfigError aborts the sweep before anything runs."""
    if not experiments:
        raise ConfigError("sweep: no experiments")
    for overrides in experiments:
        if not isinstance(overrides, dict) or not overrides:
            raise ConfigError(f"sweep: an experiment is a non-empty dict of params keys, got {overrides!r}")
        parse_params(overridden_params(Path(repo), overrides), f"params.yaml with {label(overrides)}")
    return experiments


def experiment_plan(
    repo: Path, overrides: dict[str, Any], targets: list[str] | None = None
) -> list[StageSpec]:
    """The stages `dvc repro [targets]` would visit with the overrides applied (dvc.yaml and
    the overridden params.yaml in a scratch DVC repo: no data needed)."""
    from dvc.repo import Repo

    with tempfile.TemporaryDirectory() as tmp:
        shutil.copyfile(repo / "dvc.yaml", Path(tmp) / "dvc.yaml")
        shutil.copyfile(repo / "params.yaml", Path(tmp) / "params.yaml")
        apply_overrides(Path(tmp) / "params.yaml", overrides)
        Repo.init(tmp, no_scm=True).close()
        return plan_stages(tmp, targets)


def repro_outcomes(output: str) -> dict[str, list[str]]:
    """`dvc repro`'s log -> {"ran": [...], "restored": [...], "unchanged": [...]} stages."""
    return {kind: pattern.findall(output) for kind, pattern in REPRO_OUTCOMES.items()}


def _git_visible_files(repo: Path) -> list[str]:
    """Tracked and untracked-but-not-ignored files: the code and config a run depends on."""
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=repo, capture_output=True, text=True, check=True, timeout=60,
    ).stdout
    return sorted({p for p in out.split("\0") if p})


def _uncached_outs(repo: Path) -> list[str]:
    """DVC outputs with cache: false (run-id files, metrics, histories): not in the DVC cache,
    so a workspace needs copies for DVC to see their stages as up to date."""
    from dvc.repo import Repo

    with Repo(os.fspath(repo)) as dvc_repo:
        root = Path(dvc_repo.root_dir)
        return sorted(
            os.path.relpath(out.fs_path, root)
            for stage in dvc_repo.index.stages
            for out in stage.outs
            if not out.use_cache
        )


def _cache_dir(repo: Path) -> str:
    from dvc.repo import Repo

    with Repo(os.fspath(repo)) as dvc_repo:
        return str(dvc_repo.cache.local_cache_dir)


@task(task_run_name="{name}: workspace", cache_policy=NO_CACHE)
def prepare_workspace(repo: str, workspace: str, name: str, overrides: dict[str, Any]) -> str:
    """A copy of the repo's code, params and dvc.lock with the overrides applied, using the
    repo's DVC cache (outputs are checked out from it and new ones land in it)."""
    src, dst = Path(repo), Path(workspace)
    if dst.exists():
        shutil.rmtree(dst)
    for rel in [*_git_visible_files(src), *_uncached_outs(src)]:
        path = src / rel
        if path.is_dir():
            shutil.copytree(path, dst / rel, dirs_exist_ok=True)
        elif path.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, dst / rel)
    # No git in the copy: DVC runs without SCM and keeps the repo's cache (and the remote
    # a user set in .dvc/config.local, which git does not see).
    from dvc.config import Config

    (dst / ".dvc").mkdir(exist_ok=True)
    if (src / ".dvc" / "config.local").is_file():
        shutil.copy2(src / ".dvc" / "config.local", dst / ".dvc" / "config.local")
    cache = _cache_dir(src)
    with Config(dvc_dir=str(dst / ".dvc")).edit("local") as conf:
        conf["core"]["no_scm"] = True
        conf["cache"]["dir"] = cache
    apply_overrides(dst / "params.yaml", overrides)
    return str(dst)


@task(task_run_name="{name}: dvc {args[0]}", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=5)
def dvc_step(workspace: str, name: str, args: list[str], env: dict[str, str]) -> str:
    """One DVC command in an experiment's own workspace (its own repo lock); for `--json`
    commands, stdout alone."""
    return run_cli(dvc(*args), workspace, tool_env(env), stdout_only="--json" in args)


@task(task_run_name="{name}: read evaluations", cache_policy=NO_CACHE)
def evaluation_rows(name: str, overrides: dict[str, Any], workspace: str) -> list[dict[str, Any]]:
    """One row per model the experiment evaluated (the evaluate stage's
    runs/evaluate/<run>/metrics.json in its workspace), scalar values only."""
    rows = []
    for path in sorted(Path(workspace, "runs", "evaluate").glob("*/metrics.json")):
        data = json.loads(path.read_text())
        row: dict[str, Any] = {"experiment": name, "overrides": label(overrides),
                               "run": path.parent.name,
                               "metrics_file": path.relative_to(workspace).as_posix()}
        row.update({k: v for k, v in data.items() if isinstance(v, str | int | float | bool)})
        rows.append(row)
    return rows


@task(cache_policy=NO_CACHE)
def write_table(rows: list[dict[str, Any]], out: str) -> str:
    """`<out>.csv` (every column) and `<out>.md` (the main ones)."""
    import pandas as pd

    table = pd.DataFrame(rows)
    base = Path(out)
    base.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(base.with_suffix(".csv"), index=False)
    shown = [c for c in TABLE_COLUMNS if c in table.columns]
    base.with_suffix(".md").write_text(table[shown].to_markdown(index=False, floatfmt=".4g") + "\n")
    return str(base.with_suffix(".csv"))


def default_remote(repo: Path) -> str | None:
    """The DVC remote `dvc push`/`dvc pull` use in repo (core.remote, any config level)."""
    from dvc.repo import Repo

    with Repo(os.fspath(repo)) as dvc_repo:
        return dvc_repo.config["core"].get("remote")


RESULT_ARTIFACT = "chipprune-experiment"  # the key of an experiment's table artifact


@task(cache_policy=NO_CACHE)
def publish_result(rows: list[dict[str, Any]]) -> None:
    """An experiment's rows as a Prefect table artifact of its flow run: visible in the UI,
    and how a sweep on another machine reads them back through the Prefect API."""
    from prefect.artifacts import create_table_artifact

    create_table_artifact(rows, key=RESULT_ARTIFACT, description="chipprune experiment: "
                          "one row per evaluated model, with the worker that ran it")


def read_result(flow_run_id: Any) -> list[dict[str, Any]]:
    """The rows publish_result stored for one flow run."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterKey,
        FlowRunFilter,
        FlowRunFilterId,
    )

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[RESULT_ARTIFACT])),
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
        )
    if not artifacts:
        raise RuntimeError(f"flow run {flow_run_id} completed without its {RESULT_ARTIFACT} artifact")
    data = artifacts[0].data
    return json.loads(data) if isinstance(data, str) else data
