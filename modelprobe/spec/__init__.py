"""Probe-file field types and the YAML reader. Knows no kind: the kinds registry assembles the specs."""

from .claims import ClaimSpec
from .fields import (
    ClaimName,
    Count,
    DataFile,
    FiniteFloat,
    NonNegativeInt,
    OneExpectation,
    ProbeBase,
    ProbeSpec,
    Rate,
    RateChangeThreshold,
    RateThreshold,
    Rows,
    Seed,
    SiteSpec,
    SplitBase,
    Strict,
    Threshold,
    TokenPosition,
    TokenSpec,
    Tolerance,
)
from .load import PROBE_SUFFIX, LoadedProbe, load_probe

__all__ = ["PROBE_SUFFIX", "ClaimName", "ClaimSpec", "Count", "DataFile", "FiniteFloat", "LoadedProbe", "NonNegativeInt", "OneExpectation",
           "ProbeBase", "ProbeSpec", "Rate", "RateChangeThreshold", "RateThreshold", "Rows", "Seed", "SiteSpec", "SplitBase", "Strict", "Threshold",
           "TokenPosition", "TokenSpec", "Tolerance", "load_probe"]
