"""Write one vector per row into one prompt's residual stream at (layer, token), in the prompt pass only,
and generate greedily: many patches of one prompt batched, one row per patch.

A write into resid_post of layer t at token p leaves every token before p, and every layer below t, as
in the clean run (attention is causal). So the rows that write at layer t resume there from the clean
run's resid_pre (the decoder layers of `resume`), on tokens p.. only, attending to the clean keys and
values of the tokens before p; the write itself is a per-row `Patch` intervention applied through
`hooked()` like any other. Generation then continues from a KV cache assembled per row (clean below
layer t and before token p, the row's own elsewhere), so generated tokens are not patched: they see the
patch only through the cache.

Families whose layers `resume` cannot drive with a shared prefix (see `can_share_prefix`) fall back to
`Subject.generate` with the same `Patch`: the same tokens, only slower.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .interventions import Patch, RunState, hooked
from .lastpatch import CleanPrompt
from .resume import _run_layers, can_share_prefix, generate_with_patches, greedy_from_kv
from .sites import Site
from .subject import Subject


class _SuffixKV:
    """Stands in for a KV cache while the tokens from p on run: hands each layer the clean keys/values
    of the tokens before p followed by the rows' own, and keeps the rows' own for the continuation."""

    def __init__(self, clean: CleanPrompt, p: int, n: int):
        self.clean, self.p, self.n = clean, p, n
        self.new: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        self.new[layer_idx] = (key, value)
        pk = self.clean.keys[layer_idx][:, :, :self.p].expand(self.n, -1, -1, -1)
        pv = self.clean.values[layer_idx][:, :, :self.p].expand(self.n, -1, -1, -1)
        return torch.cat([pk, key], dim=2), torch.cat([pv, value], dim=2)


def _resume_from(subject: Subject, clean: CleanPrompt, p: int, layer: int, values: torch.Tensor):
    """Last-token logits [n, vocab] and per-layer keys/values [n, kv, T, dh] of the prompt with values[r]
    written at (resid_post of `layer`, token p), resumed at `layer` on tokens p.. only."""
    n, T = len(values), len(clean.ids)
    dev, dtype = subject.device, next(subject.model.parameters()).dtype
    hidden = clean.pre[layer, p:].to(dev).to(dtype).expand(n, -1, -1).contiguous()
    suffix = T - p
    mask = torch.cat([torch.ones(suffix, p, dtype=torch.bool, device=dev),
                      torch.ones(suffix, suffix, dtype=torch.bool, device=dev).tril()], dim=1)
    positions = torch.arange(p, T, device=dev).expand(n, suffix)
    cache = _SuffixKV(clean, p, n)
    # The suffix batch starts at token p: the patched token is its column 0.
    state = RunState(phase="prompt", pad=torch.zeros(n, dtype=torch.long), prompt_len=suffix)
    patch = Patch(Site("resid_post", layer), 0, values=values)
    with torch.inference_mode(), hooked(subject.model, subject.sitemap, state, [patch]):
        out = _run_layers(subject, hidden, layer, mask.expand(n, 1, suffix, T), positions, cache)
        logits = subject.sitemap.unembed(subject.sitemap.final_norm(out[:, -1:]))[:, -1].float()
    keys, vals = [], []
    for i in range(subject.n_layers):
        if i < layer:
            keys.append(clean.keys[i].expand(n, -1, -1, -1))
            vals.append(clean.values[i].expand(n, -1, -1, -1))
        else:
            k, v = cache.new[i]
            keys.append(torch.cat([clean.keys[i][:, :, :p].expand(n, -1, -1, -1), k], dim=2))
            vals.append(torch.cat([clean.values[i][:, :, :p].expand(n, -1, -1, -1), v], dim=2))
    return logits, keys, vals


def patch_at_and_generate(subject: Subject, clean: CleanPrompt, position: int, targets: Sequence[int],
                          values: torch.Tensor, max_new_tokens: int,
                          worth_continuing: Callable[[int, int], bool] | None = None,
                          batch_size: int = 256) -> list[list[int]]:
    """Greedy continuations (ids) of one prompt, one per row: row r writes values[r] ([d]) into
    resid_post of layer targets[r] at token `position` (negative from the end), prompt pass only.

    `clean` must come from `clean_pass(..., resid_pre=True)`. `worth_continuing(row, first_token)` lets
    the caller skip the continuation of rows whose first token already decides the outcome (their
    result is then that token alone).
    """
    T = len(clean.ids)
    if not -T <= position < T:
        raise ValueError(f"position {position} is outside the prompt ({T} tokens)")
    p = position % T
    if clean.pre is None or not can_share_prefix(subject):
        return generate_with_patches(subject, clean.ids, p, targets, values, max_new_tokens)
    eos = subject.tokenizer.eos_token_id
    order = sorted(range(len(targets)), key=lambda r: targets[r])
    out: list[list[int]] = [[] for _ in targets]
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        firsts, keys, vals = [], [], []
        for layer in sorted({targets[r] for r in chunk}):
            rows = [r for r in chunk if targets[r] == layer]
            logits, k, v = _resume_from(subject, clean, p, layer, values[rows])
            firsts.append(logits.argmax(-1))
            keys.append(k)
            vals.append(v)
        rows = sorted(chunk, key=lambda r: targets[r])  # the order the groups above ran in
        first = torch.cat(firsts)
        for r, tok in zip(rows, first.tolist()):
            out[r] = [] if tok == eos else [tok]
        go = [i for i, (r, tok) in enumerate(zip(rows, first.tolist())) if max_new_tokens > 1 and tok != eos
              and (worth_continuing is None or worth_continuing(r, tok))]
        if go:
            idx = torch.tensor(go, device=first.device)
            k_go = [torch.cat([k[i] for k in keys])[idx] for i in range(subject.n_layers)]
            v_go = [torch.cat([v[i] for v in vals])[idx] for i in range(subject.n_layers)]
            for i, seq in zip(go, greedy_from_kv(subject, k_go, v_go, first[idx], max_new_tokens - 1, eos)):
                out[rows[i]] = seq
    return out
