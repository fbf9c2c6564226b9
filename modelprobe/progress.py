"""Progress to stderr: a bar on a terminal; in CI logs (stderr not a terminal) one plain line per stage at
most every LOG_EVERY seconds (probe, stage, done/total, elapsed); nothing under -q."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
_enabled = True
_probe = ""  # the probe being measured, named in log lines
LOG_EVERY = 30.0  # seconds between log lines when stderr is not a terminal
_last_line: list[float] = []  # when the last log line was written (shared by all stages: no bursts)
_writer: Callable[[str], None] | None = None


def set_enabled(on: bool) -> None:
    global _enabled
    _enabled = on


def set_probe(name: str) -> None:
    """Name the probe that log lines belong to ('' between probes)."""
    global _probe
    _probe = name


def set_writer(writer: Callable[[str], None] | None) -> None:
    """Where log lines go (the pytest plugin passes one that writes past output capture); None: stderr
    when it is not a terminal."""
    global _writer
    _writer = writer


def _active(flag: bool) -> bool:
    return flag and _enabled and sys.stderr.isatty()


def _logging(flag: bool) -> bool:
    return flag and _enabled and not sys.stderr.isatty()


def _log(desc: str, done: int, total: int | None, start: float) -> None:
    """A line when LOG_EVERY seconds passed since the last one (or since the first stage began), so a run
    of short stages is not silent and a long one does not flood the log."""
    now = time.perf_counter()
    if not _last_line:
        _last_line.append(start)
    if now - _last_line[0] < LOG_EVERY:
        return
    _last_line[0] = now
    where = f"{_probe}: " if _probe else ""
    of = f"/{total}" if total is not None else ""
    line = f"modelprobe: {where}{desc} {done}{of}, {now - start:.0f}s in this stage"
    if _writer is not None:
        _writer(line)
    else:
        print(line, file=sys.stderr, flush=True)


def bar(items: Iterable[T], desc: str, total: int | None = None, enabled: bool = True) -> Iterator[T]:
    if _logging(enabled):
        start = time.perf_counter()
        done = 0
        for item in items:
            yield item
            done += 1
            _log(desc, done, total, start)
        return
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


def line(text: str, enabled: bool = True) -> None:
    """One plain progress line (a file being downloaded): through the plugin's writer (which writes past pytest's
    capture, in CI logs only), else to stderr; nothing under -q."""
    if not (enabled and _enabled):
        return
    if _writer is not None:
        _writer(text)
    else:
        print(text, file=sys.stderr, flush=True)


_uncaptured: Callable[[], contextlib.AbstractContextManager[None]] | None = None


def set_uncaptured(factory: Callable[[], contextlib.AbstractContextManager[None]] | None) -> None:
    """How to get past the test runner's output capture (the plugin passes pytest's); None: nothing to pass."""
    global _uncaptured
    _uncaptured = factory


def uncaptured() -> contextlib.AbstractContextManager[None]:
    """A context in which stderr reaches the terminal: a download's progress bars are drawn inside a test item,
    whose output pytest captures."""
    return _uncaptured() if _uncaptured is not None else contextlib.nullcontext()
