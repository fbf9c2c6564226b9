"""The run record: everything a report, a baseline or a JUnit property is made from.

Pure data (pydantic), no torch: writers and the baseline diff read only this.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

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
    curves: dict[str, list[float]] = Field(default_factory=dict)  # per-layer curves for plots
    duration_s: float = 0.0


class ProbeRecord(_Record):
    name: str  # display name: the probe file's name without .probe.yaml, e.g. "logit_lens_capitals"
    kind: str
    file: str  # the probe's identity: its path relative to the rootdir (posix), e.g. "probes/x.probe.yaml"
    file_hash: str = ""
    about: str = ""
    settings: dict[str, Any] = Field(default_factory=dict)  # resolved layer, position, template ...
    claims: list[ClaimResult] = Field(default_factory=list)
    error: str | None = None  # a probe that could not be measured (one located line)
    collected: bool = True  # False: the file could not be read or validated, so its claims are unknown
    duration_s: float = 0.0


class PreflightResult(_Record):
    name: str
    passed: bool
    detail: str = ""
    value: float | None = None
    tolerance: float | None = None


class ModelInfo(_Record):
    id: str  # what the user passed (alias, path or hub id)
    slug: str
    path: str = ""
    hash: str = ""  # revision or content hash of the weights
    model_type: str = ""
    n_layers: int = 0
    dtype: str = ""
    device: str = ""


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
    # The run's selection: the probe files it collected (or failed to collect; None: not recorded) and the
    # claims of those that -k, -m, --lf ... deselected ("file::claim"). A baseline claim of a collected file
    # that was not deselected must be measured now.
    collected_files: list[str] | None = None
    deselected: list[str] = Field(default_factory=list)
    preflight: list[PreflightResult] = Field(default_factory=list)
    tokenization: dict[str, Any] = Field(default_factory=dict)  # chat template + example token ids
    probes: list[ProbeRecord] = Field(default_factory=list)

    def claims(self) -> list[tuple[ProbeRecord, ClaimResult]]:
        return [(p, c) for p in self.probes for c in p.claims]
