"""A module stand-in that imports the real module on first attribute access.

Spec classes live next to their kind's code, and `modelprobe schema` / `validate` must load every spec
without importing torch (seconds of start-up, and absent from a docs or CI-lint environment). Kind and
toolkit modules therefore write `from .._lazy import torch`: `torch.tensor(...)` works as usual, and the
import happens when a measurement first runs.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any


class LazyModule:
    def __init__(self, name: str):
        self._name = name

    def _module(self) -> ModuleType:
        return importlib.import_module(self._name)

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._module(), attr)

    def __repr__(self) -> str:
        return f"<lazy module {self._name!r}>"


torch: Any = LazyModule("torch")
