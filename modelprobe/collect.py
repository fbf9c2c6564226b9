"""pytest nodes: one ProbeFile per *.probe.yaml, one ClaimItem per claim. Knows pytest, not tensors."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest

from .errors import ModelprobeError
from .report.record import ClaimResult, ProbeRecord
from .spec import PROBE_SUFFIX
from .spec.load import probe_name

SESSION_KEY: pytest.StashKey[Any] = pytest.StashKey()


class ClaimFailed(Exception):
    """A claim that did not pass: rendered as plain lines, never a traceback."""


def _fmt(x: float | None) -> str:
    return "—" if x is None else f"{x:.3g}"


def describe(claim: ClaimResult) -> str:
    sym = {"at_least": "≥", "at_most": "≤"}.get(claim.comparison or "", "?")
    ci = f"[{_fmt(claim.ci[0])}, {_fmt(claim.ci[1])}]" if claim.ci else "—"
    lines = [f"{claim.verdict.upper()}: {claim.metric}",
             f"  effect {_fmt(claim.effect)}  CI {ci}  threshold {sym} {_fmt(claim.threshold)}  n={claim.n}"]
    if claim.control:
        c = claim.control
        lines.append(f"  control {c.name}: effect {_fmt(c.effect)}, p={_fmt(c.p_value)}")
    if claim.reason:
        lines.append(f"  {claim.reason}")
    return "\n".join(lines)


def _relative(path: Path, config: pytest.Config) -> str:
    """A probe's identity: its path relative to the rootdir (posix), so two files of one name differ and a
    committed baseline carries no home directory."""
    try:
        return path.relative_to(config.rootpath).as_posix()
    except ValueError:
        return path.as_posix()


class ProbeFile(pytest.File):
    """A probe file. Collection reads the spec and its data only; the model is touched when a claim runs."""

    def collect(self):
        from . import kinds
        session = self.config.stash[SESSION_KEY]
        self.identity = _relative(self.path, self.config)
        session.in_scope([self.identity])
        try:
            probe = kinds.load(self.path)
            kinds.check_data_files(probe)
            names = kinds.claim_names(probe)
        except ModelprobeError as e:
            # Recorded as the probe's error, so a typo never makes a probe vanish from report and gate.
            session.add_probe(ProbeRecord(name=probe_name(self.path), kind="", file=self.identity,
                                          error=str(e), collected=False))
            raise self.CollectError(str(e)) from None
        self.probe = probe
        self._outcome: Any = None
        self._error: str | None = None
        for tag in probe.spec.tags:
            self.config.addinivalue_line("markers", f"{tag}: modelprobe tag")
        for name in names:
            item = ClaimItem.from_parent(self, name=name)
            for tag in probe.spec.tags:
                item.add_marker(getattr(pytest.mark, tag))
            # Claims of one probe share a measurement: keep them on one xdist worker.
            item.add_marker(pytest.mark.xdist_group(name=self.identity))
            item.extra_keyword_matches.update({probe.spec.kind, probe.name})
            yield item

    def outcome(self) -> Any:
        """Load the model, set the kind up and measure once for all claims; a user-caused error (a
        model-dependent check, an unloadable model) becomes the probe's one-line error, not a traceback."""
        if self._outcome is not None or self._error is not None:
            return self._outcome
        from . import kinds
        session = self.config.stash[SESSION_KEY]
        record = ProbeRecord(name=self.probe.name, kind=self.probe.spec.kind, file=self.identity,
                             file_hash=self.probe.file_hash, about=self.probe.spec.about,
                             tags=list(self.probe.spec.tags))
        start = time.perf_counter()
        session.current_probe = self.identity
        from . import progress
        progress.set_probe(self.probe.name)
        cut_off = False
        try:
            subject = session.subject()
            if session.preflight_failed:
                raise ModelprobeError(f"preflight failed: {session.preflight_failed}")
            kind = kinds.instantiate(self.probe, subject)
            self._outcome = kind.run()
            record.settings = self._outcome.settings
            record.claims = self._outcome.claims
        except ModelprobeError as e:
            self._error = str(e)
        except Exception as e:
            self._error = f"internal error: {type(e).__name__}: {e}"
            raise
        except BaseException:  # KeyboardInterrupt, SIGTERM: say which probe was cut off
            cut_off = True
            self._error = "interrupted: the run was stopped while this probe was being measured"
            raise
        finally:
            record.duration_s = time.perf_counter() - start
            leak = session.after_probe(self.probe.name)
            if leak is not None and not leak.passed and self._error is None:
                self._error = f"hooks left behind: {leak.detail}"
            record.error = self._error
            session.add_probe(record)
            if not cut_off:
                session.current_probe = None
        return self._outcome


class ClaimItem(pytest.Item):
    parent: ProbeFile

    @property
    def identity(self) -> str:
        """`file::claim`, the file relative to the rootdir: what baselines and the gate match on."""
        return f"{self.parent.identity}::{self.name}"

    def runtest(self) -> None:
        session = self.config.stash[SESSION_KEY]
        outcome = self.parent.outcome()
        if outcome is None:
            raise ClaimFailed(f"ERROR: probe could not be measured: {self.parent._error}")
        claim = next(c for c in outcome.claims if c.name == self.name)
        self._record_properties(claim)
        problems = []
        if claim.verdict == "fail" or claim.verdict == "error":
            problems.append(describe(claim))
        elif claim.verdict == "inconclusive" and not session.options.allow_inconclusive:
            problems.append(describe(claim) + "\n  (inconclusive fails the run; --probe-allow-inconclusive "
                                              "accepts it)")
        gate = session.gate_message(self.parent.identity, claim)
        if gate:
            problems.append(gate)
        if problems:
            raise ClaimFailed("\n".join(problems))

    def _record_properties(self, claim: ClaimResult) -> None:
        props = {"verdict": claim.verdict, "effect": claim.effect, "threshold": claim.threshold,
                 "comparison": claim.comparison, "n": claim.n, "metric": claim.metric}
        if claim.ci:
            props["ci_low"], props["ci_high"] = claim.ci
        if claim.control:
            props["control"] = claim.control.name
            props["control_effect"] = claim.control.effect
            props["control_p_value"] = claim.control.p_value
        self.user_properties.extend((k, v) for k, v in props.items() if v is not None)

    def repr_failure(self, excinfo, style=None):
        if isinstance(excinfo.value, ClaimFailed):
            return str(excinfo.value)
        return super().repr_failure(excinfo, style=style)

    def reportinfo(self):
        line, _ = self.parent.probe.positions.get(("claims", self.name, "__key__"), (1, 1))
        return self.path, line - 1, f"{self.parent.probe.spec.kind} claim {self.parent.probe.name}::{self.name}"


def odd_probe_entries(directory: Path) -> list[Path]:
    """`*.probe.yaml` entries that are neither files nor folders (FIFOs, sockets, dangling or looping links):
    pytest would skip them without a word."""
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return []
    return sorted(Path(e.path) for e in entries if e.name.endswith(PROBE_SUFFIX) and _odd(e))


def _odd(entry: os.DirEntry) -> bool:
    try:
        return not entry.is_file() and not entry.is_dir()
    except OSError:  # a symlink loop
        return True


class ProbeDir(pytest.Dir):
    """A folder holding odd probe entries: each becomes a ProbeFile, whose collection refuses it by name."""

    def collect(self):
        yield from super().collect()
        for path in odd_probe_entries(self.path):
            yield ProbeFile.from_parent(self, path=path)
