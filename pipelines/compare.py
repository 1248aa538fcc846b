"""The comparison table from MLflow alone: every evaluate run of an experiment (or of a sweep
nested under it), with its model's export run where there is one (ONNX Runtime columns),
the same table `stages.report` builds from the metrics and export files.

    python -m pipelines.compare --experiment chipprune [--all] [--csv table.csv]

Runs are found with `mlflow.search_runs` by their `chipprune.stage` tag; by default the
latest run of each configuration (method, dataset, model, budget, teacher, protocol) is kept,
so re-running a stage replaces its row; `--all` keeps every run.
"""

from __future__ import annotations

import argparse
import sys

from chipprune.atomic import atomic_path
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
        records.append(record_from_run(tags, metrics, source=run.info.run_id))
    return records


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
    args = ap.parse_args(argv)
    try:
        records = evaluate_records(args.experiment, latest_only=not args.all)
    except (ValueError, tracking.TrackingUnreachable) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not records:
        print(
            f"error: experiment {args.experiment!r} has no finished evaluate runs", file=sys.stderr
        )
        return 2
    df = build_table(records)
    if args.csv:
        with atomic_path(args.csv) as tmp:
            df.drop(columns="source").to_csv(tmp, index=False)
    print(to_markdown(df.drop(columns="source")), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
