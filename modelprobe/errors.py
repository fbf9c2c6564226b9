"""Errors a user can cause. Each renders as one line; none should ever show a traceback."""

from __future__ import annotations


class ModelprobeError(Exception):
    """Base class: a mistake in a probe file, a data file, an option or a model choice."""


class SpecError(ModelprobeError):
    """A probe file problem, located at `loc` (a path of keys/indices inside the YAML document).

    The YAML loader turns `loc` into `file:line:col` when it renders the message.
    """

    def __init__(self, message: str, loc: tuple = (), file: str | None = None,
                 line: int | None = None, col: int | None = None, rendered: str | None = None):
        super().__init__(message)
        self.rendered = rendered  # several located lines, already formatted
        self.message = message
        self.loc = tuple(loc)
        self.file = file
        self.line = line
        self.col = col

    def located(self, file: str, line: int | None, col: int | None) -> SpecError:
        return SpecError(self.message, self.loc, file, line, col)

    def __str__(self) -> str:
        if self.rendered:
            return self.rendered
        where = ".".join(str(p) for p in self.loc) or "<probe>"
        if self.file is None:
            return f"{where}: {self.message}"
        pos = self.file
        if self.line is not None:
            pos += f":{self.line}:{self.col or 1}"
        if self.loc == ("<file>",):  # the file as a whole (not readable, not text): no key to name
            return f"{pos}: {self.message}"
        return f"{pos}: {where}: {self.message}"


class ModelLoadError(ModelprobeError):
    """--model names something that cannot be resolved or loaded."""


class SiteError(ModelprobeError):
    """A site the model does not have (unknown architecture, missing component, index out of range)."""

    def __init__(self, message: str, loc: tuple = ()):
        super().__init__(message)
        self.message = message
        self.loc = tuple(loc)


class DataError(ModelprobeError):
    """A data file problem, already located as `file:line: message`."""
