"""MLflow adapter the stages call: one run per executed stage, nested under the pipeline's
run when MLFLOW_PARENT_RUN_ID is set, with the whole config, provenance tags and a small
run-id file so a stage that DVC later skips or restores still points at the run that made it."""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from chipprune import atomic

DEFAULT_EXPERIMENT = "chipprune"
PACKAGES = ("chipprune", "torch", "torchvision", "dvc", "mlflow", "prefect", "torch-pruning")


def repo_root() -> Path:
    """The project root: where params.yaml lives (stages run from there under DVC)."""
    return Path(os.environ.get("CHIPPRUNE_ROOT", Path.cwd())).resolve()


def local_store(root: Path | None = None) -> Path:
    """The sqlite file the stages of the project at `root` (default: repo_root()) log to
    when MLFLOW_TRACKING_URI is unset."""
    return (root or repo_root()) / "mlflow.db"


def tracking_uri() -> str:
    # MLflow 3 refuses the old file store; sqlite needs an absolute path to be cwd-independent.
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{local_store()}"


class TrackingUnreachable(RuntimeError):
    """The MLflow tracking server does not answer: found before any work starts."""


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail fast on an http(s) tracking URI that does not answer; MLflow itself would retry
    with backoff for minutes, after the stage had already started training."""
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout):
            pass
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise TrackingUnreachable(
            f"MLflow tracking server {uri} cannot be reached ({getattr(e, 'reason', e)}); "
            "start it, or unset MLFLOW_TRACKING_URI to use the local sqlite store"
        ) from None


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], cwd=repo_root(), capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def provenance_tags() -> dict[str, str]:
    tags = {"python": sys.version.split()[0]}
    commit = _git("rev-parse", "HEAD")
    if commit:
        tags["git.commit"] = commit
        tags["git.dirty"] = str(bool(_git("status", "--porcelain", "--untracked-files=no")))
    for pkg in PACKAGES:
        try:
            tags[f"version.{pkg}"] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    return tags


def file_sha256(path: str | Path) -> str:
    """sha256 of the file's bytes. A checkpoint is hashed by several steps of one process (a
    stage's resume fingerprint and its input tags; evaluate's and export's tags in a smoke
    run), hundreds of MB each time: a file whose identity (inode, size, mtime), as DVC keys
    its own hash cache, has not changed is not read again."""
    st = os.stat(path)
    return _sha256_of(os.path.realpath(path), st.st_ino, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=256)
def _sha256_of(path: str, inode: int, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}: MLflow params are flat."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, f"{key}."))
        else:
            out[key] = v
    return out


def _experiment_id(mlflow: Any, name: str) -> str:
    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    artifacts = os.environ.get("CHIPPRUNE_ARTIFACT_ROOT") or (repo_root() / "mlartifacts").as_uri()
    try:
        return mlflow.create_experiment(name, artifact_location=artifacts)
    except Exception:  # created meanwhile by a parallel stage
        return mlflow.get_experiment_by_name(name).experiment_id


@contextmanager
def stage_run(
    stage: str,
    config: Mapping[str, Any],
    run_id_path: str | Path,
    inputs: Mapping[str, str | Path] = (),
    tags: Mapping[str, str] | None = None,
) -> Iterator[Any]:
    """Open the MLflow run of one executed stage; on success write its id to run_id_path."""
    import mlflow

    check_reachable(tracking_uri())
    mlflow.set_tracking_uri(tracking_uri())
    experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME", DEFAULT_EXPERIMENT)
    exp_id = _experiment_id(mlflow, experiment)
    all_tags = {"chipprune.stage": stage, **provenance_tags(), **(tags or {})}
    for name, path in dict(inputs).items():
        all_tags[f"input.{name}.sha256"] = file_sha256(path)
    parent = os.environ.get("MLFLOW_PARENT_RUN_ID") or None
    with mlflow.start_run(
        experiment_id=exp_id, run_name=stage, parent_run_id=parent, tags=all_tags
    ) as run:
        mlflow.log_params({k: str(v)[:6000] for k, v in flatten(config).items()})
        yield run
        atomic.write_json(
            run_id_path,
            {
                "run_id": run.info.run_id,
                "experiment_id": exp_id,
                "experiment": experiment,
                "stage": stage,
                "parent_run_id": parent,
                "tracking_uri": tracking_uri(),
            },
        )


def log_history(history: list[dict[str, float]]) -> None:
    """Per-epoch metrics with the epoch as MLflow step."""
    import mlflow

    for row in history:
        step = int(row["epoch"])
        mlflow.log_metrics({k: float(v) for k, v in row.items() if k != "epoch"}, step=step)
