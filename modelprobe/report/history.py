"""A claim's history across releases: `modelprobe history BASE1.json BASE2.json ... -o history.html`.

Each report (a baseline or report.json of one model line) is a release, in the order given or by run date.
Per claim: its effect with interval and verdict in each release, the threshold, and the releases where it
flipped or moved past its tolerance against the release before it (the same rules as `modelprobe compare`,
so the page and the gate never disagree). Writes an HTML page (a small plot per claim) and a Markdown table.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from tabulate import tabulate

from ._fmt import MISSING, fmt_ci, fmt_num
from ._io import write_text
from .baseline import _diff_claim, load_report
from .errors import BaselineError, ReportWriteError
from .plots import figure, png
from .record import ClaimResult, RunRecord

__all__ = ["ClaimHistory", "Release", "claim_histories", "cli_history", "load_releases", "render_history_html",
           "render_history_markdown", "report_trends", "trend_plot"]

COLORS = {"pass": "#1a7f37", "fail": "#cf222e", "inconclusive": "#9a6700", "error": "#8250df"}
MARKED = ("flipped", "regressed", "errored")  # what the gate would fail on between two releases


@dataclass
class Release:
    label: str
    record: RunRecord
    path: Path | None = None


@dataclass
class Point:
    claim: ClaimResult | None  # None: not in this release
    status: str = ""  # against the last release that measured it: flipped, regressed, improved, ok, ...
    message: str = ""


@dataclass
class ClaimHistory:
    probe: str  # the probe's identity (file)
    claim: str
    points: list[Point] = field(default_factory=list)

    @property
    def latest(self) -> ClaimResult:
        return next(p.claim for p in reversed(self.points) if p.claim is not None)

    @property
    def marks(self) -> list[tuple[int, Point]]:
        return [(i, p) for i, p in enumerate(self.points) if p.status in MARKED]


def _date(record: RunRecord, path: Path | None) -> datetime:
    text = record.started or record.finished
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise BaselineError(f"{path}: no run date ('started' is {text!r}); give the reports in release order "
                            "instead of --by-date") from None


def _labels(paths: list[Path]) -> list[str]:
    """A report's label: its file name without .json (the folder's name for a report.json)."""
    labels = [(p.parent.name if p.stem == "report" and p.parent.name else p.stem) for p in paths]
    return [f"{lab} ({i + 1})" if labels.count(lab) > 1 else lab for i, lab in enumerate(labels)]


def load_releases(paths: list[str | os.PathLike[str]], by_date: bool = False) -> list[Release]:
    """The reports as releases, in the given order or by run date (BaselineError, one line, on a bad file)."""
    files = [Path(p) for p in paths]
    releases = [Release(lab, load_report(f), f) for lab, f in zip(_labels(files), files, strict=True)]
    if by_date:
        dated = [(_date(r.record, r.path), i) for i, r in enumerate(releases)]
        if len({d.tzinfo is None for d, _ in dated}) > 1:
            raise BaselineError("some reports' run dates have a time zone and some do not: give the release order")
        releases = [releases[i] for _, i in sorted(dated)]
    return releases


def claim_histories(releases: list[Release]) -> list[ClaimHistory]:
    """One history per (probe file, claim) seen in any release, in order of first appearance."""
    keys: dict[tuple[str, str], None] = {}
    for r in releases:
        for p, c in r.record.claims():
            keys.setdefault((p.file, c.name), None)
    out = []
    for probe, name in keys:
        h = ClaimHistory(probe, name)
        before: ClaimResult | None = None
        for r in releases:
            now = next((c for p, c in r.record.claims() if p.file == probe and c.name == name), None)
            point = Point(now)
            if now is None:
                point.status = "missing"
            elif before is not None:
                diff = _diff_claim(probe, before, now, None, None)
                point.status, point.message = diff.status, diff.message
            h.points.append(point)
            # Held against the last release that measured it: a NaN release is marked once, not twice.
            if now is not None and (before is None or _finite(now.effect) or not _finite(before.effect)):
                before = now
        out.append(h)
    return out


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def trend_plot(h: ClaimHistory, labels: list[str]) -> str | None:
    """Effect with interval per release, coloured by verdict; threshold dashed; flips and moves past the
    tolerance ringed and named. None when no release has a finite effect."""
    pts = [(i, p.claim) for i, p in enumerate(h.points) if p.claim is not None and _finite(p.claim.effect)]
    if not pts:
        return None
    fig, ax = figure(2.3)
    xs = [i for i, _ in pts]
    ax.plot(xs, [c.effect for _, c in pts], color="#8c959f", linewidth=1, zorder=1)
    for i, c in pts:
        colour = COLORS.get(c.verdict, "#8c959f")
        if c.ci is not None and all(_finite(v) for v in c.ci):
            ax.errorbar([i], [c.effect], yerr=[[c.effect - c.ci[0]], [c.ci[1] - c.effect]], color=colour,
                        capsize=3, linewidth=1.2, zorder=2)
        ax.scatter([i], [c.effect], color=colour, s=28, zorder=3)
    latest = h.latest
    if _finite(latest.threshold):
        word = "≥" if latest.comparison == "at_least" else "≤"
        ax.axhline(latest.threshold, color="#57606a", linestyle="--", linewidth=1,
                   label=f"threshold {word} {fmt_num(latest.threshold)}")
    for i, p in h.marks:
        if p.claim is not None and _finite(p.claim.effect):
            ax.scatter([i], [p.claim.effect], s=160, facecolors="none", edgecolors="#cf222e", linewidths=1.5,
                       zorder=4)
            ax.annotate(p.status, (i, p.claim.effect), textcoords="offset points", xytext=(0, 9), ha="center",
                        fontsize=7, color="#cf222e")
    ax.set_xticks(range(len(labels)), labels, fontsize=7)
    ax.set_xlim(-0.5, len(labels) - 0.5)
    ax.set_ylabel("effect", fontsize=8)
    ax.set_title(f"{h.claim} across releases", fontsize=9)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, frameon=False, loc="best")
    return png(fig)


def _cell(p: Point) -> str:
    if p.claim is None:
        return MISSING
    c = p.claim
    return f"{c.verdict} {fmt_num(c.effect)}" + (f" {fmt_ci(c.ci)}" if c.ci else "")


def _changes(h: ClaimHistory, labels: list[str]) -> str:
    return "; ".join(f"{labels[i]}: {p.status} ({p.message})" for i, p in h.marks)


def render_history_markdown(releases: list[Release], histories: list[ClaimHistory]) -> str:
    labels = [r.label for r in releases]
    rows = [[h.probe, h.claim, *(_cell(p) for p in h.points), _changes(h, labels) or "—"] for h in histories]
    head = ["# modelprobe history", "", "Releases, in order: " + ", ".join(
        f"`{r.label}` ({r.record.model.id}, {r.record.started or 'no date'})" for r in releases), ""]
    table = tabulate(rows, headers=["probe", "claim", *labels, "flips / moves past tolerance"], tablefmt="github",
                     disable_numparse=True) if rows else "(no claims)"
    return "\n".join(head + [table, ""])


def render_history_html(releases: list[Release], histories: list[ClaimHistory]) -> str:
    import jinja2

    labels = [r.label for r in releases]
    claims = []
    for k, h in enumerate(histories):
        claims.append({
            "probe": h.probe, "name": h.claim, "anchor": f"claim-{k}", "plot": trend_plot(h, labels),
            "cells": [{"verdict": p.claim.verdict if p.claim else "none", "text": _cell(p),
                       "mark": p.status if p.status in MARKED else ""} for p in h.points],
            "threshold": (f"{'≥' if h.latest.comparison == 'at_least' else '≤'} {fmt_num(h.latest.threshold)}"
                          if h.latest.threshold is not None else MISSING),
            "tolerance": ", ".join(f"{k2} {fmt_num(v)}" for k2, v in (h.latest.tolerance or {}).items()) or MISSING,
            "changes": [(labels[i], p.status, p.message) for i, p in h.marks],
        })
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(Path(__file__).parent / "templates")),
                             autoescape=True, trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined)
    releases_ctx = [{"label": r.label, "model": r.record.model.id, "hash": r.record.model.hash[:12],
                     "date": r.record.started or MISSING, "file": str(r.path or "")} for r in releases]
    models = sorted({r.record.model.id for r in releases})
    return env.get_template("history.html.j2").render(
        title=f"modelprobe history — {', '.join(models)}", releases=releases_ctx, labels=labels, claims=claims,
        colors=COLORS, flipped=sum(bool(c["changes"]) for c in claims))


def report_trends(report_dir: str | os.PathLike[str], record: RunRecord,
                  label: str = "this run") -> dict[tuple[str, str], str]:
    """For the report of a --probe-compare run: a trend plot per claim over the model's saved baselines
    (reports/baselines/<slug>/*.json, by run date) and this run; empty when none is saved. A baseline that
    cannot be read is skipped: the comparison itself already reports on the one it compares against."""
    folder = Path(report_dir) / "baselines" / record.model.slug
    older = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            rel = Release(path.stem, load_report(path), path)
            older.append((_date(rel.record, path), rel))
        except BaselineError:
            continue
    if not older:
        return {}
    try:
        older.sort(key=lambda x: x[0])
    except TypeError:  # dates with and without a time zone: keep the file order
        pass
    releases = [r for _, r in older] + [Release(label, record)]
    labels = [r.label for r in releases]
    out = {}
    for h in claim_histories(releases):
        if h.points[-1].claim is not None and sum(p.claim is not None for p in h.points) >= 2:
            img = trend_plot(h, labels)
            if img:
                out[(h.probe, h.claim)] = img
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="modelprobe history",
                                description="Draw each claim's effect across releases (saved reports / baselines "
                                            "of one model line): an HTML page and a Markdown table.")
    p.add_argument("reports", nargs="+", help="report .json files, oldest release first (or use --by-date)")
    p.add_argument("-o", "--output", default="history.html", help="HTML file to write (default: history.html)")
    p.add_argument("--markdown", default=None, help="Markdown file to write (default: the HTML's name with .md)")
    p.add_argument("--by-date", action="store_true", help="order the releases by their run date")
    return p


def cli_history(argv: list[str]) -> int:
    """0: written; 2: a report could not be read or a file not written."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2
    out = Path(args.output)
    md = Path(args.markdown) if args.markdown else out.with_suffix(".md")
    try:
        if len(args.reports) < 2:
            raise BaselineError("a history needs at least two reports")
        releases = load_releases(args.reports, by_date=args.by_date)
        histories = claim_histories(releases)
        written = [write_text(out.parent, out.name, render_history_html(releases, histories)),
                   write_text(md.parent, md.name, render_history_markdown(releases, histories))]
    except (BaselineError, ReportWriteError) as e:
        print(f"modelprobe history: error: {e}", file=sys.stderr)
        return 2
    marked = sum(bool(h.marks) for h in histories)
    print(f"{len(histories)} claims over {len(releases)} releases ({marked} flipped or moved past their tolerance)")
    for path in written:
        print(f"wrote {path}")
    return 0

