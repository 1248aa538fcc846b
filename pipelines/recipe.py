"""Run a published grid: a params file from recipes/ becomes params.yaml and `dvc exp run`
runs it as a named DVC experiment (compare them with `dvc exp show`).

    python -m pipelines.recipe recipes/chip-cifar10.yaml [--name NAME] [--dry-run]
    python -m pipelines.recipe recipes/chip-cifar10.yaml --smoke [--workdir DIR]

The recipe is validated first (datasets, models, budgets, rate strings against their
models), so a broken recipe never replaces params.yaml; the previous params.yaml is kept
as .chipprune/params.before-<name>.yaml. The one-liner this automates:

    cp recipes/chip-cifar10.yaml params.yaml && dvc exp run -n chip-cifar10

--smoke runs every stage of the recipe on synthetic images of the real shapes with a tiny
schedule, in a work folder (default .chipprune/smoke/<name>), leaving params.yaml alone:
see pipelines.smoke. `make test` smoke-runs every recipe.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

from chipprune.atomic import write_text
from chipprune.config import ConfigError, load_params


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pipelines.recipe", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipe", type=Path)
    ap.add_argument("--name", help="experiment name (default: the recipe's file name)")
    ap.add_argument("--dry-run", action="store_true", help="validate and stop")
    ap.add_argument("--smoke", action="store_true",
                    help="every stage on synthetic data, one tiny epoch each, in --workdir")
    ap.add_argument("--workdir", type=Path, help="--smoke: where (default .chipprune/smoke/NAME)")
    args = ap.parse_args(argv)
    name = args.name or args.recipe.stem
    if args.smoke:
        from pipelines.smoke import run_smoke

        workdir = args.workdir or Path(".chipprune") / "smoke" / name
        try:
            stages = run_smoke(args.recipe, workdir)
        except (ConfigError, RuntimeError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"{args.recipe}: smoke run passed, {len(stages)} stages, in {workdir}")
        return 0
    try:
        load_params(args.recipe)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(f"{args.recipe}: valid")
        return 0
    params = Path("params.yaml")
    if params.exists():
        keep = Path(".chipprune") / f"params.before-{name}.yaml"
        keep.parent.mkdir(exist_ok=True)
        shutil.copyfile(params, keep)
    write_text(params, args.recipe.read_text())
    return subprocess.call(["dvc", "exp", "run", "-n", name])


if __name__ == "__main__":
    sys.exit(main())
