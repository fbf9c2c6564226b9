"""One prompt written many ways, one batch row per write, each resumed from the prompt's clean run.

A write into the residual stream (resid_post of layer t) at token p, or into one head's output at the last
token, leaves every token before p and every layer below t as in the clean run, so each row runs only the
tokens and layers it changes (`subject.run_layers`, `subject.resume_last`) and generation goes on from a KV
cache assembled per row: generated tokens see the write only through that cache. Backpatching writes at
the last token, patchscopes at any token, function vectors one head at a time. Families the engine cannot
resume take the general path (`generate_with_patches`, full forwards): the same tokens, only slower.
The engine is imported inside functions so that kinds stay importable without torch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from .._lazy import torch

if TYPE_CHECKING:
    from ..subject import CleanPrompt, Patch, Subject

Worth = Callable[[int, int], bool]  # (row, first token) -> whether its continuation can still matter


def generate_with_patches(subject: Subject, ids: Sequence[int], position: int | str, targets: Sequence[int],
                          values: torch.Tensor, max_new_tokens: int) -> list[list[int]]:
    """The general path for one prompt written many ways: row r writes values[r] into resid_post of layer
    targets[r] at `position`, full forwards and generation through Subject.generate (an int or "last"
    position touches no generated token: the prompt pass only). Any family; the fast paths must equal it."""
    from ..subject import Patch, Site

    out: list[list[int]] = [[] for _ in targets]
    for layer in sorted(set(targets)):
        rows = [i for i, t in enumerate(targets) if t == layer]
        vals, site = values[rows], Site("resid_post", layer)
        gens = subject.generate([list(ids)] * len(rows), max_new_tokens,
                                lambda r, vals=vals, site=site: [Patch(site, position, values=vals[r])])
        for i, g in zip(rows, gens):
            out[i] = g
    return out


def _continue(subject: Subject, first: torch.Tensor, keys: list, values: list, steps: int, worth: Worth | None,
              rows: Sequence[int], head: list | None = None) -> dict[int, list[int]]:
    """Ids per row (first token included, EOS dropped) of the rows whose first token is not EOS; the
    rows `worth` turns down and every row when `steps` is 0 keep their first token alone. keys/values
    per layer are the rows' own, after the keys/values `head` (one row, per layer) shared by every row."""
    from ..subject import greedy_from_kv

    eos = subject.tokenizer.eos_token_id
    out = {r: [tok] for r, tok in zip(rows, first.tolist()) if tok != eos}
    go = [i for i, (r, tok) in enumerate(zip(rows, first.tolist())) if steps > 0 and tok != eos
          and (worth is None or worth(r, tok))]
    if go:
        idx = torch.tensor(go, device=first.device)
        if head is not None:  # only the continued rows' caches are assembled
            keys = [torch.cat([hk.expand(len(go), -1, -1, -1), k[idx]], dim=2) for (hk, _), k in zip(head, keys)]
            values = [torch.cat([hv.expand(len(go), -1, -1, -1), v[idx]], dim=2) for (_, hv), v in zip(head, values)]
        else:
            keys, values = [k[idx] for k in keys], [v[idx] for v in values]
        cont = greedy_from_kv(subject, keys, values, first[idx], steps)
        out.update({rows[i]: seq for i, seq in zip(go, cont)})
    return out


def patch_last_and_generate(subject: Subject, clean: CleanPrompt, targets: Sequence[int], values: torch.Tensor,
                            max_new_tokens: int, worth_continuing: Worth | None = None,
                            batch_size: int = 512) -> list[list[int]]:
    """Greedy continuations (ids) of one prompt, one per row: row r writes values[r] ([d]) into the last
    prompt token's resid_post at layer targets[r], in the prompt pass only.

    `worth_continuing(row, first_token)` lets the caller skip the continuation of rows whose first token
    already decides the outcome (their result is then that token alone).
    """
    from ..subject import can_resume, resume_last

    if not can_resume(subject):
        return generate_with_patches(subject, clean.ids, "last", targets, values, max_new_tokens)
    out: list[list[int]] = []
    with torch.inference_mode():
        for start in range(0, len(targets), batch_size):
            t = torch.as_tensor(list(targets[start:start + batch_size]), device=subject.device)
            logits, last_k, last_v = resume_last(subject, clean, t, values[start:start + batch_size])
            n = len(t)
            seqs = _continue(subject, logits.argmax(-1), last_k, last_v, max_new_tokens - 1, worth_continuing,
                             range(start, start + n), clean.before(len(clean.ids) - 1))
            out.extend(seqs.get(start + i, []) for i in range(n))
    return out


def _resume_from(subject: Subject, clean: CleanPrompt, p: int, layer: int, values: torch.Tensor):
    """Last-token logits [n, vocab] and per-layer keys/values [n, kv, T, dh] of the prompt with values[r]
    written at (resid_post of `layer`, token p), resumed at `layer` on tokens p.. only."""
    from ..subject import Patch, RunState, Site, run_layers

    n, T = len(values), len(clean.ids)
    dev, dtype = subject.device, next(subject.model.parameters()).dtype
    hidden = clean.pre[layer, p:].to(dev).to(dtype).expand(n, -1, -1).contiguous()
    suffix = T - p
    mask = torch.cat([torch.ones(suffix, p, dtype=torch.bool, device=dev),
                      torch.ones(suffix, suffix, dtype=torch.bool, device=dev).tril()], dim=1)
    positions = torch.arange(p, T, device=dev).expand(n, suffix)
    # The batch starts at token p: the written token is its column 0.
    state = RunState(phase="prompt", pad=torch.zeros(n, dtype=torch.long), prompt_len=suffix)
    logits, kv, _ = run_layers(subject, hidden, layer, subject.n_layers, positions,
                               mask.expand(n, 1, suffix, T), clean.before(p), state,
                               [Patch(Site("resid_post", layer), 0, values=values)], logits="last")
    keys = [k.expand(n, -1, -1, -1) if i < layer else torch.cat([k[:, :, :p].expand(n, -1, -1, -1), kv[i][0]], dim=2)
            for i, k in enumerate(clean.keys)]
    vals = [v.expand(n, -1, -1, -1) if i < layer else torch.cat([v[:, :, :p].expand(n, -1, -1, -1), kv[i][1]], dim=2)
            for i, v in enumerate(clean.values)]
    return logits, keys, vals


def patch_at_and_generate(subject: Subject, clean: CleanPrompt, position: int, targets: Sequence[int],
                          values: torch.Tensor, max_new_tokens: int, worth_continuing: Worth | None = None,
                          batch_size: int = 256) -> list[list[int]]:
    """Greedy continuations (ids) of one prompt, one per row: row r writes values[r] ([d]) into resid_post
    of layer targets[r] at token `position` (negative from the end), prompt pass only.

    `clean` must come from `clean_pass(..., resid_pre=True)`. `worth_continuing(row, first_token)` lets the
    caller skip the continuation of rows whose first token already decides the outcome.
    """
    from ..subject import can_share_prefix

    T = len(clean.ids)
    if not -T <= position < T:
        raise ValueError(f"position {position} is outside the prompt ({T} tokens)")
    p = position % T
    if clean.pre is None or not can_share_prefix(subject):
        return generate_with_patches(subject, clean.ids, p, targets, values, max_new_tokens)
    order = sorted(range(len(targets)), key=lambda r: targets[r])
    out: list[list[int]] = [[] for _ in targets]
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        firsts, keys, vals = [], [], []
        for layer in sorted({targets[r] for r in chunk}):
            logits, k, v = _resume_from(subject, clean, p, layer, values[[r for r in chunk if targets[r] == layer]])
            firsts.append(logits.argmax(-1))
            keys.append(k)
            vals.append(v)
        rows = sorted(chunk, key=lambda r: targets[r])  # the order the groups above ran in
        k_all = [torch.cat([k[i] for k in keys]) for i in range(subject.n_layers)]
        v_all = [torch.cat([v[i] for v in vals]) for i in range(subject.n_layers)]
        for r, seq in _continue(subject, torch.cat(firsts), k_all, v_all, max_new_tokens - 1, worth_continuing,
                                rows).items():
            out[r] = seq
    return out


def patch_heads_last(subject: Subject, clean: CleanPrompt, layers: Sequence[int], heads: Sequence[int],
                     values: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Last-token logits [rows, vocab] of one prompt, row r writing values[r] ([d_head]) as the output of
    head heads[r] of layer layers[r] (attn.z, before the output projection) at the last token.

    Each row recomputes only the last token from its head's layer on, from the clean residual stream
    there, attending to the clean keys and values of the other tokens (a head's output at the last
    token changes nothing before it). Families the engine cannot resume run one full forward per layer.
    """
    from ..subject import Patch, Site, can_resume, resume_last

    n_heads = subject.sitemap.n_heads
    layers_t = torch.as_tensor(list(layers), dtype=torch.long)
    heads_t = torch.as_tensor(list(heads), dtype=torch.long)
    if not can_resume(subject):
        return _patch_heads_full(subject, clean, layers_t, heads_t, values)
    start = torch.cat([clean.embed[-1:], clean.resid[:-1, -1]])  # [L, d] the stream entering each layer
    out = []
    with torch.inference_mode():
        for b in range(0, len(layers_t), batch_size):
            lay, hd, val = layers_t[b:b + batch_size], heads_t[b:b + batch_size], values[b:b + batch_size]

            def edits(layer: int, active: torch.Tensor, lay=lay, hd=hd, val=val) -> list[Patch]:
                act = active.cpu()
                mine = lay[act] == layer
                if not bool(mine.any()):
                    return []
                mask = torch.zeros(len(act), n_heads, dtype=torch.bool)
                mask[mine, hd[act][mine]] = True
                full = torch.zeros(len(act), n_heads, val.shape[-1], dtype=val.dtype)
                full[mine, hd[act][mine]] = val[act][mine]
                return [Patch(Site("attn.z", layer), "last", values=full, unit_mask=mask)]

            out.append(resume_last(subject, clean, lay - 1, start[lay], edits)[0])
    return torch.cat(out)


def _patch_heads_full(subject: Subject, clean: CleanPrompt, layers: torch.Tensor, heads: torch.Tensor,
                      values: torch.Tensor) -> torch.Tensor:
    """The general path: full forwards, the rows of one layer in one batch."""
    from ..subject import Patch, Site

    n_heads = subject.sitemap.n_heads
    out = torch.empty(len(layers), clean.logits.shape[-1])
    for layer in sorted(set(layers.tolist())):
        rows = torch.nonzero(layers == layer).flatten()
        mask = torch.zeros(len(rows), n_heads, dtype=torch.bool)
        mask[torch.arange(len(rows)), heads[rows]] = True
        full = torch.zeros(len(rows), n_heads, values.shape[-1], dtype=values.dtype)
        full[torch.arange(len(rows)), heads[rows]] = values[rows]
        edit = Patch(Site("attn.z", layer), "last", values=full, unit_mask=mask)
        out[rows] = subject.last_logits([clean.ids] * len(rows), lambda r, e=edit: [_rows_of(e, r)]).cpu()
    return out


def _rows_of(edit: Patch, rows: list[int]) -> Patch:
    from ..subject import Patch

    return Patch(edit.site, edit.positions, values=edit.values[rows], unit_mask=edit.unit_mask[rows])
