"""The MLflow Model Registry side of deployment: every exported model logged as an MLflow ONNX
model (signature, input example, explicit requirements) and registered, one registered model
per dataset and architecture and one version per export run, the version tagged with what
it is (method, budget, fractions, the checkpoint's hash); and the choice of the best version
under a budget, which `pipelines.compare --promote` points an alias at.

Why ONNX and not the pytorch flavour: the registered artifact is then what a deployer runs
(ONNX Runtime, no Python class to unpickle), the same file the export stage checked for parity.
"""

from __future__ import annotations

import importlib.metadata
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from chipprune.deploy.onnx_export import INPUT, OUTPUT


def registered_model_name(dataset: str, model: str) -> str:
    """One registered model per dataset and architecture: `digits-resnet20`; a factory's
    `module:callable` (which the registry refuses: no ':' or '/') as `module.callable`,
    `digits-torchvision.resnet18`."""
    return f"{dataset}-{model}".replace(":", ".").replace("/", ".")


def default_alias(budget: str) -> str:
    """`best-flops-0_25` for `flops-0.25`: aliases allow letters, digits, `_` and `-` only."""
    return "best-" + budget.replace(".", "_")


def check_alias(alias: str) -> None:
    """MLflow's rule for alias names, as a ValueError naming what is allowed."""
    if not re.fullmatch(r"[\w\-]+", alias) or alias.lower() == "latest" or \
            re.fullmatch(r"[vV]\d+", alias):
        raise ValueError(f"alias {alias!r}: use letters, digits, '_' and '-' only; 'latest' "
                         "and v<number> are reserved")


def signature(input_shape: Sequence[int], num_classes: int):
    """Tensor signature of the exported graph: float32 images (N, C, H, W) -> logits (N, K),
    the batch dimension free, the names the ONNX graph uses."""
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    f32 = np.dtype(np.float32)
    return ModelSignature(inputs=Schema([TensorSpec(f32, (-1, *input_shape), INPUT)]),
                          outputs=Schema([TensorSpec(f32, (-1, num_classes), OUTPUT)]))


def requirements() -> list[str]:
    """Pinned to what exported and checked the file; inferring them costs seconds per call."""
    return [f"{p}=={importlib.metadata.version(p)}" for p in ("onnx", "onnxruntime")]


def log_registered_onnx(onnx_path: str | Path, example: np.ndarray, num_classes: int,
                        name: str, tags: Mapping[str, str], providers: Sequence[str]) -> str:
    """Log the ONNX file as the active run's MLflow model `model` (served with `providers`,
    ONNX Runtime's execution providers in order), register it as a new version of `name`,
    tag the version; returns the version number."""
    import mlflow
    import mlflow.onnx
    import onnx

    info = mlflow.onnx.log_model(
        onnx.load(str(onnx_path)), name="model",
        signature=signature(example.shape[1:], num_classes), input_example=example,
        pip_requirements=requirements(), save_as_external_data=False,
        onnx_execution_providers=list(providers),
    )
    # registered with its tags in one call: a tag set per call was a store round trip each
    version = mlflow.register_model(info.model_uri, name,
                                    tags={k: str(v) for k, v in tags.items()})
    return str(version.version)


@dataclass(frozen=True)
class Candidate:
    """One evaluated model that has a registered version."""
    registered: str  # registered model name
    version: str
    top1: float
    macs_fraction: float
    budget_type: str
    target: float


def best_under_budget(candidates: Sequence[Candidate], budget_type: str,
                      target: float) -> dict[str, Candidate]:
    """Per registered model, the version with the best test top-1 among those pruned to a
    budget of `budget_type` at or below `target` (a model pruned to flops-0.125 also meets
    flops-0.25); ties go to the smaller MACs fraction, then the newer version."""
    best: dict[str, Candidate] = {}
    for c in candidates:
        if c.budget_type != budget_type or c.target > target + 1e-12:
            continue
        key = (c.top1, -c.macs_fraction, int(c.version))
        held = best.get(c.registered)
        if held is None or key > (held.top1, -held.macs_fraction, int(held.version)):
            best[c.registered] = c
    return best


def versions_by_checkpoint(name: str, checkpoint_tag: str) -> dict[str, Any]:
    """Checkpoint sha256 -> the newest registered version of `name` made from it."""
    import mlflow

    client = mlflow.MlflowClient()
    out: dict[str, Any] = {}
    for v in client.search_model_versions(f"name = '{name}'"):
        sha = v.tags.get(checkpoint_tag)
        if sha and (sha not in out or int(v.version) > int(out[sha].version)):
            out[sha] = v
    return out


def set_alias(name: str, alias: str, version: str) -> None:
    import mlflow

    mlflow.MlflowClient().set_registered_model_alias(name, alias, version)
