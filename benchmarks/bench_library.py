#!/usr/bin/env python3
"""The shipped probe library (or given probes), per probe: wall time, forward passes, layer-token work,
generated tokens, peak memory, verdicts and the float32 floor of that work; with `--against REF`, the
same for a git ref, back to back, as one before/after table for the whole library.

Counts are the machine-independent evidence (wall times on a loaded machine are noise):
- forwards: calls of the last decoder layer (every forward, resumed or not, and every generation step
  passes it once);
- layer_tokens: sum over decoder-layer calls of rows x positions (the work a forward does; a forward
  resumed at layer t counts only layers t..L-1), split into `prefill` (calls over several positions) and
  `step` (calls over one position: generation steps and last-token resumes);
- generated: tokens returned by `Subject.generate` and the shared-prefix generator;
- floor_s: what plain transformers takes for the same layer-tokens, at rates measured in the same process
  after the run (one batched forward of 16 x 64 tokens for prefill, one cached 32-row decode step for
  step): prefill x its rate + step x its rate. wall / floor is how close the probe runs to the float32
  floor of the work its protocol requires;
- peak_mb: the process's peak resident memory when the probe ended (cumulative, CPU) or the CUDA peak
  allocated during the probe.
The counters are hooks this script installs on the loaded model (not the library's own code), so a ref
that predates them is counted the same way. As the README's command does, the probes are spread over
`--jobs` processes of `--threads` threads each (default 2 x 1, the README's command on 2 cores): job k runs
`--probe-shard=k/jobs` (the library's cost-balanced deal, by the durations of this tree's committed
baseline), in one pytest session (probes share the model and any cache), with PYTHONPATH set to that
version's tree; a ref is checked out with `git worktree add` to a temporary folder and removed after. The
library's wall is the slowest job's; the shards' reports are joined with `modelprobe merge` and every
claim's verdict, effect and interval is held against the committed baseline and between the two columns.

Usage:
    python benchmarks/bench_library.py [PROBE ...] [--model smollm2-135m-instruct] [--against REF]
        [--jobs 2] [--threads 1] [--json out.json] [--before saved.json [--after saved.json] | --only REF]
        [-- extra pytest args]
Default probes: the whole shipped library (probes/*.probe.yaml). `--before saved.json` reuses a saved run
as the "before" column.
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
LIBRARY = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "probes").glob("*.probe.yaml"))
COUNTS = ("forwards", "layer_tokens", "prefill", "step", "generated")


# ---- child: one pytest session with counters ------------------------------------------------------

class _Counter:
    """Per-probe counters fed by hooks on the model and by wrapping the generators."""

    def __init__(self) -> None:
        self.current = "<session>"
        self.per: dict[str, dict[str, float]] = {}
        self.cuda = False
        self.model = None  # the last loaded model, for the floor rates after the run

    def bump(self, key: str, n: int) -> None:
        d = self.per.setdefault(self.current, {k: 0 for k in COUNTS})
        d[key] = d.get(key, 0) + n


def _decoder_layers(model):
    """The decoder's layer list: the longest ModuleList in the model."""
    import torch

    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    return max(lists, key=len)


def _wrap_generator(owner, name: str, counter: _Counter) -> None:
    fn = getattr(owner, name, None)
    if fn is None:
        return

    def counted(*args, **kwargs):
        out = fn(*args, **kwargs)
        counter.bump("generated", sum(len(x) for x in out))
        return out
    setattr(owner, name, counted)


def _instrument(counter: _Counter) -> None:
    import importlib

    import modelprobe.subject as subject_pkg
    from modelprobe.subject import subject as subject_mod

    load = subject_pkg.load_subject

    def counted_load(*args, **kwargs):
        subj = load(*args, **kwargs)
        layers = _decoder_layers(subj.model)

        def pre(mod, args, kwargs, last=False):
            x = args[0] if args else kwargs.get("hidden_states")
            n = int(x.shape[0]) * int(x.shape[1])
            counter.bump("layer_tokens", n)
            counter.bump("step" if int(x.shape[1]) == 1 else "prefill", n)
            if last:
                counter.bump("forwards", 1)
        final = len(layers) - 1
        for i, layer in enumerate(layers):
            layer.register_forward_pre_hook(lambda m, a, k, last=(i == final): pre(m, a, k, last),
                                            with_kwargs=True)
        counter.cuda = subj.device.type == "cuda"
        counter.model = subj.model
        return subj

    subject_pkg.load_subject = counted_load
    _wrap_generator(subject_mod.Subject, "generate", counter)
    # The shared-prefix generator: subject/resumable.py now, subject/prefix.py in older trees; callers
    # import it through the subject face at call time, so the face's name is the one to wrap.
    for where in ("modelprobe.subject.resumable", "modelprobe.subject.prefix"):
        try:
            module = importlib.import_module(where)
        except ImportError:
            continue
        if hasattr(module, "generate_shared"):
            _wrap_generator(module, "generate_shared", counter)
            subject_pkg.generate_shared = module.generate_shared
            break


def floor_rates(model, threads: int) -> dict[str, float]:
    """Seconds per layer-token of plain transformers on this model, this process, this thread count:
    a batched forward (16 x 64 tokens, logits_to_keep=1) and a cached decode step of 32 rows."""
    import torch
    from transformers import DynamicCache

    torch.set_num_threads(threads)
    n_layers = len(_decoder_layers(model))
    dev = next(model.parameters()).device
    vocab = int(model.config.vocab_size)
    g = torch.Generator().manual_seed(0)

    def ids(b: int, t: int) -> torch.Tensor:
        return torch.randint(100, min(vocab, 20_000), (b, t), generator=g).to(dev)

    def timed(fn, reps: int) -> float:
        fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        best = float("inf")
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - start)
        return best

    with torch.inference_mode():
        x = ids(16, 64)
        prefill = timed(lambda: model(input_ids=x, use_cache=False, logits_to_keep=1), 3) / (16 * 64 * n_layers)
        prompt, steps = ids(32, 64), 16

        def decode() -> None:
            cache = DynamicCache()
            out = model(input_ids=prompt, past_key_values=cache, use_cache=True, logits_to_keep=1)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            start = time.perf_counter()
            for _ in range(steps):
                out = model(input_ids=nxt, past_key_values=cache, use_cache=True, logits_to_keep=1)
                nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            decode.took = time.perf_counter() - start  # type: ignore[attr-defined]

        best = float("inf")
        for _ in range(3):
            decode()
            best = min(best, decode.took)  # type: ignore[attr-defined]
        step = best / (32 * steps * n_layers)
    return {"prefill_s_per_layer_token": prefill, "step_s_per_layer_token": step}


def floor_s(counts: dict, rates: dict[str, float] | None) -> float | None:
    if not rates:
        return None
    return counts.get("prefill", 0) * rates["prefill_s_per_layer_token"] + \
        counts.get("step", 0) * rates["step_s_per_layer_token"]


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


def _baseline(model: str) -> Path | None:
    found = sorted((ROOT / "reports" / "baselines").glob(f"{model}/default.json"))
    return found[0] if found else None


def child(args: argparse.Namespace, extra: list[str]) -> None:
    counter = _Counter()
    _instrument(counter)
    plugin = _Plugin(counter)
    report_dir = Path(args.report_dir)
    argv = [*args.probes, "-p", "no:xdist", "-p", "no:cacheprovider", "-q", f"--model={args.model}",
            f"--probe-threads={args.threads}", f"--probe-report-dir={report_dir}", *extra]
    if args.shard:
        argv.append(f"--probe-shard={args.shard}")
    start = time.perf_counter()
    rc = pytest.main(argv, plugins=[plugin])
    total = time.perf_counter() - start
    verdicts: dict[str, dict[str, str]] = {}
    reports = [str(p) for p in report_dir.glob("*/report.json")]
    for path in reports:
        for p in json.loads(Path(path).read_text()).get("probes", []):
            verdicts[p["name"]] = {c["name"]: c["verdict"] for c in p.get("claims", [])}
    counter.current = "<floor>"  # the rate measurement's own forwards are nobody's work
    rates = floor_rates(counter.model, args.threads) if counter.model is not None else None
    probes = {}
    for name in sorted(set(plugin.wall) | set(counter.per)):
        if name in ("<session>", "<floor>"):
            continue
        counts = {k: 0 for k in COUNTS} | counter.per.get(name, {})
        probes[name] = {"wall_s": plugin.wall.get(name, 0.0), **counts, "floor_s": floor_s(counts, rates),
                        "peak_mb": plugin.peak.get(name), "verdicts": verdicts.get(name, {})}
    out = {"code": os.environ.get("PYTHONPATH", ""), "rc": int(rc), "total_s": total, "probes": probes,
           "session": counter.per.get("<session>", {}), "rates": rates, "reports": reports}
    Path(args.json).write_text(json.dumps(out, indent=1))


# ---- parent: run code versions, print the table ------------------------------------------------------

def run_version(tree: Path, args: argparse.Namespace, extra: list[str], label: str) -> dict:
    """The probes over `args.jobs` child processes at once (job k: shard k of jobs); one joined result."""
    work = Path(tempfile.mkdtemp(prefix="bench_library_"))
    baseline = _baseline(args.model)
    jobs = []
    print(f"bench_library: running {label} ({tree}) as {args.jobs} job(s) x {args.threads} thread(s) ...",
          file=sys.stderr, flush=True)
    start = time.perf_counter()
    for k in range(1, args.jobs + 1):
        report_dir = work / f"job{k}"
        if baseline is not None:  # the shard deal reads durations from the report folder's baseline
            (report_dir / "baselines" / args.model).mkdir(parents=True)
            (report_dir / "baselines" / args.model / "default.json").write_bytes(baseline.read_bytes())
        out = work / f"job{k}.json"
        env = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS=str(args.threads))
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--json", str(out), "--model", args.model,
               "--threads", str(args.threads), "--report-dir", str(report_dir),
               *(["--shard", f"{k}/{args.jobs}"] if args.jobs > 1 else []), *args.probes, "--", *extra]
        jobs.append((out, subprocess.Popen(cmd, cwd=tree, env=env)))
    for _, proc in jobs:
        proc.wait()
    wall = time.perf_counter() - start
    parts = [json.loads(out.read_text()) for out, _ in jobs]
    result = {"label": label, "code": str(tree), "rc": max(p["rc"] for p in parts), "library_wall_s": wall,
              "jobs": args.jobs, "threads": args.threads, "total_s": max(p["total_s"] for p in parts),
              "probes": {n: v for p in parts for n, v in p["probes"].items()},
              "rates": [p["rates"] for p in parts], "reports": [r for p in parts for r in p["reports"]]}
    result["claims"] = joined_claims(result["reports"], work / "merged" / "report.json")
    return result


def joined_claims(reports: list[str], output: Path) -> dict[str, dict]:
    """`modelprobe merge` of the jobs' reports; {probe/claim: verdict, effect, ci} of the joined report."""
    if not reports:
        return {}
    output.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "modelprobe.cli", "merge", *reports, "-o", str(output)], check=False,
                   capture_output=True, cwd=ROOT)
    path = output if output.exists() else Path(reports[0])
    return claims_of(json.loads(path.read_text()))


def claims_of(report: dict) -> dict[str, dict]:
    return {f"{p['name']}/{c['name']}": {"verdict": c.get("verdict"), "effect": c.get("effect"), "ci": c.get("ci")}
            for p in report.get("probes", []) for c in p.get("claims", [])}


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


def _row(label: str, p: dict) -> str:
    floor = p.get("floor_s")
    ratio = f"{p['wall_s'] / floor:5.2f}x" if floor else "   - "
    return (f"  {label:<12} wall {p['wall_s']:8.1f}s  floor {_fmt(floor, 's'):>8}  wall/floor {ratio}  forwards "
            f"{p['forwards']:>8,}  layer_tokens {p['layer_tokens']:>12,} (step {p.get('step', 0):>11,})  "
            f"generated {p['generated']:>8,}  peak {_fmt(p['peak_mb'], ' MB')}")


def differences(a: dict[str, dict], b: dict[str, dict]) -> list[str]:
    """Claims whose verdict, effect or interval differ between two {probe/claim: ...} maps."""
    out = []
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if x != y:
            out.append(f"{key}: {x} -> {y}")
    return out


def table(runs: list[dict]) -> str:
    names = sorted({n for r in runs for n in r["probes"]})
    lines = []
    for name in names:
        lines.append(f"{name}")
        rows = [(r["label"], r["probes"].get(name)) for r in runs]
        for label, p in rows:
            lines.append(_row(label, p) if p is not None else f"  {label:<12} (not run)")
        if len(rows) == 2 and all(p for _, p in rows):
            (_, a), (_, b) = rows
            ratio = {k: (b[k] / a[k] if a.get(k) else float("nan")) for k in ("wall_s", *COUNTS)}
            lines.append("  after/before " + "  ".join(f"{k} {v:.3f}" for k, v in ratio.items()))
            changed = {c: (a["verdicts"].get(c), v) for c, v in b["verdicts"].items() if a["verdicts"].get(c) != v}
            lines.append("  verdicts " + (f"CHANGED {changed}" if changed else f"unchanged {b['verdicts']}"))
        else:
            lines.append(f"  verdicts {rows[-1][1]['verdicts'] if rows[-1][1] else '-'}")
    lines.append("")
    for r in runs:
        tot = {k: sum(p.get(k) or 0 for p in r["probes"].values()) for k in ("wall_s", "floor_s", *COUNTS)}
        wall = r.get("library_wall_s", r.get("total_s", 0.0))
        floor_wall = tot["floor_s"] / r.get("jobs", 1) if tot["floor_s"] else None
        lines.append(f"library {r['label']:<12} wall {wall:7.1f}s ({wall / 60:.1f} min, {r.get('jobs', 1)} job(s) x "
                     f"{r.get('threads', 1)} thread(s))  probe time {tot['wall_s']:7.1f}s  floor "
                     f"{_fmt(tot['floor_s'] or None, 's')} (over the jobs: {_fmt(floor_wall, 's')})  probe time / floor "
                     + (f"{tot['wall_s'] / tot['floor_s']:.2f}x" if tot["floor_s"] else "-")
                     + f"  forwards {tot['forwards']:,}  layer_tokens {tot['layer_tokens']:,}  generated "
                       f"{tot['generated']:,}")
    if len(runs) == 2:
        a, b = runs
        tot = [{k: sum(p.get(k) or 0 for p in r["probes"].values()) for k in ("wall_s", *COUNTS)} for r in runs]
        ratios = "  ".join(f"{k} {tot[1][k] / tot[0][k] if tot[0][k] else float('nan'):.3f}" for k in tot[0])
        if a.get("library_wall_s"):  # a run saved by an older script has no library wall
            ratios += f"  library wall {b.get('library_wall_s', 0) / a['library_wall_s']:.3f}"
        lines.append("after/before  " + ratios)
    baseline = _baseline(runs[-1].get("model", "smollm2-135m-instruct")) if runs else None
    committed = claims_of(json.loads(baseline.read_text())) if baseline else {}
    for r in runs:
        if committed and r.get("claims"):
            diff = [d for d in differences(committed, r["claims"]) if d.split(":")[0].split("/")[0] in r["probes"]]
            lines.append(f"{r['label']} vs the committed baseline ({len(r['claims'])} claims): "
                         + ("verdict, effect and interval equal" if not diff else "DIFFERENT\n    " + "\n    ".join(diff)))
    if len(runs) == 2 and runs[0].get("claims") and runs[1].get("claims"):
        diff = differences(runs[0]["claims"], runs[1]["claims"])
        lines.append("after vs before: " + ("every claim's verdict, effect and interval equal" if not diff
                                            else "DIFFERENT\n    " + "\n    ".join(diff)))
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
    ap.add_argument("--jobs", type=int, default=2, help="processes the probes are dealt over (default 2)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    ap.add_argument("--json", default=None, help="write the runs here")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--shard", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--report-dir", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.jobs < 1 or args.threads < 1:
        ap.error("--jobs and --threads must be at least 1")
    args.probes = args.probes or LIBRARY
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
    for r in runs:
        r.setdefault("model", args.model)
    print(table(runs))
    if args.json:
        Path(args.json).write_text(json.dumps({"probes": args.probes, "model": args.model, "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
