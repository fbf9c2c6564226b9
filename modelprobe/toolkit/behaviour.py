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
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from ..stats import wilson_interval

if TYPE_CHECKING:
    import torch

    from ..subject import Subject
    from ..subject.subject import InterventionsFor


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


def behave(subject: Subject, grader: GraderLike, ids: Sequence[Sequence[int]], interventions: InterventionsFor = (),
           max_new_tokens: int = 48, batch_size: int | None = None, desc: str = "behaviour") -> Behaviour:
    """Grade each prompt's greedy reply (or, for a logit grader, its next-token distribution) with
    `interventions` applied to prompt and generated tokens alike."""
    if not grader.needs_generation:
        logits = subject.last_logits(ids, interventions, batch_size)
        scores = grader.scores(logits).numpy()
        return Behaviour(scores > 0, scores=scores, logits=logits)
    settled = None
    if getattr(grader, "settles", False):  # the reply shows the behaviour already: generating on cannot undo it
        def settled(reply: list[int]) -> bool:
            return bool(grader.grade_all([subject.decode(reply)])[0])
    gens = subject.generate(ids, max_new_tokens, interventions, batch_size=batch_size, desc=desc, settled=settled)
    texts = [subject.decode(g) for g in gens]
    return Behaviour(np.array(grader.grade_all(texts), dtype=bool), texts=texts)


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
