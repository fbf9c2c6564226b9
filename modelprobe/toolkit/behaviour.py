"""Behaviour under an intervention: generate (or read the next-token logits), grade, base rates,
and the rule for when a claim about a behaviour cannot be tested on this model.

A grader is any object with `needs_generation`, `grade_all(texts) -> list[bool]` and
`scores(logits) -> tensor` (log-odds; > 0 shows the behaviour), such as `kinds.graders.Grader`; one
with a true `settles` says that a reply graded True stays True however it goes on, so its row stops
generating there (the replies kept are then cut at that point).
"""

from __future__ import annotations

import re
import unicodedata
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from ..stats import wilson_interval

if TYPE_CHECKING:
    import torch

    from ..subject import InterventionsFor, Subject


class GraderLike(Protocol):
    @property
    def needs_generation(self) -> bool: ...

    def grade_all(self, texts: Sequence[str]) -> list[bool]: ...

    def scores(self, logits: torch.Tensor) -> torch.Tensor: ...


@dataclass
class Behaviour:
    flags: np.ndarray  # [n] bool: the reply shows the behaviour
    texts: list[str] | None = None  # replies (text graders)
    scores: np.ndarray | None = None  # log-odds (logit graders)
    logits: torch.Tensor | None = None  # next-token logits at the last prompt position (logit graders)

    @property
    def rate(self) -> float:
        return float(self.flags.mean()) if self.flags.size else float("nan")


# Base replies (no intervention) are shared across claims and probes of a run that ask for the same
# prompts and settings; texts and last-position logits are kept, up to this many bytes (oldest out first).
SHARED_BYTES = 256 << 20


def _shared_key(subject: Subject, grader: GraderLike, ids: Sequence[Sequence[int]], max_new_tokens: int) -> tuple | None:
    """Cache key of the base behaviour of these prompts, or None when it must not be shared: a grader
    that stops rows early shapes the replies, so it is part of the key (by its description)."""
    # Every in-place write to a parameter bumps its version: edited weights (a perturbation in flight, or
    # restored since) never meet replies of other weights.
    weights = sum(p._version for p in subject.model.parameters())
    model = (subject.info.id, subject.info.hash, subject.info.dtype, str(subject.device), weights)
    prompts = tuple(tuple(int(t) for t in x) for x in ids)
    if not grader.needs_generation:
        return ("behave.logits", model, prompts)
    settle = None
    if getattr(grader, "settles", False):
        describe = getattr(grader, "describe", None)
        if describe is None:
            return None
        settle = repr(describe())
    return ("behave.texts", model, prompts, max_new_tokens, settle)


def _shared_store(subject: Subject) -> OrderedDict:
    return subject.cache.setdefault("behave.shared", OrderedDict())


def _remember(subject: Subject, key: tuple | None, value: Any) -> None:
    if key is None:
        return
    store = _shared_store(subject)
    store[key] = value

    def size(v: Any) -> int:
        return v.numel() * v.element_size() if hasattr(v, "numel") else sum(len(t) for t in v)

    while len(store) > 1 and sum(size(v) for v in store.values()) > SHARED_BYTES:
        store.popitem(last=False)


def _recall(subject: Subject, key: tuple | None) -> Any:
    store = _shared_store(subject)
    if key is None or key not in store:
        return None
    store.move_to_end(key)
    return store[key]


def _graded(grader: GraderLike, texts: list[str] | None = None, logits: torch.Tensor | None = None) -> Behaviour:
    if logits is not None:
        scores = grader.scores(logits).numpy()
        return Behaviour(scores > 0, scores=scores, logits=logits)
    return Behaviour(np.array(grader.grade_all(texts), dtype=bool), texts=list(texts))


def behave(subject: Subject, grader: GraderLike, ids: Sequence[Sequence[int]], interventions: InterventionsFor = (),
           max_new_tokens: int = 48, batch_size: int | None = None, desc: str = "behaviour") -> Behaviour:
    """Grade each prompt's greedy reply (or, for a logit grader, its next-token distribution) with
    `interventions` applied to prompt and generated tokens alike. Without interventions the replies are
    shared with any earlier request for the same prompts and settings in this run."""
    key = None if callable(interventions) or len(interventions) else _shared_key(subject, grader, ids, max_new_tokens)
    known = _recall(subject, key)
    if not grader.needs_generation:
        logits = known if known is not None else subject.last_logits(ids, interventions, batch_size)
        _remember(subject, key, logits)
        return _graded(grader, logits=logits)
    if known is not None:
        return _graded(grader, texts=known)
    settled = None
    if getattr(grader, "settles", False):  # the reply shows the behaviour already: generating on cannot undo it
        def settled(reply: list[int]) -> bool:
            return bool(grader.grade_all([subject.decode(reply)])[0])
    gens = subject.generate(ids, max_new_tokens, interventions, batch_size=batch_size, desc=desc, settled=settled)
    texts = [subject.decode(g) for g in gens]
    _remember(subject, key, texts)
    return _graded(grader, texts=texts)


def behave_variants(subject: Subject, grader: GraderLike, ids: Sequence[Sequence[int]],
                    variants: Sequence[Sequence[Any]], max_new_tokens: int = 48, batch_size: int | None = None,
                    desc: str = "behaviour") -> list[Behaviour]:
    """`behave` under each of several intervention lists (e.g. none, and the claim's), one Behaviour per
    variant. Variants that can share a batch (toolkit.steering.stack_variants) run as one, variant-major:
    every row's numbers are its own, only the rows beside it change. A base variant (no intervention)
    whose replies this run already has is not run again."""
    from .steering import stack_variants

    base_key = _shared_key(subject, grader, ids, max_new_tokens)
    run = [v for v in range(len(variants)) if len(variants[v]) or _recall(subject, base_key) is None]
    stacked = stack_variants([variants[v] for v in run], len(ids)) if len(run) > 1 else None
    if stacked is None:
        return [behave(subject, grader, ids, list(v), max_new_tokens, batch_size, desc) for v in variants]
    both = behave(subject, grader, [x for _ in run for x in ids], stacked, max_new_tokens, batch_size, desc)
    n, out = len(ids), []
    for v in range(len(variants)):
        if v not in run:
            out.append(behave(subject, grader, ids, (), max_new_tokens, batch_size, desc))
            continue
        part = slice(run.index(v) * n, (run.index(v) + 1) * n)
        got = Behaviour(both.flags[part], texts=both.texts[part] if both.texts is not None else None,
                        scores=both.scores[part] if both.scores is not None else None,
                        logits=both.logits[part] if both.logits is not None else None)
        if not len(variants[v]):
            _remember(subject, base_key, got.logits if got.logits is not None else got.texts)
        out.append(got)
    return out


_TOKEN = re.compile(r"[a-z0-9']+|\S")
COHERENT_RULE = ("has a word; no n-gram (n<=4) of words and symbols (emoji, U+FFFD) 4 times in a row; >=30% "
                 "distinct when >=12 of them")


def _units(reply: str) -> list[str]:
    """Words ([a-z0-9']+) and single symbol characters (Unicode category S*: emoji, modifiers, the
    replacement character), in order; letters outside a-z and punctuation are skipped."""
    return [t for t in _TOKEN.findall(reply.lower())
            if len(t) > 1 or t.isascii() and (t.isalnum() or t == "'") or unicodedata.category(t).startswith("S")]


def coherent(reply: str) -> bool:
    """Has a word and is not degenerate: no n-gram (n <= 4) of words and symbols repeated 4 times in a
    row ("🌊🌊🌊🌊" counts, as emoji runs are how a broken model often repeats), and at least 30%
    distinct units in a reply of 12 or more."""
    words = _units(reply)
    if not any(len(w) > 1 or w.isascii() for w in words):
        return False
    for n in range(1, 5):
        for i in range(len(words) - 4 * n + 1):
            gram = words[i:i + n]
            if all(words[i + k * n:i + (k + 1) * n] == gram for k in range(1, 4)):
                return False
    return len(words) < 12 or len(set(words)) / len(words) >= 0.3


def coherent_flags(texts: Sequence[str]) -> np.ndarray:
    """[n] bool: which replies are coherent (`coherent`)."""
    return np.array([coherent(t) for t in texts], dtype=bool)


def rate_summary(flags: np.ndarray) -> dict[str, Any]:
    """{rate, ci (Wilson 95%), k, n} of a boolean sample."""
    k, n = int(flags.sum()), int(flags.size)
    lo, hi = wilson_interval(k, n)
    return {"rate": k / n if n else None, "ci": [lo, hi], "k": k, "n": n}


def untestable_reason(statistic: str, base: np.ndarray, min_base_rate: float, where: str) -> str | None:
    """Why a drop or rise of a behaviour cannot be tested, or None.

    A drop needs something to suppress (base rate >= min_base_rate); a rise needs room to induce
    (base rate <= 1 - min_base_rate). Such a claim is inconclusive, never a pass or a fail.
    """
    rate, k, n = float(base.mean()), int(base.sum()), int(base.size)
    if statistic.endswith("drop") and rate < min_base_rate:
        return (f"untestable: the base rate on {where} is {rate:.3g} ({k}/{n}), below {min_base_rate:g}: "
                "there is nothing to suppress")
    if statistic.endswith("rise") and rate > 1 - min_base_rate:
        return (f"untestable: the base rate on {where} is {rate:.3g} ({k}/{n}), above {1 - min_base_rate:g}: "
                "there is nothing to induce")
    return None
