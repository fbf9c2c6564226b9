"""The typed result contract: plots survive report.json, unknown plot types are refused, and reports
written before plots existed (the committed baseline) still load."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from modelprobe.report.record import ClaimResult, HeatMap, LinePlot, NullHistogram, RunRecord, Series

ROOT = Path(__file__).parent.parent


def test_plots_round_trip_through_json():
    claim = ClaimResult(name="c", verdict="pass", plots=[
        LinePlot(title="t", x_label="context size", series=[Series(label="s", y=[0.1, None, 0.3], axis="right")],
                 mark_x=1, mark_label="chosen"),
        HeatMap(title="h", x_label="target layer", y_label="source layer", value_label="fix rate",
                values=[[0.1, 0.2], [None, 0.4]], mark=(1, 1)),
        NullHistogram(title="n", x_label="effect", values=[0.0, 0.1], effect=0.5, threshold=0.2),
    ])
    back = ClaimResult.model_validate_json(claim.model_dump_json())
    assert back == claim
    assert [type(p) for p in back.plots] == [LinePlot, HeatMap, NullHistogram]


def test_a_plot_of_unknown_type_is_refused():
    with pytest.raises(ValidationError):
        ClaimResult.model_validate({"name": "c", "verdict": "pass", "plots": [{"type": "pie", "title": "x"}]})


def test_the_committed_baseline_still_loads():
    path = ROOT / "reports" / "baselines" / "smollm2-135m-instruct" / "default.json"
    record = RunRecord.model_validate_json(path.read_text())
    # It carries the typed plots of the run that made it; reading it back validates each of them.
    assert record.claims() and any(c.plots for _, c in record.claims())
