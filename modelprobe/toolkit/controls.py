"""Controls a claim's effect is held against, and the one rule for "beats its control".

- random directions or vectors of the same norm (direction ablation / addition, injected concepts);
- random circuits of the same size and kinds, in the same layers where possible;
- a random source (patch a state taken from another prompt);
- shuffled labels (relabel a pooled set, for "the labels matter").

Convention: a one-sided p-value (empirical, or paired permutation over prompts) in the direction the
claim expects; the effect beats its control when p <= ALPHA.

Sequential controls: null samples cost forwards, so kinds draw them a few at a time (`draw_sequentially`)
and stop as soon as no completion of the planned draws can change whether the control is beaten
(`null_settled` for an empirical null, `paired_settled` for a paired control over the draws' mean;
`control_decides`: false when the claim's interval does not clear its threshold, so that no control can
change the verdict). Every rule is exact: the verdict equals the full count's. The number drawn of the
number planned is reported (`sequential_detail`); a probe can ask for the full count.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .._lazy import torch
from ..stats import decide, empirical_pvalue, paired_permutation_pvalue

ALPHA = 0.05
# Null draws an empirical p-value needs to reach ALPHA at all: with n draws it is at least 1 / (n + 1).
MIN_EMPIRICAL_NULL = 19
# Pairs a one-sided sign-flip test needs to reach ALPHA at all: over n pairs its p-value is at least 2**-n.
MIN_PAIRED = 5


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


def paired_settled(mine: np.ndarray, drawn: np.ndarray, planned: int, extremes: tuple[np.ndarray, np.ndarray],
                   comparison: str, seed: int) -> bool:
    """Whether drawing more control seeds could change `beats_control` of a paired control whose per-prompt
    control effect is the mean over `planned` seeds.

    `drawn` [k, n] holds the drawn seeds' per-prompt effects, `extremes` (lo, hi) [n] the range one undrawn
    seed's effect can take per prompt. The undrawn seeds are set to the range's ends that favour and that
    oppose the claim: the sign-flip permutation p-value is monotone in each prompt's difference (the same
    resamples, seeded), so when both give the same side of ALPHA, every completion does, and the verdict
    equals the full count's. Returns True when settled (always once k == planned).
    """
    k = len(drawn)
    if k >= planned:
        return True
    lo, hi = extremes
    total = np.sum(drawn, axis=0)
    big, small = (total + (planned - k) * hi) / planned, (total + (planned - k) * lo) / planned
    adverse, favourable = (big, small) if comparison == "at_least" else (small, big)
    if beats_control(paired_control(mine, adverse, comparison, seed)):
        return True
    return not beats_control(paired_control(mine, favourable, comparison, seed))


def control_decides(ci: tuple[float, float] | None, threshold: float, comparison: str) -> bool:
    """Whether beating the control can change the verdict: only when the interval clears the threshold
    (an interval that misses it fails, one that straddles it is inconclusive, control or not)."""
    return decide(ci, threshold, comparison, True)[0] != decide(ci, threshold, comparison, False)[0]  # type: ignore[arg-type]


def hit_limit(planned: int) -> int:
    """The most null draws at least as extreme as the observation with which the full count of `planned`
    draws still beats ALPHA ((1 + hits) / (1 + planned) <= ALPHA); -1 when no count can."""
    h = int(ALPHA * (1 + planned)) - 1
    while beats_control((2 + h) / (1 + planned)):  # float rounding either way: the p-value itself decides
        h += 1
    while h >= 0 and not beats_control((1 + h) / (1 + planned)):
        h -= 1
    return h


def null_settled(observed: float, null: np.ndarray, planned: int, alternative: str) -> bool:
    """Whether an empirical control's answer (p <= ALPHA over all `planned` draws) is settled by the draws
    so far, exactly: the null draws at least as extreme as `observed` (ties count against the claim, as in
    the p-value) already exceed `hit_limit` (no completion can beat ALPHA), or would not reach it even if
    every undrawn one were extreme. Besag-Clifford's sequential p-value stops on the first condition only.

    The p-value of the drawn ones, (1 + hits) / (1 + drawn), is then on the full count's side of ALPHA:
    above it when hits > limit (drawn <= planned), at most ALPHA when hits + undrawn <= limit.
    """
    k = len(null)
    if k >= planned:
        return True
    null = np.asarray(null, dtype=float)
    hits = int((null >= observed).sum() if alternative == "greater" else (null <= observed).sum())
    limit = hit_limit(planned)
    return hits > limit or hits + (planned - k) <= limit


def draw_sequentially(draw: Callable[[int, int], np.ndarray], planned: int, step: int,
                      settled: Callable[[np.ndarray], bool] | None) -> np.ndarray:
    """Null draws [start, stop) of the `planned` ones, `step` at a time, until `settled(all drawn so far)`;
    every planned draw at once when `settled` is None. `draw` returns [stop - start, ...]."""
    if planned <= 0:
        return np.zeros((0,))
    if settled is None:
        return np.asarray(draw(0, planned))
    parts: list[np.ndarray] = []
    done = 0
    while done < planned:
        stop = min(planned, done + max(1, step))
        parts.append(np.asarray(draw(done, stop)))
        done = stop
        if settled(np.concatenate(parts)):
            break
    return np.concatenate(parts)


def sequential_detail(drawn: int, planned: int, sequential: bool, decides: bool = True,
                      what: str = "draws") -> dict[str, Any]:
    """The report's account of a sequential null: how many were drawn of how many planned, and why."""
    if not sequential:
        why = f"off: every planned {what} drawn"
    elif drawn >= planned:
        why = f"every planned {what} drawn"
    elif not decides:
        why = (f"stopped after {drawn} of {planned} {what}: the claim's interval does not clear its threshold, "
               "so no control can change the verdict")
    else:
        why = (f"stopped after {drawn} of {planned} {what}: whatever the undrawn ones give, the full count's "
               f"answer (p <= {ALPHA}) is the same")
    return {"drawn": int(drawn), "planned": int(planned), "sequential": why}


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
    """n random unit sets of the circuit's size and kinds, drawn from the units OUTSIDE the circuit, in the
    circuit's layers where that leaves enough of them. Returns (configs [n, units], layer_matched).

    Disjoint, because a random set that shares a unit with the circuit partly ablates (or keeps) the very
    mechanism under test: in a small model most "random" circuits would then hold a needed head, and a
    true circuit would fail its control for being true. Drawn with replacement (the published gate is
    "beyond the 95th percentile of >= 100 random circuits"), so a small pool is sampled, not enumerated.
    """
    rng = np.random.default_rng(seed)
    inside = scope.vector(circuit)

    def pools(match_layer: bool) -> list[tuple[np.ndarray, int]]:
        need: dict[tuple, int] = defaultdict(int)
        for u in circuit:
            need[(u.layer if match_layer else None, u.kind)] += 1
        out = []
        for (layer, kind), count in need.items():
            idx = np.array([i for i, u in enumerate(scope.units)
                            if u.kind == kind and (layer is None or u.layer == layer) and not inside[i]])
            out.append((idx, count))
        return out

    matched = True
    groups = pools(True)
    if any(len(idx) < count for idx, count in groups):  # too few other units in these layers
        matched = False
        groups = pools(False)
        if any(len(idx) < count for idx, count in groups):
            return np.zeros((0, len(scope)), dtype=bool), matched
    out = np.zeros((n, len(scope)), dtype=bool)
    for r in range(n):
        for idx, count in groups:
            out[r, rng.choice(idx, size=count, replace=False)] = True
    return out, matched
