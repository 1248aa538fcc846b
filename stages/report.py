"""DVC stage `report`: one table of every evaluated run (dense, every method, transfers),
read from the evaluate stage's metrics files, and the charts `dvc plots show` draws.

    python -m stages.report <out_dir> <eval_dir> [--figure docs/img/pareto.png]

Writes, under <out_dir>: report.csv (every column), report.md (the same, Markdown),
report.txt (the table as it fits a 100-column terminal), metrics.json (DVC's one metrics
file: test top-1 per run), pareto.png (top-1 against MACs fraction per method, also copied
to --figure, the README's picture), kept_channels.png, and the data of dvc.yaml's top-level
plots: report.csv itself (one point a run) and curves/ (long form: series, epoch, value): finetune-<budget>-<dataset>-<model>.csv, every method's fine-tune validation top-1
at one budget, and chipnet-<budget>-<dataset>-<model>.csv, ChipNet's soft and hard
validation top-1 and achieved budget per epoch.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import pandas as pd

from chipprune.atomic import atomic_path, write_json, write_text
from chipprune.models import create_model, weights_uninitialised
from chipprune.reporting import tracking
from chipprune.reporting.plots import kept_channels_figure, save_png
from chipprune.reporting.records import export_fields
from chipprune.reporting.report import (
    build_table,
    curves,
    pareto_figure,
    summary_metrics,
    terminal_table,
    to_markdown,
)
from chipprune.training.checkpoint import dense_kwargs, load_checkpoint
from stages._common import atomic_dir, run_main


def kept_per_layer(checkpoint: str) -> dict[str, int]:
    """Conv name -> kept channels, from the evaluated checkpoint's widths."""
    ckpt = load_checkpoint(checkpoint)
    widths = ckpt["model_kwargs"].get("widths", {})
    with weights_uninitialised():  # only its description is read
        spec = create_model(ckpt["model_name"], **dense_kwargs(ckpt)).describe()
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


def _history(folder: Path) -> pd.DataFrame | None:
    f = folder / "history.csv"
    return pd.read_csv(f) if f.is_file() else None


def curve_tables(df: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """File name -> long-form curves: per budget, every method's fine-tune validation top-1;
    per ChipNet run, its soft and hard validation and achieved budget (the history of
    runs/chipnet/<point>, next to runs/finetune/chipnet-<point>)."""
    tables = {}
    pruned = df[(df["method"] != "dense") & (df["teacher"] == "") & df["target"].notna()]
    for _, g in pruned.groupby(["dataset", "model", "budget_type", "target"], sort=False):
        point = Path(g.iloc[0].source).parent.name.split("-", 1)[1]  # <budget>-<dataset>-<model>
        hist = {r.method: h for r in g.itertuples(index=False)
                if (h := _history(Path(r.source).parent)) is not None}
        if hist:
            tables[f"finetune-{point}.csv"] = curves(hist, {"val_top1": ""})
        for r in g[g["method"] == "chipnet"].itertuples(index=False):
            run = Path(r.source).parent
            h = _history(run.parent.parent / "chipnet" / run.name.removeprefix("chipnet-"))
            if h is not None:
                tables[f"chipnet-{point}.csv"] = curves(
                    {"": h}, {"val_top1": "soft val top-1", "val_hard_top1": "hard val top-1",
                              "hard_budget": "achieved budget (hard)"})
    return tables


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="stages.report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir")
    ap.add_argument("eval_dir", help="the evaluate stage's folder: <name>/metrics.json per run")
    ap.add_argument("--figure", help="also copy pareto.png here (the README's picture)")
    ap.add_argument("--export-dir", help="the export stage's folder: <name>/export.json per "
                    "run, whose ONNX Runtime figures join the run's row")
    args = ap.parse_args(argv)

    files = sorted(Path(args.eval_dir).glob("*/metrics.json"))
    if not files:
        raise FileNotFoundError(f"no */metrics.json under {args.eval_dir}")
    # source: the evaluated checkpoint (its widths, and its history beside it)
    records = [{**(doc := json.loads(f.read_text())), "source": doc["checkpoint"]} for f in files]
    if args.export_dir:
        exported = {f.parent.name: json.loads(f.read_text())
                    for f in Path(args.export_dir).glob("*/export.json")}
        missing = sorted({f.parent.name for f in files} - set(exported))
        if missing:
            raise FileNotFoundError(f"no export.json under {args.export_dir} for {missing}")
        records = [{**r, **export_fields(exported[f.parent.name])}
                   for r, f in zip(records, files, strict=True)]
    df = build_table(records)
    table = terminal_table(df)
    out = Path(args.out_dir)
    with tracking.stage_run("report", {"runs": [str(f) for f in files]}, out / "mlflow_run.json"):
        import mlflow

        with atomic_path(out / "report.csv") as tmp:
            df.drop(columns="source").to_csv(tmp, index=False)
        write_text(out / "report.md", to_markdown(df))
        write_text(out / "report.txt", table)
        write_json(out / "metrics.json", summary_metrics(df))
        with atomic_dir(out / "curves") as tmp:
            for name, chart in curve_tables(df).items():
                chart.to_csv(tmp / name, index=False)
        save_png(pareto_figure(df, "top-1 against MACs"), out / "pareto.png")
        if args.figure:
            with atomic_path(args.figure) as tmp:
                shutil.copyfile(out / "pareto.png", tmp)
        kept_channels_png(df, out / "kept_channels.png")
        for f in ("report.csv", "report.md", "metrics.json", "pareto.png", "kept_channels.png"):
            if (out / f).exists():
                mlflow.log_artifact(str(out / f))
    print(table, end="", flush=True)


if __name__ == "__main__":
    sys.exit(run_main(main))
