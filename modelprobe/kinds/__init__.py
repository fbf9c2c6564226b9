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


def instantiate(probe: LoadedProbe, subject) -> ProbeKind:
    return KINDS[probe.spec.kind](probe, subject)


__all__ = ["KINDS", "Outcome", "ProbeKind", "instantiate", "load"]
