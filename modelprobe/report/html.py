"""report.html: one self-contained file (inline CSS, plots as inline base64 PNG, no network).

matplotlib is used through `matplotlib.figure.Figure` + the Agg canvas directly, so the global
pyplot backend / state of the process is never touched. No torch.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._fmt import (
    MISSING,
    fmt_ci,
    fmt_control,
    fmt_delta,
    fmt_num,
    fmt_threshold,
    fmt_value,
)
from ._io import ensure_dir, write_text
from .plots import EFFECT_COLOUR, bars, heat_map, line_plot, null_histogram
from .record import Bars, ClaimResult, HeatMap, LinePlot, NullHistogram, ProbeRecord, RunRecord, Table
from .summary import SUMMARY_HEADERS, summary_rows, verdict_counts

if TYPE_CHECKING:
    from .baseline import Comparison

__all__ = ["render_html", "write_html"]

COLORS = {"pass": "#1a7f37", "fail": "#cf222e", "inconclusive": "#9a6700", "error": "#8250df"}
_TEMPLATE_DIR = Path(__file__).parent / "templates"


# ---------------------------------------------------------------- plots


def claim_plots(claim: ClaimResult) -> list[dict[str, Any]]:
    """The claim's typed plots, drawn: {"img": data URI} per figure, {"table": ...} per table."""
    out: list[dict[str, Any]] = []
    for p in claim.plots:
        if isinstance(p, Table):
            out.append({"img": None, "title": p.title, "table": {"title": p.title, "columns": p.columns,
                                  "rows": [[fmt_value(x) for x in row] for row in p.rows]}})
            continue
        if isinstance(p, LinePlot):
            img = line_plot(p)
        elif isinstance(p, HeatMap):
            img = heat_map(p)
        elif isinstance(p, NullHistogram):
            img = null_histogram(p, COLORS.get(claim.verdict, EFFECT_COLOUR))
        else:
            img = bars(p)
        if img:
            out.append({"img": img, "title": p.title, "table": None})
    return out


def comparison_plot(comparison: Comparison) -> str | None:
    """Horizontal bars: each claim's effect before (grey) and after (coloured by status)."""
    rows = [r for r in comparison.rows if r.before_effect is not None or r.after_effect is not None][:60]
    if not rows:
        return None
    plot = Bars(title="effect before → after (red: failing)", value_label="effect",
                labels=[f"{r.claim} ({r.probe})" for r in rows], before=[r.before_effect for r in rows],
                after=[r.after_effect for r in rows])
    return bars(plot, failing=[bool(r.failing) for r in rows])


# ---------------------------------------------------------------- context


def _anchor(*parts: str, used: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9_-]+", "-", "-".join(parts)).strip("-").lower() or "x"
    a, i = base, 2
    while a in used:
        a, i = f"{base}-{i}", i + 1
    used.add(a)
    return a


def _claim_ctx(p: ProbeRecord, c: ClaimResult, anchor: str, trend: str | None = None) -> dict[str, Any]:
    effect = fmt_num(c.effect)
    facts = [
        ("metric", c.metric or MISSING),
        ("effect", effect),
        ("CI", fmt_ci(c.ci)),
        ("threshold", fmt_threshold(c)),
        ("n", str(c.n)),
        ("control", fmt_control(c.control)),
    ]
    if c.tolerance:
        facts.append(("tolerance", ", ".join(f"{k} {fmt_num(v)}" for k, v in c.tolerance.items())))
    if c.duration_s:
        facts.append(("duration", f"{fmt_num(c.duration_s)} s"))
    details = dict(c.details)
    if c.control is not None and c.control.detail:
        details.update({f"control.{k}": v for k, v in c.control.detail.items()})
    plots = claim_plots(c)
    if trend:
        plots.append({"img": trend, "title": f"{c.name} across the saved baselines and this run", "table": None})
    return {
        "name": c.name,
        "anchor": anchor,
        "verdict": c.verdict,
        "reason": c.reason,
        "facts": facts,
        "details": [(k, fmt_value(v)) for k, v in details.items()],
        "plots": plots,
    }


def _context(record: RunRecord, comparison: Comparison | None,
             trends: dict[tuple[str, str], str] | None = None) -> dict[str, Any]:
    used: set[str] = set()
    probes = []
    anchors: dict[tuple[str, str], str] = {}
    for p in record.probes:
        pa = _anchor("probe", p.name, used=used)
        anchors[(p.name, "")] = pa
        claims = []
        for c in p.claims:
            ca = _anchor(p.name, c.name, used=used)
            anchors[(p.name, c.name)] = ca
            claims.append(_claim_ctx(p, c, ca, (trends or {}).get((p.file, c.name))))
        probes.append(
            {
                "name": p.name,
                "anchor": pa,
                "kind": p.kind,
                "about": p.about,
                "file": p.file,
                "file_hash": p.file_hash[:12],
                "duration": f"{fmt_num(p.duration_s)} s" if p.duration_s else "",
                "settings": [(k, fmt_value(v)) for k, v in p.settings.items()],
                "error": p.error,
                "claims": claims,
            }
        )
    summary = []
    for row in summary_rows(record):
        probe, claim = row[0], row[1]
        summary.append({"cells": row, "anchor": anchors.get((probe, claim)) or anchors.get((probe, ""), "")})

    return {
        "record": record,
        "title": f"modelprobe report — {record.model.id}",
        "counts": verdict_counts(record),
        "meta": _meta(record),
        "headers": SUMMARY_HEADERS,
        "summary": summary,
        "comparison": _comparison_ctx(comparison),
        "preflight": [
            {
                "name": p.name,
                "passed": p.passed,
                "value": fmt_num(p.value),
                "tolerance": fmt_num(p.tolerance),
                "detail": p.detail,
            }
            for p in record.preflight
        ],
        "tokenization": (json.dumps(record.tokenization, indent=2, ensure_ascii=False, default=str)
                         if record.tokenization else ""),
        "probes": probes,
        "colors": COLORS,
    }


def _meta(record: RunRecord) -> list[tuple[str, str]]:
    m = record.model
    model_bits = [b for b in (m.model_type, f"{m.n_layers} layers" if m.n_layers else "", m.dtype) if b]
    meta = [("model", m.id + (f"  (slug {m.slug})" if m.slug and m.slug != m.id else ""))]
    if model_bits or m.device:
        meta.append(("architecture", ", ".join(model_bits) + (f" on {m.device}" if m.device else "")))
    if m.hash:
        meta.append(("weights", m.hash))
    if m.revision:
        meta.append(("revision", f"{m.revision} (commit {m.hash or 'not resolved'})"))
    if m.path:
        meta.append(("path", m.path))
    meta.append(("seed", str(record.seed)))
    if record.started or record.finished:
        meta.append(("run", f"{record.started or '?'} → {record.finished or '?'}"))
    if record.probes_commit:
        meta.append(("probes commit", record.probes_commit))
    if record.versions:
        meta.append(("versions", ", ".join(f"{k} {v}" for k, v in record.versions.items())))
    return meta


def _comparison_ctx(comparison: Comparison | None) -> dict[str, Any] | None:
    from .baseline import numerics_line

    if comparison is None:
        return None
    rows = [
        {
            "probe": r.probe,
            "claim": r.claim,
            "before": f"{r.before_verdict or MISSING} {fmt_num(r.before_effect)}",
            "after": f"{r.after_verdict or MISSING} {fmt_num(r.after_effect)}",
            "delta": fmt_delta(r.delta),
            "status": r.status,
            "failing": r.failing,
            "message": r.message,
        }
        for r in comparison.rows
    ]
    return {"ok": comparison.ok, "plot": comparison_plot(comparison), "warnings": comparison.warnings, "rows": rows,
            "error": comparison.error, "numerics": numerics_line(comparison)}


def render_html(record: RunRecord, comparison: Comparison | None = None,
                trends: dict[tuple[str, str], str] | None = None) -> str:
    """The text of report.html; `trends` ((probe file, claim) -> plot, from history.report_trends) adds each
    claim's trend across the model's saved baselines."""
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(_TEMPLATE_DIR)),
        autoescape=True,
        trim_blocks=True,
        lstrip_blocks=True,
        undefined=jinja2.StrictUndefined,
    )
    return env.get_template("report.html.j2").render(**_context(record, comparison, trends))


def write_html(
    record: RunRecord, directory: str | os.PathLike[str], comparison: Comparison | None = None
) -> Path:
    """Write the self-contained `report.html` into `directory`; returns its path."""
    ensure_dir(directory)  # fail before spending time on plots
    return write_text(directory, "report.html", render_html(record, comparison))
