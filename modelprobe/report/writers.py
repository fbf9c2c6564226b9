"""report.json, report.md (pasteable into a pull request) and the end-of-run summary table.

Only reads a `RunRecord`; no torch.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tabulate import tabulate

from ._fmt import (
    MISSING,
    fmt_ci,
    fmt_control,
    fmt_num,
    fmt_threshold,
    fmt_value,
    one_line,
)
from ._io import SignalGuard, WriteStopped, report_lock, write_text
from .errors import ReportInterrupted, ReportWriteError
from .record import ClaimResult, ProbeRecord, RunRecord
from .summary import SUMMARY_HEADERS, summary_rows, verdict_counts

if TYPE_CHECKING:
    from .baseline import Comparison

__all__ = [
    "SUMMARY_HEADERS",
    "ReportWriteError",
    "render_markdown",
    "summary_rows",
    "verdict_counts",
    "write_all",
    "write_json",
    "write_markdown",
]

VERDICT_ICON = {"pass": "✅", "fail": "❌", "inconclusive": "⚠️", "error": "💥"}

# GitHub refuses step summaries over 1 MiB; above this we append the short version.
GITHUB_SUMMARY_LIMIT = 1_000_000


# ---------------------------------------------------------------- json


def write_json(record: RunRecord, directory: str | os.PathLike[str]) -> Path:
    """Write `report.json` (the full record; `RunRecord.model_validate_json` reads it back)."""
    return write_text(directory, "report.json", json_text(record))


def json_text(record: RunRecord) -> str:
    return json.dumps(record.model_dump(mode="json"), indent=2, ensure_ascii=False) + "\n"


# ---------------------------------------------------------------- markdown


def _cell(s: Any) -> str:
    """A markdown table cell: one line, pipes escaped."""
    return one_line(str(s)).replace("|", "\\|")


def _code(s: Any) -> str:
    s = str(s)
    tick = "``" if "`" in s else "`"
    pad = " " if tick == "``" else ""
    return f"{tick}{pad}{s}{pad}{tick}"


def _table(rows: list[list[Any]], headers: list[str]) -> str:
    return tabulate(
        [[_cell(x) for x in r] for r in rows],
        headers=[_cell(h) for h in headers],
        tablefmt="github",
        disable_numparse=True,
    )


def _model_line(record: RunRecord) -> str:
    m = record.model
    bits = [b for b in (m.model_type, f"{m.n_layers} layers" if m.n_layers else "", m.dtype) if b]
    s = _code(m.id)
    if m.slug and m.slug != m.id:
        s += f" (slug {_code(m.slug)})"
    if bits:
        s += " — " + ", ".join(bits)
    if m.device:
        s += f" on {m.device}"
    return s


def _header_list(record: RunRecord) -> str:
    m = record.model
    rows: list[list[str]] = [["model", _model_line(record)]]
    if m.hash:
        rows.append(["weights", _code(m.hash)])
    if m.revision:
        rows.append(["revision", f"{_code(m.revision)} (commit {_code(m.hash) if m.hash else 'not resolved'})"])
    if m.path:
        rows.append(["path", _code(m.path)])
    rows.append(["seed", str(record.seed)])
    if record.started or record.finished:
        rows.append(["run", f"{record.started or '?'} → {record.finished or '?'}"])
    if record.probes_commit:
        rows.append(["probes commit", _code(record.probes_commit)])
    if record.versions:
        rows.append(["versions", ", ".join(f"{k} {v}" for k, v in record.versions.items())])
    return "\n".join(f"- **{k}:** {v}" for k, v in rows)


def _preflight_md(record: RunRecord) -> str:
    if not record.preflight:
        return "_No preflight checks were run._"
    rows = [
        [
            p.name,
            "✅ passed" if p.passed else "❌ failed",
            fmt_num(p.value),
            fmt_num(p.tolerance),
            p.detail or "",
        ]
        for p in record.preflight
    ]
    return _table(rows, ["check", "result", "value", "tolerance", "detail"])


def _fenced(text: str, lang: str = "") -> str:
    fence = "```"
    while fence in text:
        fence += "`"
    return f"{fence}{lang}\n{text.rstrip()}\n{fence}"


def _claim_md(c: ClaimResult) -> list[str]:
    icon = VERDICT_ICON.get(c.verdict, "")
    out = [f"#### {icon} {_code(c.name)} — {c.verdict}", ""]
    effect = fmt_num(c.effect)
    if c.ci is not None:
        effect += f" (CI {fmt_ci(c.ci)})"
    verdict = f"**{c.verdict}**"
    if c.reason:
        verdict += f" — {one_line(c.reason)}"
    items = [
        ("metric", one_line(c.metric) if c.metric else MISSING),
        ("effect", effect),
        ("threshold", fmt_threshold(c)),
        ("n", str(c.n)),
        ("verdict", verdict),
        ("control", fmt_control(c.control)),
    ]
    if c.tolerance:
        items.append(("tolerance", ", ".join(f"{k} {fmt_num(v)}" for k, v in c.tolerance.items())))
    if c.curves:
        curves = ", ".join(f"{_code(k)} ({len(v)} points)" for k, v in c.curves.items())
        items.append(("curves", curves + " — plotted in report.html"))
    out += [f"- **{k}:** {v}" for k, v in items]
    details = dict(c.details)
    if c.control is not None and c.control.detail:
        details.update({f"control.{k}": v for k, v in c.control.detail.items()})
    if details:
        out += ["", _table([[k, fmt_value(v)] for k, v in details.items()], ["detail", "value"])]
    out.append("")
    return out


def _probe_md(p: ProbeRecord) -> list[str]:
    out = [f"### {_code(p.name)} ({p.kind or 'not collected'})", ""]
    if p.about:
        out += [p.about.strip(), ""]
    file = f"- **file:** {_code(p.file)}"
    if p.file_hash:
        file += f" (hash {_code(p.file_hash[:12])})"
    out.append(file)
    if p.duration_s:
        out.append(f"- **duration:** {fmt_num(p.duration_s)} s")
    out.append("")
    if p.error:
        what = "measured" if p.collected else "collected (read and validated)"
        out += ["> [!CAUTION]", f"> **💥 error — this probe could not be {what}:**", ">"]
        out += ["> " + line if line else ">" for line in _fenced(p.error).splitlines()]
        out.append("")
    if p.settings:
        out += [_table([[k, fmt_value(v)] for k, v in p.settings.items()], ["setting", "value"]), ""]
    for c in p.claims:
        out += _claim_md(c)
    return out


def _comparison_md(comparison: Comparison) -> list[str]:
    from .baseline import comparison_table, numerics_line

    if comparison.error:
        status = f"❌ no comparison: {one_line(comparison.error)}"
    else:
        status = "✅ no regressions" if comparison.ok else "❌ regressions against the baseline"
    out = ["## Baseline comparison", "", f"**{status}**", ""]
    if numerics_line(comparison):
        out += [f"_{numerics_line(comparison)}_", ""]
    headers, rows = comparison_table(comparison)
    if rows:
        out += [_table(rows, headers), ""]
    out += [f"- ⚠️ {one_line(w)}" for w in comparison.warnings]
    if comparison.warnings:
        out.append("")
    return out


def render_markdown(record: RunRecord, comparison: Comparison | None = None, full: bool = True) -> str:
    """The text of report.md; `full=False` keeps the header, summary, comparison and preflight only."""
    out = [f"# modelprobe report — {_code(record.model.id)}", ""]
    n = verdict_counts(record)
    labels = {"pass": "passed", "fail": "failed", "inconclusive": "inconclusive",
              "error": "error" if n["error"] == 1 else "errors"}
    line = " · ".join(f"{VERDICT_ICON[v]} {n[v]} {labels[v]}" for v in labels)
    out += [f"**{line}**", ""]
    if record.interrupted:
        cut = f" while measuring {_code(record.interrupted_probe)}" if record.interrupted_probe else ""
        notes = [] if record.interrupted_writing and not cut else [
            f"> This run was interrupted{cut}: not every probe was measured."]
        if record.interrupted_writing:
            notes.append(f"> The report writing was stopped at {_code(record.interrupted_writing)}: the reports "
                         "after report.md were not written.")
        out += ["> [!WARNING]", *notes, ""]
    out += [_header_list(record), ""]
    out += ["## Summary", ""]
    rows = summary_rows(record)
    for r in rows:
        if r[2] in VERDICT_ICON:
            r[2] = f"{VERDICT_ICON[r[2]]} {r[2]}"
    out += [_table(rows, SUMMARY_HEADERS) if rows else "_No probes were run._", ""]
    if comparison is not None:
        out += _comparison_md(comparison)
    out += ["## Preflight", "", _preflight_md(record), ""]
    if not full:
        out += ["_Probe details were left out here (too long); see report.md / report.html._", ""]
        return "\n".join(out)
    if record.tokenization:
        tok = json.dumps(record.tokenization, indent=2, ensure_ascii=False, default=str)
        out += ["<details><summary>Tokenization</summary>", "", _fenced(tok, "json"), "", "</details>", ""]
    if record.probes:
        out += ["## Probes", ""]
        for p in record.probes:
            out += _probe_md(p)
    return "\n".join(out).rstrip() + "\n"


def write_markdown(
    record: RunRecord, directory: str | os.PathLike[str], comparison: Comparison | None = None
) -> Path:
    """Write `report.md` (GitHub-flavoured; paste it into a pull request)."""
    return write_text(directory, "report.md", render_markdown(record, comparison))


# ---------------------------------------------------------------- all


def _append_github_summary(record: RunRecord, comparison: Comparison | None) -> Path | None:
    target = os.environ.get("GITHUB_STEP_SUMMARY")
    if not target:
        return None
    text = render_markdown(record, comparison)
    if len(text.encode("utf-8")) > GITHUB_SUMMARY_LIMIT:
        text = render_markdown(record, comparison, full=False)
    path = Path(target)
    try:
        with path.open("a", encoding="utf-8") as f:
            f.write(text + "\n")
    except OSError as e:
        raise ReportWriteError(
            f"cannot append to GITHUB_STEP_SUMMARY {path}: {e.strerror or e.__class__.__name__}"
        ) from None
    return path


def write_all(
    record: RunRecord,
    directory: str | os.PathLike[str],
    github_summary: bool = True,
    comparison: Comparison | None = None,
    trends: dict[tuple[str, str], str] | None = None,
) -> list[Path]:
    """Write report.json, report.md and report.html into `directory`, in that order; return their paths.

    The cheap, complete record goes first, so that the slow HTML drawing (seconds for a full library) risks
    nothing else. Ctrl-C or SIGTERM while writing lets the file being written finish, stops the rest, and leaves
    report.json and report.md marked interrupted (ReportInterrupted carries the paths written); a report.html of
    an older run is removed rather than left beside them.

    With `github_summary` and env GITHUB_STEP_SUMMARY set, the markdown is also appended there
    (that file is not in the returned list). `comparison` (from `baseline.compare`) adds a
    baseline section to the markdown and a before → after chart to the HTML; `trends` a trend plot per claim.
    """
    from .html import render_html

    renderers = {
        "report.json": lambda r: json_text(r),
        "report.md": lambda r: render_markdown(r, comparison),
        "report.html": lambda r: render_html(r, comparison, trends),
    }
    paths: list[Path] = []
    current = ""
    with report_lock(directory), SignalGuard() as guard:
        try:
            for name, render in renderers.items():
                current = name
                text = render(record)
                with guard.shielded():
                    paths.append(write_text(directory, name, text))
                guard.check()
        except WriteStopped:
            with guard.shielded():  # a second signal must not cut the rescue short
                stopped = record.model_copy(update={"interrupted": True, "interrupted_writing": current})
                paths = [write_text(directory, name, renderers[name](stopped)) for name in ("report.json", "report.md")]
                _remove_stale(Path(directory), [name for name in renderers if Path(directory, name) not in paths])
            raise ReportInterrupted(paths, f"interrupted while writing {current}: {', '.join(p.name for p in paths)} "
                                           "written, marked interrupted") from None
    if github_summary:
        _append_github_summary(record, comparison)
    return paths


def _remove_stale(directory: Path, names: list[str]) -> None:
    for name in names:
        try:
            (directory / name).unlink()
        except OSError:
            pass
