"""How the last layer's output at the last token responds to one token's residual state at layer l.

For linear relational embeddings (Hernandez et al. 2023): s is the residual stream after
decoder layer l (resid_post) at one token per prompt (the subject's last token), o is the residual
stream after the last decoder layer at the last prompt token, i.e. the final norm's INPUT (the model's
logits are unembed(final_norm(o))). `jacobians` gives do/ds per prompt: one forward with grad for a
batch of prompts (each row's s patched in through the intervention engine, so every family works), then
the d rows of every prompt's Jacobian from batched backward passes (a vmap over the cotangents), not d
separate backward passes. `edited_logits` writes s + delta back and reads the next-token logits.

o depends on s only through layers l+1.. at the tokens from the subject's on (attention is causal): the
tokens before it, and every layer up to l, are those of the clean pass. So where the decoder layers can
be driven one by one (`can_cut`), the pass with grad runs only layers l+1..L-1 over the batch's columns
from the first subject column on, attending to the earlier columns' clean keys/values (computed once,
without grad, from the clean pass's resid_post at layer l); the backward passes then cover only those
columns. The same Jacobian as the full pass, to float rounding; other families take the full pass.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from .hooks import add_hook
from .interventions import Add, Patch, RunState, hooked
from .resumable import can_cut, cut_masks, run_layers
from .sites import Site
from .subject import Batch, Forward, Subject


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


def _state_batches(subject: Subject, ids: Sequence[Sequence[int]], layer: int,
                   batch_size: int | None = None) -> Iterator[tuple[Batch, Forward, torch.Tensor]]:
    """Per batch, the clean forward (capturing resid_post of `layer` at every token) and o [b, d]."""
    site = Site("resid_post", layer)
    for batch in subject.batches(ids, batch_size):
        sink: list[torch.Tensor] = []
        handle = _final_input(subject, sink)
        try:
            fw = subject.forward(batch, capture=[site])
        finally:
            handle.remove()
        yield batch, fw, sink[-1][:, -1]


def states(subject: Subject, ids: Sequence[Sequence[int]], layer: int, positions: Sequence[int],
           batch_size: int | None = None) -> States:
    """s, o and the logits of each prompt (positions: unpadded token index of s in each prompt)."""
    site = Site("resid_post", layer)
    n = len(ids)
    out_s, out_o, out_l = [None] * n, [None] * n, [None] * n
    for batch, fw, o in _state_batches(subject, ids, layer, batch_size):
        s = fw.at(site, [positions[r] for r in batch.rows]).float().cpu()
        o = o.float().cpu()
        for k, r in enumerate(batch.rows):
            out_s[r], out_o[r], out_l[r] = s[k], o[k], fw.logits[k].cpu()
    return States(torch.stack(out_s), torch.stack(out_o), torch.stack(out_l))


def jacobians(subject: Subject, ids: Sequence[Sequence[int]], layer: int, positions: Sequence[int],
              chunk: int = 64, batch_size: int | None = None) -> tuple[torch.Tensor, States]:
    """([n, d, d] do/ds per prompt, States). Each batch: one forward with grad, then ceil(d / chunk)
    backward passes, each giving `chunk` rows of every prompt's Jacobian at once (rows of different
    prompts do not mix: o of row i depends only on row i's s). Where the family allows (`can_cut`), the
    forward with grad and the backward passes cover only layers l+1.. and the tokens from the subject's on."""
    if not can_cut(subject) or layer + 1 >= subject.n_layers:
        return _full_jacobians(subject, ids, layer, positions, chunk, batch_size)
    site = Site("resid_post", layer)
    n = len(ids)
    out_s, out_o, out_l = [None] * n, [None] * n, [None] * n
    jac: torch.Tensor | None = None
    for batch, fw, o in _state_batches(subject, ids, layer, batch_size):
        rows = batch.rows
        where = [positions[r] for r in rows]
        s = fw.at(site, where).float().cpu()
        o = o.float().cpu()
        for k, r in enumerate(rows):
            out_s[r], out_o[r], out_l[r] = s[k], o[k], fw.logits[k].cpu()
        got = _suffix_jacobians(subject, batch, layer, fw.acts[site], where, chunk)
        if jac is None:
            jac = torch.empty(n, *got.shape[1:])
        jac[rows] = got
    return jac, States(torch.stack(out_s), torch.stack(out_o), torch.stack(out_l))


def _suffix_jacobians(subject: Subject, batch: Batch, layer: int, resid: torch.Tensor, where: Sequence[int],
                      chunk: int) -> torch.Tensor:
    """[b, d, d] do/ds of one batch from its clean resid_post at `layer` ([b, W, d], every column): layers
    l+1.. run without grad over the columns before the first subject column (`cut`), for their keys/values,
    then with grad over the columns from `cut` on, each row's s put back at its own column."""
    dev, L = resid.device, subject.n_layers
    cols = batch.pad.to(dev) + torch.as_tensor(list(where), device=dev)
    cut, b, d = int(cols.min()), len(where), resid.shape[-1]
    masks = cut_masks(subject, batch, resid)
    clean: dict = {}
    if cut > 0:  # rows whose subject sits further right recompute a few clean columns below: same values
        _, clean, _ = run_layers(subject, resid[:, :cut], layer + 1, L, batch.position_ids[:, :cut],
                                 {kind: m[:, :, :cut, :cut] for kind, m in masks.items()}, {})
    # Out of any inference mode a caller holds; the clean states are inference tensors: clones for autograd.
    with torch.inference_mode(False), torch.enable_grad():
        jac = torch.empty(b, d, d)
        s = resid[torch.arange(b, device=dev), cols].clone().requires_grad_(True)
        at = torch.arange(resid.shape[1] - cut, device=dev)[None, :] == (cols - cut)[:, None]
        hidden = torch.where(at[..., None], s[:, None, :], resid[:, cut:].clone())
        out, _, _ = run_layers(subject, hidden, layer + 1, L, batch.position_ids[:, cut:],
                               {kind: m[:, :, cut:, :] for kind, m in masks.items()}, clean, grad=True)
        o = out[:, -1]
        eye = torch.eye(d, dtype=o.dtype, device=o.device)
        for k in range(0, d, chunk):
            cot = eye[k:k + chunk, None, :].expand(-1, b, d)
            (g,) = torch.autograd.grad(o, s, cot, retain_graph=k + chunk < d, is_grads_batched=True)
            jac[:, k:k + chunk] = g.transpose(0, 1).float().cpu()
    return jac


def _full_jacobians(subject: Subject, ids: Sequence[Sequence[int]], layer: int, positions: Sequence[int],
                    chunk: int = 64, batch_size: int | None = None) -> tuple[torch.Tensor, States]:
    """`jacobians` through a full forward with grad (every layer and token), s patched in through the
    intervention engine: every family."""
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
