"""Function vectors (Todd et al. 2023): mean head outputs of few-shot prompts, each head's
indirect effect on shuffled-label prompts, the vector of the top heads, and accuracy with it added.

Every read is at the last token (the query's answer position). Head effects run batched through
`toolkit.prompt_writes.patch_heads_last` (one row per head, only the last token recomputed from the head's
layer on); the engine is imported inside functions so that kinds stay importable without torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..._lazy import torch

if TYPE_CHECKING:
    from ...subject import Subject


@dataclass
class FewShot:
    """One pass over few-shot prompts: each head's mean output and the mean residual stream entering
    each layer, both at the last token, and whether each prompt's first answer token came out on top."""

    head_means: torch.Tensor  # [L, H, d_head] float64
    resid_means: torch.Tensor  # [L, d_model] float64 (resid_pre per layer)
    correct: np.ndarray  # [n] bool


def few_shot_pass(subject: Subject, ids: Sequence[Sequence[int]], answers: Sequence[int],
                  batch_size: int | None = None) -> FewShot:
    from ...subject import Site

    sm = subject.sitemap
    z = [Site("attn.z", layer) for layer in range(subject.n_layers)]
    pre = [Site("resid_pre", layer) for layer in range(subject.n_layers)]
    heads = torch.zeros(subject.n_layers, sm.n_heads, sm.d_head, dtype=torch.float64)
    resid = torch.zeros(subject.n_layers, sm.d_model, dtype=torch.float64)
    correct = np.zeros(len(ids), dtype=bool)
    target = torch.as_tensor(list(answers))
    for fw in subject.run(ids, capture=z + pre, batch_size=batch_size, desc="few-shot prompts"):
        for layer in range(subject.n_layers):
            x = fw.at(z[layer], -1).double().cpu()
            heads[layer] += x.reshape(len(x), sm.n_heads, sm.d_head).sum(0)
            resid[layer] += fw.at(pre[layer], -1).double().cpu().sum(0)
        correct[fw.batch.rows] = (fw.logits.argmax(-1).cpu() == target[fw.batch.rows]).numpy()
    n = max(1, len(ids))
    return FewShot(heads / n, resid / n, correct)


def head_effects(subject: Subject, ids: Sequence[Sequence[int]], answers: Sequence[int],
                 head_means: torch.Tensor) -> np.ndarray:
    """[n, L, H]: for each prompt and head, the probability of the prompt's answer token with that head's
    output at the last token replaced by its mean over the few-shot prompts, minus the clean probability
    (the head's indirect effect). One batched, resumed run per prompt covers every head."""
    from ...subject import clean_pass
    from ...toolkit.prompt_writes import patch_heads_last

    n_layers, n_heads = head_means.shape[:2]
    layers = [layer for layer in range(n_layers) for _ in range(n_heads)]
    heads = [h for _ in range(n_layers) for h in range(n_heads)]
    values = head_means.reshape(n_layers * n_heads, -1).float()
    out = np.zeros((len(ids), n_layers, n_heads))
    for i, x in enumerate(ids):
        clean = clean_pass(subject, x)
        base = torch.softmax(clean.logits.double(), -1)[answers[i]]
        logits = patch_heads_last(subject, clean, layers, heads, values)
        p = torch.softmax(logits.double(), -1)[:, answers[i]]
        out[i] = (p - base).cpu().numpy().reshape(n_layers, n_heads)
    return out


def top_heads(effects: np.ndarray, k: int) -> list[tuple[int, int]]:
    """The k (layer, head) pairs of largest mean indirect effect, best first."""
    mean = effects.mean(0)
    order = np.argsort(-mean, axis=None, kind="stable")[:k]
    return [(int(i // mean.shape[1]), int(i % mean.shape[1])) for i in order]


def head_vector(subject: Subject, head_means: torch.Tensor, heads: Sequence[tuple[int, int]]) -> torch.Tensor:
    """[d_model] float64: the sum of the heads' mean outputs written into the residual basis by the output
    projection (its bias left out: it belongs to no head)."""
    from ...subject import Site

    sm = subject.sitemap
    out = torch.zeros(sm.d_model, dtype=torch.float64)
    for layer, h in heads:
        w = Site("attn.z", layer).hook_point(sm).module.weight.detach().double().cpu()
        w = w.T if sm.family.conv1d else w  # [d_model, H * d_head]
        out += w[:, h * sm.d_head:(h + 1) * sm.d_head] @ head_means[layer, h]
    return out


def correct_with(subject: Subject, ids: Sequence[Sequence[int]], answers: Sequence[int], layer: int | None,
                 vector: torch.Tensor | None, batch_size: int | None = None) -> np.ndarray:
    """[n] bool: whether each prompt's first answer token is the top next token, with `vector` ([d] or
    [n, d], one per prompt) added to the residual stream entering `layer` at the last token."""
    from ...subject import Add, Site

    if vector is None or layer is None:
        edits = ()
    elif vector.dim() == 1:
        edits = [Add(Site("resid_pre", layer), positions="last", vector=vector.float())]
    else:
        per_row = vector.float()

        def edits(rows: list[int]) -> list[Add]:
            return [Add(Site("resid_pre", layer), positions="last", vector=per_row[rows])]
    logits = subject.last_logits(ids, edits, batch_size)
    return (logits.argmax(-1) == torch.as_tensor(list(answers))).numpy()


# ---- prompts --------------------------------------------------------------------------------------

@dataclass
class TaskPrompts:
    """One task's token ids: few-shot prompts (contexts from the pool, queries from the pool), their
    shuffled-label twins, and the held-out queries zero-shot and with `shots` examples from the pool."""

    few_shot: list[list[int]]
    shuffled: list[list[int]]
    query_alone: list[list[int]]  # each few-shot prompt's query with no examples
    answers: list[int]  # first answer token of each few-shot prompt's query
    held: dict[str, list[int]]  # part ("dev", "test") -> row indices of the held-out queries
    zero_shot: dict[str, list[list[int]]]
    held_few_shot: dict[str, list[list[int]]]
    held_answers: dict[str, list[int]]


def build_prompts(subject: Subject, fmt: Any, rows: Sequence[dict], first: Sequence[int], pool: Sequence[int],
                  held: dict[str, Sequence[int]], prompts: int, shots: int, seed: int, path: Path) -> TaskPrompts:
    """Prompts of one task. `first` is each row's first answer token; `pool` the rows contexts (and the
    few-shot prompts' queries) are drawn from; `held` the held-out query rows per part."""
    from ...toolkit.icl import render, shuffled
    from ...toolkit.prompts import encode_rows

    rng = np.random.default_rng(seed)
    pool = list(pool)
    fs, sh, alone, answers = [], [], [], []
    for _ in range(prompts):
        pick = [pool[i] for i in rng.choice(len(pool), size=shots + 1, replace=False)]
        ctx, query = pick[:shots], pick[shots]
        fs.append(render(fmt, rows, ctx, query))
        sh.append(render(fmt, rows, ctx, query, shuffled(ctx)))
        alone.append(render(fmt, rows, [], query))
        answers.append(first[query])
    zero, few, ans = {}, {}, {}
    for part, queries in held.items():
        zero[part] = encode_rows(subject, [render(fmt, rows, [], q) for q in queries], path)
        ctxs = [[pool[i] for i in rng.choice(len(pool), size=shots, replace=False)] for _ in queries]
        few[part] = encode_rows(subject, [render(fmt, rows, c, q) for c, q in zip(ctxs, queries)], path)
        ans[part] = [first[q] for q in queries]
    return TaskPrompts(encode_rows(subject, fs, path), encode_rows(subject, sh, path), encode_rows(subject, alone, path),
                       answers, {k: list(v) for k, v in held.items()}, zero, few, ans)


__all__ = ["FewShot", "TaskPrompts", "build_prompts", "correct_with", "few_shot_pass", "head_effects", "head_vector",
           "top_heads"]
