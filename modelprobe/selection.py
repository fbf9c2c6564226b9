"""What the run's selection asked for that no file answered: baseline probes deleted from a folder the
run collected, or hidden from it.

A deleted probe file is never collected, so the collected files alone would let a release gate pass by
deleting the probe of a failing claim. A baseline probe the run did not collect counts as asked for when the
run's options would have collected it (its folder, or a folder above it, is a path the run collected, seen
through links either way; not under --ignore, --ignore-glob or norecursedirs) and -k / -m / --deselect would
have kept its claims, judged on what the baseline recorded of them (folders, file, claim name, kind, probe
name, tags). Only the run's options can leave a probe out: a file that is gone, replaced by a folder, or
hidden by a conftest's `collect_ignore` is asked for all the same. Under --lf no uncollected file counts: it
cannot have failed last time.
"""

from __future__ import annotations

import fnmatch
import os
from pathlib import Path
from typing import Any

import pytest


def deleted_but_asked_for(config: pytest.Config, before: Any, collected: set[str]) -> tuple[list[str], list[str]]:
    """(files, deselected claims "file::claim") of the baseline `before` whose file is gone but that the run's
    paths and options would have collected."""
    if config.getoption("lf", False):
        return [], []
    files, deselected = [], []
    for probe in before.probes:
        if probe.file in collected or not _would_collect(config, config.rootpath / probe.file):
            continue
        files.append(probe.file)
        deselected += [f"{probe.file}::{c.name}" for c in probe.claims if not _kept(config, probe, c.name)]
    return files, deselected


def _forms(path: Path) -> list[Path]:
    """The path as written and with the links of its folders resolved (the file itself may be gone)."""
    written = Path(os.path.abspath(path))
    return [written, Path(os.path.realpath(written.parent)) / written.name]


def _under(path: Path, folder: Path) -> Path | None:
    """`path` relative to `folder` when it lies inside it in any of their forms, else None."""
    for p in _forms(path):
        for f in (Path(os.path.abspath(folder)), Path(os.path.realpath(folder))):
            if p.is_relative_to(f):
                return p.relative_to(f)
    return None


def _would_collect(config: pytest.Config, path: Path) -> bool:
    base = config.invocation_params.dir
    roots = [base / str(arg).split("::")[0] for arg in config.args]
    below = next((b for r in roots if r.is_dir() and (b := _under(path, r)) is not None), None)
    if below is None:
        return False
    if any(_under(path, base / p) is not None for p in config.getoption("ignore", None) or []):
        return False
    if any(fnmatch.fnmatch(str(p), g) for p in _forms(path) for g in config.getoption("ignore_glob", None) or []):
        return False
    norecurse = config.getini("norecursedirs")
    return not any(fnmatch.fnmatch(part, pat) for part in below.parts[:-1] for pat in norecurse)


def _kept(config: pytest.Config, probe: Any, claim: str) -> bool:
    """Whether -k, -m and --deselect would keep this claim (the names pytest matches -k against)."""
    from _pytest.mark.expression import Expression

    node = f"{probe.file}::{claim}"
    if any(node == d or node.startswith(d.rstrip("/") + "/") or probe.file == d
           for d in config.getoption("deselect", None) or []):
        return False
    tags = set(getattr(probe, "tags", []) or [])
    folders = Path(probe.file).parts[:-1]
    names = {*folders, Path(probe.file).name, claim, probe.kind, probe.name, *tags, "xdist_group"}
    keyword = (config.getoption("keyword", "") or "").strip()
    if keyword and not Expression.compile(keyword).evaluate(
            lambda sub, **kw: any(sub.lower() in n.lower() for n in names if n)):
        return False
    marks = (config.getoption("markexpr", "") or "").strip()
    if marks and not Expression.compile(marks).evaluate(lambda name, **kw: not kw and name in tags | {"xdist_group"}):
        return False
    return True
