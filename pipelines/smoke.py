"""A recipe's smoke run: every stage `dvc repro` would run for the recipe, with the recipe's
models, datasets' shapes and class counts, methods and stage commands, on synthetic images
and a tiny schedule (one epoch per stage, two batches of 2 per epoch), so a recipe is
exercised end to end without its data or a GPU.

    python -m pipelines.recipe recipes/chip-imagenet.yaml --smoke [--workdir DIR]

What changes from the recipe (`smoke_params`): each dataset becomes `source: synthetic` of
the real shape (an image folder's class count cannot be known without it: 1000, as
ImageNet-1k), every batch size 2, every epoch count 1 (no warmup), CHIP scores 2 batches,
latency tables (in the recipe's runtime) are one repeat at batch 2 with no minimum time,
calibrated on one random model, and the measurements one repeat at batch 1, ONNX files come
from the TorchScript exporter (the fast one), training runs in one CPU process (a sharded dataset, as ImageNet's
is, stays sharded and is decoded in that process), and the grid keeps its first budget and
first dataset (plus those its transfer pairs and rate configurations read): every model and
method, each on one grid point. The stages run in this process, in DVC's order, from the
commands DVC resolves from dvc.yaml: the imports are paid once instead of once per stage.
"""

from __future__ import annotations

import copy
import importlib
import os
import shlex
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from chipprune.config import ConfigError, has_key, parse_params
from pipelines.graph import plan_stages

REPO = Path(__file__).resolve().parents[1]
BATCH = 2
# Per source: channels, classes, image side (None: the recipe's image_size)
REAL_SHAPES: dict[str, tuple[int, int, int | None]] = {
    "cifar10": (3, 10, 32),
    "cifar100": (3, 100, 32),
    "svhn": (3, 10, 32),
    "digits": (1, 10, 16),
    "imagefolder": (3, 1000, None),
    "imagenet": (3, 1000, None),
    "tiny_imagenet": (3, 200, None),
}
TRAIN_KEYS = ("train_dense", "learn_masks")


def _tiny_training(cfg: dict[str, Any]) -> None:
    """A TrainConfig-like section, in place: one epoch of two batches, no warmup, one process."""
    cfg["epochs"] = 1
    cfg["batch_size"] = BATCH
    cfg.pop("eval_batch_size", None)
    cfg.pop("distributed", None)
    cfg["device"] = "cpu"
    if isinstance(cfg.get("schedule"), dict):
        cfg["schedule"].pop("warmup_epochs", None)


def smoke_params(raw: dict[str, Any]) -> dict[str, Any]:
    """The recipe's params for a smoke run (see the module doc)."""
    p = copy.deepcopy(raw)
    for name, ds in p["datasets"].items():
        source = ds.get("source")
        if source not in REAL_SHAPES:
            raise ConfigError(f"datasets.{name}.source: {source!r} has no smoke shape; "
                              f"known: {', '.join(REAL_SHAPES)}")
        channels, classes, side = REAL_SHAPES[source]
        if ds.get("classes"):
            classes = len(ds["classes"])
        side = ds.get("image_size") or side
        if side is None:
            raise ConfigError(f"datasets.{name}: needs image_size for a smoke run")
        storage = ds.get("storage", "auto")
        if storage == "auto":  # what it would be at full size: ImageNet's is shards
            storage = "shards" if source == "imagenet" else "memory"
        p["datasets"][name] = {
            "source": "synthetic", "image_size": side, "val_size": 2 * BATCH, "seed": 0,
            "storage": storage,
            "augment": ds.get("augment", {}),
            "synthetic": {"channels": channels, "classes": classes, "train": 4 * BATCH,
                          "test": 2 * BATCH},
        }
    for key in TRAIN_KEYS:
        _tiny_training(p.setdefault(key, {}))
    p["learn_masks"]["bn_recalibration_batches"] = min(
        p["learn_masks"].get("bn_recalibration_batches", 0), 1)
    for recipe in p.get("finetune", {}).values():
        _tiny_training(recipe)
    _tiny_training(p.setdefault("transfer", {}).setdefault("recipe", {}))
    # latency at batch 1 alone: the ONNX files then run at a batch other than the export's
    # example (2) and the parity check's, so a batch dimension fixed by mistake still fails
    p["evaluate"] = {"batch_size": BATCH, "device": "cpu",
                     "latency": {"batch_sizes": [1], "warmup": 1, "repeats": 1, "rounds": 1,
                                 "dense_reference": False}}
    p["latency_budget"] = {"device": "cpu", "batch_size": BATCH, "step": 1024,
                           "runtime": raw.get("latency_budget", {}).get("runtime", "torch"),
                           "memory_format": "auto", "warmup": 1, "repeats": 1, "rounds": 1,
                           "min_ms": 0, "calibration": 1}
    p["chip"] = {**p.get("chip", {}), "batches": 2, "batch_size": BATCH, "device": "cpu"}
    # the TorchScript exporter: 4-30x faster than torch.export's on these models, which was
    # most of a large recipe's smoke run (84 of 135 s for chip-cifar10); the export stage,
    # its parity check and the registry run as ever (tests/test_export.py covers torch.export)
    p["export"] = {**p.get("export", {}), "exporter": "torchscript"}
    prune = p.get("prune")
    if prune:  # the first budget and dataset, and those the transfers and rates read
        pairs = list((p["transfer"].get("pairs") or {}).values())
        rates = list((p.get("chip_rates") or {}).values())
        prune["budgets"] = list(dict.fromkeys([prune["budgets"][0], *(x["budget"] for x in pairs)]))
        prune["datasets"] = list(dict.fromkeys([
            prune["datasets"][0], *(x["teacher"] for x in pairs), *(x["dataset"] for x in rates)]))
        used = set(prune["datasets"]) | {x["student"] for x in pairs}
        p["dense"]["datasets"] = [d for d in p["dense"]["datasets"] if d in used]
        p["datasets"] = {k: v for k, v in p["datasets"].items() if k in used}
    return p


def missing_params(repo: Path, params: dict[str, Any]) -> list[str]:
    """Every params key a stage of dvc.yaml depends on that `params` lacks (DVC fails on
    them at run time; the schema's defaults do not help, DVC reads the file)."""
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo

    with Repo(str(repo)) as dvc_repo:
        keys = {k for stage in dvc_repo.index.stages for dep in stage.deps
                if isinstance(dep, ParamsDependency) for k in dep.params}
    return sorted(k for k in keys if not has_key(params, k))


@contextmanager
def _inside(workdir: Path, env: dict[str, str]):
    old_cwd, old_env = Path.cwd(), {k: os.environ.get(k) for k in env}
    os.chdir(workdir)
    os.environ.update(env)
    try:
        yield
    finally:
        os.chdir(old_cwd)
        for k, v in old_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_smoke(recipe: str | os.PathLike[str], workdir: str | os.PathLike[str]) -> list[str]:
    """Smoke-run `recipe` in `workdir` (made, or emptied of a previous smoke run); returns
    the stages run, in order. A stage that fails raises RuntimeError naming it."""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    from stages._common import run_main

    recipe, workdir = Path(recipe), Path(workdir).resolve()
    params = smoke_params(yaml.safe_load(recipe.read_text()))
    parse_params(params, f"{recipe} (smoke)")
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    shutil.copy(REPO / "dvc.yaml", workdir / "dvc.yaml")
    (workdir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    Repo.init(str(workdir), no_scm=True).close()
    try:
        missing = missing_params(workdir, params)
        plan = plan_stages(workdir)
    except DvcException as e:  # e.g. a foreach over a key the recipe lacks
        raise ConfigError(f"{recipe}: dvc.yaml does not resolve with it: {e}") from None
    if missing:  # `dvc repro` would stop at the first stage that reads one
        raise ConfigError(f"{recipe}: dvc.yaml reads params the recipe does not set: "
                          f"{', '.join(missing)}")
    if str(REPO) not in sys.path:  # the stage modules, whatever the cwd
        sys.path.insert(0, str(REPO))
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlflow.db'}",
           "CHIPPRUNE_ARTIFACT_ROOT": (workdir / "mlartifacts").as_uri(),
           "MLFLOW_EXPERIMENT_NAME": f"smoke-{recipe.stem}", "CHIPPRUNE_ROOT": str(workdir),
           # a few images per stage: decoded in the stage's process, not by forked workers
           "CHIPPRUNE_DATA_WORKERS": "0"}
    done = []
    with _inside(workdir, env):
        for spec in plan:
            argv = shlex.split(spec.cmd)
            if argv[:2] != ["python", "-m"]:
                raise RuntimeError(f"{spec.name}: not a `python -m` stage command: {spec.cmd}")
            print(f"smoke {recipe.stem}: {spec.name}", flush=True)
            start = time.perf_counter()
            main = importlib.import_module(argv[2]).main
            if run_main(main, argv[3:]) != 0:
                raise RuntimeError(f"smoke run of {recipe}: stage {spec.name} failed")
            print(f"smoke {recipe.stem}: {spec.name} done in {time.perf_counter() - start:.1f} s",
                  flush=True)
            done.append(spec.name)
    return done
