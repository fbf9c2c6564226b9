"""The kind contract: a spec class, model-dependent setup, one measurement per probe, verdicts.

A kind is `class MyKind(ProbeKind[MySpec])` with `name`, `Spec`, `setup()` and `measure()`. The
measurement of each claim is a `Measured`; `judge()` turns it into the recorded `ClaimResult`.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

from ..errors import SiteError, SpecError
from ..report.record import ClaimResult, ControlResult, Plot
from ..spec import ClaimSpec, LoadedProbe, ProbeBase
from ..stats import decide

if TYPE_CHECKING:
    from ..subject import Subject

SpecT = TypeVar("SpecT", bound=ProbeBase)


@dataclass
class Outcome:
    """A probe's measurement: resolved settings and one result per claim."""

    settings: dict[str, Any] = field(default_factory=dict)
    claims: list[ClaimResult] = field(default_factory=list)


@dataclass
class Measured:
    """What a kind measured for one claim, before the verdict.

    `untestable` (a reason) makes the claim inconclusive whatever the numbers say: a claim that could
    not be measured never passes. `beats_control` is None when the claim has no control.
    """

    effect: float | None
    ci: tuple[float, float] | None
    n: int
    metric: str
    control: ControlResult | None = None
    beats_control: bool | None = None
    details: dict[str, Any] = field(default_factory=dict)
    curves: dict[str, list[float]] = field(default_factory=dict)
    plots: list[Plot] = field(default_factory=list)
    untestable: str | None = None


class ProbeKind(ABC, Generic[SpecT]):
    name: ClassVar[str]
    Spec: ClassVar[type[ProbeBase]]

    def __init__(self, probe: LoadedProbe, subject: Subject):
        self.probe = probe
        self.spec: SpecT = probe.spec  # type: ignore[assignment]
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

    @classmethod
    def check_data(cls, probe: LoadedProbe) -> Any:
        """Read and check the data rows without a model (fields and their types), raising located errors;
        runs at collection. Kinds return the rows, so that `setup()` can reuse them."""
        return None

    def claim_names(self) -> list[str]:
        return list(self.spec.claims)  # type: ignore[attr-defined]

    def setup(self) -> None:  # noqa: B027 - optional hook; most kinds override it
        """Model-dependent checks (layers in range, single-token answers...). Raise SpecError/SiteError."""

    @abstractmethod
    def measure(self) -> Outcome:
        """Run the model once for all claims of the probe."""

    def run(self) -> Outcome:
        start = time.perf_counter()
        try:
            outcome = self.measure()
        except SpecError as e:
            if e.file is not None:
                raise
            if len(e.loc) == 1:  # a grader knows its field's name, not where the probe put it: the first one
                e = SpecError(e.message, next((loc for loc in self.probe.positions if loc[-1:] == e.loc), e.loc))
            raise self.probe.locate(e) from None
        per_claim = (time.perf_counter() - start) / max(1, len(outcome.claims))
        for c in outcome.claims:
            c.duration_s = c.duration_s or per_claim
        return outcome


def judge(name: str, claim: ClaimSpec, m: Measured) -> ClaimResult:
    """A claim's verdict from its interval and its control; `m.untestable` forces inconclusive."""
    th = claim.expect.threshold
    if m.untestable:
        verdict, reason = "inconclusive", m.untestable
    else:
        verdict, reason = decide(m.ci, th.value, th.comparison, m.beats_control)
    return ClaimResult(
        name=name, verdict=verdict, reason=reason, metric=m.metric, effect=m.effect,
        ci=m.ci, threshold=th.value, comparison=th.comparison, n=m.n, control=m.control,
        tolerance=claim.tolerance.model_dump(exclude_none=True) if claim.tolerance else None,
        details=m.details, curves=m.curves, plots=m.plots,
    )
