"""The comparison table of every evaluated run, from plain records (metrics files or MLflow
runs alike), and its figures."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

from chipprune.reporting.published import published_for
from chipprune.reporting.records import budget_label

# Counts in both conventions: `macs` is ours (conv + FC), `flops_with_bn` adds BN at 2 per
# output element, the count (thop's) the CHIP authors print for a pruned model, so a row
# holds against `published_flops` without arithmetic.
COUNT_FIELDS = ("params", "macs", "flops_with_bn")
PUBLISHED_FIELDS = ("top1", "top5", "params_fraction", "macs_fraction", "params", "flops")
COLUMNS = [
    "method", "dataset", "teacher", "protocol", "model", "budget_type", "target",
    "params_fraction", "macs_fraction", "top1", "delta_top1", "latency_ms",
    "speedup", "speedup_per_macs_reduction", "ort_latency_ms", "ort_speedup",
    "onnx_max_abs_diff", *COUNT_FIELDS,
    *(f"published_{f}" for f in PUBLISHED_FIELDS),
]


def _published(row: pd.Series) -> list[float]:
    """The paper's figures for a row's configuration (NaN where none): a budget row matches
    on TYPE-TARGET, a rates row on rates:<name>; transfers never match."""
    kind, target = row["budget_type"], row["target"]
    budget = kind if kind.startswith("rates:") or target is None or target != target else (
        f"{kind}-{target}")
    pub = None if row["teacher"] else published_for(row["method"], row["dataset"], row["model"],
                                                    budget)
    return [float("nan") if pub is None or getattr(pub, f) is None else getattr(pub, f)
            for f in PUBLISHED_FIELDS]


def latency_key(records: list[dict], prefix: str = "latency_ms_bs") -> str | None:
    """The latency field of the largest batch size every record measured (`latency_ms_bs<N>`,
    the faster memory format; the per-format `latency_ms_bs<N>_nchw` / `_cl` are not picked;
    `ort_latency_ms_bs<N>` with that prefix)."""
    common = set.intersection(*({k for k in r if re.fullmatch(rf"{prefix}\d+", k)}
                                for r in records))
    return max(common, key=lambda k: int(k.removeprefix(prefix)), default=None)


def build_table(records: list[dict], latency_field: str | None = None) -> pd.DataFrame:
    """One row per evaluated model. Records carry: method ('dense' for the reference),
    dataset, model, budget {type, target} (None for dense), teacher (transfers), test_top1,
    params_fraction, macs_fraction and latency fields `latency_ms_bs<N>` (the largest N all
    records share is used unless `latency_field` names one); where the export stage ran,
    `ort_latency_ms_bs<N>` (ONNX Runtime, the same N rule) and `onnx_max_abs_diff`.

    delta_top1 and speedup are against the dense model of the same dataset and architecture;
    speedup / (1 / macs_fraction) says how much of the MACs reduction the hardware delivers.
    published_*: the paper's figures for the row's configuration (chipprune.reporting.published).
    """
    latency_field = latency_field or (latency_key(records) if records else None)
    ort_field = latency_key(records, "ort_latency_ms_bs") if records else None
    rows = []
    for r in records:
        budget = r.get("budget") or {}
        rows.append({
            "method": r["method"], "dataset": r["dataset"], "teacher": r.get("teacher") or "",
            "protocol": r.get("protocol") or "",
            "model": r["model"], "budget_type": budget_label(budget),
            "target": budget.get("target"), "params_fraction": r["params_fraction"],
            "macs_fraction": r["macs_fraction"], "top1": r["test_top1"],
            "latency_ms": r.get(latency_field) if latency_field else None, "source": r.get("source", ""),
            "ort_latency_ms": r.get(ort_field) if ort_field else None,
            "onnx_max_abs_diff": r.get("onnx_max_abs_diff"),
            "params": r.get("params"), "macs": r.get("macs"), "flops_with_bn": r.get("macs_with_bn"),
        })
    df = pd.DataFrame(rows, columns=COLUMNS[:7] + ["params_fraction", "macs_fraction", "top1",
                                                    "latency_ms", "source", "ort_latency_ms",
                                                    "onnx_max_abs_diff", *COUNT_FIELDS])
    dense = df[df["method"] == "dense"].set_index(["dataset", "model"])
    key = list(zip(df["dataset"], df["model"], strict=True))

    def ref(col):
        return [dense[col].get(k, float("nan")) if k in dense.index else float("nan") for k in key]

    for col in COUNT_FIELDS:  # whole numbers, from metrics files (int) or MLflow (float) alike
        df[col] = pd.to_numeric(df[col]).astype("Int64")
    df["delta_top1"] = df["top1"] - pd.Series(ref("top1"), index=df.index)
    df["speedup"] = pd.Series(ref("latency_ms"), index=df.index) / df["latency_ms"]
    df["speedup_per_macs_reduction"] = df["speedup"] * df["macs_fraction"]
    for col in ("ort_latency_ms", "onnx_max_abs_diff"):
        df[col] = pd.to_numeric(df[col]).astype(float)  # NaN where the export did not run
    # ONNX Runtime: against the dense model of the same dataset and architecture, exported
    # and timed the same way
    df["ort_speedup"] = pd.Series(ref("ort_latency_ms"), index=df.index) / df["ort_latency_ms"]
    published = pd.DataFrame([_published(r) for _, r in df.iterrows()], index=df.index,
                             columns=[f"published_{f}" for f in PUBLISHED_FIELDS], dtype=float)
    df = pd.concat([df, published], axis=1)
    order = {"dense": 0}
    df["_m"] = df["method"].map(lambda m: order.get(m, 1))
    df = df.sort_values(["dataset", "model", "_m", "teacher", "budget_type", "target", "method",
                         "protocol"],
                        na_position="first").drop(columns="_m").reset_index(drop=True)
    return df[COLUMNS + ["source"]]  # source: where the record came from (not for people)


def to_markdown(df: pd.DataFrame) -> str:
    """A GitHub-style table (pandas' to_markdown needs `tabulate`; this does not)."""
    def fmt(v):
        if v is pd.NA or (isinstance(v, float) and v != v):
            return ""
        if isinstance(v, float):
            return f"{v:,.0f}" if v.is_integer() and abs(v) >= 1000 else f"{v:.4f}"  # counts
        return f"{v:,}" if isinstance(v, int | np.integer) else str(v)

    df = df.drop(columns=["source"], errors="ignore")
    lines = ["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def pareto_figure(df: pd.DataFrame, title: str):
    """Top-1 against MACs fraction, one line per method (dense as a star)."""
    from chipprune.reporting.plots import plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    pruned = df[(df["method"] != "dense") & (df["teacher"] == "")]
    for i, (method, g) in enumerate(pruned.groupby("method")):
        g = g.sort_values("macs_fraction")
        ax.plot(g["macs_fraction"], g["top1"], marker="o", color=f"C{i}", label=method)
    dense = df[df["method"] == "dense"]
    ax.scatter(dense["macs_fraction"], dense["top1"], marker="*", s=150, color="k", label="dense")
    ax.set_xlabel("MACs fraction of the dense model")
    ax.set_ylabel("test top-1")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    return fig


def _budget(row) -> str:
    """A row's budget as written: TYPE-TARGET, or rates:<name> (no target)."""
    target = "" if row.target is None or row.target != row.target else f"-{row.target:g}"
    return f"{row.budget_type}{target}"


def run_label(row) -> str:
    """A row's short name: dense-<dataset>-<model>, <method>-<budget>[-<teacher>-to]-<dataset>-<model>."""
    if row.method == "dense":
        return f"dense-{row.dataset}-{row.model}"
    teacher = f"{row.teacher}-to-" if row.teacher else ""
    budget = _budget(row).replace(":", "-")  # rates:<name>
    return f"{row.method}-{budget}-{teacher}{row.dataset}-{row.model}"


def summary_metrics(df: pd.DataFrame) -> dict[str, float]:
    """The one DVC metrics file: test top-1 per run, flat (one `dvc exp show` column a run)."""
    return {run_label(r): round(float(r.top1), 6) for r in df.itertuples(index=False)}


def terminal_table(df: pd.DataFrame, width: int = 100) -> str:
    """The table as it fits a `width`-column terminal: the run, its fractions of the dense
    model, top-1, its change and the measured speedup (the rest is in report.csv / .md)."""
    def num(v, fmt):
        return "" if v is None or v != v else format(v, fmt)

    rows = []
    for r in df.itertuples(index=False):
        run = "dense" if r.method == "dense" else f"{r.method} {_budget(r)}"
        data = f"{r.teacher}>{r.dataset} {r.protocol}" if r.teacher else r.dataset
        rows.append((run, data, r.model, num(r.params_fraction, ".3f"), num(r.macs_fraction, ".3f"),
                     num(r.top1, ".4f"), num(r.delta_top1, "+.4f"), num(r.speedup, ".2f")))
    head = ("run", "data", "model", "params", "MACs", "top-1", "Δ top-1", "speedup")
    w = [max(len(head[i]), *(len(x[i]) for x in rows)) for i in range(len(head))]
    w[0] = min(w[0], 30)

    def line(cells):
        left = [f"{c[:w[i]]:<{w[i]}}" for i, c in enumerate(cells[:3])]
        right = [f"{c:>{w[i + 3]}}" for i, c in enumerate(cells[3:])]
        return "  ".join(left + right).rstrip()[:width]

    return "\n".join([line(head), "-" * min(width, len(line(head)))]
                     + [line(x) for x in rows]) + "\n"


def curves(histories: dict[str, pd.DataFrame], columns: dict[str, str]) -> pd.DataFrame:
    """Per-epoch histories in long form for one chart, rows (series, epoch, value): one
    series per history (keyed by its prefix, e.g. the method) and per column of `columns`
    (history column -> the suffix it gets in the series name; "" for none)."""
    parts = [
        pd.DataFrame({"series": f"{prefix} {suffix}".strip(), "epoch": h["epoch"], "value": h[col]})
        for prefix, h in histories.items() for col, suffix in columns.items() if col in h.columns
    ]
    if not parts:
        return pd.DataFrame(columns=["series", "epoch", "value"])
    return pd.concat(parts, ignore_index=True)
