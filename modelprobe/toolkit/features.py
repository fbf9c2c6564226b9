"""Single units (neurons, SAE latents, directions): their activation per prompt, how well it separates two
prompt sets, and a behaviour metric with each of many units set to a value, batched.

- `unit_activations`: one forward per batch captures every site; each unit's activation over the prompt's
  tokens is reduced to one number per prompt (max or mean), and summed over tokens for mean ablation;
  the clean batches of one prompt set can be kept (with the residual stream where interventions start)
  to resume from;
- `rank_units`: AUROC of every unit at once (with vs without), best first;
- `metric_with_units_set`: the metric at the last position with unit i set to target[i], for every unit
  of a set, as variant rows of resumed forwards (one row per unit and prompt), not one forward per unit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Literal

import numpy as np

from .._lazy import torch
from ..stats import auroc

if TYPE_CHECKING:
    from ..subject import Batch, Subject, UnitSet

Aggregate = Literal["max", "mean"]
ROWS_PER_FORWARD = 64  # rows (units x prompts) per resumed forward: on CPU, wider batches are no faster


@dataclass
class UnitActivations:
    per_prompt: list[np.ndarray]  # per unit set: [n_prompts, n_units] max / mean over the counted tokens
    token_sums: list[np.ndarray]  # per unit set: [n_units] sum over every counted token (float64)
    tokens: int = 0  # tokens counted
    clean: list[tuple[Batch, torch.Tensor | None, torch.Tensor]] = field(default_factory=list)
    # kept batches: (batch, resid_pre at the resume layer or None, last-position logits)


def _counted(batch: Batch, width: int, skip_first: bool, device) -> torch.Tensor:
    """[b, s] bool: the real tokens of each row, without its first when `skip_first`."""
    cols = torch.arange(width, device=device)[None, :]
    start = batch.pad.to(device)[:, None] + (1 if skip_first else 0)
    return cols >= start


def unit_activations(subject: Subject, ids: Sequence[Sequence[int]], unit_sets: Sequence[UnitSet],
                     aggregate: Aggregate = "max", skip_first: bool = True, keep_from: int | None = None,
                     batch_size: int | None = None, desc: str = "unit activations") -> UnitActivations:
    """Each unit's activation per prompt (max or mean over its tokens; the first token, an attention sink
    in most models, left out when `skip_first`) and summed over all tokens. `keep_from`: keep every clean
    batch with its residual stream at the input of that layer and its last-position logits."""
    from ..progress import bar
    from ..subject import Site

    sites = list(dict.fromkeys(u.site for u in unit_sets))
    resid = Site("resid_pre", keep_from) if keep_from is not None else None
    capture = sites + ([resid] if resid is not None and resid not in sites else [])
    out = UnitActivations([np.zeros((len(ids), len(u))) for u in unit_sets],
                          [np.zeros(len(u)) for u in unit_sets])
    batches = list(subject.batches(ids, batch_size))
    for batch in bar(batches, desc, total=len(batches), enabled=subject.progress):
        fw = subject.forward(batch, capture, logits="last" if keep_from is not None else None)
        for k, units in enumerate(unit_sets):
            a = units.activations(fw.acts[units.site])  # [b, s, n]
            mask = _counted(batch, a.shape[1], skip_first and a.shape[1] > 1, a.device)
            lengths = batch.input_ids.shape[1] - batch.pad.to(a.device) - (1 if skip_first and a.shape[1] > 1 else 0)
            if aggregate == "max":
                red = a.masked_fill(~mask[..., None], -torch.inf).amax(1)
            else:
                red = (a * mask[..., None]).sum(1) / lengths.clamp(min=1)[:, None]
            out.per_prompt[k][batch.rows] = red.double().cpu().numpy()
            out.token_sums[k] += (a.double() * mask[..., None]).sum((0, 1)).cpu().numpy()
        out.tokens += int(_counted(batch, batch.input_ids.shape[1], skip_first and batch.input_ids.shape[1] > 1,
                                   batch.pad.device).sum())
        if keep_from is not None:
            out.clean.append((batch, fw.acts[resid] if resid is not None else None, fw.logits.cpu()))
    return out


def rank_units(with_scores: np.ndarray, without_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(order best first, AUROC per unit) of units by how well their activation separates `with`
    [n1, units] from `without` [n2, units]; ties broken by the standardised mean difference."""
    a = auroc(with_scores, without_scores, axis=0)
    pooled = np.sqrt((with_scores.var(0) + without_scores.var(0)) / 2.0) + 1e-12
    d = (with_scores.mean(0) - without_scores.mean(0)) / pooled
    return np.lexsort((-d, -a)), a


def token_set_metric(logits: torch.Tensor, tokens: torch.Tensor, what: str = "logprob") -> torch.Tensor:
    """Per row, the log of the total probability of `tokens` at the next position ("logprob"), or the
    total probability itself ("prob")."""
    lp = logits.float().log_softmax(-1)[:, tokens.to(logits.device)]
    total = lp.logsumexp(-1)
    return total if what == "logprob" else total.exp()


def _set_rows(units: UnitSet, idx: torch.Tensor, targets: torch.Tensor, n: int) -> list:
    return [units.set_to(idx, targets, repeat=n)]


def metric_with_units_set(subject: Subject, clean: Sequence[tuple[Batch, torch.Tensor | None, torch.Tensor]],
                          units: UnitSet, targets: torch.Tensor, metric: Callable[[torch.Tensor], torch.Tensor],
                          n_prompts: int, prefix: int = 0) -> np.ndarray:
    """[n_units, n_prompts] metric at the last position with unit i set to targets[i] on every token.

    The batches resume at the units' layer from the kept residual stream; the units of a chunk are the
    variant rows of one forward (`subject.resume_variants`)."""
    from ..subject import resume_variants

    start = units.site.layer
    out = np.zeros((len(units), n_prompts))
    for batch, resid, _ in clean:
        b = len(batch.rows)
        step = max(1, ROWS_PER_FORWARD // max(1, b))
        for lo in range(0, len(units), step):
            idx = torch.arange(lo, min(lo + step, len(units)))
            logits = resume_variants(subject, batch, start, resid, len(idx),
                                     partial(_set_rows, units, idx, targets[idx]), prefix)
            out[lo:lo + len(idx)][:, batch.rows] = metric(logits.cpu()).double().view(len(idx), b).numpy()
    return out
