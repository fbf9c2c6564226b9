"""Checks that modelprobe.stats gives the right numbers: known values, coverage and calibration."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats as sps

from modelprobe.stats import (
    DEFAULT_RESAMPLES,
    DEFAULT_SEED,
    bootstrap_ci,
    decide,
    empirical_pvalue,
    paired_bootstrap,
    paired_difference,
    paired_permutation_pvalue,
    permutation_pvalue,
    wilson_interval,
)

Z95 = 1.959963984540054  # norm.ppf(0.975)


def wilson_by_hand(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half


def test_defaults() -> None:
    assert DEFAULT_SEED == 0
    assert DEFAULT_RESAMPLES == 2000


# --------------------------------------------------------------------------- Wilson


@pytest.mark.parametrize(
    ("k", "n", "expected"),
    [
        # 0/10: lower bound exactly 0, upper z^2 / (n + z^2).
        (0, 10, (0.0, Z95**2 / (10 + Z95**2))),
        (5, 10, (0.2365930905125640, 0.7634069094874360)),
        (10, 10, (10 / (10 + Z95**2), 1.0)),
        (3, 30, wilson_by_hand(3, 30)),
        (1, 1, (1 / (1 + Z95**2), 1.0)),
    ],
)
def test_wilson_known_values(k: int, n: int, expected: tuple[float, float]) -> None:
    lo, hi = wilson_interval(k, n)
    assert lo == pytest.approx(expected[0], abs=1e-12)
    assert hi == pytest.approx(expected[1], abs=1e-12)


def test_wilson_matches_scipy_and_other_confidence() -> None:
    for k, n in [(0, 7), (2, 7), (17, 40), (99, 100)]:
        for conf in (0.8, 0.95, 0.99):
            ref = sps.binomtest(k, n).proportion_ci(confidence_level=conf, method="wilson")
            lo, hi = wilson_interval(k, n, confidence=conf)
            assert lo == pytest.approx(ref.low, abs=1e-12)
            assert hi == pytest.approx(ref.high, abs=1e-12)


def test_wilson_edge_cases() -> None:
    assert wilson_interval(0, 0) == (0.0, 1.0)
    assert wilson_interval(np.int64(3), np.int64(4)) == wilson_interval(3, 4)
    for bad in [(-1, 5), (6, 5), (0, -1)]:
        with pytest.raises(ValueError):
            wilson_interval(*bad)
    with pytest.raises(ValueError):
        wilson_interval(1, 2, confidence=1.0)
    with pytest.raises(TypeError):
        wilson_interval(1.5, 2)  # type: ignore[arg-type]


@pytest.mark.parametrize("p", [0.05, 0.3, 0.5])
@pytest.mark.parametrize("n", [30, 100])
def test_wilson_coverage_simulation(p: float, n: int) -> None:
    # The interval depends only on k, so compute it once per k and look the draws up.
    table = np.array([wilson_interval(k, n) for k in range(n + 1)])
    covers = (table[:, 0] <= p) & (p <= table[:, 1])
    draws = np.random.default_rng(12345).binomial(n, p, size=4000)
    coverage = covers[draws].mean()
    assert 0.92 <= coverage <= 0.98, coverage
    # And the exact coverage (sum of the binomial pmf over covering k) is in the same band.
    exact = sps.binom.pmf(np.arange(n + 1), n, p)[covers].sum()
    assert 0.92 <= exact <= 0.98, exact


@settings(max_examples=200, deadline=None)
@given(
    n=st.integers(min_value=1, max_value=5000),
    frac=st.floats(min_value=0, max_value=1),
    conf=st.floats(min_value=0.5, max_value=0.999),
)
def test_wilson_properties(n: int, frac: float, conf: float) -> None:
    k = round(frac * n)
    lo, hi = wilson_interval(k, n, conf)
    assert 0.0 <= lo <= k / n <= hi <= 1.0
    # A higher confidence gives a wider interval that contains the narrower one.
    lo2, hi2 = wilson_interval(k, n, min(conf + 0.0005, 0.9999))
    assert lo2 <= lo + 1e-12 and hi <= hi2 + 1e-12
    # Symmetry: failures and successes swap roles.
    flo, fhi = wilson_interval(n - k, n, conf)
    assert flo == pytest.approx(1 - hi, abs=1e-9) and fhi == pytest.approx(1 - lo, abs=1e-9)


# --------------------------------------------------------------------------- bootstrap


def test_bootstrap_ci_coverage_normal_mean() -> None:
    rng = np.random.default_rng(2024)
    hits = 0
    reps = 200
    for i in range(reps):
        x = rng.normal(loc=1.5, scale=2.0, size=50)
        est, lo, hi = bootstrap_ci(x, n_resamples=1000, seed=i)
        assert lo <= est <= hi
        hits += lo <= 1.5 <= hi
    assert 0.88 <= hits / reps <= 0.99, hits / reps


def test_bootstrap_ci_matches_normal_theory_for_large_n() -> None:
    x = np.random.default_rng(7).normal(size=2000)
    est, lo, hi = bootstrap_ci(x)
    assert est == pytest.approx(x.mean())
    half_theory = Z95 * x.std(ddof=1) / math.sqrt(x.size)
    assert (hi - lo) / 2 == pytest.approx(half_theory, rel=0.1)
    assert (lo + hi) / 2 == pytest.approx(est, abs=0.1 * half_theory)


def test_bootstrap_ci_deterministic_and_seed_sensitive() -> None:
    x = np.random.default_rng(3).exponential(size=40)
    assert bootstrap_ci(x) == bootstrap_ci(x)
    assert bootstrap_ci(x, seed=5) == bootstrap_ci(x, seed=5)
    assert bootstrap_ci(x, seed=5) != bootstrap_ci(x, seed=6)


def test_bootstrap_ci_non_vectorised_statistic_and_confidence() -> None:
    x = np.random.default_rng(4).normal(size=60)
    est, lo, hi = bootstrap_ci(x, statistic=lambda v: float(np.median(v)), n_resamples=300)
    assert est == pytest.approx(np.median(x)) and lo < est < hi
    _, lo80, hi80 = bootstrap_ci(x, confidence=0.8)
    _, lo99, hi99 = bootstrap_ci(x, confidence=0.99)
    assert lo99 < lo80 < hi80 < hi99


def test_bootstrap_ci_degenerate_inputs() -> None:
    assert bootstrap_ci([3.0]) == (3.0, 3.0, 3.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert bootstrap_ci([2.5] * 20) == (2.5, 2.5, 2.5)
        assert bootstrap_ci(np.ones(5, dtype=bool)) == (1.0, 1.0, 1.0)
    for bad in ([], [1.0, float("nan")], [1.0, float("inf")]):
        with pytest.raises(ValueError):
            bootstrap_ci(bad)
    with pytest.raises(ValueError):
        bootstrap_ci(np.ones((3, 2)))
    with pytest.raises(ValueError):
        bootstrap_ci([1.0, 2.0], confidence=0.0)


def test_paired_difference_coverage() -> None:
    # Prompt-level variation (sd 3) dwarfs the effect noise (sd 0.5): only a paired interval is tight.
    rng = np.random.default_rng(99)
    hits = 0
    reps = 200
    for i in range(reps):
        base = rng.normal(scale=3.0, size=50)
        before = base + 1.0
        after = base + rng.normal(scale=0.5, size=50)
        est, lo, hi = paired_difference(before, after, n_resamples=1000, seed=i)
        assert lo <= est <= hi
        assert hi - lo < 0.5  # an unpaired interval would be ~ 2 * 1.96 * 3 * sqrt(2/50) = 2.4 wide
        hits += lo <= 1.0 <= hi
    assert 0.88 <= hits / reps <= 0.99, hits / reps


def test_paired_difference_sign_and_value() -> None:
    before = np.array([1.0, 2.0, 3.0, 4.0])
    after = np.array([0.5, 1.5, 2.0, 3.0])
    est, lo, hi = paired_difference(before, after)
    assert est == pytest.approx(0.75)
    # Every resample averages per-prompt drops from {0.5, 0.5, 1, 1}.
    assert 0.5 <= lo <= est <= hi <= 1.0
    est2, lo2, hi2 = paired_difference(after, before)
    assert (est2, lo2, hi2) == pytest.approx((-est, -hi, -lo))


def test_paired_bootstrap_vectorised_and_loop_paths_agree() -> None:
    rng = np.random.default_rng(11)
    a, b = rng.normal(size=200), rng.normal(size=200)

    def vectorised(x, y, axis=None):
        return np.mean(x - y, axis=axis)

    def looped(x, y):
        return np.mean(x - y)

    res_v = paired_bootstrap([a, b], vectorised)
    res_l = paired_bootstrap([a, b], looped)
    assert res_v == pytest.approx(res_l, rel=1e-12, abs=1e-12)


def test_paired_bootstrap_faithfulness_ratio() -> None:
    rng = np.random.default_rng(5)
    n = 200
    e = rng.normal(0.0, 0.3, n)  # fully ablated
    m = e + 2.0 + rng.normal(0.0, 0.3, n)  # full model
    c = e + 1.6 + rng.normal(0.0, 0.3, n)  # circuit only: true faithfulness 0.8

    def faithfulness(c, e, m):
        return (np.mean(c) - np.mean(e)) / (np.mean(m) - np.mean(e))

    est, lo, hi = paired_bootstrap([c, e, m], faithfulness)
    assert est == pytest.approx(faithfulness(c, e, m))
    assert lo < 0.8 < hi
    assert hi - lo < 0.1
    assert paired_bootstrap([c, e, m], faithfulness) == (est, lo, hi)
    assert paired_bootstrap([c, e, m], faithfulness, seed=1) != (est, lo, hi)


def test_paired_bootstrap_is_fast_for_python_loop() -> None:
    import time

    rng = np.random.default_rng(0)
    arrays = [rng.normal(size=200) for _ in range(3)]
    t0 = time.perf_counter()
    paired_bootstrap(arrays, lambda c, e, m: (np.mean(c) - np.mean(e)) / (np.mean(m) - np.mean(e) + 5))
    assert time.perf_counter() - t0 < 1.0


def test_paired_bootstrap_non_finite_replicates_widen_conservatively() -> None:
    # Denominator mean(m) is zero in some resamples: the interval must not look decisive.
    m = np.array([1.0, -1.0, 1.0, -1.0, 1.0, -1.0])
    c = np.ones(6)
    est, lo, hi = paired_bootstrap([c, m], lambda c, m: np.mean(c) / np.mean(m) if np.mean(m) else np.nan)
    assert math.isnan(est)
    assert lo == -math.inf and hi == math.inf
    assert decide((lo, hi), 0.5, "at_least")[0] == "inconclusive"


def test_paired_bootstrap_multidimensional_prompt_axis() -> None:
    x = np.random.default_rng(8).normal(size=(30, 4))
    est, lo, hi = paired_bootstrap([x], lambda v: float(np.mean(v[:, 0])), n_resamples=200)
    assert est == pytest.approx(x[:, 0].mean()) and lo < est < hi


def test_paired_bootstrap_degenerate_inputs() -> None:
    assert paired_bootstrap([[2.0], [1.0]], lambda a, b: np.mean(a - b)) == (1.0, 1.0, 1.0)
    same = np.full(10, 0.25)
    assert paired_difference(same + 1, same) == (1.0, 1.0, 1.0)
    with pytest.raises(ValueError):
        paired_bootstrap([[1.0, 2.0], [1.0, 2.0, 3.0]], lambda a, b: 0.0)
    with pytest.raises(ValueError):
        paired_bootstrap([], lambda: 0.0)
    with pytest.raises(ValueError):
        paired_bootstrap([[]], np.mean)
    with pytest.raises(ValueError):
        paired_difference([1.0, float("nan")], [1.0, 2.0])
    with pytest.raises(ValueError):
        paired_bootstrap([[1.0, 2.0]], np.mean, n_resamples=0)


# --------------------------------------------------------------------------- permutation tests


def test_permutation_exact_small_example() -> None:
    # 6 equally likely splits of {1,2,3,4}; only the observed one reaches a mean difference of 2.
    assert permutation_pvalue([3.0, 4.0], [1.0, 2.0]) == pytest.approx(1 / 6)
    assert permutation_pvalue([3.0, 4.0], [1.0, 2.0], alternative="less") == pytest.approx(1.0)
    # 8 sign flips of differences (1, 2, 3); only all-positive reaches the observed mean.
    assert paired_permutation_pvalue([2.0, 4.0, 6.0], [1.0, 2.0, 3.0]) == pytest.approx(1 / 8)
    assert paired_permutation_pvalue([1.0, 2.0, 3.0], [2.0, 4.0, 6.0], alternative="less") == pytest.approx(
        1 / 8
    )


def test_permutation_detects_clear_effect_and_direction() -> None:
    rng = np.random.default_rng(1)
    control = rng.normal(0.0, 1.0, 60)
    effect = rng.normal(1.0, 1.0, 60)
    assert permutation_pvalue(effect, control) < 0.01
    assert permutation_pvalue(effect, control, alternative="less") > 0.5
    assert permutation_pvalue(control, effect, alternative="less") < 0.01

    base = rng.normal(0.0, 3.0, 40)
    after = base + rng.normal(0.0, 0.3, 40)
    before = base + 0.5 + rng.normal(0.0, 0.3, 40)
    assert paired_permutation_pvalue(before, after) < 0.01
    assert paired_permutation_pvalue(after, before, alternative="less") < 0.01
    assert paired_permutation_pvalue(before, after, alternative="less") > 0.5
    # The same data unpaired is swamped by prompt variation.
    assert permutation_pvalue(before, after) > 0.05


def test_permutation_null_example_and_determinism() -> None:
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=40), rng.normal(size=40)
    p = permutation_pvalue(x, y)
    assert p > 0.05
    assert p == permutation_pvalue(x, y)
    assert paired_permutation_pvalue(x, y) > 0.05
    assert paired_permutation_pvalue(x, y) == paired_permutation_pvalue(x, y)


def test_permutation_pvalues_uniform_under_null() -> None:
    rng = np.random.default_rng(3)
    ps = np.array(
        [
            permutation_pvalue(rng.normal(size=20), rng.normal(size=20), n_resamples=200, seed=i)
            for i in range(150)
        ]
    )
    pps = np.array(
        [
            paired_permutation_pvalue(rng.normal(size=20), rng.normal(size=20), n_resamples=200, seed=i)
            for i in range(150)
        ]
    )
    for p in (ps, pps):
        assert np.all((p > 0) & (p <= 1))
        assert sps.kstest(p, "uniform").pvalue > 0.001
        assert np.mean(p <= 0.05) <= 0.12


def test_permutation_input_validation() -> None:
    with pytest.raises(ValueError):
        permutation_pvalue([], [1.0])
    with pytest.raises(ValueError):
        permutation_pvalue([1.0], [2.0], alternative="two-sided")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        paired_permutation_pvalue([1.0, 2.0], [1.0])


# --------------------------------------------------------------------------- empirical p-value


@pytest.mark.parametrize(
    ("observed", "null", "alternative", "expected"),
    [
        (3.0, [1, 2, 3, 4], "greater", 3 / 5),  # 3 and 4 are >= 3
        (3.0, [1, 2, 3, 4], "less", 4 / 5),  # 1, 2, 3 are <= 3
        (10.0, [1, 2, 3, 4], "greater", 1 / 5),  # never exceeded: smallest possible p
        (-1.0, [1, 2, 3, 4], "less", 1 / 5),
        (0.0, [1, 2, 3, 4], "greater", 5 / 5),
        (0.5, np.zeros(99), "greater", 1 / 100),
        (0.5, [], "greater", 1.0),
    ],
)
def test_empirical_pvalue_hand_examples(observed, null, alternative, expected) -> None:
    assert empirical_pvalue(observed, null, alternative) == pytest.approx(expected)


def test_empirical_pvalue_validation() -> None:
    with pytest.raises(ValueError):
        empirical_pvalue(float("nan"), [1.0])
    with pytest.raises(ValueError):
        empirical_pvalue(1.0, [1.0, float("nan")])
    with pytest.raises(ValueError):
        empirical_pvalue(1.0, [1.0], alternative="both")  # type: ignore[arg-type]


@settings(max_examples=100, deadline=None)
@given(
    null=st.lists(st.integers(-5, 5), max_size=30),
    a=st.integers(-6, 6),
    b=st.integers(-6, 6),
)
def test_empirical_pvalue_properties(null: list[int], a: int, b: int) -> None:
    lo_obs, hi_obs = min(a, b), max(a, b)
    pg_lo, pg_hi = empirical_pvalue(lo_obs, null), empirical_pvalue(hi_obs, null)
    assert 0 < pg_hi <= pg_lo <= 1  # a larger observation is never less significant for "greater"
    assert empirical_pvalue(lo_obs, null, "less") <= empirical_pvalue(hi_obs, null, "less")
    # Mirroring the data swaps the alternatives.
    assert empirical_pvalue(-a, [-v for v in null], "less") == empirical_pvalue(a, null, "greater")


# --------------------------------------------------------------------------- decide


@pytest.mark.parametrize(
    ("ci", "threshold", "comparison", "beats_control", "verdict", "reason_part"),
    [
        (
            (0.62, 0.81),
            0.5,
            "at_least",
            True,
            "pass",
            "interval [0.62, 0.81] clears at_least 0.5; beats control",
        ),
        ((0.62, 0.81), 0.5, "at_least", None, "pass", "clears at_least 0.5"),
        ((0.5, 0.81), 0.5, "at_least", None, "pass", "clears"),  # boundary: lo == threshold
        ((0.1, 0.3), 0.5, "at_least", True, "fail", "misses at_least 0.5"),
        ((0.1, 0.5), 0.5, "at_least", None, "inconclusive", "straddles"),  # boundary: hi == threshold
        ((0.4, 0.6), 0.5, "at_least", None, "inconclusive", "[0.4, 0.6] straddles at_least 0.5"),
        ((0.62, 0.81), 0.5, "at_least", False, "fail", "does not beat its control"),
        ((0.4, 0.6), 0.5, "at_least", False, "inconclusive", "does not beat control"),
        ((0.1, 0.3), 0.5, "at_least", False, "fail", "misses"),
        ((0.01, 0.04), 0.05, "at_most", True, "pass", "clears at_most 0.05; beats control"),
        ((0.01, 0.05), 0.05, "at_most", None, "pass", "clears"),  # boundary: hi == threshold
        ((0.06, 0.2), 0.05, "at_most", None, "fail", "misses at_most 0.05"),
        ((0.05, 0.2), 0.05, "at_most", None, "inconclusive", "straddles"),  # boundary: lo == threshold
        ((0.01, 0.04), 0.05, "at_most", False, "fail", "does not beat its control"),
        ((0.5, 0.5), 0.5, "at_least", None, "pass", "clears"),
        ((0.5, 0.5), 0.5, "at_most", None, "pass", "clears"),
        ((-math.inf, math.inf), 0.5, "at_least", None, "inconclusive", "straddles"),
        ((math.nan, 1.0), 0.5, "at_least", None, "inconclusive", "undefined"),
        (None, 0.5, "at_least", True, "inconclusive", "no interval: too few data"),
        (None, 0.5, "at_most", None, "inconclusive", "no interval: too few data"),
    ],
)
def test_decide_branches(ci, threshold, comparison, beats_control, verdict, reason_part) -> None:
    got, reason = decide(ci, threshold, comparison, beats_control)
    assert got == verdict
    assert reason_part in reason
    assert "\n" not in reason


def test_decide_accepts_numpy_and_validates() -> None:
    est, lo, hi = bootstrap_ci(np.linspace(0.6, 0.9, 30))
    assert decide((lo, hi), 0.5, "at_least")[0] == "pass"
    assert decide((np.float64(0.6), np.float64(0.7)), 0.5, "at_least")[0] == "pass"
    with pytest.raises(ValueError):
        decide((0.7, 0.6), 0.5, "at_least")
    with pytest.raises(ValueError):
        decide((0.1, 0.5, 0.7), 0.5, "at_least")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        decide((0.1, 0.7), 0.5, "above")  # type: ignore[arg-type]


RANK = {"fail": 0, "inconclusive": 1, "pass": 2}
finite = st.floats(min_value=-10, max_value=10, allow_nan=False)


@settings(max_examples=300, deadline=None)
@given(
    a=finite,
    b=finite,
    t=finite,
    shift=st.floats(min_value=0, max_value=5),
    control=st.sampled_from([None, True, False]),
)
def test_decide_monotone_and_mirror(a: float, b: float, t: float, shift: float, control: bool | None) -> None:
    lo, hi = min(a, b), max(a, b)
    v, _ = decide((lo, hi), t, "at_least", control)
    up, _ = decide((lo + shift, hi + shift), t, "at_least", control)
    down, _ = decide((lo - shift, hi - shift), t, "at_most", control)
    base_most, _ = decide((lo, hi), t, "at_most", control)
    if control is False:
        # A control that is not beaten rules out a pass. (Not monotone: a straddling interval is
        # inconclusive, but moving it to clear the threshold makes it fail on the control.)
        assert "pass" not in (v, up, down, base_most)
    else:
        # Moving the interval towards the claim never makes the verdict worse.
        assert RANK[up] >= RANK[v]
        assert RANK[down] >= RANK[base_most]
        # Raising an at_least threshold never helps.
        assert RANK[decide((lo, hi), t + shift, "at_least", control)[0]] <= RANK[v]
    # at_most is at_least on the negated axis.
    assert decide((-hi, -lo), -t, "at_most", control)[0] == v
    # Without a control verdict a pass requires clearing, a fail requires missing.
    if control is not False:
        assert (v == "pass") == (lo >= t)
    assert (v == "fail") == (hi < t or (control is False and lo >= t))


def test_a_control_missed_as_a_numpy_bool_still_fails():
    """Regression: empirical p-values once came back as numpy floats, so `p <= ALPHA` was numpy's False,
    which `decide` did not recognise as a missed control (`is False`) and passed the claim."""
    from modelprobe.toolkit.controls import beats_control, empirical_control

    p = empirical_control(5.0, np.zeros(15), "at_least")  # 1/16 > 0.05: the control is not beaten
    assert type(p) is float and beats_control(p) is False
    assert decide((5.0, 6.0), 0.1, "at_least", np.bool_(False))[0] == "fail"
    assert decide((5.0, 6.0), 0.1, "at_least", np.bool_(True))[0] == "pass"
