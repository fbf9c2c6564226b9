"""How the last layer's output at the last token responds to one token's residual state at layer l.

For linear relational embeddings (Hernandez et al. 2023): s is the residual stream after
decoder layer l (resid_post) at one token per prompt (the subject's last token), o is the residual
stream after the last decoder layer at the last prompt token, i.e. the final norm's INPUT (the model's
logits are unembed(final_norm(o))). `jacobians` gives do/ds per prompt: one forward with grad for a
batch of prompts (each row's s patched in through the intervention engine, so every family works), then
the d rows of every prompt's Jacobian from batched backward passes (a vmap over the cotangents), not d
separate backward passes. `edited_logits` writes s + delta back and reads the next-token logits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .hooks import add_hook
from .interventions import Add, Patch, RunState, hooked
from .sites import Site
from .subject import Subject


@dataclass
class States:
    s: torch.Tensor  # [n, d] resid_post at layer l at each prompt's chosen token (float32, CPU)
    o: torch.Tensor  # [n, d] the final norm's input at the last token (float32, CPU)
    logits: torch.Tensor  # [n, vocab] the model's own next-token logits


def _final_input(subject: Subject, sink: list[torch.Tensor]):
    """A pre-hook on the final norm that keeps its input (with its graph, when there is one)."""
    def pre(mod, args, kwargs):
        sink.append(args[0] if args else kwargs["hidden_states"])
    return add_hook(subject.sitemap.final_norm, pre, "Jacobian capture of the final norm's input", pre=True,
                    with_kwargs=True)


def states(subject: Subject, ids: Sequence[Sequence[int]], layer: int, positions: Sequence[int],
           batch_size: int | None = None) -> States:
    """s, o and the logits of each prompt (positions: unpadded token index of s in each prompt)."""
    site = Site("resid_post", layer)
    n = len(ids)
    out_s, out_o, out_l = [None] * n, [None] * n, [None] * n
    for batch in subject.batches(ids, batch_size):
        sink: list[torch.Tensor] = []
        handle = _final_input(subject, sink)
        try:
            fw = subject.forward(batch, capture=[site])
        finally:
            handle.remove()
        s = fw.at(site, [positions[r] for r in batch.rows]).float().cpu()
        o = sink[-1][:, -1].float().cpu()
        for k, r in enumerate(batch.rows):
            out_s[r], out_o[r], out_l[r] = s[k], o[k], fw.logits[k].cpu()
    return States(torch.stack(out_s), torch.stack(out_o), torch.stack(out_l))


def jacobians(subject: Subject, ids: Sequence[Sequence[int]], layer: int, positions: Sequence[int],
              chunk: int = 64, batch_size: int | None = None) -> tuple[torch.Tensor, States]:
    """([n, d, d] do/ds per prompt, States). Each batch: one forward with grad, then ceil(d / chunk)
    backward passes, each giving `chunk` rows of every prompt's Jacobian at once (rows of different
    prompts do not mix: o of row i depends only on row i's s)."""
    site = Site("resid_post", layer)
    base = states(subject, ids, layer, positions, batch_size)
    n, d = base.s.shape
    jac = torch.empty(n, d, d)
    dtype = next(subject.model.parameters()).dtype
    for batch in subject.batches(ids, batch_size):
        rows = batch.rows
        s = base.s[rows].to(subject.device).to(dtype).requires_grad_(True)
        where = torch.as_tensor([positions[r] for r in rows])
        sink: list[torch.Tensor] = []
        state = RunState(phase="prompt", pad=batch.pad, prompt_len=batch.input_ids.shape[1])
        handle = _final_input(subject, sink)
        try:
            with torch.enable_grad(), hooked(subject.model, subject.sitemap, state,
                                             [Patch(site, positions=where, values=s)]):
                subject.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                              position_ids=batch.position_ids, use_cache=False, logits_to_keep=1)
                o = sink[-1][:, -1]
                eye = torch.eye(d, dtype=o.dtype, device=o.device)
                for k in range(0, d, chunk):
                    cot = eye[k:k + chunk, None, :].expand(-1, len(rows), d)
                    (g,) = torch.autograd.grad(o, s, cot, retain_graph=k + chunk < d, is_grads_batched=True)
                    jac[rows, k:k + chunk] = g.transpose(0, 1).float().cpu()
        finally:
            handle.remove()
    return jac, base


def edited_logits(subject: Subject, ids: Sequence[Sequence[int]], layer: int, positions: Sequence[int],
                  deltas: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
    """[n, vocab] next-token logits with deltas[i] added to prompt i's resid_post at layer l, token
    positions[i] (prompt pass only)."""
    site = Site("resid_post", layer)
    where = torch.as_tensor(list(positions))

    def edits(rows: list[int]):
        return [Add(site, positions=where[rows], vector=deltas[rows])]

    return subject.last_logits(ids, edits, batch_size)
