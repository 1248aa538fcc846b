"""DVC stage `prepare`: a dataset from params.yaml `datasets.<name>` -> uint8 tensors per
split + meta.json in data/prepared/<name>.

    python -m stages.prepare <name> <out_dir> <run_id_json>
"""

from __future__ import annotations

import argparse
import sys

from chipprune.config import ConfigError, load_params
from chipprune.data import prepare_dataset, save_prepared
from chipprune.reporting import tracking
from stages._common import atomic_dir, run_main


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="stages.prepare", description=__doc__)
    ap.add_argument("name", help="dataset key under `datasets:` in params.yaml")
    ap.add_argument("out_dir")
    ap.add_argument("run_id_json")
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args(argv)

    params = load_params(args.params)
    if args.name not in params.datasets:
        raise ConfigError(f"datasets.{args.name}: not defined; defined: {sorted(params.datasets)}")
    cfg = params.datasets[args.name]
    ds = prepare_dataset(
        cfg.source,
        root=cfg.root,
        download=cfg.download,
        classes=cfg.classes,
        val_size=cfg.val_size,
        seed=cfg.seed,
        image_size=cfg.image_size,
        synthetic=cfg.synthetic.model_dump() if cfg.synthetic else None,
    )
    ds.meta["name"] = args.name
    with tracking.stage_run(
        f"prepare@{args.name}", {"dataset": cfg.model_dump()}, args.run_id_json
    ) as _:
        import mlflow

        with atomic_dir(args.out_dir) as tmp:
            save_prepared(ds, tmp)
        mlflow.log_dict(ds.meta, "meta.json")
        mlflow.log_metrics({f"size.{k}": v for k, v in ds.meta["sizes"].items()})
    print(f"prepared {args.name}: {ds.meta['sizes']} {ds.meta['image_shape']}", flush=True)


if __name__ == "__main__":
    sys.exit(run_main(main))
