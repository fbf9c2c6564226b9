"""The claim kinds: a registry that assembles the probe-file specs (spec/ itself knows no kind).

A kind's name is written once, in its spec (`kind: Literal["circuit"]`). The built-in kinds are found
by reading this package's modules for kind classes, so a source checkout on PYTHONPATH works without
installed metadata, and a new kind module is registered by being here. Another package ships a kind
under the entry point group `modelprobe.kinds` (`name = "package.module:KindClass"`). A kind module is
imported only when its kind is named (and by `modelprobe schema`, which needs them all); kind modules
import no torch at import time.
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
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


def builtin_kinds() -> dict[str, str]:
    """name -> "module:Class" of every kind class in this package: a class that sets `Spec`, named by
    that spec's `kind` Literal. Read from the source, so that nothing is imported (a kind module loads
    only when its kind is named, and helper modules may import torch); kind packages are walked as folders,
    not imported."""
    found: dict[str, str] = {}
    for module, source in _modules_under(Path(__file__).parent, __name__):
        for name, target in _kinds_in(module, source):
            if name in found:
                raise ModelprobeError(f"two built-in kinds are named '{name}' ({found[name]}, {target})")
            found[name] = target
    return found


def _modules_under(folder: Path, package: str) -> Iterator[tuple[str, Path]]:
    """(module name, its source file) of every module below a package folder, without importing any."""
    for info in pkgutil.iter_modules([str(folder)]):
        module = f"{package}.{info.name}"
        if info.ispkg:
            yield module, folder / info.name / "__init__.py"
            yield from _modules_under(folder / info.name, module)
        else:
            yield module, folder / f"{info.name}.py"


def _kinds_in(module: str, source: Path) -> list[tuple[str, str]]:
    """(name, "module:Class") of the kind classes a module defines. A module without its source, or a
    kind whose spec is defined elsewhere, is asked by importing it."""
    if not source.is_file():
        return [(v.name, f"{module}:{k}") for k, v in vars(importlib.import_module(module)).items()
                if isinstance(v, type) and issubclass(v, ProbeKind) and "Spec" in vars(v) and v.__module__ == module]
    tree = ast.parse(source.read_text(encoding="utf-8"))
    classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}
    out = []
    for cls in classes.values():
        spec = next((stmt.value.id for stmt in cls.body if isinstance(stmt, ast.Assign)
                     and [getattr(t, "id", None) for t in stmt.targets] == ["Spec"]
                     and isinstance(stmt.value, ast.Name)), None)
        if spec is not None:
            name = _literal_kind(classes.get(spec)) or getattr(importlib.import_module(module), cls.name).name
            out.append((name, f"{module}:{cls.name}"))
    return out


def _literal_kind(spec: ast.ClassDef | None) -> str | None:
    """The string of a spec class's `kind: Literal["..."]`, from its source."""
    for stmt in spec.body if spec is not None else ():
        if (isinstance(stmt, ast.AnnAssign) and getattr(stmt.target, "id", None) == "kind"
                and isinstance(stmt.annotation, ast.Subscript)
                and getattr(stmt.annotation.value, "id", None) == "Literal"
                and isinstance(stmt.annotation.slice, ast.Constant) and isinstance(stmt.annotation.slice.value, str)):
            return stmt.annotation.slice.value
    return None


class KindRegistry(Mapping[str, type[ProbeKind]]):
    """name -> kind class: the built-in kinds, then entry-point kinds, imported on first use."""

    def __init__(self) -> None:
        self._targets: dict[str, str] | None = None
        self._loaded: dict[str, type[ProbeKind]] = {}

    def targets(self) -> dict[str, str]:
        """name -> "module:Class" of every kind; a built-in name wins over an entry point of the same
        name (an installed copy's metadata may still list the built-ins)."""
        if self._targets is None:
            builtin = builtin_kinds()
            found = {ep.name: ep.value for ep in entry_points(group=GROUP) if ep.name not in builtin}
            self._targets = {**found, **builtin}
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
    KINDS[probe.spec.kind].check_files(probe)


def claim_names(probe: LoadedProbe) -> list[str]:
    """The claims of a loaded probe, in file order (collection needs no model for this)."""
    return list(getattr(probe.spec, "claims", {}))


def instantiate(probe: LoadedProbe, subject: Subject) -> ProbeKind:
    """The probe's kind set up against the model: model-dependent checks raise located errors."""
    return KINDS[probe.spec.kind](probe, subject)


__all__ = ["GROUP", "KINDS", "KindRegistry", "Measured", "Outcome", "ProbeKind", "check_data_files",
           "claim_names", "instantiate", "judge", "load"]
