"""YAML with positions: every key and value keeps its line and column for error messages."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import MarkedYAMLError

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


def load_yaml(path: Path) -> tuple[Any, Positions]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise SpecError(f"cannot read file: {e.strerror}", file=str(path)) from None
    yaml = YAML(typ="rt")
    try:
        doc = yaml.load(text)
    except MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else None
        col = mark.column + 1 if mark else None
        raise SpecError(f"invalid YAML: {e.problem or e.context}", ("<yaml>",), str(path), line, col) from None
    positions: Positions = {}
    data = _plain(doc, (), positions)
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
