"""Errors raised by the report layer: one-line messages, meant to be shown without a traceback."""

from __future__ import annotations


class ReportError(Exception):
    """Base class of the report layer's errors."""


class ReportWriteError(ReportError):
    """A report file (or its directory) could not be written."""


class BaselineError(ReportError):
    """A baseline could not be loaded, saved or compared."""
