"""The kind contract: a spec class, model-dependent setup, one measurement per probe, verdicts.

A kind is `class MyKind(ProbeKind[MySpec])` with `Spec`, `skeleton`, `setup()` and `measure()`. Its name
is written once, as the spec's `kind: Literal["my_kind"]`; the class reads it from there. The data
files are the spec's `DataFile` fields, found by walking it. The measurement of each claim is a
`Measured`; `judge()` turns it into the recorded `ClaimResult`.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Literal, TypeVar, get_args, get_origin

from ..errors import SiteError, SpecError
from ..report.record import ClaimResult, ControlResult, Plot
from ..spec import ClaimSpec, LoadedProbe, ProbeBase
from ..spec.fields import Rows, data_files
from ..stats import decide
from ..toolkit.prompts import read_rows

if TYPE_CHECKING:
    from ..subject import Subject

SpecT = TypeVar("SpecT", bound=ProbeBase)
# The first line of every skeleton: editors that read it complete and check the probe file.
SCHEMA_COMMENT = "# yaml-language-server: $schema=../modelprobe/schema/modelprobe.schema.json\n"


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


def spec_kind(spec: type[ProbeBase]) -> str:
    """The kind name a spec class declares: its `kind` field, a Literal of one string."""
    annotation = spec.model_fields["kind"].annotation
    names = get_args(annotation) if get_origin(annotation) is Literal else ()
    if len(names) != 1 or not isinstance(names[0], str):
        raise TypeError(f"{spec.__name__}.kind must be Literal['<kind name>'], not {annotation}")
    return names[0]


class ProbeKind(ABC, Generic[SpecT]):
    """A claim kind. Subclasses set `Spec` (the probe file's pydantic model) and may set `skeleton`: the
    commented probe file `modelprobe new` writes, from `about:` on (the schema comment and the `kind:`
    line come first, added here), and `skeleton_data`: example rows of the data files it names (relative
    path -> rows), written only where no such file exists, so that a fresh skeleton validates."""

    name: ClassVar[str]
    Spec: ClassVar[type[ProbeBase]]
    skeleton: ClassVar[str | None] = None
    skeleton_data: ClassVar[dict[str, list[dict[str, Any]]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "Spec" in cls.__dict__:  # a kind of its own, even when it extends another kind's class
            cls.name = spec_kind(cls.Spec)
            cls.skeleton = cls.__dict__.get("skeleton")
            cls.skeleton_data = cls.__dict__.get("skeleton_data", {})
        body = cls.__dict__.get("skeleton")
        if body is not None:
            cls.skeleton = f"{SCHEMA_COMMENT}kind: {cls.name}\n{body}"

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
        """(path relative to the probe file, its YAML loc) of every data file the spec names: its
        `DataFile` fields, nested blocks and claims included."""
        return [(path, loc) for path, loc, _ in data_files(spec)]

    def data_rows(self, path: str) -> list[dict[str, Any]]:
        """The rows of a data file the spec names, read once and checked as its field declares."""
        return _read(self.probe, next(f for f in data_files(self.spec) if f[0] == path))

    @classmethod
    def check_files(cls, probe: LoadedProbe) -> None:
        """Read every data file the spec names, checking the rows its field declares (`Rows`), then the
        kind's own checks: at collection, no model needed; located errors otherwise."""
        for found in data_files(probe.spec):
            _read(probe, found)
        cls.check_data(probe)

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


def _read(probe: LoadedProbe, found: tuple[str, tuple, Rows | None]) -> list[dict[str, Any]]:
    path, loc, rows = found
    if rows is None:
        return probe.rows(path, loc, required=())
    return read_rows(probe, path, loc, rows.text, rows.optional)


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
