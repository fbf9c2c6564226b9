"""Resume a forward from a clean run, then continue greedily.

An edit that first touches layer t at token p leaves every layer below t, and every token before p, as in
the clean run (attention is causal). So `run_layers` runs layers t.. over tokens p.. only, from the clean
residual stream entering layer t, attending to the clean keys and values of the tokens before p (`_KV`
stands in for the KV cache and keeps the new tokens' own); `greedy` goes on from a KV cache per row, so
generated tokens see the edit only through it. Families whose decoder layers we cannot drive exactly
(see `can_resume`) take full forwards instead: the same numbers, only slower.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from .hooks import add_hook
from .interventions import Intervention, RunState, WeightDelta, hooked
from .prefix import can_resume, can_share_prefix, layer_type
from .sites import Site
from .subject import Batch, Forward, InterventionsFor, Subject, cache_kwarg

KV = Sequence[tuple[torch.Tensor, torch.Tensor]]  # per layer (keys, values) [rows, kv_heads, tokens, d_head]


def can_cut(subject: Subject) -> bool:
    """Whether a batch's run can be cut at a token column (`cut_masks`): the tokens before it given as clean
    keys/values, the rest run by `run_layers` under the model's own masks, sliced (plain tensor masks)."""
    return can_resume(subject) and getattr(subject.model.config, "_attn_implementation", None) in ("sdpa", "eager")


def cut_masks(subject: Subject, batch: Batch, hidden: torch.Tensor) -> dict[str, torch.Tensor]:
    """The masks the model's own forward of `batch` uses, per layer type, as [b or 1, 1, W, W] tensors: a
    mask the model leaves out (sdpa's plain causal case) is made explicit, so that its slices
    [:, :, q0:q1, :k1] mask a run of columns q0..q1-1 attending to columns ..k1-1 as the full run does."""
    width = batch.input_ids.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=hidden.device).tril()[None, None]
    return {kind: causal if m is None else m for kind, m in _masks(subject, batch, hidden).items()}


def first_layer(sites_or_interventions: Sequence[Intervention | WeightDelta | Site], subject: Subject) -> int:
    """The lowest decoder layer an intervention or capture touches (-1 for the embedding or unknown
    places, n_layers when it touches only the final norm / unembedding)."""
    lowest = subject.n_layers
    layer_path = re.compile(re.escape(subject.sitemap.family.layers) + r"\.(\d+)\.")
    after = (subject.sitemap.family.final_norm, subject.sitemap.family.unembed)
    for item in sites_or_interventions:
        site = None if isinstance(item, WeightDelta) else item if isinstance(item, Site) else item.site
        path = item.parameter if site is None else None if site.module is None else site.module + "."
        if path is not None:
            m = layer_path.match(path)
            if m:
                lowest = min(lowest, int(m.group(1)))
            elif not path.startswith(after):
                return -1
        elif site.layer is not None:
            lowest = min(lowest, site.layer)
        elif site.component == "embed":
            return -1
    return lowest


def _masks(subject: Subject, batch: Batch, hidden: torch.Tensor) -> dict[str, object]:
    """The attention masks the model's own forward would build, keyed by layer type."""
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    kwargs = dict(config=subject.model.config, inputs_embeds=hidden, attention_mask=batch.attention_mask,
                  position_ids=batch.position_ids, **{cache_kwarg(create_causal_mask): None})
    masks: dict[str, object] = {"full_attention": create_causal_mask(**kwargs)}
    if any(layer_type(subject, layer) == "sliding_attention" for layer in range(subject.n_layers)):
        masks["sliding_attention"] = create_sliding_window_causal_mask(**kwargs)
    return masks


class _KV:
    """Stands in for a KV cache: hands each layer the clean keys/values of the untouched tokens (one row, or
    one per group of consecutive rows) followed by the new tokens' own, and keeps the new ones."""

    def __init__(self, clean: KV | dict[int, tuple[torch.Tensor, torch.Tensor]]):
        self.clean, self.new = clean, {}

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        self.new[layer_idx] = (key, value)
        if not self.clean:  # nothing before the new tokens: recording only
            return key, value
        (ck, cv), n = self.clean[layer_idx], len(key)
        return torch.cat([_rows(ck, n), key], dim=2), torch.cat([_rows(cv, n), value], dim=2)


def _rows(t: torch.Tensor, n: int) -> torch.Tensor:
    return t.expand(n, *t.shape[1:]) if len(t) == 1 else t.repeat_interleave(n // len(t), 0)


def _normal(t: Any) -> Any:
    """A tensor autograd may save for backward: inference tensors (made under inference mode, e.g. a
    clean pass's keys/values) are cloned (call outside inference mode)."""
    return t.clone() if isinstance(t, torch.Tensor) and t.is_inference() else t


def run_layers(subject: Subject, hidden: torch.Tensor, start: int, end: int, positions: torch.Tensor,
               mask: Any = None, clean: KV | dict | None = None, state: RunState | None = None,
               interventions: Sequence[Intervention] = (), capture: Sequence[Site] = (),
               logits: str | None = None,
               grad: bool = False) -> tuple[torch.Tensor, dict[int, Any], dict[Site, torch.Tensor]]:
    """Run decoder layers start..end-1 on `hidden` ([rows, tokens, d], the residual stream entering `start`)
    at `positions`, under `interventions` and `capture` (through `hooked`, `state` describing the rows).

    `mask`: the attention mask (boolean: True where a token may attend), or one per layer type. `clean`:
    per layer the clean keys/values of the tokens before these (None: no cache; empty: none, but keep the
    new ones). Returns the final hidden states (with `logits`, "last" [rows, vocab] or "all", norm and
    unembedding applied), the new tokens' keys/values per layer, and the captures.

    `grad`: run with autograd (for gradients w.r.t. `hidden`), even inside a caller's inference mode;
    inference tensors among `mask` and `clean` are cloned first, as autograd cannot save them.
    """
    eager = subject.model.config._attn_implementation == "eager"
    if eager and isinstance(mask, torch.Tensor) and mask.dtype == torch.bool:  # eager attention adds its mask
        mask = torch.zeros(mask.shape, dtype=hidden.dtype, device=hidden.device).masked_fill(
            ~mask, torch.finfo(hidden.dtype).min)
    if grad:
        with torch.inference_mode(False):
            hidden = _normal(hidden)
            mask = {k: _normal(m) for k, m in mask.items()} if isinstance(mask, dict) else _normal(mask)
            if clean:
                items = clean.items() if isinstance(clean, dict) else enumerate(clean)
                clean = {i: (_normal(k), _normal(v)) for i, (k, v) in items}
    kv = None if clean is None else _KV(clean)
    cache = {} if kv is None else {cache_kwarg(subject.sitemap.layers[0].forward): kv}
    state = state or RunState(phase="prompt", pad=torch.zeros(len(hidden), dtype=torch.long),
                              prompt_len=hidden.shape[1])
    # Without grad: inference mode (no autograd bookkeeping). With grad: out of any inference mode a
    # caller holds (enable_grad alone does not leave it), or the graph would not be recorded.
    mode = (torch.inference_mode(False), torch.enable_grad()) if grad else (torch.inference_mode(), nullcontext())
    with mode[0], mode[1], hooked(subject.model, subject.sitemap, state, interventions, capture) as cap:
        position_embeddings = subject.model.model.rotary_emb(hidden, positions)
        for layer in range(start, end):
            hidden = subject.sitemap.layers[layer](
                hidden, attention_mask=mask[layer_type(subject, layer)] if isinstance(mask, dict) else mask,
                position_ids=positions, position_embeddings=position_embeddings, use_cache=False, **cache)
            if isinstance(hidden, tuple):  # older transformers return (hidden, ...)
                hidden = hidden[0]
        if logits == "last":
            hidden = subject.sitemap.unembed(subject.sitemap.final_norm(hidden[:, -1:]))[:, -1].float()
        elif logits:
            hidden = subject.sitemap.unembed(subject.sitemap.final_norm(hidden)).float()
    return hidden, {} if kv is None else kv.new, {s: v[-1] for s, v in cap.items()}


class _Enough(Exception):
    """Raised by the hook at the last layer a capture-only pass needs: the layers above it would be wasted."""


def stop_point(subject: Subject, capture: Sequence[Site]) -> tuple[int, bool] | None:
    """Where a forward that only captures `capture` may stop: (layer, before), `before` True when every
    capture at the highest layer is its input (resid_pre), so that layer need not run either. None when a
    capture sits outside the decoder layers (embeddings, final norm, logits): the full forward is needed."""
    layer_path = re.compile(re.escape(subject.sitemap.family.layers) + r"\.(\d+)(\.|$)")
    top, before = -1, True
    for site in capture:
        hp = site.hook_point(subject.sitemap)
        m = layer_path.match(hp.path)
        if m is None:
            return None
        layer = int(m.group(1))
        pre = hp.module is subject.sitemap.layers[layer] and hp.io == "input"
        if layer > top:
            top, before = layer, pre
        elif layer == top:
            before = before and pre
    return (top, before) if top >= 0 else None


def run_until(subject: Subject, ids: Sequence[Sequence[int]], capture: Sequence[Site],
              interventions: InterventionsFor = (), batch_size: int | None = None,
              desc: str = "forward") -> Iterator[Forward]:
    """`subject.run(ids, capture, interventions, logits=None)`, each forward stopping once the highest
    layer a capture reads has run: a layer above it (or an intervention there) cannot change what a lower
    layer computes, so the captures are the full forward's, bit for bit (same batches, same layers below).
    Captures outside the decoder layers take the full forward."""
    from ..progress import bar

    stop = stop_point(subject, capture) if capture else None
    if stop is None:
        yield from subject.run(ids, capture, interventions, None, batch_size, desc)
        return
    layer, before = stop

    def enough(*args: Any) -> None:
        raise _Enough

    for batch in bar(list(subject.batches(ids, batch_size)), desc, enabled=subject.progress):
        state = RunState(phase="prompt", pad=batch.pad, prompt_len=batch.input_ids.shape[1])
        edits = subject.interventions_for(interventions, batch.rows)
        with torch.inference_mode(), hooked(subject.model, subject.sitemap, state, edits, capture) as cap:
            # registered after hooked's own hooks on the same module, so it runs after their captures
            handle = add_hook(subject.sitemap.layers[layer], enough, "run_until: stop after the last capture",
                              pre=before)
            try:
                subject.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                              position_ids=batch.position_ids, use_cache=False, logits_to_keep=1)
            except _Enough:
                pass
            finally:
                handle.remove()
        yield Forward(batch, {s: v[-1] for s, v in cap.items()}, None)


def resume(subject: Subject, batch: Batch, start: int, resid_pre: torch.Tensor | None,
           interventions: InterventionsFor = (), capture: Sequence[Site] = (), logits: str = "last") -> Forward:
    """A forward of `batch` from `resid_pre` ([b, s, d], the clean run's residual stream entering layer
    `start`, not an intervention): layers start..L-1, the final norm and the unembedding. Interventions and
    captures below `start` raise ValueError (the cached stream would miss them); families that cannot be
    resumed and `resid_pre=None` run the full forward: the same numbers. `logits="last"` unembeds only the
    last position ([b, vocab]; captures at `final`/`logits` then see it only); "all" gives [b, s, vocab].
    """
    chosen = subject.interventions_for(interventions, batch.rows)
    lowest = first_layer([*chosen, *capture], subject)
    if lowest < start:
        raise ValueError(f"cannot resume at layer {start}: an intervention or capture touches layer {lowest}, "
                         "below the cached residual stream")
    if resid_pre is None or not can_resume(subject):
        return subject.forward(batch, capture, chosen, logits)
    hidden = resid_pre.to(subject.device).to(next(subject.model.parameters()).dtype)
    if hidden.shape[:2] != batch.input_ids.shape:
        raise ValueError(f"resid_pre has shape {tuple(hidden.shape)}, the batch is {tuple(batch.input_ids.shape)}")
    state = RunState(phase="prompt", pad=batch.pad, prompt_len=batch.input_ids.shape[1])
    out, _, acts = run_layers(subject, hidden, start, subject.n_layers, batch.position_ids,
                              _masks(subject, batch, hidden), None, state, chosen, capture, logits)
    return Forward(batch, acts, out if logits else None)


def resume_variants(subject: Subject, batch: Batch, start: int, resid_pre: torch.Tensor, n_variants: int,
                    interventions: Callable[[int], Sequence[Intervention]], prefix: int = 0) -> torch.Tensor:
    """Last-position logits [n_variants * b, vocab] of resuming `batch` at `start` under `n_variants`
    sets of interventions, variant-major (row v * b + i: variant v on prompt i).

    `interventions(n)` gives the interventions for n_variants * n rows (variant-major), on all positions.
    When `prefix` > 0 the prompts all start with the same `prefix` tokens: those run once per variant and
    the others attend to their keys and values (the full run's numbers at a fraction of the cost).
    """
    b = len(batch.rows)
    edits_for_rows = interventions(b)
    for edit in edits_for_rows:
        if getattr(edit, "positions", "all") != "all":
            raise ValueError(f"resume_variants needs interventions on all positions, got {edit.positions!r}")
    if prefix <= 0 or not can_share_prefix(subject):
        rows = [r + v * (max(batch.rows) + 1) for v in range(n_variants) for r in batch.rows]
        rep = Batch(rows, batch.input_ids.repeat(n_variants, 1), batch.attention_mask.repeat(n_variants, 1),
                    batch.position_ids.repeat(n_variants, 1), batch.pad.repeat(n_variants), batch.lengths * n_variants)
        return resume(subject, rep, start, resid_pre.repeat(n_variants, 1, 1), edits_for_rows).logits
    if first_layer(edits_for_rows, subject) < start:
        raise ValueError(f"cannot resume at layer {start}: an intervention touches a lower layer")
    dev, dtype = subject.device, next(subject.model.parameters()).dtype
    hidden, pad, L = resid_pre.to(dev).to(dtype), batch.pad.to(dev), subject.n_layers
    # The prefix, once per variant (row 0's copy: the prefix of every row is the same).
    head = hidden[0, int(pad[0]):int(pad[0]) + prefix].expand(n_variants, prefix, -1).contiguous()
    causal = torch.ones(prefix, prefix, dtype=torch.bool, device=dev).tril().expand(n_variants, 1, prefix, prefix)
    pos = torch.arange(prefix, device=dev).expand(n_variants, prefix)
    _, kv, _ = run_layers(subject, head, start, L, pos, causal, {}, None, interventions(1))
    # The rest: each row's own tokens, left-padded (row i's pad columns now also hide its prefix).
    tail = hidden[:, prefix:].repeat(n_variants, 1, 1)
    width = tail.shape[1]
    real = (torch.arange(width, device=dev)[None, :] >= pad[:, None]).repeat(n_variants, 1)  # [rows, width]
    own = torch.ones(width, width, dtype=torch.bool, device=dev).tril()[None] & real[:, None, :]
    seen = torch.ones(len(real), width, prefix, dtype=torch.bool, device=dev)  # the prefix: by every token
    mask = torch.cat([seen, own], -1)[:, None]
    state = RunState(phase="prompt", pad=batch.pad.repeat(n_variants), prompt_len=width)
    positions = batch.position_ids[:, prefix:].repeat(n_variants, 1)
    return run_layers(subject, tail, start, L, positions, mask, kv, state, edits_for_rows, logits="last")[0]


def greedy(subject: Subject, cache: Any, ids: torch.Tensor, positions: torch.Tensor, steps: int,
           mask: torch.Tensor | None = None, interventions: InterventionsFor = (), rows: Sequence[int] = (),
           state: RunState | None = None,
           settled: Callable[[int, list[int]], bool] | None = None) -> list[list[int]]:
    """Greedy continuation of rows whose earlier tokens sit in `cache` (a transformers cache, one row each):
    `ids` [n, t] the tokens still to run at `positions`, `mask` [n, cached + t] for padded rows.
    `interventions` (or a callable of the caller's `rows`) act at every step, `state` describing the
    first; a row that says EOS leaves the batch and its cache, and so does a row for which
    `settled(its caller row, its ids so far)` is True (whatever reads the reply can no longer change its
    verdict: the reply ends there). Returns new ids per row, EOS dropped."""
    model, kw, eos, dev = subject.model, cache_kwarg(subject.model.forward), subject.tokenizer.eos_token_id, ids.device
    active, out = list(range(len(ids))), [[] for _ in range(len(ids))]
    state = state or RunState(phase="generated")
    with torch.inference_mode():
        for _ in range(steps):
            edits = subject.interventions_for(interventions, [rows[i] for i in active] if rows else [])
            with hooked(model, subject.sitemap, state, edits):
                res = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                            logits_to_keep=1, **{kw: cache})
            nxt = res.logits[:, -1].argmax(-1)
            keep = [j for j in range(len(active)) if eos is None or int(nxt[j]) != eos]
            for j in keep:
                out[active[j]].append(int(nxt[j]))
            if settled is not None:
                keep = [j for j in keep if not settled(rows[active[j]] if rows else active[j], out[active[j]])]
            if not keep:
                break
            if len(keep) < len(active):  # drop finished rows from the batch and its cache
                sel = torch.tensor(keep, device=dev)
                cache.batch_select_indices(sel)
                mask, nxt, positions = None if mask is None else mask[sel], nxt[sel], positions[sel]
                active = [active[j] for j in keep]
            if mask is not None:
                mask = torch.cat([mask, torch.ones(len(active), 1, dtype=torch.long, device=dev)], dim=1)
            ids, positions, state = nxt[:, None], positions[:, -1:] + 1, RunState(phase="generated")
    return out


def generate_shared(subject: Subject, prefix: Sequence[int], suffixes: Sequence[Sequence[int]], max_new_tokens: int,
                    interventions: InterventionsFor = (), batch_size: int | None = None,
                    desc: str = "generate",
                    settled: Callable[[int, list[int]], bool] | None = None) -> list[list[int]]:
    """Greedy continuation of prefix + suffix[i] per row, the shared prefix run once (EOS stops a row, and
    so does `settled(row, ids so far)` returning True, as in `greedy`).
    `interventions` (or a callable of the caller's row indices) must not touch the prefix: they act on the
    suffix and generated tokens, their positions index the suffix (From(0) = the suffix's first token)."""
    from transformers import DynamicCache

    from ..progress import bar

    if any(len(s) == 0 for s in suffixes):
        raise ValueError("every row needs at least one token after the shared prefix")
    plen, base = len(prefix), DynamicCache()
    with torch.inference_mode():
        subject.model(input_ids=torch.tensor([list(prefix)], device=subject.device), use_cache=True, logits_to_keep=1,
                      position_ids=torch.arange(plen, device=subject.device)[None],
                      **{cache_kwarg(subject.model.forward): base})
    results: list[list[int]] = [[] for _ in suffixes]
    batches = list(subject.batches(suffixes, batch_size))
    for batch in bar(batches, desc, total=len(batches), enabled=subject.progress):
        b, dev = len(batch.rows), batch.input_ids.device
        cache = copy.deepcopy(base)
        cache.batch_repeat_interleave(b)
        mask = torch.cat([torch.ones(b, plen, dtype=torch.long, device=dev), batch.attention_mask], dim=1)
        state = RunState(phase="prompt", pad=batch.pad, prompt_len=batch.input_ids.shape[1])
        seqs = greedy(subject, cache, batch.input_ids, batch.position_ids + plen, max_new_tokens, mask,
                      interventions, batch.rows, state, settled)
        for row, seq in zip(batch.rows, seqs):
            results[row] = seq
    return results


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

    def before(self, p: int) -> KV:
        """The clean keys/values of the tokens before token p, per layer."""
        return [(k[:, :, :p], v[:, :, :p]) for k, v in zip(self.keys, self.values)]


def clean_pass(subject: Subject, ids: Sequence[int], resid_pre: bool = False) -> CleanPrompt:
    """Run one prompt unpatched, keeping its residual stream (all layers and tokens) and KV cache;
    with `resid_pre`, each layer's input too (what a resume from that layer starts from)."""
    from transformers import DynamicCache

    sites = [Site("resid_post", layer) for layer in range(subject.n_layers)]
    pre_sites = [Site("resid_pre", layer) for layer in range(subject.n_layers)] if resid_pre else []
    embed = Site("resid_pre", 0)
    x, cache = torch.tensor([list(ids)], device=subject.device), DynamicCache()
    state = RunState(phase="prompt", pad=torch.zeros(1, dtype=torch.long), prompt_len=x.shape[1])
    with torch.inference_mode(), hooked(subject.model, subject.sitemap, state, (),
                                        list(dict.fromkeys([*sites, embed, *pre_sites]))) as cap:
        out = subject.model(input_ids=x, use_cache=True, logits_to_keep=1,
                            **{cache_kwarg(subject.model.forward): cache})
    resid = torch.stack([cap[s][-1][0] for s in sites])
    pre = torch.stack([cap[s][-1][0] for s in pre_sites]) if resid_pre else None
    return CleanPrompt(list(ids), resid, [c.keys for c in cache.layers], [c.values for c in cache.layers],
                       out.logits[0, -1].float(), pre, cap[embed][-1][0])


def resume_last(subject: Subject, clean: CleanPrompt, targets: torch.Tensor, values: torch.Tensor,
                edits: Callable[[int, torch.Tensor], Sequence[Intervention]] | None = None):
    """Logits [rows, vocab] of the last token after writing values[r] at resid_post of layer targets[r]
    (-1: the embeddings), and the last token's keys/values per layer for every row (clean at layers <=
    target). Only the last token runs, from its row's layer on. `edits(layer, active)` may give
    interventions for the rows `active` (indices into the rows) while they run `layer`."""
    n, T = len(targets), len(clean.ids)
    dtype = next(subject.model.parameters()).dtype
    hidden = torch.zeros(n, 1, values.shape[-1], dtype=dtype, device=subject.device)
    last_k = [k[:, :, -1:].expand(n, -1, -1, -1).clone() for k in clean.keys]
    last_v = [v[:, :, -1:].expand(n, -1, -1, -1).clone() for v in clean.values]
    values, before = values.to(subject.device).to(dtype), clean.before(T - 1)
    for layer in range(int(targets.min()) + 1, subject.n_layers + 1):
        starts = targets == layer - 1
        hidden[starts, 0] = values[starts]
        if layer == subject.n_layers:
            break
        active = torch.nonzero(targets < layer).flatten()
        pos = torch.full((len(active), 1), T - 1, dtype=torch.long, device=subject.device)
        chosen = edits(layer, active) if edits is not None else ()
        hidden[active], kv, _ = run_layers(subject, hidden[active], layer, layer + 1, pos, None, before,
                                           interventions=chosen)
        last_k[layer][active], last_v[layer][active] = kv[layer]
    logits = subject.sitemap.unembed(subject.sitemap.final_norm(hidden))[:, -1].float()
    return logits, last_k, last_v


def greedy_from_kv(subject: Subject, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor],
                   first: torch.Tensor, steps: int) -> list[list[int]]:
    """Greedy continuation of n unpadded rows of one length T whose prompt pass is done: keys/values per
    layer [n, kv_heads, T, d_head] (e.g. clean where a write could not reach, the row's own elsewhere),
    `first` the token each row chose after the prompt. Returns ids per row, `first` included."""
    from transformers import DynamicCache

    cache = DynamicCache()
    for layer, (k, v) in enumerate(zip(keys, values)):
        cache.update(k, v, layer)
    pos = torch.full((len(first), 1), keys[0].shape[2], dtype=torch.long, device=subject.device)
    cont = greedy(subject, cache, first.to(subject.device)[:, None], pos, steps)
    return [[int(t), *c] for t, c in zip(first, cont)]
