"""Patch the last prompt token's residual stream and continue: many (source, target) patches of one prompt
batched, one row per patch, resuming from the clean run.

A patch that writes a vector into the residual stream (block output, resid_post) at layer t of the LAST
prompt token leaves every earlier token, and every layer <= t of the last token, exactly as in the
clean run (attention is causal). So each row only recomputes the last token through layers t+1..L-1,
attending to the clean keys and values of the prefix, cached once per prompt: the clean residual
stream of the last token at layer t is replaced by the patched one and the pass resumes there. The
greedy continuation (the prompt pass is patched, generated tokens are not) then runs with a KV cache
assembled per row: clean keys/values at layers <= t, patched ones above.

Only families that `resume` can drive (llama-like decoder layers) take this path; the others fall back
to full forwards with a `Patch` intervention, which give the same tokens, only slower.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .interventions import Intervention, Patch, RunState, hooked
from .resume import can_resume, generate_with_patches, greedy_from_kv
from .sites import Site
from .subject import Subject, cache_kwarg

# (layer, rows running it now [k]) -> interventions for a batch of those k rows
LayerEdits = Callable[[int, torch.Tensor], Sequence[Intervention]]


@dataclass
class CleanPrompt:
    """One prompt's clean run: its ids, the residual stream at every layer and token, its KV cache."""

    ids: list[int]
    resid: torch.Tensor  # [L, T, d] resid_post per layer and token
    keys: list[torch.Tensor]  # per layer [1, kv_heads, T, d_head]
    values: list[torch.Tensor]
    logits: torch.Tensor  # [vocab] at the last token
    pre: torch.Tensor | None = None  # [L, T, d] resid_pre per layer and token, when asked for
    embed: torch.Tensor | None = None  # [T, d] resid_pre of layer 0 (the embeddings)


def clean_pass(subject: Subject, ids: Sequence[int], resid_pre: bool = False) -> CleanPrompt:
    """Run one prompt unpatched, keeping its residual stream (all layers and tokens) and KV cache;
    with `resid_pre`, each layer's input too (what a resume from that layer starts from)."""
    from transformers import DynamicCache

    sites = [Site("resid_post", layer) for layer in range(subject.n_layers)]
    pre_sites = [Site("resid_pre", layer) for layer in range(subject.n_layers)] if resid_pre else []
    embed = Site("resid_pre", 0)
    captured = list(dict.fromkeys([*sites, embed, *pre_sites]))
    x = torch.tensor([list(ids)], device=subject.device)
    cache = DynamicCache()
    state = RunState(phase="prompt", pad=torch.zeros(1, dtype=torch.long), prompt_len=x.shape[1])
    with torch.inference_mode(), hooked(subject.model, subject.sitemap, state, (), captured) as cap:
        out = subject.model(input_ids=x, use_cache=True, logits_to_keep=1,
                            **{cache_kwarg(subject.model.forward): cache})
    resid = torch.stack([cap[s][-1][0] for s in sites])
    pre = torch.stack([cap[s][-1][0] for s in pre_sites]) if resid_pre else None
    return CleanPrompt(list(ids), resid, [layer.keys for layer in cache.layers],
                       [layer.values for layer in cache.layers], out.logits[0, -1].float(), pre,
                       cap[embed][-1][0])


def last_resid_pre(clean: CleanPrompt) -> torch.Tensor:
    """[L, d] the clean residual stream entering each layer at the last token."""
    return torch.cat([clean.embed[-1:], clean.resid[:-1, -1]])


class _PrefixCache:
    """Stands in for a KV cache while one layer runs on the last token: hands the attention the clean
    prefix keys/values followed by the row's own, and keeps the row's own for the continuation."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        self.keys, self.values = keys, values
        self.new: tuple[torch.Tensor, torch.Tensor] | None = None

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        self.new = (key, value)
        n = key.shape[0]
        return (torch.cat([self.keys.expand(n, -1, -1, -1), key], dim=2),
                torch.cat([self.values.expand(n, -1, -1, -1), value], dim=2))


def _resume_last(subject: Subject, clean: CleanPrompt, targets: torch.Tensor, values: torch.Tensor,
                 edits: LayerEdits | None = None):
    """Logits [rows, vocab] of the last token after writing values[r] at resid_post of layer targets[r]
    (-1: the embeddings), and the last token's keys/values per layer for every row (clean at layers
    <= target). `edits(layer, active)` may give interventions for the rows `active` (indices into
    the rows) while they run `layer`, one batch row per active row."""
    base, layers = subject.model.model, subject.sitemap.layers
    n, n_layers, T = len(targets), subject.n_layers, len(clean.ids)
    dtype = next(subject.model.parameters()).dtype
    hidden = torch.zeros(n, 1, values.shape[-1], dtype=dtype, device=subject.device)
    last_k = [clean.keys[layer][:, :, -1:].expand(n, -1, -1, -1).clone() for layer in range(n_layers)]
    last_v = [clean.values[layer][:, :, -1:].expand(n, -1, -1, -1).clone() for layer in range(n_layers)]
    values = values.to(subject.device).to(dtype)
    kw = cache_kwarg(layers[0].forward)
    for layer in range(int(targets.min()) + 1, n_layers + 1):
        starts = targets == layer - 1
        hidden[starts, 0] = values[starts]
        if layer == n_layers:
            break
        active = torch.nonzero(targets < layer).flatten()
        h = hidden[active]
        pos = torch.full((len(active), 1), T - 1, dtype=torch.long, device=subject.device)
        cache = _PrefixCache(clean.keys[layer][:, :, :-1], clean.values[layer][:, :, :-1])
        chosen = edits(layer, active) if edits is not None else ()
        state = RunState(phase="prompt", pad=torch.zeros(len(active), dtype=torch.long), prompt_len=1)
        with hooked(subject.model, subject.sitemap, state, chosen):
            out = layers[layer](h, attention_mask=None, position_ids=pos, use_cache=True,
                                position_embeddings=base.rotary_emb(h, pos), **{kw: cache})
        hidden[active] = out[0] if isinstance(out, tuple) else out
        last_k[layer][active], last_v[layer][active] = cache.new
    logits = subject.sitemap.unembed(subject.sitemap.final_norm(hidden))[:, -1].float()
    return logits, last_k, last_v


def _continue(subject: Subject, clean: CleanPrompt, first: torch.Tensor, last_k, last_v, steps: int,
              eos: int | None) -> list[list[int]]:
    """Greedy continuation of rows whose first new token is `first`, from their assembled KV cache."""
    n = len(first)
    keys = [torch.cat([clean.keys[layer][:, :, :-1].expand(n, -1, -1, -1), last_k[layer]], dim=2)
            for layer in range(subject.n_layers)]
    values = [torch.cat([clean.values[layer][:, :, :-1].expand(n, -1, -1, -1), last_v[layer]], dim=2)
              for layer in range(subject.n_layers)]
    return greedy_from_kv(subject, keys, values, first, steps, eos)


def patch_last_and_generate(subject: Subject, clean: CleanPrompt, targets: Sequence[int], values: torch.Tensor,
                            max_new_tokens: int, worth_continuing: Callable[[int, int], bool] | None = None,
                            batch_size: int = 512) -> list[list[int]]:
    """Greedy continuations (ids) of one prompt, one per row: row r writes values[r] ([d]) into the
    last prompt token's resid_post at layer targets[r], in the prompt pass only.

    `worth_continuing(row, first_token)` lets the caller skip the continuation of rows whose first token
    already decides the outcome (their result is then that token alone).
    """
    if not can_resume(subject):
        return generate_with_patches(subject, clean.ids, "last", targets, values, max_new_tokens)
    eos = subject.tokenizer.eos_token_id
    out: list[list[int]] = []
    with torch.inference_mode():
        for start in range(0, len(targets), batch_size):
            t = torch.as_tensor(list(targets[start:start + batch_size]), device=subject.device)
            logits, last_k, last_v = _resume_last(subject, clean, t, values[start:start + batch_size])
            first = logits.argmax(-1)
            seqs = [[int(x)] for x in first]
            go = [i for i, x in enumerate(first.tolist()) if max_new_tokens > 1 and x != eos
                  and (worth_continuing is None or worth_continuing(start + i, x))]
            if go:
                idx = torch.tensor(go, device=subject.device)
                cont = _continue(subject, clean, first[idx], [k[idx] for k in last_k], [v[idx] for v in last_v],
                                 max_new_tokens - 1, eos)
                for i, seq in zip(go, cont):
                    seqs[i] = seq
            out.extend([[x for x in s if x != eos] for s in seqs])
    return out


# ---- one head's output at the last token, many heads of one prompt batched --------------------------

def patch_heads_last(subject: Subject, clean: CleanPrompt, layers: Sequence[int], heads: Sequence[int],
                     values: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Last-token logits [rows, vocab] of one prompt, row r writing values[r] ([d_head]) as the output of
    head heads[r] of layer layers[r] (attn.z, before the output projection) at the last token.

    Each row recomputes only the last token from its head's layer on, from the clean residual stream
    there, attending to the clean keys and values of the other tokens (a head's output at the last
    token changes nothing before it). Families `resume` cannot drive run one full forward per layer.
    """
    n_heads = subject.sitemap.n_heads
    layers_t = torch.as_tensor(list(layers), dtype=torch.long)
    heads_t = torch.as_tensor(list(heads), dtype=torch.long)
    if not can_resume(subject):
        return _patch_heads_full(subject, clean, layers_t, heads_t, values)
    start = last_resid_pre(clean)
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

            logits, _, _ = _resume_last(subject, clean, lay - 1, start[lay], edits)
            out.append(logits)
    return torch.cat(out)


def _patch_heads_full(subject: Subject, clean: CleanPrompt, layers: torch.Tensor, heads: torch.Tensor,
                      values: torch.Tensor) -> torch.Tensor:
    """The general path: full forwards, the rows of one layer in one batch."""
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
    return Patch(edit.site, edit.positions, values=edit.values[rows], unit_mask=edit.unit_mask[rows])
