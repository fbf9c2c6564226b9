#!/usr/bin/env python3
"""The shipped probe library (or given probes), per probe: wall time, forward passes, layer-token work,
generated tokens, peak memory and verdicts; with `--against REF`, the same for a git ref, back to back,
as one before/after table.

Counts are the machine-independent evidence (wall times on a loaded machine are noise):
- forwards: calls of the last decoder layer (every forward, resumed or not, and every generation step
  passes it once);
- layer_tokens: sum over decoder-layer calls of rows x positions (the work a forward does; a forward
  resumed at layer t counts only layers t..L-1);
- generated: tokens returned by `Subject.generate` and the shared-prefix generator;
- peak_mb: the process's peak resident memory when the probe ended (cumulative, CPU) or the CUDA peak
  allocated during the probe.
The counters are hooks this script installs on the loaded model (not the library's own code), so a ref
that predates them is counted the same way. Each code version runs in one pytest session (as a user
runs the library: probes share the model and any cache), in a child process with PYTHONPATH set to that
version's tree; a ref is checked out with `git worktree add` to a temporary folder and removed after.

Usage:
    python benchmarks/bench_library.py [PROBE ...] [--model smollm2-135m-instruct] [--against REF]
        [--threads 1] [--json out.json] [--before saved.json [--after saved.json] | --only REF]
        [-- extra pytest args]
Default probes: the wave-1 library (ioi_circuit, logit_lens_capitals, refusal_direction,
sentiment_direction). `--before saved.json` reuses a saved run as the "before" column.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WAVE1 = ["probes/ioi_circuit.probe.yaml", "probes/logit_lens_capitals.probe.yaml",
         "probes/refusal_direction.probe.yaml", "probes/sentiment_direction.probe.yaml"]
COUNTS = ("forwards", "layer_tokens", "generated")


# ---- child: one pytest session with counters ------------------------------------------------------

class _Counter:
    """Per-probe counters fed by hooks on the model and by wrapping the generators."""

    def __init__(self) -> None:
        self.current = "<session>"
        self.per: dict[str, dict[str, float]] = {}
        self.cuda = False

    def bump(self, key: str, n: int) -> None:
        d = self.per.setdefault(self.current, {k: 0 for k in COUNTS})
        d[key] = d.get(key, 0) + n


def _decoder_layers(model):
    """The decoder's layer list: the longest ModuleList in the model."""
    import torch

    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    return max(lists, key=len)


def _instrument(counter: _Counter) -> None:
    import modelprobe.subject as subject_pkg
    from modelprobe.subject import subject as subject_mod

    load = subject_pkg.load_subject

    def counted_load(*args, **kwargs):
        subj = load(*args, **kwargs)
        layers = _decoder_layers(subj.model)

        def pre(mod, args, kwargs, last=False):
            x = args[0] if args else kwargs.get("hidden_states")
            counter.bump("layer_tokens", int(x.shape[0]) * int(x.shape[1]))
            if last:
                counter.bump("forwards", 1)
        final = len(layers) - 1
        for i, layer in enumerate(layers):
            layer.register_forward_pre_hook(lambda m, a, k, last=(i == final): pre(m, a, k, last),
                                            with_kwargs=True)
        counter.cuda = subj.device.type == "cuda"
        return subj

    subject_pkg.load_subject = counted_load
    gen = subject_mod.Subject.generate

    def counted_generate(self, *args, **kwargs):
        out = gen(self, *args, **kwargs)
        counter.bump("generated", sum(len(x) for x in out))
        return out
    subject_mod.Subject.generate = counted_generate
    import importlib

    # The shared-prefix generator lives in subject/resumable.py (subject/prefix.py in older trees, a module
    # that now holds something else): counted where it is found, in the module the face reads it from.
    for name in ("resumable", "prefix"):
        try:
            home = importlib.import_module(f"modelprobe.subject.{name}")
        except ImportError:
            continue
        shared = getattr(home, "generate_shared", None)
        if shared is None:
            continue

        def counted_shared(*args, shared=shared, **kwargs):
            out = shared(*args, **kwargs)
            counter.bump("generated", sum(len(x) for x in out))
            return out
        home.generate_shared = counted_shared
        return


class _Plugin:
    def __init__(self, counter: _Counter) -> None:
        self.c = counter
        self.wall: dict[str, float] = {}
        self.peak: dict[str, float] = {}

    def _probe(self, item) -> str:
        return Path(str(item.fspath)).name.replace(".probe.yaml", "")

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(self, item, nextitem):  # noqa: ARG002
        import torch

        self.c.current = self._probe(item)
        if self.c.cuda:
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        yield
        self.wall[self.c.current] = self.wall.get(self.c.current, 0.0) + time.perf_counter() - start
        if self.c.cuda:
            mb = torch.cuda.max_memory_allocated() / 2 ** 20
        else:
            mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        self.peak[self.c.current] = max(self.peak.get(self.c.current, 0.0), mb)


def child(args: argparse.Namespace, extra: list[str]) -> None:
    counter = _Counter()
    _instrument(counter)
    plugin = _Plugin(counter)
    report_dir = tempfile.mkdtemp(prefix="bench_library_")
    argv = [*args.probes, "-p", "no:xdist", "-p", "no:cacheprovider", "-q", f"--model={args.model}",
            f"--probe-threads={args.threads}", f"--probe-report-dir={report_dir}", *extra]
    start = time.perf_counter()
    rc = pytest.main(argv, plugins=[plugin])
    total = time.perf_counter() - start
    verdicts: dict[str, dict[str, str]] = {}
    for path in Path(report_dir).glob("*/report.json"):
        for p in json.loads(path.read_text()).get("probes", []):
            verdicts[p["name"]] = {c["name"]: c["verdict"] for c in p.get("claims", [])}
    probes = {}
    for name in sorted(set(plugin.wall) | set(counter.per)):
        if name == "<session>":
            continue
        probes[name] = {"wall_s": plugin.wall.get(name, 0.0), **counter.per.get(name, {k: 0 for k in COUNTS}),
                        "peak_mb": plugin.peak.get(name), "verdicts": verdicts.get(name, {})}
    out = {"code": os.environ.get("PYTHONPATH", ""), "rc": int(rc), "total_s": total, "probes": probes,
           "session": counter.per.get("<session>", {})}
    Path(args.json).write_text(json.dumps(out, indent=1))


# ---- parent: run code versions, print the table ------------------------------------------------------

def run_version(tree: Path, args: argparse.Namespace, extra: list[str], label: str) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = Path(f.name)
    env = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS=str(args.threads))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--json", str(out), "--model", args.model,
           "--threads", str(args.threads), *args.probes, "--", *extra]
    print(f"bench_library: running {label} ({tree}) ...", file=sys.stderr, flush=True)
    subprocess.run(cmd, cwd=tree, env=env, check=False)
    result = json.loads(out.read_text())
    out.unlink()
    result["label"] = label
    return result


def run_ref(ref: str, args: argparse.Namespace, extra: list[str]) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="bench_ref_")) / "tree"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tmp), ref], check=True,
                   capture_output=True)
    try:
        return run_version(tmp, args, extra, ref)
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tmp)], check=False,
                       capture_output=True)


def _fmt(x: float | None, unit: str = "") -> str:
    if x is None:
        return "-"
    return f"{x:,.1f}{unit}" if isinstance(x, float) and unit else f"{int(x):,}"


def table(runs: list[dict]) -> str:
    names = sorted({n for r in runs for n in r["probes"]})
    lines = []
    for name in names:
        lines.append(f"{name}")
        rows = [(r["label"], r["probes"].get(name)) for r in runs]
        for label, p in rows:
            if p is None:
                lines.append(f"  {label:<12} (not run)")
                continue
            lines.append(f"  {label:<12} wall {p['wall_s']:8.1f}s  forwards {p['forwards']:>9,}  layer_tokens "
                         f"{p['layer_tokens']:>13,}  generated {p['generated']:>9,}  peak {_fmt(p['peak_mb'], ' MB')}")
        if len(rows) == 2 and all(p for _, p in rows):
            (_, a), (_, b) = rows
            ratio = {k: (b[k] / a[k] if a[k] else float("nan")) for k in ("wall_s", *COUNTS)}
            lines.append("  after/before " + "  ".join(f"{k} {v:.3f}" for k, v in ratio.items()))
            changed = {c: (a["verdicts"].get(c), v) for c, v in b["verdicts"].items() if a["verdicts"].get(c) != v}
            lines.append("  verdicts " + (f"CHANGED {changed}" if changed else f"unchanged {b['verdicts']}"))
        else:
            lines.append(f"  verdicts {rows[-1][1]['verdicts'] if rows[-1][1] else '-'}")
    if len(runs) == 2:
        tot = [{k: sum(p[k] for p in r["probes"].values()) for k in ("wall_s", *COUNTS)} for r in runs]
        lines.append("total  " + "  ".join(f"{k} {tot[0][k]:,.0f} -> {tot[1][k]:,.0f} "
                                          f"({tot[1][k] / tot[0][k] if tot[0][k] else float('nan'):.3f})"
                                          for k in tot[0]))
    return "\n".join(lines)


def main() -> None:
    argv = sys.argv[1:]
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("probes", nargs="*", default=None)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--against", default=None, help="git ref to run first (the 'before' column)")
    ap.add_argument("--only", default=None, help="run only this git ref (save it with --json for --before)")
    ap.add_argument("--before", default=None, help="a saved --json of an earlier run, used as 'before'")
    ap.add_argument("--after", default=None, help="with --before: a saved --json as 'after' (print, run nothing)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None, help="write the runs here")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.probes = args.probes or WAVE1
    if args.child:
        child(args, extra)
        return
    runs = []
    if args.only:
        runs.append(run_ref(args.only, args, extra))
    elif args.before:
        runs.append(json.loads(Path(args.before).read_text())["runs"][-1])
    elif args.against:
        runs.append(run_ref(args.against, args, extra))
    if args.after:
        runs.append(json.loads(Path(args.after).read_text())["runs"][-1])
    elif not args.only:
        runs.append(run_version(ROOT, args, extra, "this tree"))
    print(table(runs))
    if args.json:
        Path(args.json).write_text(json.dumps({"probes": args.probes, "model": args.model, "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
