"""Errors raised by the report layer: one-line messages, meant to be shown without a traceback."""

from __future__ import annotations

from ..errors import ModelprobeError


class ReportError(ModelprobeError):
    """Base class of the report layer's errors (one line each, no traceback wanted)."""


class ReportWriteError(ReportError):
    """A report file (or its directory) could not be written."""


class BaselineError(ReportError):
    """A baseline could not be loaded, saved or compared."""


class ReportInterrupted(ReportError):
    """Ctrl-C or SIGTERM stopped the report writing; `paths` were written whole, marked interrupted."""

    def __init__(self, paths: list, message: str):
        super().__init__(message)
        self.paths = list(paths)
