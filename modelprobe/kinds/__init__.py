"""The claim kinds: a registry that assembles the probe-file specs (spec/ itself knows no kind).

Kinds register under the entry point group `modelprobe.kinds` (`name = "package.module:KindClass"`),
so a separate package can ship one. The built-in kinds are listed here as well, so that a source
checkout works before its metadata is installed. A kind module is imported only when its kind is
named (and by `modelprobe schema`, which needs them all); kind modules import no torch at import time.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ModelprobeError
from ..spec import LoadedProbe, load_probe
from .base import Measured, Outcome, ProbeKind, judge

if TYPE_CHECKING:
    from ..spec import ProbeBase
    from ..subject import Subject

GROUP = "modelprobe.kinds"
BUILTIN = {
    "circuit": "modelprobe.kinds.circuit:Circuit",
    "direction": "modelprobe.kinds.direction:Direction",
    "logit_lens": "modelprobe.kinds.logit_lens:LogitLens",
    "icl_update": "modelprobe.kinds.icl_update:IclUpdate",
    "backpatch": "modelprobe.kinds.backpatch:Backpatch",
    "patchscope": "modelprobe.kinds.patchscope:Patchscope",
    "injection": "modelprobe.kinds.injection:Injection",
    "injection_protocol": "modelprobe.kinds.injection_protocol:InjectionProtocol",
    "feature": "modelprobe.kinds.feature:Feature",
    "function_vector": "modelprobe.kinds.function_vector:FunctionVector",

    "weight_perturbation": "modelprobe.kinds.weight_perturbation:WeightPerturbation",

    "linear_relation": "modelprobe.kinds.linear_relation:LinearRelation",
    "icv": "modelprobe.kinds.icv:Icv",

    "latent_language": "modelprobe.kinds.latent_language:LatentLanguage",
}


class KindRegistry(Mapping[str, type[ProbeKind]]):
    """name -> kind class, importing each kind's module on first use."""

    def __init__(self) -> None:
        self._targets: dict[str, str] | None = None
        self._loaded: dict[str, type[ProbeKind]] = {}

    def targets(self) -> dict[str, str]:
        if self._targets is None:
            found = dict(BUILTIN)
            for ep in entry_points(group=GROUP):
                found[ep.name] = ep.value
            self._targets = found
        return self._targets

    def refresh(self) -> None:
        """Forget what was discovered (after installing a kind in the running process, e.g. a test)."""
        self._targets = None
        self._loaded.clear()

    def __getitem__(self, name: str) -> type[ProbeKind]:
        if name not in self._loaded:
            target = self.targets()[name]  # KeyError for an unknown kind, as a Mapping should
            module, _, attr = target.partition(":")
            try:
                cls = getattr(importlib.import_module(module), attr)
            except (ImportError, AttributeError) as e:
                raise ModelprobeError(f"kind '{name}' ({target}, entry point group {GROUP}) cannot be "
                                      f"loaded: {e}") from None
            if not (isinstance(cls, type) and issubclass(cls, ProbeKind)) or cls.name != name:
                raise ModelprobeError(f"kind '{name}' ({target}) is not a ProbeKind subclass named '{name}'")
            self._loaded[name] = cls
        return self._loaded[name]

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self.targets()))

    def __len__(self) -> int:
        return len(self.targets())


class _Specs(Mapping[str, "type[ProbeBase]"]):
    """name -> spec class, for the probe loader; loads only the kind a file names."""

    def __getitem__(self, name: str) -> type[ProbeBase]:
        return KINDS[name].Spec

    def __iter__(self) -> Iterator[str]:
        return iter(KINDS)

    def __len__(self) -> int:
        return len(KINDS)


KINDS = KindRegistry()


def load(path: Path) -> LoadedProbe:
    """Read and validate a probe file (no model, no torch)."""
    return load_probe(path, _Specs())


def check_data_files(probe: LoadedProbe) -> None:
    """Every data file the probe names is allowed, exists and reads as JSONL, and its rows are well formed
    (no model needed): a located SpecError / DataError otherwise. The rows are kept on the probe."""
    kind = KINDS[probe.spec.kind]
    for rel, loc in kind.data_files(probe.spec):
        probe.rows(rel, loc, required=())
    kind.check_data(probe)


def claim_names(probe: LoadedProbe) -> list[str]:
    """The claims of a loaded probe, in file order (collection needs no model for this)."""
    return list(getattr(probe.spec, "claims", {}))


def instantiate(probe: LoadedProbe, subject: Subject) -> ProbeKind:
    """The probe's kind set up against the model: model-dependent checks raise located errors."""
    return KINDS[probe.spec.kind](probe, subject)


__all__ = ["GROUP", "KINDS", "KindRegistry", "Measured", "Outcome", "ProbeKind", "check_data_files",
           "claim_names", "instantiate", "judge", "load"]
