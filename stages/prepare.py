"""DVC stage `prepare`: a dataset from params.yaml `datasets.<name>` -> uint8 tensors per
split + meta.json in data/prepared/<name>, or (`storage: shards`, or `auto` for a set too
large for memory) tar shards of encoded images with an index per split + meta.json.

    python -m stages.prepare <name> <out_dir> <run_id_json>
"""

from __future__ import annotations

import argparse
import sys

from chipprune.config import ConfigError, load_params
from chipprune.data import prepare_dataset, save_prepared
from chipprune.data.artifact import write_meta
from chipprune.data.prepare import memory_bytes, prepare_shards
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
    common = {"root": cfg.root, "download": cfg.download, "classes": cfg.classes,
              "val_size": cfg.val_size, "seed": cfg.seed, "image_size": cfg.image_size,
              "synthetic": cfg.synthetic.model_dump() if cfg.synthetic else None}
    storage = cfg.storage
    if storage == "auto":
        need = memory_bytes(cfg.source, root=cfg.root, download=cfg.download,
                            image_size=cfg.image_size)
        storage = "shards" if need is not None and need > cfg.memory_limit_gb * 2**30 else "memory"
    ds = None if storage == "shards" else prepare_dataset(cfg.source, **common)
    with tracking.stage_run(
        f"prepare@{args.name}", {"dataset": cfg.model_dump()}, args.run_id_json
    ) as _:
        import mlflow

        with atomic_dir(args.out_dir) as tmp:
            if ds is None:
                meta = prepare_shards(cfg.source, tmp, shard_side=cfg.shard_side,
                                      shard_size=cfg.shard_size, workers=cfg.workers,
                                      skip_corrupt=cfg.skip_corrupt, **common)
                meta["name"] = args.name
                write_meta(tmp, meta)
            else:
                meta = ds.meta
                meta["name"] = args.name
                save_prepared(ds, tmp)
        mlflow.log_dict(meta, "meta.json")
        mlflow.log_metrics({f"size.{k}": v for k, v in meta["sizes"].items()})
        if storage == "shards":
            mlflow.log_metrics({f"skipped.{k}": len(v) for k, v in meta["skipped"].items()})
    skipped = sum(len(v) for v in meta.get("skipped", {}).values())
    print(f"prepared {args.name} ({storage}): {meta['sizes']} {meta['image_shape']}"
          + (f", {skipped} unreadable images left out" if skipped else ""), flush=True)


if __name__ == "__main__":
    sys.exit(run_main(main))
