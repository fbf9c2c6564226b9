"""Baselines: save a run's record, load one back, and diff two runs claim by claim.

`modelprobe compare A.json B.json` is `cli_compare`. A diff fails (exit 1) when a claim that passed
now does not ("flipped"), or when an effect moved by more than its tolerance ("regressed").
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ValidationError
from tabulate import tabulate

from ..model_facts import ModelInfo, device_class
from ._fmt import MISSING, fmt_delta, fmt_num, one_line
from ._io import write_text
from .errors import BaselineError
from .record import SCHEMA_VERSION, ClaimResult, ProbeRecord, RunRecord

__all__ = [
    "BaselineError",
    "ClaimDiff",
    "Comparison",
    "Status",
    "baseline_path",
    "cli_compare",
    "compare",
    "comparison_table",
    "format_comparison",
    "load_report",
    "save_baseline",
]

Status = Literal["ok", "flipped", "regressed", "improved", "new", "missing", "errored"]

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

DEFAULT_REPORT_DIR = "reports"


# ---------------------------------------------------------------- files


def _check_name(name: str) -> None:
    if not _NAME_RE.match(name) or name.endswith(".json"):
        raise BaselineError(
            f"bad baseline name {name!r}: use letters, digits, '.', '_' or '-' (no path, no .json)"
        )


def baseline_path(report_dir: str | os.PathLike[str], model_slug: str, name: str) -> Path:
    """`<report_dir>/baselines/<model_slug>/<name>.json`."""
    _check_name(name)
    return Path(report_dir) / "baselines" / model_slug / f"{name}.json"


def save_baseline(record: RunRecord, report_dir: str | os.PathLike[str], name: str) -> Path:
    """Save `record` as baseline `name` for its model; returns the file written (overwrites).

    The model's local path is left out: a committed baseline names no directory of the machine that
    made it (model id, slug and weights hash identify the model).
    """
    path = baseline_path(report_dir, record.model.slug, name)
    record = record.model_copy(update={"model": record.model.model_copy(update={"path": ""})})
    text = json.dumps(record.model_dump(mode="json"), indent=2, ensure_ascii=False) + "\n"
    return write_text(path.parent, path.name, text, error=BaselineError)


def _looks_like_path(path_or_name: str | os.PathLike[str]) -> bool:
    if isinstance(path_or_name, os.PathLike):
        return True
    s = str(path_or_name)
    return s.endswith(".json") or "/" in s or os.sep in s


def _available(report_dir: str | os.PathLike[str], model_slug: str) -> str:
    d = Path(report_dir) / "baselines" / model_slug
    try:
        names = sorted(p.stem for p in d.glob("*.json"))
    except OSError:
        names = []
    return f"available: {', '.join(names)}" if names else f"none saved in {d}"


def load_report(
    path_or_name: str | os.PathLike[str],
    report_dir: str | os.PathLike[str] = DEFAULT_REPORT_DIR,
    model_slug: str = "",
) -> RunRecord:
    """Load a report.json / baseline file, given its path or a bare baseline NAME.

    A NAME (no '/', no '.json') is `<report_dir>/baselines/<model_slug>/<NAME>.json`.
    Raises BaselineError (one line, naming the file) when the file is missing, is not JSON,
    is not a modelprobe report, or has another schema_version.
    """
    if _looks_like_path(path_or_name):
        path = Path(path_or_name)
        if not path.is_file():
            what = "is a directory, not a report file" if path.is_dir() else "not found"
            raise BaselineError(f"report file {path} {what}")
    else:
        name = str(path_or_name)
        if not model_slug:
            raise BaselineError(f"cannot resolve baseline name {name!r} without a model: pass a file path")
        path = baseline_path(report_dir, model_slug, name)
        if not path.is_file():
            raise BaselineError(
                f"no baseline {name!r} for model {model_slug}: {path} not found "
                f"({_available(report_dir, model_slug)})"
            )
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise BaselineError(f"cannot read {path}: {e.strerror or e.__class__.__name__}") from None
    except UnicodeDecodeError:
        raise BaselineError(f"{path} is not JSON (not UTF-8 text)") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise BaselineError(f"{path} is not JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    except RecursionError:
        raise BaselineError(f"{path} is not a modelprobe report (JSON nested too deeply)") from None
    if not isinstance(data, dict) or data.get("tool") != "modelprobe":
        raise BaselineError(f'{path} is not a modelprobe report (no "tool": "modelprobe")')
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise BaselineError(
            f"{path} has report schema_version {version!r}, this modelprobe reads {SCHEMA_VERSION}: "
            "re-run the probes to make a new report / baseline"
        )
    try:
        record = RunRecord.model_validate(data)
    except RecursionError:
        raise BaselineError(f"{path} is not a valid modelprobe report (nested too deeply)") from None
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"]) or "(top level)"
        more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
        raise BaselineError(
            f"{path} is not a valid modelprobe report: field {loc}: {err['msg']}{more}"
        ) from None
    duplicates = sorted({p.file for p in record.probes if [q.file for q in record.probes].count(p.file) > 1})
    if duplicates:
        raise BaselineError(f"{path} lists probe {duplicates[0]} more than once: which one is meant is unclear")
    return record


# ---------------------------------------------------------------- diff


class ClaimDiff(BaseModel):
    probe: str
    claim: str
    before_verdict: str | None = None
    before_effect: float | None = None
    after_verdict: str | None = None
    after_effect: float | None = None
    delta: float | None = None
    tolerance: float | None = None  # the largest |delta| allowed for this claim (None: no check)
    status: Status = "ok"
    failing: bool = False
    message: str = ""


class Comparison(BaseModel):
    before_model: str = ""
    after_model: str = ""
    before_numerics: str = ""  # "float32 on cpu": the dtype and device class that made the baseline
    after_numerics: str = ""
    error: str = ""  # the comparison could not be made (no baseline, another model, other numerics)
    rows: list[ClaimDiff] = []
    warnings: list[str] = []
    ok: bool = True

    @property
    def failing(self) -> list[ClaimDiff]:
        return [r for r in self.rows if r.failing]


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def _not_a_number(x: float | None) -> bool:
    return x is not None and not math.isfinite(x)


def _allowed(
    before_effect: float, tol: dict[str, float] | None, tol_abs: float | None, tol_rel: float | None
) -> float | None:
    """Largest |delta| allowed: max(abs, rel·|before|) — within either tolerance is within."""
    if tol:  # the claim's own tolerance replaces the global ones
        tol_abs, tol_rel = tol.get("abs"), tol.get("rel")
    parts = []
    if tol_abs is not None:
        parts.append(abs(float(tol_abs)))
    if tol_rel is not None:
        parts.append(abs(float(tol_rel)) * abs(before_effect))
    return max(parts) if parts else None


def _effects(b: float | None, a: float | None) -> str:
    return f"effect {fmt_num(b)} → {fmt_num(a)}"


def _diff_claim(
    probe: str,
    before: ClaimResult,
    after: ClaimResult,
    tol_abs: float | None,
    tol_rel: float | None,
) -> ClaimDiff:
    b, a = _finite(before.effect), _finite(after.effect)
    delta = a - b if a is not None and b is not None else None
    allowed = _allowed(b, after.tolerance, tol_abs, tol_rel) if b is not None else None
    row = ClaimDiff(
        probe=probe,
        claim=after.name,
        before_verdict=before.verdict,
        before_effect=before.effect,
        after_verdict=after.verdict,
        after_effect=after.effect,
        delta=delta,
        tolerance=allowed,
    )
    verdicts = f"{before.verdict} → {after.verdict}"
    if after.verdict == "error":
        row.status, row.failing = "errored", True
        row.message = f"{verdicts}: {one_line(after.reason, 120)}" if after.reason else verdicts
    elif before.verdict == "pass" and after.verdict != "pass":
        row.status, row.failing = "flipped", True
        row.message = f"{verdicts} ({_effects(before.effect, after.effect)})"
        if after.reason:
            row.message += f": {one_line(after.reason, 120)}"
    elif _not_a_number(after.effect) or (_not_a_number(before.effect) and (tol_abs, tol_rel) != (None, None)):
        # NaN or inf is no measurement: it must not slip through a tolerance by comparing false.
        row.status, row.failing = "regressed", True
        row.message = f"{_effects(before.effect, after.effect)}: not a finite number, nothing to compare"
    elif delta is not None and allowed is not None and abs(delta) > allowed * (1 + 1e-9) + 1e-12:
        row.status, row.failing = "regressed", True
        moved = "rose" if delta > 0 else "fell"
        row.message = (
            f"{_effects(before.effect, after.effect)}: {moved} by {fmt_num(abs(delta))}, "
            f"tolerance ±{fmt_num(allowed)}"
        )
        if before.verdict != after.verdict:
            row.message += f" ({verdicts})"
    elif before.verdict != "pass" and after.verdict == "pass":
        row.status = "improved"
        row.message = f"{verdicts} ({_effects(before.effect, after.effect)})"
    else:
        row.message = _effects(before.effect, after.effect)
        if before.verdict != after.verdict:
            row.message = f"{verdicts} ({row.message})"
    return row


def _check_models(before: RunRecord, after: RunRecord, allow_model_change: bool) -> list[str]:
    bm, am = before.model, after.model
    same_slug = bm.slug == am.slug
    same_hash = not bm.hash or not am.hash or bm.hash == am.hash
    if same_slug and same_hash:
        return []

    def desc(m) -> str:
        return f"{m.slug} ({m.hash[:12]})" if m.hash else m.slug

    what = f"baseline model {desc(bm)} vs this run's model {desc(am)}"
    if same_slug:
        # A new revision of the same model is exactly what a release gate compares.
        return [f"weights changed since the baseline: {what}"]
    if not allow_model_change:
        raise BaselineError(
            f"cannot compare different models: {what}; "
            "allow a model change (--allow-model-change / --probe-allow-model-change) to compare anyway"
        )
    return [f"model changed: {what}"]


def numerics(m: ModelInfo) -> str:
    """The dtype and device class a run computed in; a record that names neither predates the check and was made
    in float32 on the cpu, the only numerics then."""
    return f"{m.dtype or 'float32'} on {device_class(m.device)}"


def _check_numerics(before: RunRecord, after: RunRecord, allow_dtype_change: bool) -> list[str]:
    """A verdict can move with precision alone (a bf16 run is not a regression of the model): another dtype or
    device class refuses like another model, unless allowed."""
    b, a = numerics(before.model), numerics(after.model)
    if b == a:
        return []
    if not allow_dtype_change:
        raise BaselineError(
            f"cannot compare runs of different numerics: the baseline was made in {b}, this run in {a}; run in "
            f"{b} or allow it (--allow-dtype-change / --probe-allow-dtype-change)"
        )
    return [f"numerics changed: baseline made in {b}, this run in {a}"]


def _metadata_warnings(before: RunRecord, after: RunRecord) -> list[str]:
    w: list[str] = []
    if before.seed != after.seed:
        w.append(f"seed differs: {before.seed} → {after.seed}")
    bprobes = {p.file: p for p in before.probes}
    for p in after.probes:
        q = bprobes.get(p.file)
        if q is not None and q.file_hash and p.file_hash and q.file_hash != p.file_hash:
            w.append(
                f"probe {p.file}: probe file changed since the baseline "
                f"(hash {q.file_hash[:12]} → {p.file_hash[:12]})"
            )
    for k in sorted(set(before.versions) & set(after.versions)):
        if before.versions[k] != after.versions[k]:
            w.append(f"{k} version differs: {before.versions[k]} → {after.versions[k]}")
    if after.interrupted:
        w.append("this run was interrupted: claims it did not reach show as missing")
    if before.interrupted:
        w.append("the baseline run was interrupted")
    return w


def compare(
    before: RunRecord,
    after: RunRecord,
    tolerance_abs: float | None = None,
    tolerance_rel: float | None = None,
    strict: bool = False,
    allow_model_change: bool = False,
    allow_dtype_change: bool = False,
) -> Comparison:
    """Diff two runs claim by claim, matched by probe identity (its file, relative to the rootdir) and name.

    - passed before, not now → "flipped" (failing); an "error" verdict now → "errored" (failing);
    - |effect delta| > tolerance → "regressed" (failing); the tolerance is the AFTER claim's own
      {"abs", "rel"} if it has one, else `tolerance_abs` / `tolerance_rel`; allowed delta is
      max(abs, rel·|before effect|); no tolerance at all → effect moves never fail; a NaN or
      infinite effect now is always failing;
    - not passing before, passing now → "improved";
    - in the baseline and in this run's selection (a claim of a file the run collected or failed to collect,
      `after.collected_files`, all files when None; not deselected, `after.deselected`) but not measured →
      "missing" or, when its probe errored, "errored": always failing — a gate never passes on a claim it
      did not measure (a claim deleted from its probe file is missing too);
    - new since the baseline → "new" (failing only if `strict`);
    - different model slug / hash → BaselineError unless `allow_model_change` (then a warning);
    - different dtype or device class → BaselineError unless `allow_dtype_change` (then a warning);
    - different probe file hash, seed, package versions → warnings.
    """
    warnings = _check_models(before, after, allow_model_change)
    warnings += _check_numerics(before, after, allow_dtype_change)
    warnings += _metadata_warnings(before, after)

    aprobes: dict[str, ProbeRecord] = {p.file: p for p in after.probes}
    bclaims = {(p.file, c.name): c for p in before.probes for c in p.claims}
    aclaims = {(p.file, c.name): c for p in after.probes for c in p.claims}

    rows: list[ClaimDiff] = []
    for key, a in aclaims.items():
        b = bclaims.get(key)
        rows.append(_diff_claim(key[0], b, a, tolerance_abs, tolerance_rel) if b is not None
                    else _new_row(key, a, strict, known=any(p.file == key[0] for p in before.probes)))
    scope = set(after.collected_files) if after.collected_files is not None else None
    deselected = set(after.deselected)
    for key, b in bclaims.items():
        if key in aclaims:
            continue
        if (scope is not None and key[0] not in scope) or f"{key[0]}::{key[1]}" in deselected:
            continue  # the run did not ask for this claim (other paths, -k, -m)
        rows.append(_missing_row(key, b, aprobes.get(key[0])))

    return Comparison(
        before_model=before.model.slug,
        after_model=after.model.slug,
        before_numerics=numerics(before.model),
        after_numerics=numerics(after.model),
        rows=rows,
        warnings=warnings,
        ok=not any(r.failing for r in rows),
    )


def numerics_line(comparison: Comparison) -> str:
    """Which dtype and device made the baseline, and this run (a verdict can move with precision alone)."""
    if not comparison.before_numerics:
        return ""
    return f"baseline made in {comparison.before_numerics}; this run in {comparison.after_numerics or '?'}"


def _new_row(key: tuple[str, str], a: ClaimResult, strict: bool, known: bool) -> ClaimDiff:
    where = "claim" if known else "probe"
    return ClaimDiff(probe=key[0], claim=key[1], after_verdict=a.verdict, after_effect=a.effect, status="new",
                     failing=strict,
                     message=f"{where} not in the baseline (now {a.verdict}, effect {fmt_num(a.effect)})")


def _missing_row(key: tuple[str, str], b: ClaimResult, ap: ProbeRecord | None) -> ClaimDiff:
    row = ClaimDiff(probe=key[0], claim=key[1], before_verdict=b.verdict, before_effect=b.effect,
                    status="missing", failing=True)
    if ap is not None and ap.error:
        stage = "could not be collected" if not ap.collected else "could not be measured"
        row.status, row.after_verdict = "errored", "error"
        row.message = f"{b.verdict} → error: probe {stage}: {one_line(ap.error, 160)}"
    else:
        where = "claim" if ap is not None else "probe"
        row.message = f"{where} not measured in this run (baseline: {b.verdict}, effect {fmt_num(b.effect)})"
    return row


# ---------------------------------------------------------------- text


COMPARISON_HEADERS = ["probe", "claim", "before", "after", "Δ", "status", "message"]


def _side(verdict: str | None, effect: float | None) -> str:
    if verdict is None:
        return MISSING
    return f"{verdict} {fmt_num(effect)}" if effect is not None else verdict


def comparison_table(comparison: Comparison) -> tuple[list[str], list[list[str]]]:
    """Headers and rows (strings) of the comparison table; failing statuses are upper-cased."""
    rows = [
        [
            r.probe,
            r.claim,
            _side(r.before_verdict, r.before_effect),
            _side(r.after_verdict, r.after_effect),
            fmt_delta(r.delta),
            r.status.upper() if r.failing else r.status,
            r.message,
        ]
        for r in comparison.rows
    ]
    return COMPARISON_HEADERS, rows


def comparison_verdict(comparison: Comparison) -> str:
    failing = comparison.failing
    if not failing:
        matched = sum(r.before_verdict is not None and r.after_verdict is not None for r in comparison.rows)
        new = sum(r.status == "new" for r in comparison.rows)
        return f"OK: no regressions ({matched} claims compared" + (f", {new} new)" if new else ")")
    counts: dict[str, int] = {}
    for r in failing:
        counts[r.status] = counts.get(r.status, 0) + 1
    what = ", ".join(f"{n} {s}" for s, n in counts.items())
    return f"FAILED: {len(failing)} of {len(comparison.rows)} claims ({what})"


def format_comparison(comparison: Comparison) -> str:
    """The comparison as plain text: table, warnings, one-line verdict."""
    headers, rows = comparison_table(comparison)
    out = [tabulate(rows, headers=headers, tablefmt="simple", disable_numparse=True) if rows else "(no claims)"]
    if numerics_line(comparison):
        out += ["", numerics_line(comparison)]
    if comparison.warnings:
        out.append("")
        out += [f"warning: {w}" for w in comparison.warnings]
    out += ["", comparison_verdict(comparison)]
    return "\n".join(out)


# ---------------------------------------------------------------- CLI


def _tolerance(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number >= 0")
    return value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="modelprobe compare",
        description=(
            "Compare two modelprobe reports claim by claim. Exit 0: no regressions; "
            "1: a claim flipped, regressed, errored or was not measured; 2: a report could not be read "
            "or compared."
        ),
    )
    p.add_argument("before", help="baseline: a report .json file, or a baseline NAME")
    p.add_argument("after", help="new run: a report .json file, or a baseline NAME")
    p.add_argument("--tolerance-abs", type=_tolerance, default=None, metavar="X",
                   help="fail when an effect moves by more than X (claims' own tolerances win)")
    p.add_argument("--tolerance-rel", type=_tolerance, default=None, metavar="Y",
                   help="fail when an effect moves by more than Y × |baseline effect|")
    p.add_argument("--strict", action="store_true",
                   help="claims new in the second report fail too (missing or errored ones always fail)")
    p.add_argument("--allow-model-change", action="store_true",
                   help="compare reports of different models (a warning instead of an error)")
    p.add_argument("--allow-dtype-change", action="store_true",
                   help="compare reports made in different dtypes or on different device classes")
    p.add_argument("--report-dir", default=DEFAULT_REPORT_DIR,
                   help=f"where baseline NAMEs are looked up (default: {DEFAULT_REPORT_DIR})")
    return p


def cli_compare(argv: list[str]) -> int:
    """`modelprobe compare A B [...]`: print the diff; 0 ok, 1 failing claims, 2 unreadable input."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2, already printed)
        return e.code if isinstance(e.code, int) else 2
    try:
        specs = [args.before, args.after]
        loaded: list[RunRecord | None] = [None, None]
        for i, s in enumerate(specs):  # paths first: a NAME resolves against the other report's model
            if _looks_like_path(s):
                loaded[i] = load_report(s, args.report_dir)
        if loaded == [None, None]:
            raise BaselineError("give at least one report file path (a NAME needs a model to look it up)")
        for i, s in enumerate(specs):
            if loaded[i] is None:
                other = loaded[1 - i]
                assert other is not None
                loaded[i] = load_report(s, args.report_dir, other.model.slug)
        before, after = loaded
        assert before is not None and after is not None
        result = compare(
            before,
            after,
            tolerance_abs=args.tolerance_abs,
            tolerance_rel=args.tolerance_rel,
            strict=args.strict,
            allow_model_change=args.allow_model_change,
            allow_dtype_change=args.allow_dtype_change,
        )
    except BaselineError as e:
        print(f"modelprobe compare: error: {e}", file=sys.stderr)
        return 2
    print(format_comparison(result))
    return 0 if result.ok else 1
