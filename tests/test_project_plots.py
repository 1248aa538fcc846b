"""The project's own `dvc plots show`: dvc.yaml's top-level plots over data the report stage's
real code writes (report.csv, curves/), in a throwaway repo. A few comparison charts, not one
per stage: top-1 against MACs fraction coloured by method on an axis fitted to the data, one
fine-tune chart per budget, ChipNet's curves; and the page renders offline (screenshot)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pandas as pd
import pytest
import yaml

from chipprune.reporting.report import build_table, curves
from tests.conftest import REPO

METHODS = ("chipnet", "chip", "random", "l1", "uniform")


def _record(method, target, top1, macs):
    budget = None if method == "dense" else {"type": "flops", "target": target}
    return {"method": method, "dataset": "digits", "model": "resnet20", "budget": budget,
            "params_fraction": macs, "macs_fraction": macs, "test_top1": top1,
            "latency_ms_bs8": 10.0 * macs}


def _run(cmd, cwd, env):
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"{cmd}:\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def plots_repo(tmp_path_factory):
    repo = tmp_path_factory.mktemp("project_plots")
    env = {**os.environ, "DVC_NO_ANALYTICS": "1",
           "DVC_SITE_CACHE_DIR": str(tmp_path_factory.mktemp("site_cache"))}
    _run(["git", "init", "-q"], repo, env)
    _run([sys.executable, "-m", "dvc", "init", "-q"], repo, env)
    shutil.copytree(REPO / "dvc_templates", repo / "dvc_templates")
    _run([sys.executable, "-m", "dvc", "config", "plots.html_template",
          "../dvc_templates/offline_plots.html"], repo, env)
    plots = yaml.safe_load((REPO / "dvc.yaml").read_text())["plots"]
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"plots": plots}))

    # what the report stage writes, through its own functions
    records = [_record("dense", None, 0.99, 1.0)] + [
        _record(m, t, 0.95 + 0.01 * i + 0.02 * t, t * (1 + 0.01 * i))
        for i, m in enumerate(METHODS) for t in (0.25, 0.5)
    ]
    results = repo / "results"
    (results / "curves").mkdir(parents=True)
    build_table(records).drop(columns="source").to_csv(results / "report.csv", index=False)
    hist = {m: pd.DataFrame({"epoch": [1, 2, 3], "val_top1": [0.9, 0.95, 0.97 + 0.001 * i]})
            for i, m in enumerate(METHODS)}
    curves(hist, {"val_top1": ""}).to_csv(results / "curves/finetune-flops-0.25-digits-resnet20.csv",
                                         index=False)
    chipnet = pd.DataFrame({"epoch": [1, 2], "val_top1": [0.9, 0.92], "val_hard_top1": [0.5, 0.8],
                            "hard_budget": [0.25, 0.25]})
    curves({"": chipnet}, {"val_top1": "soft val top-1", "val_hard_top1": "hard val top-1",
                           "hard_budget": "achieved budget (hard)"}).to_csv(
        results / "curves/chipnet-flops-0.25-digits-resnet20.csv", index=False)
    from chipprune.reporting.plots import plt, save_png

    for png in ("pareto.png", "kept_channels.png"):
        fig, ax = plt.subplots(figsize=(2, 2))
        ax.plot([0, 1], [0, 1])
        save_png(fig, results / png)
    return repo, env


def _vega(spec):
    """The Vega-Lite spec of one plot entry of `dvc plots show --json`."""
    return spec["content"]


def test_top_level_plots_are_a_few_comparison_charts(plots_repo):
    repo, env = plots_repo
    shown = json.loads(_run([sys.executable, "-m", "dvc", "plots", "show", "--json"], repo,
                            env).stdout)["data"]
    assert sorted(shown) == sorted([
        "Top-1 against MACs fraction, by method",
        "results/curves/chipnet-flops-0.25-digits-resnet20.csv",
        "results/curves/finetune-flops-0.25-digits-resnet20.csv",
        "results/kept_channels.png", "results/pareto.png",
    ])
    pareto = _vega(shown["Top-1 against MACs fraction, by method"][0])
    lines, marks = pareto["layer"]
    assert lines["encoding"]["color"]["field"] == "method"
    assert lines["encoding"]["y"]["scale"] == {"zero": False}  # fitted, not 0-1
    assert lines["encoding"]["x"]["field"] == "macs_fraction"
    data = pareto["data"]["values"]
    assert {d["method"] for d in data} == {"dense", *METHODS}
    assert len(data) == 1 + 2 * len(METHODS)
    finetune = _vega(shown["results/curves/finetune-flops-0.25-digits-resnet20.csv"][0])
    assert finetune["encoding"]["color"]["field"] == "series"
    assert {d["series"] for d in finetune["data"]["values"]} == set(METHODS)
    chipnet = _vega(shown["results/curves/chipnet-flops-0.25-digits-resnet20.csv"][0])
    assert {d["series"] for d in chipnet["data"]["values"]} == {
        "soft val top-1", "hard val top-1", "achieved budget (hard)"}


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed")
def test_project_plots_page_renders_offline(plots_repo, tmp_path):
    image_mod = pytest.importorskip("PIL.Image")
    repo, env = plots_repo
    _run([sys.executable, "-m", "dvc", "plots", "show", "--out", "plots_out"], repo, env)
    png = tmp_path / "plots.png"
    proc = subprocess.run(["bash", str(REPO / "tools/screenshot_plots.sh"),
                           str(repo / "plots_out/index.html"), str(png), "1400,1600"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    with image_mod.open(png) as img:
        rgb = img.convert("RGB")
    # the Pareto chart: one colour per method (vega's category10), so many saturated hues
    area = rgb.crop((0, 0, 700, 450))
    hues = {c for n, c in area.getcolors(maxcolors=area.width * area.height)
            if max(c) - min(c) > 80 and n > 20}
    assert len(hues) >= len(METHODS)
