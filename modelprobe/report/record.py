"""The run record: everything a report, a baseline or a JUnit property is made from.

Pure data (pydantic), no torch: writers and the baseline diff read only this.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..model_facts import ModelInfo, PreflightResult

SCHEMA_VERSION = 1

Verdict = Literal["pass", "fail", "inconclusive", "error"]


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ControlResult(_Record):
    """What the claim's effect was held against (random direction, random circuits, ...)."""

    name: str
    effect: float | None = None
    p_value: float | None = None
    detail: dict[str, Any] = Field(default_factory=dict)


# ---- plots: what a kind wants drawn; the HTML writer reads only these --------------------------

class Series(_Record):
    label: str
    y: list[float | None]
    axis: Literal["left", "right"] = "left"  # right: its own (log when positive) scale, e.g. ranks
    lo: list[float | None] | None = None  # an interval band around y (same length), drawn shaded
    hi: list[float | None] | None = None


class LinePlot(_Record):
    """Curves over a shared x axis (layers, strengths, context sizes...), with an optional marked x."""

    type: Literal["lines"] = "lines"
    title: str
    x_label: str
    y_label: str = ""
    x: list[float] | None = None  # default 0, 1, 2, ...
    series: list[Series]
    mark_x: float | None = None
    mark_label: str = ""


class HeatMap(_Record):
    """values[row][col], e.g. back-patching's source layer (rows) x target layer (columns)."""

    type: Literal["heatmap"] = "heatmap"
    title: str
    x_label: str
    y_label: str
    value_label: str
    values: list[list[float | None]]
    x_ticks: list[str] | None = None
    y_ticks: list[str] | None = None
    mark: tuple[int, int] | None = None  # (row, col) of the chosen cell
    # The colour scale's (low, high); heat maps meant to be compared by eye (a claim and its control) share
    # one. None: the data's own range.
    value_range: tuple[float, float] | None = None


class NullHistogram(_Record):
    """A control's null distribution with the claim's effect (and threshold) marked."""

    type: Literal["null"] = "null"
    title: str
    x_label: str
    values: list[float]
    effect: float | None = None
    effect_label: str = "effect"
    threshold: float | None = None


class Bars(_Record):
    """Before/after bars per label (base vs intervened rate, clean vs ablated metric...)."""

    type: Literal["bars"] = "bars"
    title: str
    value_label: str
    labels: list[str]
    before: list[float | None]
    after: list[float | None]
    before_label: str = "before"
    after_label: str = "after"


class Table(_Record):
    type: Literal["table"] = "table"
    title: str
    columns: list[str]
    rows: list[list[Any]]


Plot = Annotated[LinePlot | HeatMap | NullHistogram | Bars | Table, Field(discriminator="type")]


class ClaimResult(_Record):
    name: str
    verdict: Verdict
    reason: str = ""
    metric: str = ""  # what `effect` measures, in words a reader understands
    effect: float | None = None
    ci: tuple[float, float] | None = None
    threshold: float | None = None
    comparison: Literal["at_least", "at_most"] | None = None
    n: int = 0
    control: ControlResult | None = None
    tolerance: dict[str, float] | None = None  # {"abs": .., "rel": ..} from the probe file
    details: dict[str, Any] = Field(default_factory=dict)  # extra numbers for the report
    curves: dict[str, list[float]] = Field(default_factory=dict)  # raw per-layer numbers (JSON readers)
    plots: list[Plot] = Field(default_factory=list)  # what report.html draws
    duration_s: float = 0.0


class ProbeRecord(_Record):
    name: str  # display name: the probe file's name without .probe.yaml, e.g. "logit_lens_capitals"
    kind: str
    file: str  # the probe's identity: its path relative to the rootdir (posix), e.g. "probes/x.probe.yaml"
    file_hash: str = ""
    about: str = ""
    tags: list[str] = Field(default_factory=list)  # the probe's tags (pytest markers): a gate judges -m on them
    settings: dict[str, Any] = Field(default_factory=dict)  # resolved layer, position, template ...
    claims: list[ClaimResult] = Field(default_factory=list)
    error: str | None = None  # a probe that could not be measured (one located line)
    collected: bool = True  # False: the file could not be read or validated, so its claims are unknown
    duration_s: float = 0.0


class RunRecord(_Record):
    schema_version: int = SCHEMA_VERSION
    tool: str = "modelprobe"
    model: ModelInfo
    versions: dict[str, str] = Field(default_factory=dict)
    probes_commit: str = ""
    seed: int = 0
    started: str = ""
    finished: str = ""
    interrupted: bool = False
    interrupted_probe: str | None = None  # identity of the probe being measured when the run was stopped
    interrupted_writing: str = ""  # the report file being written when a signal stopped the writing
    # The run's selection: the probe files it collected (or failed to collect; None: not recorded) and the
    # claims of those that -k, -m, --lf ... deselected ("file::claim"). A baseline claim of a collected file
    # that was not deselected must be measured now. Baseline probes deleted from a folder the run collected
    # count as collected (modelprobe/selection.py): a deleted probe is missing, never out of scope.
    collected_files: list[str] | None = None
    deselected: list[str] = Field(default_factory=list)
    # --probe-shard: {"index": i, "count": n, "files": [this shard's probe files], "costs_from": "..."};
    # the other shards' claims are in `deselected` (modelprobe/shard.py joins the shards' reports)
    shard: dict[str, Any] | None = None
    preflight: list[PreflightResult] = Field(default_factory=list)
    tokenization: dict[str, Any] = Field(default_factory=dict)  # chat template + example token ids
    probes: list[ProbeRecord] = Field(default_factory=list)

    def claims(self) -> list[tuple[ProbeRecord, ClaimResult]]:
        return [(p, c) for p in self.probes for c in p.claims]
