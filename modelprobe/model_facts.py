"""Facts about the model under test that the engine produces and the run record stores.

Pure data, no torch: `subject/` builds them and `report/` records them, so neither imports the other.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class _Fact(BaseModel):
    model_config = ConfigDict(extra="forbid")


# Relative error that rounding alone gives a machinery check (hooks, identities) in each dtype: below it a
# difference is the dtype's, not the model's or the hooks'.
DTYPE_TOLERANCE = {"float32": 1e-3, "bfloat16": 5e-2, "float16": 5e-2}


def dtype_tolerance(dtype: str) -> float:
    return DTYPE_TOLERANCE.get(dtype, DTYPE_TOLERANCE["bfloat16"])


class PreflightResult(_Fact):
    name: str
    passed: bool
    detail: str = ""
    value: float | None = None
    tolerance: float | None = None


class ModelInfo(_Fact):
    id: str  # what the user passed (alias, path or hub id)
    slug: str
    path: str = ""
    hash: str = ""  # hub commit sha, or content hash of the weights
    revision: str = ""  # the hub revision asked for (branch, tag or sha); "" for the default branch or no hub
    model_type: str = ""
    n_layers: int = 0
    dtype: str = ""  # "" in records made before the gate checked it: float32, the only dtype then
    device: str = ""  # "" likewise: cpu


def device_class(device: str) -> str:
    """cpu, cuda, mps ... without the index: cuda:0 and cuda:1 compute alike, cpu and cuda do not."""
    return (device or "cpu").split(":")[0]
