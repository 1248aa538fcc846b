"""DVC stage `report`: one table of every evaluated run (dense, every method, transfers),
read from the evaluate metrics files -> CSV (dvc plots), JSON (dvc metrics), Markdown,
a Pareto PNG (top-1 vs MACs fraction per method) and a PNG of kept channels per layer.

    python -m stages.report <out_dir> <runs_dir>...
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from chipprune.atomic import atomic_path, write_json, write_text
from chipprune.models import create_model
from chipprune.reporting import tracking
from chipprune.reporting.plots import kept_channels_figure, save_png
from chipprune.reporting.report import build_table, pareto_figure, to_markdown
from chipprune.training.checkpoint import load_checkpoint
from stages._common import run_main


def run_label(row) -> str:
    if row.method == "dense":
        return f"dense-{row.dataset}-{row.model}"
    teacher = f"{row.teacher}-to-" if row.teacher else ""
    return f"{row.method}-{row.budget_type}-{row.target}-{teacher}{row.dataset}-{row.model}"


def kept_per_layer(metrics_file: str) -> dict[str, int]:
    """Conv name -> kept channels, from the evaluated checkpoint's widths."""
    ckpt = load_checkpoint(Path(metrics_file).parent.parent / "checkpoint.pt")
    widths = ckpt["model_kwargs"].get("widths", {})
    dense_kwargs = {k: v for k, v in ckpt["model_kwargs"].items() if k not in ("widths", "kept")}
    spec = create_model(ckpt["model_name"], **dense_kwargs).describe()
    removed = {  # convs of residual branches removed as a whole (orphan removal)
        conv for br in spec.branches if any(widths.get(g) == 0 for g in br.groups)
        for conv in br.convs
    }
    return {c.conv: 0 if c.conv in removed else widths.get(c.group, c.out_channels)
            for c in spec.convs}


def kept_channels_png(df, path: Path) -> None:
    """Every method at the smallest target of the first budget type, first dataset/model."""
    pruned = df[(df["method"] != "dense") & (df["teacher"] == "")]
    if pruned.empty:
        return
    first = pruned.iloc[0]
    sel = pruned[(pruned["budget_type"] == first.budget_type)
                 & (pruned["dataset"] == first.dataset) & (pruned["model"] == first.model)]
    sel = sel[sel["target"] == sel["target"].min()]
    kept = {r.method: kept_per_layer(r.source) for r in sel.itertuples(index=False)}
    dense_rows = df[(df["method"] == "dense") & (df["dataset"] == first.dataset)
                    & (df["model"] == first.model)]
    dense = kept_per_layer(dense_rows.iloc[0].source) if not dense_rows.empty else next(iter(kept.values()))
    title = (f"kept channels per layer: {first.budget_type} {sel['target'].iloc[0]}, "
             f"{first.model} on {first.dataset}")
    save_png(kept_channels_figure(kept, dense, title), path)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="stages.report", description=__doc__)
    ap.add_argument("out_dir")
    ap.add_argument("runs_dirs", nargs="+", help="folders searched for */eval/metrics.json")
    args = ap.parse_args(argv)

    files = sorted(f for d in args.runs_dirs for f in Path(d).glob("*/eval/metrics.json"))
    if not files:
        raise FileNotFoundError(f"no */eval/metrics.json under {args.runs_dirs}")
    records = [{**json.loads(f.read_text()), "source": str(f)} for f in files]
    df = build_table(records)
    out = Path(args.out_dir)
    with tracking.stage_run("report", {"runs": [str(f) for f in files]}, out / "mlflow_run.json"):
        import mlflow

        with atomic_path(out / "report.csv") as tmp:
            df.drop(columns="source").to_csv(tmp, index=False)
        write_text(out / "report.md", to_markdown(df))
        numbers = ("top1", "delta_top1", "macs_fraction", "params_fraction", "speedup")
        write_json(out / "report.json", {
            run_label(r): {k: (None if v != v else v) for k, v in r._asdict().items() if k in numbers}
            for r in df.itertuples(index=False)
        })
        save_png(pareto_figure(df, "top-1 against MACs"), out / "pareto.png")
        kept_channels_png(df, out / "kept_channels.png")
        for f in ("report.csv", "report.md", "pareto.png", "kept_channels.png"):
            if (out / f).exists():
                mlflow.log_artifact(str(out / f))
    print(to_markdown(df), flush=True)


if __name__ == "__main__":
    sys.exit(run_main(main))
