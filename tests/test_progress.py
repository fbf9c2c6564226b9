"""Progress in CI logs: when stderr is not a terminal, one plain line at most every LOG_EVERY seconds
(probe, stage, done/total, elapsed); nothing under -q."""

from __future__ import annotations

import pytest

from modelprobe import progress


@pytest.fixture
def lines(monkeypatch):
    got: list[str] = []
    clock = iter(range(0, 10_000, 10))  # every call to the clock is 10 s later
    monkeypatch.setattr(progress.time, "perf_counter", lambda: float(next(clock)))
    monkeypatch.setattr(progress, "_last_line", [])
    monkeypatch.setattr(progress, "_writer", got.append)
    monkeypatch.setattr(progress, "_enabled", True)
    monkeypatch.setattr(progress.sys.stderr, "isatty", lambda: False, raising=False)
    progress.set_probe("refusal_direction")
    yield got
    progress.set_probe("")


def test_log_lines_name_probe_stage_and_count_at_most_every_30_seconds(lines):
    assert list(progress.bar(range(12), "direction: controls", total=12)) == list(range(12))
    # 10 s per item: a line at 30, 60, 90 and 120 s, not one per item
    assert len(lines) == 4
    assert lines[0] == "modelprobe: refusal_direction: direction: controls 3/12, 30s in this stage"
    assert all("refusal_direction: direction: controls" in x for x in lines)


def test_short_stages_in_a_row_still_log(lines):
    for k in range(6):  # six stages, 30 s each (three clock reads of 10 s): 180 s in all
        list(progress.bar(range(2), f"stage {k}", total=2))
    # none of them reaches 30 s on its own, yet the log is not silent: one line per 30 s at most
    assert 3 <= len(lines) <= 6 and lines[0].startswith("modelprobe: refusal_direction: stage 1 ")


def test_quiet_writes_nothing(lines):
    progress.set_enabled(False)
    assert list(progress.bar(range(12), "direction: controls", total=12)) == list(range(12))
    assert lines == []
