"""`--probe-shard=i/n`: a deterministic, cost-balanced share of the probes; `modelprobe merge` joins the shards.

Every shard collects every probe file and keeps the claims of its own files. The files are dealt out
longest first (the durations of the baseline or the last whole report; a file of unknown cost counts as
the median known one), each to the shard with the least work so far; equal costs go in the order of a
stable hash of the file's path, so with no durations at all the deal is by hash. Every shard must see the
same durations: they come from committed files, never from a shard's own report.

`modelprobe merge a.json b.json ... -o report.json` joins the shard reports into one report and one gate
decision under the rules of a single run: a failing or (without --allow-inconclusive) inconclusive claim,
an errored probe, an interrupted shard, a claim of a shard that never reported (missing) or, with
--compare, a comparison that does not pass, exits 1.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .report.record import ProbeRecord, RunRecord

_SHARD = re.compile(r"^\s*(\d{1,4})\s*/\s*(\d{1,4})\s*$")
MAX_SHARDS = 1000


def parse_shard(text: str) -> tuple[int, int]:
    """'i/n' with 1 <= i <= n <= 1000 → (i, n)."""
    m = _SHARD.match(str(text))
    if not m:
        raise ValueError("expected i/n, e.g. 1/4 (shard i of n, counted from 1)")
    i, n = int(m.group(1)), int(m.group(2))
    if not 1 <= n <= MAX_SHARDS:
        raise ValueError(f"the number of shards must be between 1 and {MAX_SHARDS}")
    if not 1 <= i <= n:
        raise ValueError(f"the shard must be between 1 and {n}")
    return i, n


def _hash(file: str) -> str:
    return hashlib.sha256(file.encode()).hexdigest()


def durations(record: RunRecord | None) -> dict[str, float]:
    """{probe file: seconds} of a whole (not sharded) run's measured probes."""
    if record is None or record.shard is not None:
        return {}
    return {p.file: float(p.duration_s) for p in record.probes if p.duration_s > 0 and not p.error}


def deal(files: Iterable[str], costs: dict[str, float], n: int) -> dict[str, int]:
    """{file: shard 1..n}: longest first to the least loaded shard (the lowest index on a tie)."""
    files = sorted(set(files))
    known = sorted(costs[f] for f in files if f in costs)
    default = known[len(known) // 2] if known else 1.0
    load = [0.0] * n
    out: dict[str, int] = {}
    for f in sorted(files, key=lambda f: (-costs.get(f, default), _hash(f))):
        k = min(range(n), key=lambda j: (load[j], j))
        out[f] = k + 1
        load[k] += costs.get(f, default)
    return out


def cost_source(report_dir: Path, slug: str, compared: RunRecord | None,
                compare_name: str | None) -> tuple[dict[str, float], str]:
    """(durations, where they came from): the --probe-compare baseline, else the default baseline, else the
    last whole report of this model; none: the deal is by hash."""
    from .report.baseline import BaselineError, load_report

    tried: list[tuple[str, Any]] = []
    if compared is not None:
        tried.append((f"baseline {compare_name}", compared))
    for path in (report_dir / "baselines" / slug / "default.json", report_dir / slug / "report.json"):
        if path.is_file():
            try:
                tried.append((str(path), load_report(str(path))))
            except BaselineError:
                continue
    for where, record in tried:
        costs = durations(record)
        if costs:
            return costs, where
    return {}, "none known: a stable hash of each file's path"


def share(session: Any) -> set[str]:
    """This shard's probe files among the run's collected ones; records the deal in the run record."""
    i, n = session.options.shard
    compared = session.gate.before if session.gate else None
    costs, where = cost_source(session.options.report_dir, session.record.model.slug, compared,
                               session.options.compare)
    dealt = deal(session.record.collected_files or [], costs, n)
    mine = sorted(f for f, k in dealt.items() if k == i)
    session.record.shard = {"index": i, "count": n, "files": mine, "costs_from": where,
                            "planned_s": round(sum(costs.get(f, 0.0) for f in mine), 1)}
    return set(mine)


def longest_first(session: Any, items: list) -> None:
    """Under xdist: the claims reordered so that the probe files with the longest recorded durations come
    first (a file's claims stay together, in their order). The scheduler hands out work in collection
    order, so the longest probes start first and the last to start are short ones: the
    longest-processing-time rule, which keeps one slow probe from starting when the other workers are
    nearly done. Every worker computes the same order from the same committed durations."""
    from .collect import ClaimItem

    compared = session.gate.before if session.gate else None
    costs, _ = cost_source(session.options.report_dir, session.record.model.slug, compared,
                           session.options.compare)
    if not costs:
        return
    files = {item.parent.identity for item in items if isinstance(item, ClaimItem)}
    known = sorted(costs[f] for f in files if f in costs)
    default = known[len(known) // 2] if known else 1.0
    rank = {f: i for i, f in enumerate(sorted(files, key=lambda f: (-costs.get(f, default), _hash(f))))}
    items.sort(key=lambda item: rank[item.parent.identity] if isinstance(item, ClaimItem) else -1)


# ---- merge ---------------------------------------------------------------------------------------------

class MergeError(ValueError):
    """Shard reports that cannot be joined (one line)."""


def _file_of(identity: str) -> str:
    return identity.rsplit("::", 1)[0]


def merge(records: list[RunRecord]) -> tuple[RunRecord, list[str]]:
    """(one report of the shards' runs, the files no reporting shard measured). Shards of one split
    (same n, same model, distinct i) join; a missing shard's files become errored probes."""
    if not records:
        raise MergeError("no shard reports given")
    shards = [r.shard for r in records]
    if any(s is None for s in shards):
        raise MergeError("a report is not a shard's (run with --probe-shard=i/n)")
    counts = {s["count"] for s in shards}  # type: ignore[index]
    if len(counts) != 1:
        raise MergeError(f"the reports come from different splits ({', '.join(map(str, sorted(counts)))} shards)")
    n = counts.pop()
    seen: dict[int, int] = {}
    for k, s in enumerate(shards):
        i = s["index"]  # type: ignore[index]
        if i in seen:
            raise MergeError(f"shard {i}/{n} is given twice (reports {seen[i] + 1} and {k + 1})")
        seen[i] = k
    slugs = {r.model.slug for r in records}
    if len(slugs) != 1:
        raise MergeError(f"the shards measured different models: {', '.join(sorted(slugs))}")
    first = records[0]
    owned = {f: s["index"] for s in shards for f in s["files"]}  # type: ignore[index]
    out = first.model_copy(deep=True, update={"probes": [], "deselected": [], "shard": None,
                                               "interrupted": False, "interrupted_probe": None})
    for r in records:
        mine = set(r.shard["files"])  # type: ignore[index]
        if r.model.model_type and not out.model.model_type:
            out.model, out.preflight, out.tokenization = r.model, r.preflight, r.tokenization
        out.versions.update(r.versions)
        out.started = min(out.started or r.started, r.started or out.started)
        out.finished = max(out.finished, r.finished)
        out.interrupted = out.interrupted or r.interrupted
        out.interrupted_probe = out.interrupted_probe or r.interrupted_probe
        out.preflight = out.preflight + [p for p in r.preflight if p not in out.preflight]
        out.collected_files = sorted(set(out.collected_files or []) | set(r.collected_files or []))
        # a shard's own claims that -k / -m deselected; the others' claims it left alone are theirs
        out.deselected = sorted(set(out.deselected) | {d for d in r.deselected if _file_of(d) in mine})
        for p in r.probes:
            if p.file in mine or not p.collected:  # files that fail to collect fail in every shard
                out.probes = [q for q in out.probes if q.file != p.file] + [p]
    measured = {p.file for p in out.probes}
    absent = sorted(set(range(1, n + 1)) - set(seen))
    # a file no reporting shard owns belonged to a shard that never reported
    lost = sorted(f for f in out.collected_files or [] if f not in measured and f not in owned)
    for f in lost:
        out.probes.append(ProbeRecord(name=Path(f).name.removesuffix(".probe.yaml"), kind="", file=f,
                                      error=f"not measured: shard {'/'.join(str(i) for i in absent) or '?'} of "
                                            f"{n} never reported"))
    out.probes.sort(key=lambda p: p.file)
    return out, lost


def gate_failures(record: RunRecord, allow_inconclusive: bool) -> list[str]:
    """Why a single run of these results would exit 1 (empty: it would pass)."""
    why = [f"{p.file}: {p.error}" for p in record.probes if p.error]
    for p, c in record.claims():
        if c.verdict == "fail" or (c.verdict == "inconclusive" and not allow_inconclusive):
            why.append(f"{p.file}::{c.name}: {c.verdict}")
    if record.interrupted:
        why.append("a shard was interrupted")
    why += [f"preflight {p.name}: {p.detail}" for p in record.preflight if not p.passed]
    return why


def cli_merge(argv: list[str]) -> int:
    """`modelprobe merge A.json B.json ... -o report.json`: 0 the joined run passes, 1 it fails, 2 bad input."""
    from .report.baseline import BaselineError, compare, format_comparison, load_report
    from .report.errors import ReportError
    from .report.html import render_html
    from .report.writers import json_text, render_markdown, report_lock, write_text

    parser = argparse.ArgumentParser(prog="modelprobe merge", description="join --probe-shard reports into one")
    parser.add_argument("reports", nargs="+", help="the shards' report.json files")
    parser.add_argument("-o", "--output", required=True, help="the joined report.json (report.md/.html beside it)")
    parser.add_argument("--compare", default=None, help="a baseline report.json to gate the joined run against")
    parser.add_argument("--allow-inconclusive", action="store_true", help="inconclusive claims do not fail")
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2
    output = Path(args.output)
    try:
        if output.suffix != ".json":
            raise MergeError(f"-o {output}: the joined report is a .json file")
        merged, lost = merge([load_report(p) for p in args.reports])
        comparison = compare(load_report(args.compare), merged) if args.compare else None
        texts = {output.name: json_text(merged), f"{output.stem}.md": render_markdown(merged, comparison),
                 f"{output.stem}.html": render_html(merged, comparison)}
        with report_lock(output.parent):
            paths = [write_text(output.parent, name, text) for name, text in texts.items()]
    except (BaselineError, MergeError, ReportError) as e:
        print(f"modelprobe merge: error: {e}", file=sys.stderr)
        return 2
    why = gate_failures(merged, args.allow_inconclusive)
    if comparison is not None:
        print(format_comparison(comparison))
        why += [] if comparison.ok else ["the comparison with the baseline fails"]
    for f in lost:
        print(f"MISSING {f}: its shard never reported")
    for line in why:
        print(f"FAILED {line}")
    for p in paths:
        print(f"report: {p}")
    return 1 if why else 0
