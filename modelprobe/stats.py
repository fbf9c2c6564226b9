"""Small, seeded statistics that turn measurements into pass / fail / inconclusive verdicts.

Every claim modelprobe checks is measured on a finite set of prompts, so a point estimate alone
cannot decide it: we put an interval (or a p-value) on the estimate and only pass or fail when the
whole interval is on one side of the claim's threshold. Everything is seeded so that a rerun of the
same probe on the same data gives the same verdict.
"""

from __future__ import annotations

import inspect
import math
import operator
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike
from scipy import stats as sps

__all__ = [
    "DEFAULT_RESAMPLES",
    "DEFAULT_SEED",
    "Verdict",
    "auroc",
    "auroc_interval",
    "bootstrap_ci",
    "decide",
    "empirical_pvalue",
    "paired_bootstrap",
    "paired_difference",
    "paired_permutation_pvalue",
    "permutation_pvalue",
    "wilson_interval",
]

Verdict = Literal["pass", "fail", "inconclusive"]
Alternative = Literal["greater", "less"]
Comparison = Literal["at_least", "at_most"]
Seed = int | np.random.Generator | None

DEFAULT_SEED = 0
DEFAULT_RESAMPLES = 2000

# Upper bound on the number of elements in one batch of resampled indices (keeps memory flat for
# large prompt sets while still letting vectorised statistics do a whole batch in one call).
_MAX_BATCH_ELEMENTS = 1 << 20


def _check_confidence(confidence: float) -> float:
    confidence = float(confidence)
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return confidence


def _check_resamples(n_resamples: int) -> int:
    n_resamples = int(n_resamples)
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    return n_resamples


def _check_alternative(alternative: str) -> None:
    if alternative not in ("greater", "less"):
        raise ValueError(f"alternative must be 'greater' or 'less', got {alternative!r}")


def _as_finite_array(values: ArrayLike, name: str, ndim: int | None = None) -> np.ndarray:
    arr = np.asarray(values)
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise TypeError(f"{name} must be numeric, got dtype {arr.dtype}")
    if ndim is not None and arr.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {arr.shape}")
    if arr.ndim == 0:
        raise ValueError(f"{name} must have a leading (prompt) axis, got a scalar")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr


def _rng_kwargs(func: Callable[..., Any], seed: Seed) -> dict[str, Any]:
    # scipy >= 1.15 takes `rng`; older versions (project allows >= 1.11) only take `random_state`.
    key = "rng" if "rng" in inspect.signature(func).parameters else "random_state"
    return {key: np.random.default_rng(seed)}


def _takes_axis(func: Callable[..., Any]) -> bool:
    try:
        return "axis" in inspect.signature(func).parameters
    except (TypeError, ValueError):  # builtins / ufuncs without an introspectable signature
        return False


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion.

    Used for rates over prompts (e.g. "the top token flips on >= 80% of prompts"); unlike the
    normal approximation it stays inside [0, 1] and keeps near-nominal coverage at 0/n and n/n.
    With no trials nothing is known, so n == 0 gives (0.0, 1.0).
    """
    successes, n = operator.index(successes), operator.index(n)
    confidence = _check_confidence(confidence)
    if n < 0 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n, got successes={successes}, n={n}")
    if n == 0:
        return (0.0, 1.0)
    z = float(sps.norm.ppf(0.5 + confidence / 2.0))
    p_hat = successes / n
    z2_n = z * z / n
    denom = 1.0 + z2_n
    centre = (p_hat + z2_n / 2.0) / denom
    half = z * math.sqrt(p_hat * (1.0 - p_hat) / n + z2_n / (4.0 * n)) / denom
    lo, hi = centre - half, centre + half
    # The closed form is exactly 0 / 1 at successes == 0 / n; pin those so rounding cannot leak out.
    if successes == 0:
        lo = 0.0
    if successes == n:
        hi = 1.0
    return (min(max(lo, 0.0), 1.0), min(max(hi, 0.0), 1.0))


def bootstrap_ci(
    values: ArrayLike,
    statistic: Callable[..., Any] = np.mean,
    confidence: float = 0.95,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: Seed = DEFAULT_SEED,
) -> tuple[float, float, float]:
    """Percentile-bootstrap interval for ``statistic`` of one 1-D sample: (estimate, lo, hi).

    The bootstrap makes no distributional assumption about per-prompt scores, which are often
    skewed or bounded. With fewer than two values, or all values equal, resampling carries no
    information about spread, so the degenerate interval (v, v, v) is returned.
    """
    arr = _as_finite_array(values, "values", ndim=1)
    confidence = _check_confidence(confidence)
    n_resamples = _check_resamples(n_resamples)
    if arr.size == 0:
        raise ValueError("values is empty")
    estimate = float(statistic(arr))
    if arr.size < 2 or np.all(arr == arr[0]):
        return (estimate, estimate, estimate)
    res = sps.bootstrap(
        (arr,),
        statistic,
        n_resamples=n_resamples,
        confidence_level=confidence,
        method="percentile",
        vectorized=_takes_axis(statistic),
        **_rng_kwargs(sps.bootstrap, seed),
    )
    return (estimate, float(res.confidence_interval.low), float(res.confidence_interval.high))


def paired_bootstrap(
    arrays: Sequence[ArrayLike],
    statistic: Callable[..., Any],
    confidence: float = 0.95,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: Seed = DEFAULT_SEED,
) -> tuple[float, float, float]:
    """Bootstrap interval for ``statistic(*arrays)`` resampling prompts jointly: (estimate, lo, hi).

    Measurements on the same prompts (clean / corrupted / patched runs) are correlated; resampling
    the same prompt indices in every array keeps that pairing, which is what makes intervals for
    differences and ratios such as faithfulness (mean(c) - mean(e)) / (mean(m) - mean(e)) honest.

    Axis 0 of every array is the prompt axis. If ``statistic`` accepts an ``axis`` keyword and all
    arrays are 1-D, it is called on whole batches of resamples with ``axis=-1``; otherwise once per
    resample. Both paths draw identical indices, so they give identical results for a given seed.
    Resamples where the statistic is not finite (e.g. a ratio whose denominator hits 0) are treated
    conservatively: NaN counts as -inf for the lower bound and +inf for the upper bound.
    """
    if len(arrays) == 0:
        raise ValueError("need at least one array")
    arrs = [_as_finite_array(a, f"arrays[{i}]") for i, a in enumerate(arrays)]
    n = arrs[0].shape[0]
    if any(a.shape[0] != n for a in arrs):
        raise ValueError(f"paired arrays need the same number of prompts, got {[a.shape[0] for a in arrs]}")
    if n == 0:
        raise ValueError("arrays are empty")
    confidence = _check_confidence(confidence)
    n_resamples = _check_resamples(n_resamples)

    estimate = float(statistic(*arrs))
    if n < 2:
        return (estimate, estimate, estimate)

    rng = np.random.default_rng(seed)
    vectorised = _takes_axis(statistic) and all(a.ndim == 1 for a in arrs)
    batch = max(1, min(n_resamples, _MAX_BATCH_ELEMENTS // n))
    boot = np.empty(n_resamples, dtype=float)
    done = 0
    while done < n_resamples:
        size = min(batch, n_resamples - done)
        idx = rng.integers(0, n, size=(size, n))
        if vectorised:
            out = np.asarray(statistic(*(a[idx] for a in arrs), axis=-1), dtype=float)
            if out.shape != (size,):
                raise ValueError(f"vectorised statistic must return shape ({size},), got {out.shape}")
            boot[done : done + size] = out
        else:
            for j, row in enumerate(idx):
                boot[done + j] = float(statistic(*(a[row] for a in arrs)))
        done += size

    alpha = 1.0 - confidence
    nan = np.isnan(boot)
    # Order statistics ("lower"/"higher") rather than interpolation: slightly conservative, and
    # well defined when some replicates are +-inf.
    lo = float(np.quantile(np.where(nan, -np.inf, boot), alpha / 2.0, method="lower"))
    hi = float(np.quantile(np.where(nan, np.inf, boot), 1.0 - alpha / 2.0, method="higher"))
    return (estimate, lo, hi)


def _mean_paired_diff(x: np.ndarray, y: np.ndarray, axis: int | None = None) -> Any:
    return np.mean(x - y, axis=axis)


def _mean_diff(x: np.ndarray, y: np.ndarray, axis: int = -1) -> Any:
    return np.mean(x, axis=axis) - np.mean(y, axis=axis)


def paired_difference(
    before: ArrayLike,
    after: ArrayLike,
    confidence: float = 0.95,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: Seed = DEFAULT_SEED,
) -> tuple[float, float, float]:
    """Paired-bootstrap interval for mean(before - after): (estimate, lo, hi).

    The usual "does ablating X hurt the metric on these prompts" quantity; positive means a drop.
    """
    b = _as_finite_array(before, "before", ndim=1)
    a = _as_finite_array(after, "after", ndim=1)
    return paired_bootstrap([b, a], _mean_paired_diff, confidence, n_resamples, seed)


def permutation_pvalue(
    effect_samples: ArrayLike,
    control_samples: ArrayLike,
    alternative: Alternative = "greater",
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: Seed = DEFAULT_SEED,
) -> float:
    """One-sided two-sample permutation p-value for the difference of means (independent samples).

    For comparing an effect against a control measured on different units (e.g. the real circuit's
    scores vs. scores of random circuits). "greater" tests mean(effect) > mean(control).
    """
    _check_alternative(alternative)
    x = _as_finite_array(effect_samples, "effect_samples", ndim=1)
    y = _as_finite_array(control_samples, "control_samples", ndim=1)
    if x.size == 0 or y.size == 0:
        raise ValueError("effect_samples and control_samples must be non-empty")
    res = sps.permutation_test(
        (x, y),
        _mean_diff,
        permutation_type="independent",
        vectorized=True,
        n_resamples=_check_resamples(n_resamples),
        alternative=alternative,
        **_rng_kwargs(sps.permutation_test, seed),
    )
    return float(res.pvalue)


def paired_permutation_pvalue(
    effect: ArrayLike,
    control: ArrayLike,
    alternative: Alternative = "greater",
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: Seed = DEFAULT_SEED,
) -> float:
    """One-sided sign-flip permutation p-value for mean(effect - control) over paired prompts.

    Swapping effect and control within a prompt is exchangeable under the null, so this uses the
    pairing and is far more powerful than the independent test when prompts vary a lot.
    """
    _check_alternative(alternative)
    x = _as_finite_array(effect, "effect", ndim=1)
    y = _as_finite_array(control, "control", ndim=1)
    if x.shape != y.shape:
        raise ValueError(f"paired samples need equal length, got {x.size} and {y.size}")
    if x.size == 0:
        raise ValueError("samples are empty")
    res = sps.permutation_test(
        (x, y),
        _mean_paired_diff,
        permutation_type="samples",
        vectorized=True,
        n_resamples=_check_resamples(n_resamples),
        alternative=alternative,
        **_rng_kwargs(sps.permutation_test, seed),
    )
    return float(res.pvalue)


def empirical_pvalue(observed: float, null_samples: ArrayLike, alternative: Alternative = "greater") -> float:
    """Monte-Carlo p-value of ``observed`` against draws from a null (random circuits / directions).

    Uses (1 + #{null >= observed}) / (1 + N) ("less": #{null <= observed}); the +1 counts the
    observation itself, so the p-value is never 0 and is valid for a finite number of null draws.
    Ties count against the claim. An empty null gives 1.0.
    """
    _check_alternative(alternative)
    observed = float(observed)
    if math.isnan(observed):
        raise ValueError("observed is NaN")
    null = np.asarray(null_samples, dtype=float).ravel()
    if np.any(np.isnan(null)):
        raise ValueError("null_samples contains NaN")
    hits = (
        np.count_nonzero(null >= observed) if alternative == "greater" else np.count_nonzero(null <= observed)
    )
    return float((1.0 + hits) / (1.0 + null.size))


def auroc(positive: ArrayLike, negative: ArrayLike, axis: int = 0) -> np.ndarray:
    """Area under the ROC curve of scores separating `positive` from `negative` along `axis` (samples),
    vectorised over the other axes (one AUROC per unit): P(a positive scores above a negative), ties
    counting one half (Mann-Whitney U / n1 n2). 1: every positive above every negative; 0.5: chance."""
    x = np.moveaxis(_as_finite_array(positive, "positive"), axis, -1)
    y = np.moveaxis(_as_finite_array(negative, "negative"), axis, -1)
    n1, n2 = x.shape[-1], y.shape[-1]
    if n1 == 0 or n2 == 0:
        raise ValueError("auroc needs at least one positive and one negative sample")
    ranks = sps.rankdata(np.concatenate([x, y], axis=-1), axis=-1)  # average ranks: ties count 1/2
    u = ranks[..., :n1].sum(-1) - n1 * (n1 + 1) / 2.0
    return np.asarray(u / (n1 * n2), dtype=float)


def auroc_interval(
    positive: ArrayLike,
    negative: ArrayLike,
    confidence: float = 0.95,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: Seed = DEFAULT_SEED,
) -> tuple[float, float, float]:
    """AUROC of two 1-D samples with a stratified percentile bootstrap: (estimate, lo, hi).

    Each class is resampled on its own (its size kept), since the two sets are independent prompts.
    A sample of one value per class gives the degenerate interval (v, v, v).
    """
    x = _as_finite_array(positive, "positive", ndim=1)
    y = _as_finite_array(negative, "negative", ndim=1)
    confidence = _check_confidence(confidence)
    n_resamples = _check_resamples(n_resamples)
    estimate = float(auroc(x, y))
    if x.size < 2 and y.size < 2:
        return (estimate, estimate, estimate)
    rng = np.random.default_rng(seed)
    batch = max(1, min(n_resamples, _MAX_BATCH_ELEMENTS // (x.size + y.size)))
    boot = np.empty(n_resamples)
    done = 0
    while done < n_resamples:
        size = min(batch, n_resamples - done)
        xs = x[rng.integers(0, x.size, size=(size, x.size))]
        ys = y[rng.integers(0, y.size, size=(size, y.size))]
        boot[done:done + size] = auroc(xs, ys, axis=-1)
        done += size
    alpha = 1.0 - confidence
    lo = float(np.quantile(boot, alpha / 2.0, method="lower"))
    hi = float(np.quantile(boot, 1.0 - alpha / 2.0, method="higher"))
    return (estimate, lo, hi)


def _fmt(x: float) -> str:
    return f"{x:.3g}"


def decide(
    ci: tuple[float, float] | None,
    threshold: float,
    comparison: Comparison,
    beats_control: bool | None = None,
) -> tuple[Verdict, str]:
    """Turn an interval (lo, hi) and a threshold into a verdict and a one-sentence reason.

    Only an interval entirely on one side of the threshold decides: pass when it clears it (and the
    control, if any, was beaten), fail when it misses it entirely or the control was not beaten,
    inconclusive when it straddles it. Equality with the threshold counts as clearing.
    """
    if comparison not in ("at_least", "at_most"):
        raise ValueError(f"comparison must be 'at_least' or 'at_most', got {comparison!r}")
    threshold = float(threshold)
    if beats_control is not None:
        beats_control = bool(beats_control)  # numpy's False is not `False`: it must not read as "no control"
    if math.isnan(threshold):
        raise ValueError("threshold is NaN")
    if ci is None:
        return ("inconclusive", "no interval: too few data")
    if len(ci) != 2:
        raise ValueError(f"ci must be (lo, hi), got {len(ci)} values")
    lo, hi = float(ci[0]), float(ci[1])
    if math.isnan(lo) or math.isnan(hi):
        return ("inconclusive", f"interval [{_fmt(lo)}, {_fmt(hi)}] is undefined")
    if lo > hi:
        raise ValueError(f"ci lower bound {lo} exceeds upper bound {hi}")

    if comparison == "at_least":
        clears, misses = lo >= threshold, hi < threshold
    else:
        clears, misses = hi <= threshold, lo > threshold
    where = f"interval [{_fmt(lo)}, {_fmt(hi)}]"
    target = f"{comparison} {_fmt(threshold)}"
    if clears:
        if beats_control is False:
            return ("fail", f"{where} clears {target}, but the effect does not beat its control")
        suffix = "; beats control" if beats_control else ""
        return ("pass", f"{where} clears {target}{suffix}")
    if misses:
        return ("fail", f"{where} misses {target}")
    suffix = "; does not beat control" if beats_control is False else ""
    return ("inconclusive", f"{where} straddles {target}{suffix}")
