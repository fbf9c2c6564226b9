"""What the run's selection asked for that no file answered: baseline probes deleted from a folder the
run collected.

A deleted probe file is never collected, so the collected files alone would let a release gate pass by
deleting the probe of a failing claim. A baseline probe whose file is gone counts as asked for when the
run would have collected it (its folder, or a folder above it, is a path the run collected; not under
--ignore, --ignore-glob or norecursedirs) and -k / -m / --deselect would have kept its claims, judged on
what the baseline recorded of them (folders, file, claim name, kind, probe name, tags). Under --lf no
deleted file counts: it cannot have failed last time.
"""

from __future__ import annotations

import fnmatch
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


def _would_collect(config: pytest.Config, path: Path) -> bool:
    if path.exists():  # present but not collected: the run's own options left it out
        return False
    base = config.invocation_params.dir
    roots = [(base / str(arg).split("::")[0]).resolve() for arg in config.args]
    root = next((r for r in roots if r.is_dir() and path.is_relative_to(r)), None)
    if root is None:
        return False
    ignored = [(base / p).resolve() for p in config.getoption("ignore", None) or []]
    if any(path.is_relative_to(p) for p in ignored):
        return False
    if any(fnmatch.fnmatch(str(path), g) for g in config.getoption("ignore_glob", None) or []):
        return False
    norecurse = config.getini("norecursedirs")
    below = path.relative_to(root).parts[:-1]
    return not any(fnmatch.fnmatch(part, pat) for part in below for pat in norecurse)


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
