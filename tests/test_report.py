"""The comparison table: exact deltas and speedups against the dense model of the same
dataset and architecture, transfers kept apart, the latency batch chosen consistently."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from chipprune.reporting.report import build_table, latency_key, to_markdown


def rec(method, dataset, top1, macs, lat, budget=None, teacher=None, model="resnet20"):
    return {"method": method, "dataset": dataset, "model": model, "test_top1": top1,
            "params_fraction": macs, "macs_fraction": macs, "budget": budget,
            "teacher": teacher, "latency_ms_bs1": 1.0, "latency_ms_bs256": lat}


RECORDS = [
    rec("chipnet", "c10", 0.90, 0.25, 10.0, {"type": "flops", "target": 0.25}),
    rec("dense", "c10", 0.95, 1.0, 40.0),
    rec("chip", "c10", 0.91, 0.5, 25.0, {"type": "flops", "target": 0.5}),
    rec("chipnet", "c10", 0.80, 0.25, 20.0, {"type": "flops", "target": 0.25}, teacher="c100"),
    rec("random", "svhn", 0.5, 0.5, 1.0, {"type": "params", "target": 0.5}),
]


def test_deltas_and_speedups_are_against_the_matching_dense_model():
    df = build_table(RECORDS)
    # dense first, then by teacher, budget type and target
    assert list(df["method"][:4]) == ["dense", "chipnet", "chip", "chipnet"]
    chipnet = df[(df["method"] == "chipnet") & (df["teacher"] == "")].iloc[0]
    assert chipnet["delta_top1"] == pytest.approx(-0.05)
    assert chipnet["speedup"] == pytest.approx(4.0)
    assert chipnet["speedup_per_macs_reduction"] == pytest.approx(1.0)  # 4x speed at 4x fewer MACs
    chip = df[df["method"] == "chip"].iloc[0]
    assert chip["speedup"] == pytest.approx(1.6) and chip["speedup_per_macs_reduction"] == pytest.approx(0.8)
    transfer = df[df["teacher"] == "c100"].iloc[0]
    assert transfer["delta_top1"] == pytest.approx(-0.15) and transfer["speedup"] == pytest.approx(2.0)
    orphan = df[df["dataset"] == "svhn"].iloc[0]  # no dense svhn model: no reference
    assert math.isnan(orphan["delta_top1"]) and math.isnan(orphan["speedup"])


def test_latency_batch_is_the_largest_common_one():
    a = {"latency_ms_bs1": 1, "latency_ms_bs8": 2, "latency_ms_bs256": 3}
    b = {"latency_ms_bs1": 1, "latency_ms_bs8": 2}
    assert latency_key([a, b]) == "latency_ms_bs8"
    assert latency_key([a]) == "latency_ms_bs256"


def test_markdown_has_a_row_per_run():
    md = to_markdown(build_table(RECORDS))
    lines = md.strip().splitlines()
    assert len(lines) == 2 + len(RECORDS)
    assert lines[0].startswith("| method | dataset | teacher | protocol |") and "source" not in lines[0]


def test_mlflow_tags_round_trip_to_the_same_record():
    """evaluate writes run_tags; pipelines.compare rebuilds the record from tags + metrics."""
    from chipprune.reporting.records import record_from_run, run_tags

    metrics = {"test_top1": 0.9, "params_fraction": 0.3, "macs_fraction": 0.25,
               "latency_ms_bs8": 2.0}
    base = {"dataset": "digits", "model": "resnet20", **metrics}
    records = [
        {**base, "method": "dense", "budget": None},
        {**base, "method": "chipnet", "budget": {"type": "flops", "target": 0.25}},
        {**base, "method": "chip", "budget": {"type": "rates", "target": None, "config": "r1"}},
        {**base, "method": "chipnet", "budget": {"type": "flops", "target": 0.125},
         "dataset": "even", "teacher": "digits", "protocol": "scratch"},
    ]
    again = [record_from_run(run_tags(r), metrics) for r in records]
    pd.testing.assert_frame_equal(build_table(again), build_table(records))
    assert sorted(build_table(records)["budget_type"]) == ["", "flops", "flops", "rates:r1"]


def test_published_figures_sit_beside_the_matching_configurations_only():
    def rates(config, model, **counts):
        return {**rec("chip", "cifar10", 0.94, 0.52, 1.0, {"type": "rates", "target": None,
                                                           "config": config}, model=model),
                **counts}

    rows = [
        rates("r110-52", "resnet110", params=889_702, macs=119_638_144, macs_with_bn=121_087_872),
        rates("r56-47", "resnet56"),
        rec("chip", "cifar10", 0.93, 0.48, 1.0, {"type": "flops", "target": 0.479},
            model="resnet110"),  # our budget-driven row: not the authors' configuration
        rec("random", "cifar10", 0.90, 0.48, 1.0, {"type": "rates", "target": None,
                                                    "config": "r56-47"}, model="resnet56"),
        {**rates("r56-47", "resnet56"), "teacher": "cifar100"},  # a transfer: not theirs
    ]
    df = build_table(rows).set_index(["method", "model", "budget_type", "teacher"])
    r110 = df.loc[("chip", "resnet110", "rates:r110-52", "")]
    assert (r110["published_top1"], r110["published_params_fraction"],
            r110["published_macs_fraction"], r110["published_params"],
            r110["published_flops"]) == pytest.approx((0.9444, 0.517, 0.479, 0.89e6, 121.09e6))
    # both conventions of ours beside theirs: 121,087,872 with BN is their 121.09M
    assert (r110["params"], r110["macs"], r110["flops_with_bn"]) == (
        889_702, 119_638_144, 121_087_872)
    r56 = df.loc[("chip", "resnet56", "rates:r56-47", "")]
    assert (r56["published_top1"], r56["published_macs_fraction"]) == pytest.approx((0.9416, 0.526))
    assert math.isnan(r56["published_top5"]) and pd.isna(r56["params"])  # not recorded
    for key in (("chip", "resnet110", "flops", ""), ("random", "resnet56", "rates:r56-47", ""),
                ("chip", "resnet56", "rates:r56-47", "cifar100")):
        assert df.loc[key][[c for c in df.columns if c.startswith("published_")]].isna().all()
    md = to_markdown(build_table(rows))
    assert "published_flops" in md.splitlines()[0] and "| 121,087,872 |" in md
