"""The claim kinds. This registry assembles the probe-file specs: spec/ itself knows no kind."""

from __future__ import annotations

from pathlib import Path

from ..spec import LoadedProbe, load_probe
from .base import Outcome, ProbeKind
from .circuit import Circuit
from .direction import Direction
from .logit_lens import LogitLens

KINDS: dict[str, type[ProbeKind]] = {k.name: k for k in (Circuit, Direction, LogitLens,)}


def load(path: Path) -> LoadedProbe:
    return load_probe(path, {name: k.Spec for name, k in KINDS.items()})


def check_data_files(probe: LoadedProbe) -> None:
    """Every data file the probe names is allowed, exists and reads as JSONL (no model needed): a located
    SpecError / DataError otherwise. The rows are kept on the probe for the kind."""
    for rel, loc in KINDS[probe.spec.kind].data_files(probe.spec):
        probe.rows(rel, loc, required=())


def claim_names(probe: LoadedProbe) -> list[str]:
    """The probe's claim names, from the spec alone (collection never needs the model)."""
    return list(probe.spec.claims)


def instantiate(probe: LoadedProbe, subject) -> ProbeKind:
    return KINDS[probe.spec.kind](probe, subject)


__all__ = ["KINDS", "check_data_files", "claim_names", "Outcome", "ProbeKind", "instantiate", "load"]
