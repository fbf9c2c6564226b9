"""Writing report files: create the directory, write atomically, turn OS errors into one-line errors."""

from __future__ import annotations

import os
import tempfile
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
