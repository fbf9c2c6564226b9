"""What every claim kind shares: setup against a model, one measurement per probe, verdicts."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..errors import SiteError, SpecError
from ..report.record import ClaimResult, ControlResult
from ..spec import LoadedProbe, OneExpectation, ProbeBase, Tolerance
from ..stats import decide


@dataclass
class Outcome:
    """A probe's measurement: resolved settings and one result per claim."""

    settings: dict[str, Any] = field(default_factory=dict)
    claims: list[ClaimResult] = field(default_factory=list)


class ProbeKind(ABC):
    name: ClassVar[str]
    Spec: ClassVar[type[ProbeBase]]

    def __init__(self, probe: LoadedProbe, subject: Any):
        self.probe = probe
        self.spec: Any = probe.spec
        self.subject = subject
        try:
            self.setup()
        except SiteError as e:
            raise probe.error(f"{e.message} (model '{subject.info.id}')", e.loc) from None
        except SpecError as e:
            raise (probe.locate(e) if e.file is None else e) from None

    @classmethod
    def data_files(cls, spec: Any) -> list[tuple[str, tuple]]:
        """(path relative to the probe file, its YAML loc) of every data file the spec names."""
        return []

    def claim_names(self) -> list[str]:
        return list(self.spec.claims)

    def setup(self) -> None:  # noqa: B027 - optional hook; most kinds override it
        """Model-dependent checks (layers in range, single-token answers...). Raise SpecError/SiteError."""

    @abstractmethod
    def measure(self) -> Outcome:
        """Run the model once for all claims of the probe."""

    def run(self) -> Outcome:
        start = time.perf_counter()
        outcome = self.measure()
        per_claim = (time.perf_counter() - start) / max(1, len(outcome.claims))
        for c in outcome.claims:
            c.duration_s = c.duration_s or per_claim
        return outcome


def judge(name: str, expect: OneExpectation, effect: float | None, ci: tuple[float, float] | None, n: int,
          metric: str, control: ControlResult | None = None, beats_control: bool | None = None,
          details: dict[str, Any] | None = None, curves: dict[str, list[float]] | None = None,
          tolerance: Tolerance | None = None, untestable: str | None = None) -> ClaimResult:
    """A claim's verdict from its interval and its control; `untestable` forces inconclusive with a reason."""
    th = expect.threshold
    if untestable:
        verdict, reason = "inconclusive", untestable
    else:
        verdict, reason = decide(ci, th.value, th.comparison, beats_control)
    return ClaimResult(
        name=name, verdict=verdict, reason=reason, metric=metric, effect=effect,
        ci=ci, threshold=th.value, comparison=th.comparison, n=n, control=control,
        tolerance=tolerance.model_dump(exclude_none=True) if tolerance else None,
        details=details or {}, curves=curves or {},
    )
