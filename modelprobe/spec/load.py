"""Read a probe file: YAML with positions → the kind's pydantic spec, errors as `file:line:col: loc: msg`."""

from __future__ import annotations

import difflib
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from ..errors import DataError, SpecError
from .fields import ProbeBase
from .yaml_loader import MAX_PROBE_BYTES, Positions, load_yaml, position_of, read_text_file

PROBE_SUFFIX = ".probe.yaml"
MAX_DATA_BYTES = 64 << 20  # a JSONL prompt set; larger is a mistake or an attack, not a probe

# Data files may live only inside the probe file's folder or one of these roots (the rootdir, the working
# directory of `modelprobe validate`, and --probe-data-root): a probe file can never read /etc/passwd.
_data_roots: list[Path] = []


def set_data_roots(roots: list[Path]) -> None:
    """Where data files may live besides the probe's own folder (the plugin passes the rootdir)."""
    _data_roots[:] = [Path(os.path.abspath(r)) for r in roots]


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


@dataclass
class LoadedProbe:
    path: Path
    spec: ProbeBase
    positions: Positions
    file_hash: str
    data: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # relative path -> rows

    @property
    def name(self) -> str:
        return probe_name(self.path)

    def data_path(self, rel: str, loc: tuple) -> Path:
        """The data file named `rel` at `loc` (relative to the probe file): it must exist and lie inside the
        probe's folder or an allowed root; a located SpecError otherwise.

        "Outside" is decided first, from the text alone, so that a probe file cannot learn whether a path
        outside exists; a link inside that leads outside is outside too."""
        path, roots = self.allowed_path(rel, loc)
        if not path.exists():
            raise self.error(f"data file '{self.path.parent / rel}' not found", loc)
        real = Path(os.path.realpath(path))
        if not any(_inside(real, Path(os.path.realpath(root))) for root in roots):
            raise self._outside(rel, loc, roots)
        return path

    def allowed_path(self, rel: str, loc: tuple) -> tuple[Path, list[Path]]:
        """(the path, the allowed roots); a located SpecError when the text of `rel` leads outside them.
        Touches no file."""
        folder = Path(os.path.abspath(self.path.parent))
        path = Path(os.path.normpath(folder / rel))
        roots = [folder, *(_data_roots or [Path(os.path.abspath(os.curdir))])]
        if not any(_inside(path, root) for root in roots):
            raise self._outside(rel, loc, roots)
        return path, roots

    def _outside(self, rel: str, loc: tuple, roots: list[Path]) -> SpecError:
        return self.error(f"data file '{rel}' is outside the probe's folder and the rootdir "
                          f"({', '.join(str(r) for r in roots)}); --probe-data-root allows another folder", loc)

    def error(self, message: str, loc: tuple = (), key: bool = False) -> SpecError:
        """A SpecError at `loc` of this file."""
        line, col = position_of(loc, self.positions, key)
        return SpecError(message, loc, str(self.path), line, col)

    def locate(self, err: SpecError) -> SpecError:
        line, col = position_of(err.loc, self.positions)
        return err.located(str(self.path), line, col)

    def rows(self, rel: str, loc: tuple, required: tuple[str, ...] = ("prompt",)) -> list[dict[str, Any]]:
        """Rows of a JSONL data file named in the probe (relative to the probe file), read once."""
        if rel not in self.data:
            self.data[rel] = read_jsonl(rel, required, self, loc)
        rows = self.data[rel]
        for i, row in enumerate(rows):
            missing = [f for f in required if f not in row]
            if missing:
                raise DataError(f"{self.path.parent / rel}:{i + 1}: missing field '{missing[0]}'")
        return rows


def read_jsonl(rel: str, required: tuple[str, ...], probe: LoadedProbe, loc: tuple) -> list[dict[str, Any]]:
    """Rows of a data file named at `loc` of a probe: a missing file is an error at that YAML field."""
    path = probe.data_path(rel, loc)
    rows = parse_jsonl(path, required, shown=probe.path.parent / rel)
    if not rows:
        raise probe.error(f"data file '{probe.path.parent / rel}' holds no rows", loc)
    return rows


def parse_jsonl(path: Path, required: tuple[str, ...] = (), shown: Path | None = None) -> list[dict[str, Any]]:
    """One JSON object per line; problems are DataErrors located as `file:line[:col]`."""
    shown = shown or path

    def error(message: str, line: int | None, col: int | None) -> DataError:
        where = f"{shown}:{line}:{col}" if line and col else f"{shown}:{line}" if line else f"{shown}"
        return DataError(f"{where}: {message}")

    if not path.exists():
        raise DataError(f"{shown}: file not found")
    text = read_text_file(path, MAX_DATA_BYTES, error)
    path = shown
    rows = []
    lines = text.splitlines()
    while lines and not lines[-1].strip():
        lines.pop()  # trailing blank lines are harmless
    for i, line in enumerate(lines):
        if not line.strip():
            # Row k is line k + 1 in every later message: a blank line inside would shift them all.
            raise DataError(f"{path}:{i + 1}: blank line (one JSON object per line, no gaps)")
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{i + 1}:{e.colno}: not valid JSON: {e.msg}") from None
        except RecursionError:
            raise DataError(f"{path}:{i + 1}: JSON nested too deeply") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{i + 1}: each line must be a JSON object")
        missing = [f for f in required if f not in row]
        if missing:
            raise DataError(f"{path}:{i + 1}: missing field '{missing[0]}'")
        rows.append(row)
    return rows


def _field_names(model: type[BaseModel], seen: set | None = None) -> set[str]:
    seen = seen if seen is not None else set()
    if model in seen:
        return set()
    seen.add(model)
    names = set()
    for name, f in model.model_fields.items():
        names.add(f.alias or name)
        for arg in _types_in(f.annotation):
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                names |= _field_names(arg, seen)
    return names


def _types_in(annotation: Any) -> list[Any]:
    args = getattr(annotation, "__args__", None)
    if not args:
        return [annotation]
    out = []
    for a in args:
        out.extend(_types_in(a))
    return out


def _message(err: dict[str, Any], spec_cls: type[BaseModel]) -> str:
    if err["type"] == "extra_forbidden":
        key = str(err["loc"][-1])
        close = difflib.get_close_matches(key, sorted(_field_names(spec_cls)), n=1)
        return f"unknown key '{key}'" + (f" (did you mean '{close[0]}'?)" if close else "")
    if err["type"] == "missing":
        return "required field is missing"
    msg = err["msg"]
    return msg[len("Value error, "):] if msg.startswith("Value error, ") else msg


def _clean_loc(loc: tuple) -> tuple:
    # pydantic puts union member names into loc (e.g. 'int', 'list[int]'); they are not keys of the file.
    out = []
    for part in loc:
        if isinstance(part, str) and ("[" in part or part in {"int", "float", "str", "bool", "dict"}
                                       or part.startswith("function-")):
            continue
        out.append(part)
    return tuple(out)


def validate(data: Any, spec_cls: type[BaseModel], path: Path, positions: Positions) -> BaseModel:
    try:
        return spec_cls.model_validate(data)
    except ValidationError as e:
        errs = e.errors(include_url=False)
        lines = []
        for err in errs:
            loc = _clean_loc(err["loc"])
            line, col = position_of(loc, positions, key=err["type"] == "extra_forbidden")
            lines.append(str(SpecError(_message(err, spec_cls), loc, str(path), line, col)))
        first = errs[0]
        floc = _clean_loc(first["loc"])
        line, col = position_of(floc, positions, key=first["type"] == "extra_forbidden")
        raise SpecError(_message(first, spec_cls), floc, str(path), line, col, rendered="\n".join(lines)) from None


def probe_name(path: Path) -> str:
    """The display name: the file name without .probe.yaml."""
    return path.name[: -len(PROBE_SUFFIX)] if path.name.endswith(PROBE_SUFFIX) else path.stem


def load_probe(path: Path, kinds: Mapping[str, type[ProbeBase]]) -> LoadedProbe:
    """Load and validate one probe file (no model needed). Raises SpecError / DataError."""
    path = Path(path)
    if not probe_name(path):
        raise SpecError(f"the file name gives an empty probe name: name it NAME{PROBE_SUFFIX}", ("<file>",),
                        str(path))
    data, positions = load_yaml(path)
    digest = hashlib.sha256(data_bytes(path)).hexdigest()[:16]
    if not isinstance(data, dict):
        raise SpecError("a probe file is a mapping with 'kind', 'claims', ...", (), str(path), 1, 1)
    kind = data.get("kind")
    if kind is None:
        raise SpecError(f"required field is missing (one of: {', '.join(sorted(kinds))})", ("kind",),
                        str(path), 1, 1)
    if kind not in kinds:
        line, col = position_of(("kind",), positions)
        raise SpecError(f"unknown kind '{kind}' (known: {', '.join(sorted(kinds))})", ("kind",),
                        str(path), line, col)
    try:
        spec = validate(data, kinds[kind], path, positions)
    except RecursionError:
        raise SpecError("nested too deeply", (), str(path), 1, 1) from None
    return LoadedProbe(path, spec, positions, digest)  # type: ignore[arg-type]


def data_bytes(path: Path) -> bytes:
    """The bytes of a file already read and checked by load_yaml (regular, under the size limit)."""
    with open(path, "rb") as f:
        return f.read(MAX_PROBE_BYTES + 1)
