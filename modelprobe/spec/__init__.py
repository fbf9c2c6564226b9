"""Probe-file field types and the YAML reader. Knows no kind: the kinds registry assembles the specs."""

from .claims import ClaimSpec
from .fields import (
    ChatPrompts,
    ClaimName,
    Count,
    DataFile,
    FiniteFloat,
    IclFormat,
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

__all__ = ["PROBE_SUFFIX", "ChatPrompts", "ClaimName", "ClaimSpec", "Count", "DataFile", "FiniteFloat", "IclFormat", "LoadedProbe", "NonNegativeInt", "OneExpectation",
           "ProbeBase", "ProbeSpec", "Rate", "RateChangeThreshold", "RateThreshold", "Rows", "Seed", "SiteSpec", "SplitBase", "Strict", "Threshold",
           "TokenPosition", "TokenSpec", "Tolerance", "load_probe"]
