"""An evaluate record as MLflow tags and back, so the comparison table can be rebuilt from
MLflow alone (`pipelines.compare`). Kept apart from report.py: evaluate imports this, and
pandas would cost every evaluate stage a third of a second."""

from __future__ import annotations

# What an evaluate run records as MLflow tags, so the table can be rebuilt from MLflow alone
TAG_PREFIX = "chipprune."
RECORD_TAGS = ("method", "dataset", "model", "budget_type", "target", "teacher", "protocol")
# The file hash of the checkpoint a per-model run (evaluate@, export@) looked at: it joins a
# model's export figures to its evaluate record
CHECKPOINT_TAG = "input.checkpoint.sha256"
# The export stage's figures that join a run's row (ONNX parity, ONNX Runtime latency)
EXPORT_FIELD_PREFIXES = ("ort_", "onnx_")


def export_fields(exported: dict) -> dict:
    """The fields of an export record (or export run's metrics) a report row takes."""
    return {k: v for k, v in exported.items() if k.startswith(EXPORT_FIELD_PREFIXES)}


def budget_label(budget: dict | None) -> str:
    """The budget type column: '' for dense, 'rates:<config>' for CHIP at named rates."""
    budget = budget or {}
    kind = budget.get("type") or ""
    return f"rates:{budget['config']}" if kind == "rates" and budget.get("config") else kind


def checkpoint_labels(ckpt: dict, dataset: str | None) -> dict:
    """What a checkpoint is, from the masks it was pruned with: method ('dense' without),
    budget, teacher and protocol (transfers), with its dataset and model; the labels of an
    evaluate record and of a registered model version."""
    masks = ckpt.get("masks", {})
    return {"method": masks.get("method", "dense"), "budget": masks.get("budget"),
            "teacher": masks.get("teacher"), "protocol": masks.get("protocol"),
            "dataset": dataset, "model": ckpt["model_name"]}


def record_labels(record: dict) -> dict[str, str]:
    """The RECORD_TAGS of one record as strings ('' for none)."""
    budget = record.get("budget") or {}
    values = {
        "method": record["method"], "dataset": record["dataset"], "model": record["model"],
        "budget_type": budget_label(budget), "target": budget.get("target"),
        "teacher": record.get("teacher"), "protocol": record.get("protocol"),
    }  # fmt: skip
    return {k: "" if v is None else str(v) for k, v in values.items()}


def run_tags(record: dict) -> dict[str, str]:
    """The MLflow tags of one evaluate record (its metrics are logged as metrics)."""
    return {f"{TAG_PREFIX}{k}": v for k, v in record_labels(record).items()}


def record_from_run(tags: dict[str, str], metrics: dict[str, float], source: str = "") -> dict:
    """The evaluate record `build_table` takes, from one MLflow run's tags and metrics."""
    t = {k: tags.get(f"{TAG_PREFIX}{k}") or "" for k in RECORD_TAGS}
    target = float(t["target"]) if t["target"] else None
    budget = {"type": t["budget_type"], "target": target} if t["budget_type"] else None
    return {
        **metrics,
        "method": t["method"], "dataset": t["dataset"], "model": t["model"],
        "budget": budget, "teacher": t["teacher"] or None, "protocol": t["protocol"] or None,
        "source": source,
    }  # fmt: skip
