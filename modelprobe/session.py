"""One pytest run: the options, the model (loaded once, lazily), the run record and the baseline."""

from __future__ import annotations

import datetime as dt
import os
import platform
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ModelLoadError
from .options import parse_tolerance, read_options
from .report.record import ModelInfo, PreflightResult, ProbeRecord, RunRecord


@dataclass
class Options:
    model: str
    device: str
    dtype: str
    report_dir: Path
    data_root: Path | None
    trust_remote_code: bool
    allow_inconclusive: bool
    batch_size: int | str  # rows per forward, or 'auto'
    threads: int
    save: str | None
    compare: str | None
    tolerance: str | None
    strict: bool
    allow_model_change: bool
    shard: tuple[int, int] | None = None  # (i, n) of --probe-shard
    revision: str | None = None
    allow_pickle: bool = False
    allow_dtype_change: bool = False

    @classmethod
    def from_config(cls, config: Any) -> Options:
        """The checked options (raises OptionError naming the option)."""
        v = read_options(lambda name: config.getoption(name, default=None), config.getini)
        return cls(
            model=v["probe_model"], device=v["probe_device"], dtype=v["probe_dtype"],
            report_dir=Path(v["probe_report_dir"]),
            data_root=Path(v["probe_data_root"]) if v["probe_data_root"] else None,
            trust_remote_code=v["trust_remote_code"],
            allow_inconclusive=v["probe_allow_inconclusive"], batch_size=v["probe_batch_size"],
            threads=v["probe_threads"], save=v["probe_save"], compare=v["probe_compare"],
            tolerance=v["probe_tolerance"], strict=v["probe_strict"],
            allow_model_change=v["probe_allow_model_change"], shard=v["probe_shard"], revision=v["probe_revision"],
            allow_pickle=v["probe_allow_pickle"], allow_dtype_change=v["probe_allow_dtype_change"],
        )


def _git_commit(path: Path) -> str:
    try:
        out = subprocess.run(["git", "-C", str(path), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5)
        if out.returncode != 0:
            return ""
        dirty = subprocess.run(["git", "-C", str(path), "status", "--porcelain", "--", "."],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return ""


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")  # --by-date must order runs less than a second apart


class ProbeSession:
    def __init__(self, options: Options, rootdir: Path, progress: bool = True, worker: bool = False):
        self.options = options
        self.worker = worker
        self.rootdir = rootdir
        self.progress = progress
        self._subject: Any = None
        self.load_error: str | None = None
        self.preflight_failed: str | None = None
        # The slug names the report folder before the model is loaded (collection errors, interrupts); resolve
        # decides it, as it does for the loaded model, the baselines and the GGUF cache.
        from .subject import unfetched  # path work only: no torch, no download
        self.resolved, self.resolve_error = unfetched(options.model, options.revision)
        self.record = RunRecord(model=ModelInfo(id=options.model, slug=self.resolved.slug,
                                                revision=self.resolved.revision),
                                started=_now(), seed=0, probes_commit=_git_commit(rootdir))
        self.record.versions = {"python": platform.python_version()}
        self.saw_probe_files = False
        self.current_probe: str | None = None  # identity of the probe being measured (for interrupts)
        self.gate: BaselineGate | None = BaselineGate(self) if options.compare else None
        self.comparison: Any = None
        self.report_paths: list[Path] = []
        self.report_error: str | None = None
        self.baseline_error: str | None = None  # --probe-save failed (the reports themselves were written)
        self.report_interrupted: str | None = None  # a signal stopped the report writing (report.json is whole)

    @property
    def loaded(self) -> bool:
        return self._subject is not None

    def subject(self) -> Any:
        """The model, loaded on first use; a load failure is remembered and re-raised as one line."""
        if self._subject is not None:
            return self._subject
        if self.load_error is not None:
            raise ModelLoadError(self.load_error)
        import torch

        from . import __version__
        from .subject import load_subject, run_preflight

        # Oversubscribed threads were measured 4x slower: one thread per xdist worker.
        threads = self.options.threads or (1 if self.worker else 0)
        if threads:
            torch.set_num_threads(threads)
        from .subject import worker_device
        device = worker_device(self.options.device, os.environ.get("PYTEST_XDIST_WORKER"))
        try:
            subject = load_subject(self.options.model, device, self.options.dtype,
                                   self.options.trust_remote_code, self.options.batch_size, self.progress,
                                   revision=self.options.revision, allow_pickle=self.options.allow_pickle)
        except ModelLoadError as e:
            self.load_error = str(e)
            raise
        self._subject = subject
        self.record.model = subject.info
        self.record.versions.update(subject.cache.get("versions", {}))
        self.record.versions.update({"modelprobe": __version__})
        self.record.preflight = run_preflight(subject)
        self.record.tokenization = tokenization_record(subject)
        self.record.tokenization["site_map"] = subject.sitemap.features()
        if self.gate:
            self.gate.check_model()
        failed = [p for p in self.record.preflight if not p.passed]
        if failed:
            self.preflight_failed = "; ".join(f"{p.name}: {p.detail}" for p in failed)
        return subject

    def gate_message(self, probe_file: str, claim: Any) -> str | None:
        return self.gate.message(probe_file, claim) if self.gate else None

    def after_probe(self, probe_name: str) -> PreflightResult | None:
        """No hook of ours may survive a probe; None when no model was loaded."""
        if self._subject is None:
            return None
        from .subject import check_no_hooks_left
        result = check_no_hooks_left(self._subject, after=f"probe {probe_name}")
        if not result.passed:
            self.record.preflight.append(result)
        return result

    def add_probe(self, probe: ProbeRecord) -> None:
        self.record.probes = [p for p in self.record.probes if p.file != probe.file] + [probe]

    def in_scope(self, files: list[str], deselected: list[str] = ()) -> None:
        """Record the run's selection: probe files collected (or not collectable), claims deselected."""
        self.record.collected_files = sorted(set(self.record.collected_files or []) | set(files))
        self.record.deselected = sorted(set(self.record.deselected) | set(deselected))

    def finish(self, interrupted: bool) -> None:
        self.record.finished = _now()
        self.record.interrupted = interrupted
        if interrupted and self.current_probe:
            self.record.interrupted_probe = self.current_probe
        if self.gate:
            self.comparison = self.gate.comparison(self.record)

    @property
    def gate_failed(self) -> bool:
        """A usable baseline was not matched: an error, a regression, or a baseline claim not measured."""
        return bool(self.gate and (self.gate.error or (self.comparison is not None and not self.comparison.ok)))

    def write_reports(self) -> None:
        """report.{json,md,html} (+ baseline); a write failure is kept as one line, never a crash."""
        from .report.baseline import save_baseline
        from .report.errors import BaselineError, ReportError, ReportInterrupted
        from .report.writers import write_all

        directory = self.options.report_dir / self.record.model.slug
        trends = None
        if self.comparison is not None:
            from .report.history import report_trends
            trends = report_trends(self.options.report_dir, self.record)
        try:
            self.report_paths = list(write_all(self.record, directory, comparison=self.comparison,
                                                   trends=trends))
        except ReportInterrupted as e:  # the user or CI wants out: no baseline from a cut-off write
            self.report_paths, self.report_interrupted = e.paths, str(e)
            self.record.interrupted = True
            return
        except ReportError as e:
            self.report_error = str(e)
            return
        if self.options.save:
            try:
                self.report_paths.append(save_baseline(self.record, self.options.report_dir, self.options.save))
            except BaselineError as e:
                self.baseline_error = str(e)


def tokenization_record(subject: Any) -> dict[str, Any]:
    """The exact chat template and one example's token ids, so a reader can audit BOS and template."""
    tok = subject.tokenizer
    example = "Give me a short example."
    out: dict[str, Any] = {
        "bos_token": tok.bos_token, "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
        "pad_token_id": subject.pad_id, "padding_side": "left", "tokenizer_adds_bos": subject.adds_bos,
        "plain_example": {"text": example, "ids": subject.encode(example)},
        "chat_template": getattr(tok, "chat_template", None),
    }
    if subject.has_chat_template():
        out["chat_example"] = {"text": subject.render(example, True), "ids": subject.encode(example, True)}
    return out


class BaselineGate:
    """--probe-compare: each claim is held against the same claim of a stored run as it finishes."""

    def __init__(self, session: ProbeSession):
        self.session = session
        self.before: RunRecord | None = None
        self.error: str | None = None
        opts = session.options
        self.tol_abs, self.tol_rel = parse_tolerance(opts.tolerance) if opts.tolerance else (None, None)
        from .report.baseline import BaselineError, load_report
        try:
            self.before = load_report(opts.compare, opts.report_dir, session.record.model.slug)
        except BaselineError as e:
            self.error = str(e)

    def check_model(self) -> None:
        from .report.baseline import BaselineError, compare
        if self.before is None or self.error:
            return
        empty = RunRecord(model=self.session.record.model)
        try:
            compare(self.before, empty, allow_model_change=self.session.options.allow_model_change,
                    allow_dtype_change=self.session.options.allow_dtype_change)
        except BaselineError as e:
            self.error = str(e)

    def comparison(self, after: RunRecord) -> Any:
        """The whole-run diff for the reports; without a usable baseline, a diff that says why (report.md and
        report.html show it as the terminal does)."""
        from .report.baseline import BaselineError, Comparison, compare, numerics
        opts = self.session.options
        if self.before is not None and not self.error:
            try:
                return compare(self.before, after, self.tol_abs, self.tol_rel, strict=opts.strict,
                               allow_model_change=opts.allow_model_change,
                               allow_dtype_change=opts.allow_dtype_change)
            except BaselineError as e:
                self.error = str(e)
        known = self.before is not None and bool(after.model.model_type)  # numerics known on both sides
        return Comparison(ok=False, error=self.error or "no baseline",
                          before_numerics=numerics(self.before.model) if known else "",
                          after_numerics=numerics(after.model) if known else "")

    def message(self, probe_file: str, claim: Any) -> str | None:
        from .report.baseline import compare
        if self.error:
            return f"baseline comparison impossible: {self.error}"
        if self.before is None:
            return None
        before_probe = next((p for p in self.before.probes if p.file == probe_file), None)
        before_claim = next((c for c in before_probe.claims if c.name == claim.name), None) if before_probe else None
        if before_claim is None:
            return ("claim is new since the baseline (fails under --probe-strict)"
                    if self.session.options.strict else None)
        b = self.before.model_copy(update={"probes": [before_probe.model_copy(update={"claims": [before_claim]})]})
        after = RunRecord(model=self.session.record.model, seed=b.seed,
                          probes=[before_probe.model_copy(update={"claims": [claim]})])
        result = compare(b, after, self.tol_abs, self.tol_rel, strict=self.session.options.strict,
                         allow_model_change=True, allow_dtype_change=True)
        failing = [r for r in result.rows if r.failing]
        return f"regression against baseline: {failing[0].message}" if failing else None
