"""The per-claim summary table and verdict counts, shared by the Markdown and HTML writers."""

from __future__ import annotations

import re
from collections import Counter

from ._fmt import MISSING, fmt_ci, fmt_control, fmt_num, fmt_threshold, one_line
from .record import ClaimResult, RunRecord

SUMMARY_HEADERS = ["probe", "claim", "verdict", "effect", "CI", "threshold", "control", "why"]

# stats.decide's reasons repeat the interval and threshold, which have their own columns.
_DECIDED = re.compile(r"^interval \[[^\]]*\] (clears|misses|straddles) at_(?:least|most) \S+(.*)$")
WHY_WIDTH = 72


def why(claim: ClaimResult) -> str:
    """Why a claim did not pass, short enough for a table cell ("" for a pass): the claim's own reason (an
    untestable base rate, no direction passing selection ...) or what its interval did."""
    if claim.verdict == "pass":
        return ""
    reason = one_line(claim.reason)
    m = _DECIDED.match(reason)
    if m:
        what, rest = m.groups()
        parts = [] if what == "clears" else [f"interval {what} threshold"]
        if "not beat" in rest or "does not beat" in reason:
            parts.append("control not beaten")
        return "; ".join(parts) or one_line(reason, WHY_WIDTH)
    return one_line(reason, WHY_WIDTH) if reason else MISSING


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
            rows.append([shown, claim, verdict, MISSING, MISSING, MISSING, MISSING,
                         one_line(probe.error or "", WHY_WIDTH) or MISSING])
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
                    why(c),
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
