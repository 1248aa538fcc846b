"""Every stage kind on ResNet-50 at 224 from shards, on this machine: a few hundred images of
bench/data_throughput.py's generated ImageNet folder, through the real `dvc repro` of
chip-imagenet's grid (trimmed: one epoch each, CHIP and ChipNet at flops-0.552, the random
baseline, one rate configuration). Prints each stage's wall time and the report.

    python bench/imagenet_stages.py [--folder /tmp/chipprune-bench/imagenet-20000]
                                    [--classes 10] [--per-class 30] [--work /tmp/chipprune-r50]

The subset is hard links into --folder (run bench/data_throughput.py first); the work folder
is a copy of the project's stage code with its own params.yaml, DVC and MLflow stores.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def subset(folder: Path, out: Path, classes: int, per_class: int) -> None:
    for split, n in (("train", per_class), ("val", max(1, per_class // 5))):
        wnids = sorted(p.name for p in (folder / split).iterdir())[:classes]
        for w in wnids:
            (out / split / w).mkdir(parents=True, exist_ok=True)
            for f in sorted((folder / split / w).iterdir())[:n]:
                os.link(f, out / split / w / f.name)


def params(images: Path) -> dict:
    p = yaml.safe_load((REPO / "recipes/chip-imagenet.yaml").read_text())
    p["datasets"]["imagenet"].update(root=str(images), val_size=0.1, workers=2)
    one = {"epochs": 1, "batch_size": 16, "eval_batch_size": 32, "device": "cpu"}
    p["train_dense"].update(one, schedule={"kind": "cosine", "warmup_epochs": 0})
    for recipe in p["finetune"].values():
        recipe.update(one)
    p["learn_masks"] = {**one, "batch_size": 16}
    p["chip"] = {**p["chip"], "batches": 2, "batch_size": 16, "device": "cpu"}
    p["prune"].update(methods=["chip", "chipnet", "random"], baselines=["random"])
    p["finetune"]["chipnet"] = dict(p["finetune"]["chip"])
    p["chip_rates"] = {"r50-45": p["chip_rates"]["r50-45"]}
    p["evaluate"] = {"batch_size": 32, "device": "cpu",
                     "latency": {"batch_sizes": [1, 16], "warmup": 2, "repeats": 5, "rounds": 1}}
    return p


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--folder", type=Path, default=Path("/tmp/chipprune-bench/imagenet-20000"))
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--per-class", type=int, default=30)
    ap.add_argument("--work", type=Path, default=Path("/tmp/chipprune-r50"))
    args = ap.parse_args()
    if not (args.folder / "done").is_file():
        sys.exit(f"{args.folder}: not there; run bench/data_throughput.py first")
    work = args.work.resolve()
    if work.exists():
        shutil.rmtree(work)
    subset(args.folder, work / "images", args.classes, args.per_class)
    for name in ("chipprune", "stages", "pipelines", "nets", "dvc_templates"):
        shutil.copytree(REPO / name, work / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", work / "dvc.yaml")
    (work / "params.yaml").write_text(yaml.safe_dump(params(work / "images"), sort_keys=False))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "DVC_NO_ANALYTICS": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
           "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}",
           "CHIPPRUNE_ARTIFACT_ROOT": (work / "mlartifacts").as_uri()}
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=work, check=True, env=env)
    from pipelines.graph import plan_stages

    times = []
    for spec in plan_stages(work):
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "dvc", "repro", "--single-item", spec.name], cwd=work, env=env,
                              capture_output=True, text=True)
        took = time.perf_counter() - t0
        times.append((spec.name, took))
        print(f"{spec.name:48s} {took:7.1f} s", flush=True)
        if proc.returncode:
            sys.exit(proc.stdout[-3000:] + proc.stderr[-3000:])
    print(f"{len(times)} stages in {sum(t for _, t in times):.0f} s")
    print((work / "results/report.txt").read_text())


if __name__ == "__main__":
    main()
