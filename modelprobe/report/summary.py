"""The per-claim summary table and verdict counts, shared by the Markdown and HTML writers."""

from __future__ import annotations

from collections import Counter

from ._fmt import MISSING, fmt_ci, fmt_control, fmt_num, fmt_threshold
from .record import RunRecord

SUMMARY_HEADERS = ["probe", "claim", "verdict", "effect", "CI", "threshold", "control"]


def summary_rows(record: RunRecord) -> list[list[str]]:
    """One row per claim (probe, claim, verdict, effect, CI, threshold, control), as strings.

    A probe that errored before producing claims gets one row with verdict "error". Probes are named by
    their display name, or by their file where two share a name (a/x.probe.yaml, b/x.probe.yaml).
    """
    names = Counter(p.name for p in record.probes)
    rows: list[list[str]] = []
    for probe in record.probes:
        shown = probe.name if names[probe.name] == 1 else probe.file
        if not probe.claims:
            verdict = "error" if probe.error else MISSING
            claim = "(probe error)" if probe.error else "(no claims)"
            rows.append([shown, claim, verdict, MISSING, MISSING, MISSING, MISSING])
            continue
        for c in probe.claims:
            rows.append(
                [
                    shown,
                    c.name,
                    c.verdict,
                    fmt_num(c.effect),
                    fmt_ci(c.ci),
                    fmt_threshold(c),
                    fmt_control(c.control),
                ]
            )
    return rows


def verdict_counts(record: RunRecord) -> dict[str, int]:
    """Counts per verdict; a probe that errored without claims counts as one "error"."""
    counts: Counter[str] = Counter()
    for probe in record.probes:
        if not probe.claims and probe.error:
            counts["error"] += 1
        for c in probe.claims:
            counts[c.verdict] += 1
    return {v: counts.get(v, 0) for v in ("pass", "fail", "inconclusive", "error")}
