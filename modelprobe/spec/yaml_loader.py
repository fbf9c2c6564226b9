"""YAML with positions: every key and value keeps its line and column for error messages."""

from __future__ import annotations

import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import MarkedYAMLError, YAMLError

from ..errors import SpecError

Positions = dict[tuple, tuple[int, int]]  # loc -> (line, col), 1-based


def _plain(node: Any, loc: tuple, pos: Positions) -> Any:
    if isinstance(node, CommentedMap):
        out = {}
        for k, v in node.items():
            try:
                kl, kc = node.lc.key(k)
                pos[(*loc, str(k), "__key__")] = (kl + 1, kc + 1)
                vl, vc = node.lc.value(k)
                pos[(*loc, str(k))] = (vl + 1, vc + 1)
            except (KeyError, TypeError, AttributeError):
                pass
            out[str(k) if not isinstance(k, int | float | bool) else k] = _plain(v, (*loc, str(k)), pos)
        return out
    if isinstance(node, CommentedSeq):
        items = []
        for i, v in enumerate(node):
            try:
                line, col = node.lc.item(i)
                pos[(*loc, i)] = (line + 1, col + 1)
            except (KeyError, TypeError, AttributeError):
                pass
            items.append(_plain(v, (*loc, i), pos))
        return items
    if isinstance(node, str):
        return str(node)
    return node


MAX_PROBE_BYTES = 1 << 20  # a probe file is a page of YAML; its data live in JSONL files


def read_text_file(path: Path, limit: int, error: Callable[[str, int | None, int | None], Exception]) -> str:
    """A regular file's UTF-8 text, or `error(message, line, col)`: FIFOs, devices, directories, files over
    `limit` bytes, binary and non-UTF-8 files are refused by name, before anything is read from them."""
    try:
        st = path.stat()
    except OSError as e:  # a symlink loop or a dangling link lands here
        raise error(f"cannot read file: {e.strerror or type(e).__name__}", None, None) from None
    if not stat.S_ISREG(st.st_mode):
        what = "a FIFO" if stat.S_ISFIFO(st.st_mode) else "a directory" if stat.S_ISDIR(st.st_mode) else "special"
        raise error(f"not a regular file ({what}): refused", None, None)
    if st.st_size > limit:
        raise error(f"file is {st.st_size} bytes, over the limit of {limit}", None, None)
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise error(f"cannot read file: {e.strerror or type(e).__name__}", None, None) from None
    if len(data) > limit:
        raise error(f"file is over the limit of {limit} bytes", None, None)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        col = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise error(f"not UTF-8 text (byte 0x{data[e.start]:02x})", line, col) from None
    if "\x00" in text:
        line = text.count("\n", 0, text.index("\x00")) + 1
        raise error("a binary file, not text (NUL byte)", line, None)
    return text


def _refuse_aliases(yaml: YAML, text: str, path: Path) -> None:
    """Anchors and aliases are refused before anything is built: an alias bomb expands exponentially."""
    from ruamel.yaml.events import AliasEvent

    for event in yaml.parse(text):
        anchor = getattr(event, "anchor", None)
        if isinstance(event, AliasEvent) or anchor:
            mark = event.start_mark
            raise SpecError(f"YAML anchors and aliases (&{anchor or '...'} / *{anchor or '...'}) are not "
                            "allowed in probe files: write the value out", ("<yaml>",), str(path),
                            mark.line + 1, mark.column + 1)


def load_yaml(path: Path) -> tuple[Any, Positions]:
    def error(message: str, line: int | None, col: int | None) -> SpecError:
        return SpecError(message, ("<file>",), str(path), line, col)

    text = read_text_file(path, MAX_PROBE_BYTES, error)
    yaml = YAML(typ="rt")
    try:
        _refuse_aliases(yaml, text, path)
        doc = yaml.load(text)
    except MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else None
        col = mark.column + 1 if mark else None
        raise SpecError(f"invalid YAML: {e.problem or e.context}", ("<yaml>",), str(path), line, col) from None
    except YAMLError as e:  # reader errors (control characters) carry no mark
        raise SpecError(f"invalid YAML: {str(e).strip().splitlines()[0]}", ("<yaml>",), str(path), 1, 1) from None
    except RecursionError:
        raise SpecError("YAML nested too deeply", ("<yaml>",), str(path), 1, 1) from None
    positions: Positions = {}
    try:
        data = _plain(doc, (), positions)
    except RecursionError:
        raise SpecError("YAML nested too deeply", ("<yaml>",), str(path), 1, 1) from None
    if data is None:
        data = {}
    return data, positions


def position_of(loc: tuple, positions: Positions, key: bool = False) -> tuple[int | None, int | None]:
    """The line and column of the deepest part of `loc` the file has (a missing key: its parent)."""
    loc = tuple(loc)
    if key and (*loc, "__key__") in positions:
        return positions[(*loc, "__key__")]
    for end in range(len(loc), 0, -1):
        if loc[:end] in positions:
            return positions[loc[:end]]
    return (1, 1)
