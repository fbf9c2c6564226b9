"""Metrics read from next-token logits at the last position, one value per prompt.

Every kind that scores an answer uses these, so "logit difference" means the same thing everywhere.
`logits` are [n, vocab] float tensors; token ids are [n] long tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from .._lazy import torch

if TYPE_CHECKING:
    from ..subject import InterventionsFor, Subject

MetricName = Literal["logit_diff", "logprob", "prob", "rank", "accuracy"]
METRICS: dict[str, str] = {
    "logit_diff": "logit(answer) − logit(wrong)",
    "logprob": "log-probability of the answer",
    "prob": "probability of the answer",
    "rank": "rank of the answer among all tokens (0 = top-1)",
    "accuracy": "1 when the answer is the top-1 token, else 0",
}


def logit_diff(logits: torch.Tensor, answers: torch.Tensor, wrongs: torch.Tensor) -> torch.Tensor:
    return (logits.gather(1, answers.to(logits.device)[:, None])
            - logits.gather(1, wrongs.to(logits.device)[:, None]))[:, 0]


def logprob(logits: torch.Tensor, answers: torch.Tensor) -> torch.Tensor:
    return logits.log_softmax(-1).gather(1, answers.to(logits.device)[:, None])[:, 0]


def prob(logits: torch.Tensor, answers: torch.Tensor) -> torch.Tensor:
    return logits.softmax(-1).gather(1, answers.to(logits.device)[:, None])[:, 0]


def rank(logits: torch.Tensor, answers: torch.Tensor) -> torch.Tensor:
    """How many tokens score strictly higher than the answer (ties favour the answer)."""
    return (logits > logits.gather(1, answers.to(logits.device)[:, None])).sum(-1)


def accuracy(logits: torch.Tensor, answers: torch.Tensor) -> torch.Tensor:
    return (logits.argmax(-1) == answers.to(logits.device)).float()


def at_last_position(subject: Subject, ids: Sequence[Sequence[int]], metric: str, answers: Sequence[int],
                     wrongs: Sequence[int] | None = None, interventions: InterventionsFor = (),
                     batch_size: int | None = None) -> np.ndarray:
    """`metric` of each prompt's answer at its last position, with `interventions` applied: [n] float64."""
    logits = subject.last_logits(ids, interventions, batch_size)
    w = torch.tensor(list(wrongs)) if wrongs is not None else None
    return metric_values(logits, metric, torch.tensor(list(answers)), w).double().numpy()


def kl(base: torch.Tensor, other: torch.Tensor) -> np.ndarray:
    """Per-row KL(base ‖ other) of next-token distributions, in nats (float64, clamped at 0)."""
    lp, lq = torch.log_softmax(base.double(), -1), torch.log_softmax(other.double(), -1)
    return (lp.exp() * (lp - lq)).sum(-1).clamp(min=0).numpy()


def metric_values(logits: torch.Tensor, metric: str, answers: torch.Tensor,
                  wrongs: torch.Tensor | None = None) -> torch.Tensor:
    """Per-row `metric` from last-position logits [b, vocab]."""
    if metric == "logit_diff":
        if wrongs is None:
            raise ValueError("logit_diff needs the wrong tokens")
        return logit_diff(logits, answers, wrongs)
    fn = {"logprob": logprob, "prob": prob, "rank": rank, "accuracy": accuracy}.get(metric)
    if fn is None:
        raise ValueError(f"unknown metric {metric!r} (one of: {', '.join(METRICS)})")
    return fn(logits, answers)


def faithfulness(c: np.ndarray, e: np.ndarray, m: np.ndarray, axis: int | None = None) -> Any:
    """(mean m(C) − mean m(∅)) / (mean m(M) − mean m(∅)); vectorised over bootstrap resamples."""
    ce, ee, me = c.mean(axis=axis), e.mean(axis=axis), m.mean(axis=axis)
    with np.errstate(divide="ignore", invalid="ignore"):
        return (ce - ee) / (me - ee)
