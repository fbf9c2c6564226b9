"""In-context prompts and the runs the rank-1 view of in-context learning needs.

Prompts are (context of `shots` examples, query) pairs drawn from one task's rows; every run reads the
query token (the last one) only. Engine parts (factors, the hook that applies them) live in
`subject.rank1`; this module imports it inside functions so that kinds stay importable without torch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .._lazy import torch

if TYPE_CHECKING:
    from ..subject import Rank1, Site, Subject


@dataclass
class Draw:
    """Row indices: each prompt's context examples [n, shots], its query and a second, unseen query."""

    context: np.ndarray
    query: np.ndarray
    transfer: np.ndarray


def draw_prompts(n_rows: int, prompts: int, shots: int, seed: int) -> Draw:
    """For each prompt, shots + 2 distinct rows (context, query, transfer query), seeded."""
    rng = np.random.default_rng(seed)
    picks = np.stack([rng.choice(n_rows, size=min(n_rows, shots + 2), replace=False) for _ in range(prompts)])
    transfer = picks[:, shots + 1] if picks.shape[1] > shots + 1 else picks[:, shots]
    return Draw(picks[:, :shots], picks[:, shots], transfer)


def render(fmt: Any, rows: Sequence[dict], examples: Sequence[int], query: int,
           labels: Sequence[int] | None = None) -> str:
    """The context (examples with their own outputs, or the outputs of `labels`) followed by the query."""
    labels = examples if labels is None else labels
    text = "".join(fmt.example.format(input=rows[e]["input"], output=rows[o]["output"])
                   for e, o in zip(examples, labels))
    return text + fmt.query.format(input=rows[query]["input"])


def shuffled(examples: Sequence[int]) -> list[int]:
    """Labels for a shuffled-label context: each example gets the next example's output (none its own)."""
    return [examples[(k + 1) % len(examples)] for k in range(len(examples))]


@dataclass
class LastStates:
    """What one pass over a list of prompts kept at the query token, in the caller's order."""

    states: dict[Any, torch.Tensor]  # site -> [n, d] float64
    logprob: torch.Tensor | None  # [n] log-probability of each prompt's answer token
    logits: torch.Tensor | None  # [n, vocab], only when asked for


def last_states(subject: Subject, ids: Sequence[Sequence[int]], sites: Sequence[Site] = (),
                answers: Sequence[int] | None = None, updates: Mapping[int, Rank1] | None = None,
                biases: Mapping[int, torch.Tensor] | None = None, keep_logits: bool = False,
                batch_size: int | None = None) -> LastStates:
    """One batched pass: activations at the query token, the answer's log-probability, optionally
    with per-prompt rank-1 updates of MLP input matrices and residual biases (added after the MLP)
    at the query token."""
    from ..subject import Add, rank1_applied
    from ..subject import Site as _Site

    n = len(ids)
    states: dict[Any, torch.Tensor] = {}
    lp = torch.zeros(n, dtype=torch.float64) if answers is not None else None
    logits = None
    target = torch.tensor(list(answers)) if answers is not None else None
    for batch in subject.batches(ids, batch_size):
        rows = batch.rows
        adds = [Add(_Site("mlp_out", layer), positions="last", vector=v[rows].float())
                for layer, v in (biases or {}).items()]
        with rank1_applied(subject.sitemap, updates or {}, rows):
            fw = subject.forward(batch, list(sites), adds, "last")
        for s in sites:
            x = fw.acts[s][:, -1].double().cpu()
            states.setdefault(s, torch.zeros(n, x.shape[-1], dtype=torch.float64))[rows] = x
        lg = fw.logits.double().cpu()
        if lp is not None:
            lp[rows] = torch.log_softmax(lg, -1)[torch.arange(len(rows)), target[rows]]
        if keep_logits:
            if logits is None:
                logits = torch.zeros(n, lg.shape[-1], dtype=torch.float64)
            logits[rows] = lg
    return LastStates(states, lp, logits)


def query_inputs(subject: Subject, ids: Sequence[Sequence[int]], layers: Sequence[int],
                 batch_size: int | None = None) -> dict[int, torch.Tensor]:
    """The MLP input at the query token per layer ({layer: [n, d] float64}); each pass stops at the
    highest layer asked for."""
    from ..subject import query_mlp_inputs
    out: dict[int, torch.Tensor] = {}
    for batch in subject.batches(ids, batch_size):
        got = query_mlp_inputs(subject.model, subject.sitemap, batch, layers)
        for layer, x in got.items():
            out.setdefault(layer, torch.zeros(len(ids), x.shape[-1], dtype=torch.float64))[batch.rows] = x
    return out


def identity(subject: Subject, ctx_ids: Sequence[Sequence[int]], plain_ids: Sequence[Sequence[int]],
             batch_size: int | None = None) -> tuple[np.ndarray, np.ndarray, list[Rank1]]:
    """The exactness check: rank-1 updates (and residual biases) computed layer by layer on the already
    updated no-context run (in one pass, `online_updates`) make its query token follow the with-context
    run exactly; a separate pass applies the stored factors and measures the errors.

    Returns the relative error of the residual after each layer [n, L], of the last-token logits [n],
    and the factors per layer.
    """
    from ..subject import Rank1, mlp_input_site, online_updates
    from ..subject import Site as _Site

    sm = subject.sitemap
    layers = range(subject.n_layers)
    u_sites = [mlp_input_site(sm, layer) for layer in layers]
    mid = [_Site("resid_mid", layer) for layer in layers]
    post = [_Site("resid_post", layer) for layer in layers]
    ctx = last_states(subject, ctx_ids, u_sites + mid + post, keep_logits=True, batch_size=batch_size)
    n = len(plain_ids)
    u_ctx = torch.stack([ctx.states[s] for s in u_sites], dim=1)  # [n, L, d]
    mid_ctx = torch.stack([ctx.states[s] for s in mid], dim=1)
    updates = {layer: None for layer in layers}
    biases = {layer: torch.zeros(n, sm.d_model, dtype=torch.float64) for layer in layers}
    for batch in subject.batches(plain_ids, batch_size):
        rows = batch.rows
        got, bias = online_updates(subject.model, sm, batch, mid_ctx[rows], u_ctx[rows])
        for layer in layers:
            if updates[layer] is None:
                updates[layer] = Rank1(torch.zeros(n, got[layer].a.shape[-1], dtype=torch.float64),
                                       torch.zeros(n, got[layer].b.shape[-1], dtype=torch.float64))
            updates[layer].a[rows], updates[layer].b[rows] = got[layer].a.cpu(), got[layer].b.cpu()
            biases[layer][rows] = bias[layer].cpu()
    # The check: a fresh pass with the stored factors and biases, through the same hooks converges uses.
    final = last_states(subject, plain_ids, post, updates=updates, biases=biases, keep_logits=True,
                        batch_size=batch_size)

    def rel(x: torch.Tensor, ref: torch.Tensor) -> np.ndarray:
        return ((x - ref).norm(dim=-1) / ref.norm(dim=-1).clamp(min=1e-30)).numpy()

    per_layer = np.stack([rel(final.states[s], ctx.states[s]) for s in post], axis=1)
    return per_layer, rel(final.logits, ctx.logits), [updates[layer] for layer in layers]


__all__ = ["Draw", "LastStates", "draw_prompts", "identity", "last_states", "query_inputs", "render", "shuffled"]
