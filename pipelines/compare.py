"""The comparison table from MLflow alone: every evaluate run of an experiment (or of a sweep
nested under it), with its model's export run where there is one (ONNX Runtime columns),
the same table `stages.report` builds from the metrics and export files.

    python -m pipelines.compare --experiment chipprune [--all] [--csv table.csv]
    python -m pipelines.compare --experiment chipprune --promote flops-0.25 [--alias NAME]

Runs are found with `mlflow.search_runs` by their `chipprune.stage` tag; by default the
latest run of each configuration (method, dataset, model, budget, teacher, protocol) is kept,
so re-running a stage replaces its row; `--all` keeps every run.

`--promote TYPE-TARGET` points an alias (default `best-TYPE-TARGET`, the dot as `_`) of each
registered model (one per dataset and architecture, see stages.export) at the version with
the best test top-1 among the models pruned to a TYPE budget at or below TARGET, so a
deployer loads `models:/digits-resnet20@best-flops-0_25`.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from chipprune.atomic import atomic_path
from chipprune.config import parse_budget_label
from chipprune.deploy import registry
from chipprune.reporting import tracking
from chipprune.reporting.records import (
    CHECKPOINT_TAG,
    RECORD_TAGS,
    TAG_PREFIX,
    export_fields,
    record_from_run,
)
from chipprune.reporting.report import build_table, to_markdown


def evaluate_records(experiment: str, latest_only: bool = True) -> list[dict]:
    """One build_table record per evaluate run of `experiment`, newest first."""
    import mlflow

    uri = tracking.tracking_uri()
    tracking.check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name(experiment) is None:
        names = [e.name for e in mlflow.search_experiments()]
        raise ValueError(f"no MLflow experiment {experiment!r}; there are: {', '.join(names)}")
    runs = mlflow.search_runs(
        experiment_names=[experiment],
        filter_string=f"tags.`{TAG_PREFIX}method` != '' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        output_format="list",
    )
    exported = _export_metrics(experiment)
    records, seen = [], set()
    for run in runs:
        tags = run.data.tags
        key = tuple(tags.get(f"{TAG_PREFIX}{k}", "") for k in RECORD_TAGS)
        if latest_only and key in seen:
            continue
        seen.add(key)
        # the export of this very checkpoint (the same file hash), not of a namesake
        metrics = dict(run.data.metrics) | exported.get(tags.get(CHECKPOINT_TAG), {})
        records.append(record_from_run(tags, metrics, source=run.info.run_id)
                       | {CHECKPOINT_TAG: tags.get(CHECKPOINT_TAG)})
    return records


def promote(records: list[dict[str, Any]], budget: str, alias: str) -> list[registry.Candidate]:
    """Point `alias` of each registered model at its best version under `budget` (see
    registry.best_under_budget); the versions are joined to the evaluate records by the
    checkpoint's hash. Returns the promoted versions; ValueError when there are none."""
    kind, target = parse_budget_label(budget)
    pruned: dict[str, list[dict[str, Any]]] = {}  # registered model -> its pruned records
    for r in records:
        if (r.get("budget") or {}).get("target") is not None:
            pruned.setdefault(registry.registered_model_name(r["dataset"], r["model"]), []).append(r)
    candidates = []
    for name, rs in sorted(pruned.items()):
        versions = registry.versions_by_checkpoint(name, CHECKPOINT_TAG)
        candidates += [registry.Candidate(name, v.version, r["test_top1"], r["macs_fraction"],
                                          r["budget"]["type"], r["budget"]["target"])
                       for r in rs if (v := versions.get(r[CHECKPOINT_TAG])) is not None]
    best = registry.best_under_budget(candidates, kind, target)
    if not best:
        raise ValueError(f"no registered model version was pruned to a {kind} budget at or "
                         f"below {target:g} (registered versions: {len(candidates)}); run the "
                         "export stage after evaluate")
    for c in best.values():
        registry.set_alias(c.registered, alias, c.version)
    return list(best.values())


def _export_metrics(experiment: str) -> dict[str, dict[str, float]]:
    """Checkpoint sha256 -> the ONNX and ONNX Runtime metrics of its newest export run (the
    export stage's `export@<name>` runs, tagged `chipprune.exported` and with the file hash
    of the checkpoint they exported, as evaluate's runs are)."""
    import mlflow

    runs = mlflow.search_runs(
        experiment_names=[experiment],
        filter_string=f"tags.`{TAG_PREFIX}exported` != '' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        output_format="list",
    )
    out: dict[str, dict[str, float]] = {}
    for run in runs:
        out.setdefault(run.data.tags.get(CHECKPOINT_TAG), export_fields(run.data.metrics))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="pipelines.compare",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--experiment", required=True, help="MLflow experiment name")
    ap.add_argument("--all", action="store_true", help="every run, not the latest per config")
    ap.add_argument("--csv", help="also write the table here (CSV)")
    ap.add_argument("--promote", metavar="TYPE-TARGET",
                    help="alias each registered model's best version under this budget")
    ap.add_argument("--alias", help="the alias --promote sets (default best-TYPE-TARGET)")
    args = ap.parse_args(argv)
    if args.alias and not args.promote:
        ap.error("--alias goes with --promote")
    try:
        if args.promote:
            parse_budget_label(args.promote)  # bad input: before any MLflow call
            alias = args.alias or registry.default_alias(args.promote)
            registry.check_alias(alias)
        records = evaluate_records(args.experiment, latest_only=not args.all)
        if not records:
            raise ValueError(f"experiment {args.experiment!r} has no finished evaluate runs")
        if args.promote:
            for c in promote(records, args.promote, alias):
                print(f"{c.registered}@{alias} -> version {c.version} (top-1 {c.top1:.4f}, "
                      f"MACs fraction {c.macs_fraction:.3f}, {c.budget_type}-{c.target:g})")
            return 0
    except (ValueError, tracking.TrackingUnreachable) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    df = build_table(records)
    if args.csv:
        with atomic_path(args.csv) as tmp:
            df.drop(columns="source").to_csv(tmp, index=False)
    print(to_markdown(df.drop(columns="source")), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
