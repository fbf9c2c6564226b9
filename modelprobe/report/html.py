"""report.html: one self-contained file (inline CSS, plots as inline base64 PNG, no network).

matplotlib is used through `matplotlib.figure.Figure` + the Agg canvas directly, so the global
pyplot backend / state of the process is never touched. No torch.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._fmt import (
    MISSING,
    control_name,
    fmt_ci,
    fmt_control,
    fmt_delta,
    fmt_num,
    fmt_threshold,
    fmt_value,
)
from ._io import ensure_dir, write_text
from .record import ClaimResult, ProbeRecord, RunRecord

if TYPE_CHECKING:
    from .baseline import Comparison

__all__ = ["render_html", "write_html"]

FIGSIZE = (5.0, 2.6)
DPI = 90
COLORS = {"pass": "#1a7f37", "fail": "#cf222e", "inconclusive": "#9a6700", "error": "#8250df"}
_TEMPLATE_DIR = Path(__file__).parent / "templates"


# ---------------------------------------------------------------- plots


def _figure(height: float = FIGSIZE[1]):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(FIGSIZE[0], height), dpi=DPI)
    ax = fig.add_subplot()
    ax.tick_params(labelsize=8)
    ax.grid(True, alpha=0.3, linewidth=0.6)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    return fig, ax


def _png(fig) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    fig.tight_layout(pad=0.4)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _floats(values: Any) -> list[float]:
    out = []
    for v in values if isinstance(values, (list, tuple)) else []:
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out.append(float(v))
    return out


def curves_plot(claim: ClaimResult, layer: int | None = None) -> str | None:
    """All of a claim's curves in one line plot; x = index (layer). None when it has no curves."""
    curves = {k: v for k, v in claim.curves.items() if v}
    if not curves:
        return None
    fig, ax = _figure()
    longest = 0
    # Rates and probabilities live in [0, 1]; ranks and norms do not: those go on their own
    # (log, when positive) right-hand axis so neither flattens the other.
    small = {k: v for k, v in curves.items() if max((abs(y) for y in _floats(v)), default=0) <= 1.5}
    large = {k: v for k, v in curves.items() if k not in small}
    axes = [(ax, small or large)]
    if small and large:
        twin = ax.twinx()
        twin.tick_params(labelsize=8)
        if all(y > 0 for ys in large.values() for y in _floats(ys)):
            twin.set_yscale("log")
        axes.append((twin, large))
    colours = iter(f"C{i}" for i in range(10 * len(curves)))
    handles = []
    for axis, group in axes:
        for name, ys in group.items():
            ys = [y if y is not None else math.nan for y in ys]
            longest = max(longest, len(ys))
            label = name + (" (right axis)" if axis is not ax else "")
            handles += axis.plot(range(len(ys)), ys, marker="o" if len(ys) <= 40 else None, markersize=2.5,
                                 linewidth=1.4, label=label, color=next(colours))
    if layer is not None and 0 <= layer < longest:
        ax.axvline(layer, color="#57606a", linestyle=":", linewidth=1, label=f"layer {layer}")
    ax.set_xlabel("layer", fontsize=8)
    ax.set_title(claim.name, fontsize=9)
    if longest > 1:
        ax.set_xlim(-0.5, longest - 0.5)
    if len(curves) > 1 or layer is not None:
        ax.legend(handles=handles + ([ax.lines[-1]] if layer is not None and 0 <= layer < longest else []),
                  fontsize=7, frameon=False)
    return _png(fig)


def null_plot(claim: ClaimResult) -> str | None:
    """Histogram of details["null_distribution"] with the claim's effect as a vertical line."""
    null = _floats(claim.details.get("null_distribution"))
    if not null:
        return None
    fig, ax = _figure()
    ax.hist(null, bins=min(40, max(8, int(math.sqrt(len(null))))), color="#8c959f", alpha=0.85,
            label="null (control)")
    effect = claim.effect
    if effect is not None and math.isfinite(effect):
        ax.axvline(effect, color=COLORS.get(claim.verdict, "#0969da"), linewidth=2,
                   label=f"effect {fmt_num(effect)}")
    if claim.threshold is not None:
        ax.axvline(claim.threshold, color="#57606a", linestyle="--", linewidth=1,
                   label=f"threshold {fmt_threshold(claim)}")
    what = control_name(claim.control) if claim.control else "control"
    ax.set_title(f"{claim.name}: {what} (n={len(null)})", fontsize=9)
    ax.set_ylabel("count", fontsize=8)
    ax.margins(x=0.06)
    ax.legend(fontsize=7, frameon=True, framealpha=0.9, edgecolor="none")
    return _png(fig)


def comparison_plot(comparison: Comparison) -> str | None:
    """Horizontal bars: each claim's effect before (grey) and after (coloured by status)."""
    rows = [r for r in comparison.rows if r.before_effect is not None or r.after_effect is not None]
    if not rows:
        return None
    rows = rows[:60]
    height = max(FIGSIZE[1], 0.9 + 0.42 * len(rows))
    fig, ax = _figure(height)
    ys = list(range(len(rows)))[::-1]
    ax.barh([y + 0.2 for y in ys], [_val(r.before_effect) for r in rows], height=0.38,
            color="#afb8c1", label="before")
    colors = ["#cf222e" if r.failing else "#0969da" for r in rows]
    ax.barh([y - 0.2 for y in ys], [_val(r.after_effect) for r in rows], height=0.38, color=colors,
            label="after")
    labels = [f"{_short(r.claim, 30)}\n{_short(r.probe, 30)}" for r in rows]
    ax.set_yticks(ys, labels, fontsize=7, linespacing=1.1)
    ax.axvline(0, color="#57606a", linewidth=0.8)
    ax.grid(True, axis="x", alpha=0.3)
    ax.grid(False, axis="y")
    ax.set_xlabel("effect", fontsize=8)
    ax.set_title("effect before → after (red: failing)", fontsize=9)
    ax.legend(fontsize=7, frameon=False, loc="best")
    return _png(fig)


def _val(x: float | None) -> float:
    return x if x is not None and math.isfinite(x) else 0.0


def _short(s: str, n: int) -> str:
    return s if len(s) <= n else s[: n - 1] + "…"


# ---------------------------------------------------------------- context


def _anchor(*parts: str, used: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9_-]+", "-", "-".join(parts)).strip("-").lower() or "x"
    a, i = base, 2
    while a in used:
        a, i = f"{base}-{i}", i + 1
    used.add(a)
    return a


def _layer(settings: dict[str, Any]) -> int | None:
    v = settings.get("layer")
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _claim_ctx(p: ProbeRecord, c: ClaimResult, anchor: str) -> dict[str, Any]:
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
    plots = [x for x in (curves_plot(c, _layer(p.settings)), null_plot(c)) if x]
    return {
        "name": c.name,
        "anchor": anchor,
        "verdict": c.verdict,
        "reason": c.reason,
        "facts": facts,
        "details": [(k, fmt_value(v)) for k, v in details.items()],
        "plots": plots,
    }


def _context(record: RunRecord, comparison: Comparison | None) -> dict[str, Any]:
    from .writers import summary_rows, verdict_counts

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
            claims.append(_claim_ctx(p, c, ca))
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

    m = record.model
    model_bits = [b for b in (m.model_type, f"{m.n_layers} layers" if m.n_layers else "", m.dtype) if b]
    meta = [("model", m.id + (f"  (slug {m.slug})" if m.slug and m.slug != m.id else ""))]
    if model_bits or m.device:
        meta.append(("architecture", ", ".join(model_bits) + (f" on {m.device}" if m.device else "")))
    if m.hash:
        meta.append(("weights", m.hash))
    if m.path:
        meta.append(("path", m.path))
    meta.append(("seed", str(record.seed)))
    if record.started or record.finished:
        meta.append(("run", f"{record.started or '?'} → {record.finished or '?'}"))
    if record.probes_commit:
        meta.append(("probes commit", record.probes_commit))
    if record.versions:
        meta.append(("versions", ", ".join(f"{k} {v}" for k, v in record.versions.items())))

    comp = None
    if comparison is not None:
        comp = {
            "ok": comparison.ok,
            "plot": comparison_plot(comparison),
            "warnings": comparison.warnings,
            "rows": [
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
            ],
        }

    tokenization = (
        json.dumps(record.tokenization, indent=2, ensure_ascii=False, default=str)
        if record.tokenization
        else ""
    )
    return {
        "record": record,
        "title": f"modelprobe report — {m.id}",
        "counts": verdict_counts(record),
        "meta": meta,
        "headers": ["probe", "claim", "verdict", "effect", "CI", "threshold", "control"],
        "summary": summary,
        "comparison": comp,
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
        "tokenization": tokenization,
        "probes": probes,
        "colors": COLORS,
    }


def render_html(record: RunRecord, comparison: Comparison | None = None) -> str:
    """The text of report.html."""
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(_TEMPLATE_DIR)),
        autoescape=True,
        trim_blocks=True,
        lstrip_blocks=True,
        undefined=jinja2.StrictUndefined,
    )
    return env.get_template("report.html.j2").render(**_context(record, comparison))


def write_html(
    record: RunRecord, directory: str | os.PathLike[str], comparison: Comparison | None = None
) -> Path:
    """Write the self-contained `report.html` into `directory`; returns its path."""
    ensure_dir(directory)  # fail before spending time on plots
    return write_text(directory, "report.html", render_html(record, comparison))
