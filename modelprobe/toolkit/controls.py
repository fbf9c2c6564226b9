"""Controls a claim's effect is held against, and the one rule for "beats its control".

- random directions or vectors of the same norm (direction ablation / addition, injected concepts);
- random circuits of the same size and kinds, in the same layers where possible;
- a random source (patch a state taken from another prompt);
- shuffled labels (relabel a pooled set, for "the labels matter").

Convention: a one-sided p-value (empirical, or paired permutation over prompts) in the direction the
claim expects; the effect beats its control when p <= ALPHA.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np

from .._lazy import torch
from ..stats import empirical_pvalue, paired_permutation_pvalue

ALPHA = 0.05


def beats_control(p: float) -> bool:
    """The one comparison of a control's p-value with ALPHA, for every kind."""
    return bool(p <= ALPHA)  # a numpy bool is never `is False`: decide() would read a miss as no control


def alternative_for(comparison: str) -> str:
    """The one-sided alternative a threshold implies: at_least → greater, at_most → less."""
    return "greater" if comparison == "at_least" else "less"


def empirical_control(observed: float, null: np.ndarray, comparison: str) -> float:
    """p-value of an observed effect against a null sample (random circuits, random sources...)."""
    return empirical_pvalue(observed, null, alternative_for(comparison))  # type: ignore[arg-type]


def paired_control(mine: np.ndarray, theirs: np.ndarray, comparison: str, seed: int) -> float:
    """p-value of per-prompt effects against the same prompts' effects under the control."""
    return paired_permutation_pvalue(mine, theirs, alternative=alternative_for(comparison), seed=seed)


def random_unit_directions(n: int, d: int, seed: int) -> torch.Tensor:
    """[n, d] float32 unit vectors, Gaussian then normalised in float64; fixed by `seed`."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(n, d, generator=g, dtype=torch.float64)
    return (v / v.norm(dim=-1, keepdim=True)).float()


def same_norm_vectors(n: int, like: torch.Tensor, seed: int) -> torch.Tensor:
    """[n, d] random vectors with the norm of `like` (a random-vector control for an added vector)."""
    return random_unit_directions(n, like.shape[-1], seed) * float(like.norm())


def random_source(n: int, seed: int) -> np.ndarray:
    """For each of n prompts, another prompt to take a state from (never itself; n >= 2)."""
    if n < 2:
        raise ValueError("a random-source control needs at least two prompts")
    rng = np.random.default_rng(seed)
    shift = rng.integers(1, n, size=n)
    return (np.arange(n) + shift) % n


def shuffled_labels(labels: Sequence[Any], seed: int) -> list[Any]:
    """The same labels in a seeded random order (a relabelled control set)."""
    order = np.random.default_rng(seed).permutation(len(labels))
    return [labels[i] for i in order]


def random_circuits(circuit: Sequence[Any], scope: Any, n: int, seed: int) -> tuple[np.ndarray, bool]:
    """n random unit sets of the circuit's size and kinds, in the circuit's layers where that leaves any
    choice; never the circuit itself. Returns (configs [n, units], layer_matched)."""
    rng = np.random.default_rng(seed)
    circ = scope.vector(circuit)

    def pools(match_layer: bool) -> list[tuple[np.ndarray, int]]:
        need: dict[tuple, int] = defaultdict(int)
        for u in circuit:
            need[(u.layer if match_layer else None, u.kind)] += 1
        out = []
        for (layer, kind), count in need.items():
            idx = np.array([i for i, u in enumerate(scope.units)
                            if u.kind == kind and (layer is None or u.layer == layer)])
            out.append((idx, count))
        return out

    matched = True
    groups = pools(True)
    if all(len(idx) == count for idx, count in groups):  # no other circuit in these layers
        matched = False
        groups = pools(False)
        if all(len(idx) == count for idx, count in groups):
            return np.zeros((0, len(scope)), dtype=bool), matched
    out = np.zeros((n, len(scope)), dtype=bool)
    for r in range(n):
        while True:
            v = np.zeros(len(scope), dtype=bool)
            for idx, count in groups:
                v[rng.choice(idx, size=count, replace=False)] = True
            if not np.array_equal(v, circ):
                break
        out[r] = v
    return out, matched
