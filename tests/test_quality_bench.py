"""`capfilt bench quality` end to end on a small web: real pipeline, figures that add up.

The figures themselves are the benchmark's business (docs/quality.md); this checks that the benchmark
measures what it says: every web row accounted for, shares in [0, 1], the threshold sweep monotone.
"""

from __future__ import annotations

import json

import pytest

from pipeline.synthetic.bootstrap import Budget
from pipeline.synthetic.quality import THRESHOLDS, format_report, run_quality
from pipeline.synthetic.splits import KINDS

pytestmark = pytest.mark.slow  # the quality benchmark

REQUIRED = ["filter.removed_corrupt", "filter.kept_correct", "captioner.correct", "coverage.before",
            "coverage.after", "bootstrap.raw_r1", "bootstrap.capfilt_r1"]  # fmt: skip


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("quality")
    return run_quality(seed=1, rows=40, eval_rows=20, out=out, log=lambda _: None,
                       budget=Budget(steps=3, batch_size=16))  # fmt: skip


def test_required_figures_are_shares(report):
    data = json.loads(json.dumps(report))  # what --json writes
    for dotted in REQUIRED:
        value = data
        for part in dotted.split("."):
            value = value[part]
        assert isinstance(value, float) and 0.0 <= value <= 1.0, dotted


def test_every_web_row_is_counted_once(report):
    assert sum(k["rows"] for k in report["filter"]["per_kind"].values()) == 40
    assert set(report["filter"]["per_kind"]) == set(KINDS)
    assert report["pipeline"]["counts"]["kept"] + report["pipeline"]["counts"]["filtered"] == 40
    assert report["captioner"]["captions"] == 40 * 2  # the local job writes two captions per image


def test_threshold_sweep_is_monotone(report):
    curve = report["filter"]["curve"]
    assert [p["threshold"] for p in curve] == list(THRESHOLDS)
    removed = [p["removed_corrupt"] for p in curve]
    kept = [p["kept_correct"] for p in curve]
    assert removed == sorted(removed) and kept == sorted(kept, reverse=True)


def test_report_table_names_every_kind_and_the_verdict(report):
    table = format_report(report)
    for kind in KINDS:
        assert kind in table
    assert "raw web" in table and "CapFilt" in table and "claim" in table
