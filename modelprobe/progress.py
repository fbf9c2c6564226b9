"""Progress to stderr, quiet when not a terminal or under -q."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
_enabled = True


def set_enabled(on: bool) -> None:
    global _enabled
    _enabled = on


def _active(flag: bool) -> bool:
    return flag and _enabled and sys.stderr.isatty()


def bar(items: Iterable[T], desc: str, total: int | None = None, enabled: bool = True) -> Iterator[T]:
    if not _active(enabled):
        yield from items
        return
    from tqdm import tqdm
    yield from tqdm(items, desc=desc, total=total, leave=False, file=sys.stderr)


@contextlib.contextmanager
def status(message: str, enabled: bool = True) -> Iterator[None]:
    start = time.perf_counter()
    if _active(enabled):
        print(f"modelprobe: {message} ...", file=sys.stderr, flush=True)
    yield
    if _active(enabled):
        print(f"modelprobe: done in {time.perf_counter() - start:.1f}s", file=sys.stderr, flush=True)
