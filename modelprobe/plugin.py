"""pytest hooks only (the pytest11 entry point). Never imports torch at import time."""

from __future__ import annotations

from pathlib import Path

import pytest

from .collect import SESSION_KEY, ProbeFile
from .session import DEFAULTS, Options, ProbeSession

_OPTIONS = [
    # (flag, dest, help, kind)
    ("--model", "probe_model", "model under test: alias, local HF directory, .gguf file or cached hub id "
                               f"(default {DEFAULTS['probe_model']})", str),
    ("--probe-device", "probe_device", "cpu, cuda, cuda:N or auto (device_map='auto' across GPUs)", str),
    ("--probe-dtype", "probe_dtype", "float32 (default), bfloat16 or float16", str),
    ("--probe-report-dir", "probe_report_dir", "where reports/<model-slug>/report.* go (default reports)", str),
    ("--trust-remote-code", "trust_remote_code", "allow model code from the model directory (off by default)", bool),
    ("--probe-allow-inconclusive", "probe_allow_inconclusive", "do not fail the run on inconclusive claims", bool),
    ("--probe-batch-size", "probe_batch_size", "prompts per forward pass (default 16)", int),
    ("--probe-threads", "probe_threads", "torch threads (default: all cores; 1 per xdist worker)", int),
    ("--probe-save", "probe_save", "save this run as baseline NAME under <report-dir>/baselines/<model-slug>/", str),
    ("--probe-compare", "probe_compare", "compare with a baseline (NAME or path to a report.json)", str),
    ("--probe-tolerance", "probe_tolerance", "allowed effect move vs the baseline: 0.05, abs:0.05, rel:0.1", str),
    ("--probe-strict", "probe_strict", "claims new in or missing from this run fail the comparison", bool),
    ("--probe-allow-model-change", "probe_allow_model_change", "allow comparing with another model's baseline",
     bool),
]


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("modelprobe", "modelprobe: claims about model internals")
    for flag, dest, help_text, kind in _OPTIONS:
        if kind is bool:
            group.addoption(flag, dest=dest, action="store_true", default=None, help=help_text)
            parser.addini(dest, help_text + " (ini)", type="bool", default=None)
        else:
            group.addoption(flag, dest=dest, default=None, type=kind, help=help_text)
            parser.addini(dest, help_text + " (ini)", default=None)


def pytest_configure(config: pytest.Config) -> None:
    try:
        options = Options.from_config(config)
    except ValueError as e:
        raise pytest.UsageError(f"modelprobe: {e}") from None
    progress = config.getoption("verbose", 0) >= 0
    from . import progress as progress_mod
    progress_mod.set_enabled(progress)
    try:
        session = ProbeSession(options, Path(str(config.rootpath)), progress=progress,
                               worker=_is_worker(config))
    except ValueError as e:
        raise pytest.UsageError(f"modelprobe: {e}") from None
    config.stash[SESSION_KEY] = session


def pytest_collect_file(file_path: Path, parent: pytest.Collector):
    if file_path.name.endswith(".probe.yaml"):
        # One bad probe file must not stop the others: keep running after its collection error.
        parent.config.option.continue_on_collection_errors = True
        return ProbeFile.from_parent(parent, path=file_path)
    return None


def pytest_report_header(config: pytest.Config) -> list[str]:
    session = config.stash.get(SESSION_KEY, None)
    if session is None:
        return []
    o = session.options
    from .errors import ModelprobeError
    from .subject.resolve import resolve  # path work only: no torch
    try:
        r = resolve(o.model)
        where = f"path={r.path / r.gguf_file if r.gguf_file else r.path} hash={r.fingerprint}"
    except ModelprobeError as e:
        where = f"(unresolved: {e})"
    return [f"modelprobe: model={o.model} {where} dtype={o.dtype} device={o.device} reports={o.report_dir}"]


def _is_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    config = session.config
    ps = config.stash.get(SESSION_KEY, None)
    if ps is None:
        return
    ps.finish(interrupted=exitstatus == pytest.ExitCode.INTERRUPTED)
    if _is_worker(config):
        config.workeroutput["modelprobe_record"] = ps.record.model_dump_json()
        return
    if not ps.record.probes and (not ps.loaded or config.option.collectonly):
        return
    ps.write_reports()
    if ps.report_error or (ps.gate and ps.gate.error):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error) -> None:
    """xdist controller: merge each worker's probes into the one record the controller writes."""
    ps = node.config.stash.get(SESSION_KEY, None)
    data = getattr(node, "workeroutput", {}).get("modelprobe_record")
    if ps is None or not data:
        return
    from .report.record import RunRecord
    worker = RunRecord.model_validate_json(data)
    if worker.model.model_type:
        ps.record.model = worker.model
        ps.record.preflight = ps.record.preflight or worker.preflight
        ps.record.tokenization = ps.record.tokenization or worker.tokenization
        ps.record.versions.update(worker.versions)
    for probe in worker.probes:
        ps.add_probe(probe)


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    ps = config.stash.get(SESSION_KEY, None)
    if ps is None or _is_worker(config) or not ps.record.probes:
        return
    from tabulate import tabulate

    from .report.writers import SUMMARY_HEADERS, summary_rows
    terminalreporter.section("modelprobe")
    rows = sorted(summary_rows(ps.record))
    terminalreporter.write_line(tabulate(rows, headers=SUMMARY_HEADERS, tablefmt="simple"))
    for p in ps.record.preflight:
        if not p.passed:
            terminalreporter.write_line(f"PREFLIGHT FAILED {p.name}: {p.detail}", red=True)
    if ps.gate and ps.gate.error:
        terminalreporter.write_line(f"baseline: {ps.gate.error}", red=True)
    for path in ps.report_paths:
        terminalreporter.write_line(f"report: {path}")
    if ps.report_error:
        terminalreporter.write_line(f"report NOT written: {ps.report_error}", red=True)
