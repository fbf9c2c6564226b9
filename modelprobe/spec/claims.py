"""What every claim of every kind has: one expectation and an optional baseline tolerance."""

from __future__ import annotations

from .fields import OneExpectation, Strict, Tolerance


class ClaimSpec(Strict):
    """Base of a kind's claim: `expect` (the kind narrows it to its own statistics) and `tolerance`.

    Claim names are the keys of the probe's `claims:` mapping, so their rule lives on that mapping.
    """

    expect: OneExpectation
    tolerance: Tolerance | None = None
