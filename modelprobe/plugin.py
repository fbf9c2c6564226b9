"""pytest hooks only (the pytest11 entry point). Never imports torch at import time."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from .collect import SESSION_KEY, ProbeDir, ProbeFile, odd_probe_entries
from .options import OPTIONS, OptionError
from .session import Options, ProbeSession

_PREVIOUS_SIGTERM: pytest.StashKey[object] = pytest.StashKey()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("modelprobe", "modelprobe: claims about model internals")
    for o in OPTIONS:
        # Values are read as text and checked in one place (options.read_options), flag and ini alike: pytest's
        # own ini parsing would answer `probe_strict = maybe` with an internal error.
        if o.is_flag:
            group.addoption(o.flag, dest=o.ini, action="store_true", default=None, help=o.help)
        else:
            group.addoption(o.flag, dest=o.ini, default=None, help=o.help)
        parser.addini(o.ini, o.help + " (ini)", default=None)


def pytest_configure(config: pytest.Config) -> None:
    # Registered here so that --strict-markers passes without pytest-xdist installed.
    config.addinivalue_line("markers", "xdist_group(name): keep a probe's claims on one xdist worker")
    try:
        options = Options.from_config(config)
    except OptionError as e:
        raise pytest.UsageError(f"modelprobe: {e}") from None
    worker = _is_worker(config)
    from .spec.load import set_data_roots
    set_data_roots([Path(str(config.rootpath))] + ([options.data_root] if options.data_root else []))
    progress = config.getoption("verbose", 0) >= 0
    from . import progress as progress_mod
    progress_mod.set_enabled(progress)
    progress_mod.set_writer(_log_writer(config))
    progress_mod.set_uncaptured(_uncaptured(config))
    config.stash[SESSION_KEY] = ProbeSession(options, Path(str(config.rootpath)), progress=progress,
                                             worker=worker)
    if not worker and getattr(config.option, "loadscopereorder", None):
        # xdist would reorder the groups by their number of claims; the workers' order (longest probe
        # first, by recorded duration) is the one that balances the workers.
        config.option.loadscopereorder = False
    _install_sigterm(config)


def report_dir_problem(report_dir: Path) -> str | None:
    """Why reports could not be written under `report_dir` (its first existing ancestor decides), or None."""
    probe = report_dir
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        return f"--probe-report-dir={report_dir}: {probe} is not a directory"
    if probe.exists() and not os.access(probe, os.W_OK | os.X_OK):
        return f"--probe-report-dir={report_dir}: {probe} is not writable"
    return None


def pytest_collection_finish(session: pytest.Session) -> None:
    """An unwritable report folder stops a probe run before any claim runs, not after the whole run (runs
    without probe files, e.g. another project's tests, are left alone)."""
    ps = session.config.stash.get(SESSION_KEY, None)
    if ps is None or ps.worker or not ps.saw_probe_files or session.config.option.collectonly:
        return
    problem = report_dir_problem(ps.options.report_dir)
    if problem:
        ps.report_error = problem
        raise pytest.UsageError(f"modelprobe: {problem}")


def _install_sigterm(config: pytest.Config) -> None:
    """SIGTERM (what CI sends on a timeout) takes the KeyboardInterrupt path: the report is still written."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum} (SIGTERM)")
    try:
        config.stash[_PREVIOUS_SIGTERM] = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread: leave signals alone
        pass


def pytest_unconfigure(config: pytest.Config) -> None:
    from .spec.load import set_data_roots
    set_data_roots([])  # an in-process run (pytester) must not leave its rootdir behind
    from . import progress as progress_mod
    progress_mod.set_uncaptured(None)  # nor its finished capture
    previous = config.stash.get(_PREVIOUS_SIGTERM, None)
    if previous is not None:
        signal.signal(signal.SIGTERM, previous)  # type: ignore[arg-type]


def pytest_collect_file(file_path: Path, parent: pytest.Collector):
    if file_path.name.endswith(".probe.yaml"):
        # One bad probe file must not stop the others: keep running after its collection error.
        parent.config.option.continue_on_collection_errors = True
        session = parent.config.stash.get(SESSION_KEY, None)
        if session is not None:
            session.saw_probe_files = True
        return ProbeFile.from_parent(parent, path=file_path)
    return None


@pytest.hookimpl(tryfirst=True)
def pytest_collect_directory(path: Path, parent: pytest.Collector):
    """Only folders with a FIFO or a broken link named *.probe.yaml (and no __init__.py) get our collector."""
    if not (path / "__init__.py").exists() and odd_probe_entries(path):
        return ProbeDir.from_parent(parent, path=path)
    return None


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    """--probe-shard=i/n: keep the claims of this shard's probe files; the others' are deselected. Under
    xdist the longest probes are put first (shard.longest_first)."""
    ps = config.stash.get(SESSION_KEY, None)
    if ps is None:
        return
    if _is_worker(config):
        from .shard import longest_first
        longest_first(ps, items)
    if ps.options.shard is None:
        return
    from .collect import ClaimItem
    from .shard import share
    mine = share(ps)
    drop = [item for item in items if isinstance(item, ClaimItem) and item.parent.identity not in mine]
    if drop:
        items[:] = [item for item in items if not (isinstance(item, ClaimItem) and item.parent.identity not in mine)]
        config.hook.pytest_deselected(items=drop)


def pytest_deselected(items: list[pytest.Item]) -> None:
    """Claims deselected by -k, -m, --lf ...: the baseline gate does not ask for them."""
    from .collect import ClaimItem
    claims = [item for item in items if isinstance(item, ClaimItem)]
    if claims:
        session = claims[0].config.stash.get(SESSION_KEY, None)
        if session is not None:
            session.in_scope([], [item.identity for item in claims])


def pytest_report_header(config: pytest.Config) -> list[str]:
    session = config.stash.get(SESSION_KEY, None)
    if session is None:
        return []
    o = session.options
    r = session.resolved
    if session.resolve_error:
        where = f"(unresolved: {session.resolve_error})"
    elif r.fingerprint:
        where = f"path={r.path / r.gguf_file if r.gguf_file else r.path} hash={r.fingerprint}"
    else:
        where = "(not in the local Hugging Face cache yet: downloaded when the first claim runs)"
    return [f"modelprobe: model={o.model} {where} dtype={o.dtype} device={o.device} reports={o.report_dir}"]


def _is_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    config = session.config
    ps = config.stash.get(SESSION_KEY, None)
    if ps is None:
        return
    interrupted = exitstatus == pytest.ExitCode.INTERRUPTED
    if not _is_worker(config) and ps.gate is not None and ps.gate.before is not None:
        from .selection import deleted_but_asked_for
        # Baseline probes deleted from a folder this run collected were asked for: missing, not skipped.
        files, deselected = deleted_but_asked_for(config, ps.gate.before, set(ps.record.collected_files or []))
        if files:
            ps.in_scope(files, deselected)
    ps.finish(interrupted=interrupted)
    if _is_worker(config):
        config.workeroutput["modelprobe_record"] = ps.record.model_dump_json()
        return
    # A shard left no probe still reports (and passes): `modelprobe merge` counts a shard without a report
    # as lost.
    empty_shard = ps.options.shard is not None and (ps.saw_probe_files or ps.record.shard is not None)  # xdist
    if empty_shard and exitstatus == pytest.ExitCode.NO_TESTS_COLLECTED:
        session.exitstatus = pytest.ExitCode.OK
    # A gate whose baseline files the run asked for reports them even when nothing was collected.
    asked = ps.gate is not None and ps.gate.before is not None and bool(ps.record.collected_files)
    if config.option.collectonly or ps.report_error or not (ps.record.probes or asked or empty_shard
                                                            or (interrupted and ps.saw_probe_files)):
        return
    ps.write_reports()
    if ps.report_interrupted:
        session.exitstatus = pytest.ExitCode.INTERRUPTED
    elif (ps.report_error or ps.baseline_error or ps.gate_failed) and \
            exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
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
    ps.in_scope(worker.collected_files or [], worker.deselected)
    ps.record.shard = ps.record.shard or worker.shard
    ps.saw_probe_files = ps.saw_probe_files or bool(worker.probes)
    if worker.interrupted_probe:
        ps.current_probe = worker.interrupted_probe


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    ps = config.stash.get(SESSION_KEY, None)
    if ps is None or _is_worker(config) or not (ps.record.probes or ps.comparison is not None):
        return
    from tabulate import tabulate

    from .report.writers import SUMMARY_HEADERS, summary_rows
    terminalreporter.section("modelprobe")
    rows = sorted(summary_rows(ps.record))
    terminalreporter.write_line(tabulate(rows, headers=SUMMARY_HEADERS, tablefmt="simple"))
    for p in ps.record.preflight:
        if not p.passed:
            terminalreporter.write_line(f"PREFLIGHT FAILED {p.name}: {p.detail}", red=True)
    if ps.record.interrupted_probe:
        terminalreporter.write_line(f"interrupted while measuring {ps.record.interrupted_probe}", red=True)
    if ps.gate and ps.gate.error:
        terminalreporter.write_line(f"baseline: {ps.gate.error}", red=True)
    if ps.comparison is not None:
        for r in ps.comparison.failing:
            if r.status in ("missing", "errored"):  # claims with no item of their own in this run
                terminalreporter.write_line(f"baseline: {r.probe}::{r.claim} {r.status.upper()}: {r.message}",
                                            red=True)
    for path in ps.report_paths:
        terminalreporter.write_line(f"report: {path}")
    if ps.report_error:
        terminalreporter.write_line(f"report NOT written: {ps.report_error}", red=True)
    if ps.report_interrupted:
        terminalreporter.write_line(f"reports {ps.report_interrupted}", red=True)
    if ps.baseline_error:
        terminalreporter.write_line(f"baseline NOT saved: {ps.baseline_error}", red=True)


def _uncaptured(config: pytest.Config):
    import contextlib

    def factory():
        capman = config.pluginmanager.getplugin("capturemanager")
        return capman.global_and_fixture_disabled() if capman else contextlib.nullcontext()
    return factory


def _log_writer(config: pytest.Config):
    """Progress log lines past pytest's output capture (a measurement runs inside a test item), only when
    the real stderr is not a terminal (CI logs); a terminal has pytest's own progress."""
    import contextlib
    import sys

    def write(line: str) -> None:
        capman = config.pluginmanager.getplugin("capturemanager")
        with capman.global_and_fixture_disabled() if capman else contextlib.nullcontext():
            if not sys.stderr.isatty():
                print(line, file=sys.stderr, flush=True)
    return write
