"""Writing report files: create the directory, write atomically, turn OS errors into one-line errors."""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from .errors import ReportWriteError


def _reason(e: OSError) -> str:
    return e.strerror or e.__class__.__name__


def ensure_dir(directory: str | os.PathLike[str], error: type[Exception] = ReportWriteError) -> Path:
    d = Path(directory)
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise error(f"cannot create report directory {d}: {_reason(e)}") from None
    if not d.is_dir():
        raise error(f"cannot create report directory {d}: not a directory")
    return d


def write_text(
    directory: str | os.PathLike[str],
    filename: str,
    text: str,
    error: type[Exception] = ReportWriteError,
) -> Path:
    """Write `text` to `directory/filename` atomically (a reader never sees half a file)."""
    d = ensure_dir(directory, error)
    path = d / filename
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{filename}.", suffix=".tmp", dir=d)
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; reports are meant to be read (CI artifacts)
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        raise error(f"cannot write {filename} to {d}: {_reason(e)}") from None
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
    return path


LOCK_NAME = ".modelprobe.lock"


@contextlib.contextmanager
def report_lock(directory: str | os.PathLike[str], timeout_s: float = 300.0,
                error: type[Exception] = ReportWriteError) -> Iterator[Path]:
    """Hold the report folder's lock file while a run writes its reports, so that two runs writing one folder
    never mix report.json from one with report.html from the other (each file is also replaced atomically)."""
    d = ensure_dir(directory, error)
    try:
        import fcntl
    except ImportError:  # no flock (Windows): atomic replaces still keep each file whole
        yield d
        return
    try:
        fd = os.open(d / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise error(f"cannot create the lock file in {d}: {_reason(e)}") from None
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise error(f"{d} is locked by another run for over {timeout_s:.0f} s") from None
                time.sleep(0.05)
        yield d
    finally:
        os.close(fd)  # closing releases the lock


class WriteStopped(BaseException):
    """SIGINT / SIGTERM arrived while reports were being rendered. A BaseException, like KeyboardInterrupt, so that
    no `except Exception` in the drawing code swallows it."""


class SignalGuard:
    """While reports are written, Ctrl-C and SIGTERM (what CI sends on a timeout, often seconds before SIGKILL)
    stop the rendering at once but never a file write: inside `shielded()` a signal is only noted, and the write
    completes. Only the main thread can take signals; elsewhere the guard does nothing."""

    SIGNALS = ("SIGINT", "SIGTERM")

    def __init__(self) -> None:
        self.signum: int | None = None
        self._shield = 0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> SignalGuard:
        import signal
        import threading
        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                num = getattr(signal, name, None)
                if num is not None:
                    self._previous[num] = signal.signal(num, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        import signal
        for num, handler in self._previous.items():
            signal.signal(num, handler)  # type: ignore[arg-type]

    def _handle(self, signum: int, frame: object) -> None:
        first = self.signum is None
        self.signum = self.signum or signum
        if first and not self._shield:
            raise WriteStopped(signum)

    @contextlib.contextmanager
    def shielded(self) -> Iterator[None]:
        self._shield += 1
        try:
            yield
        finally:
            self._shield -= 1

    def check(self) -> None:
        """Stop now if a signal was noted during a shielded write."""
        if self.signum is not None and not self._shield:
            raise WriteStopped(self.signum)
