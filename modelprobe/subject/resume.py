"""Resume a forward pass from a cached residual stream: run decoder layers start..L-1 only.

An intervention that first touches layer `start` leaves every layer below it exactly as in the clean
run, so recomputing them is waste. `resume()` takes the clean run's resid_pre at `start`, runs the
remaining decoder layers, the final norm and the unembedding, with interventions and captures
attached through the same `hooked()` context as a full forward (same hook points, same semantics).

Only families whose decoder layers we can drive exactly are resumed (rotary position embeddings
from the model's own rotary module, masks from transformers' own mask builders, no logit
post-processing). Every other family falls back to a full forward: correct, only slower.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import torch

from .batching import common_prefix  # noqa: F401  (re-exported: the selection shares prefixes too)
from .interventions import Intervention, Patch, Positions, RunState, WeightDelta, hooked
from .sites import Site
from .subject import Batch, Forward, InterventionsFor, Subject, cache_kwarg

# Model types whose decoder stack is: rotary embeddings shared by all layers, a causal (or sliding
# window) mask per layer type, layer(hidden, attention_mask, position_ids, position_embeddings),
# then norm and lm_head with nothing after it. Gemma is left out on purpose: it soft-caps logits.
RESUMABLE = frozenset({"llama", "mistral", "qwen2", "qwen3"})


def can_resume(subject: Subject) -> bool:
    """Whether `resume` runs only the layers from `start` for this model (else it runs a full forward)."""
    base = getattr(subject.model, "model", None)
    return (subject.sitemap.model_type in RESUMABLE and subject.sitemap.family.name == "llama"
            and base is not None and hasattr(base, "rotary_emb") and hasattr(base, "layers"))


def first_layer(sites_or_interventions: Sequence[Intervention | WeightDelta | Site], subject: Subject) -> int:
    """The lowest decoder layer an intervention or capture touches (-1 for the embedding or unknown
    places, n_layers when it touches only the final norm / unembedding)."""
    lowest = subject.n_layers
    layer_path = re.compile(re.escape(subject.sitemap.family.layers) + r"\.(\d+)\.")
    after = (subject.sitemap.family.final_norm, subject.sitemap.family.unembed)
    for item in sites_or_interventions:
        if isinstance(item, WeightDelta):
            m = layer_path.match(item.parameter)
            if m:
                lowest = min(lowest, int(m.group(1)))
            elif not item.parameter.startswith(after):
                return -1
            continue
        site = item if isinstance(item, Site) else item.site
        if site.module is not None:
            m = layer_path.match(site.module + ".")
            if m:
                lowest = min(lowest, int(m.group(1)))
            elif not site.module.startswith(after):
                return -1
        elif site.layer is not None:
            lowest = min(lowest, site.layer)
        elif site.component == "embed":
            return -1
    return lowest


def _masks(subject: Subject, batch: Batch, hidden: torch.Tensor) -> dict[str, object]:
    """The attention masks the model's own forward would build, keyed by layer type."""
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    config = subject.model.config
    kwargs = dict(config=config, inputs_embeds=hidden, attention_mask=batch.attention_mask,
                  position_ids=batch.position_ids, **{cache_kwarg(create_causal_mask): None})
    masks: dict[str, object] = {"full_attention": create_causal_mask(**kwargs)}
    types = set(getattr(config, "layer_types", None) or [])
    mistral_window = config.model_type == "mistral" and getattr(config, "sliding_window", None) is not None
    if "sliding_attention" in types or mistral_window:
        masks["sliding_attention"] = create_sliding_window_causal_mask(**kwargs)
    return masks


def _layer_type(subject: Subject, layer: int) -> str:
    config = subject.model.config
    types = getattr(config, "layer_types", None)
    if types:
        return types[layer]
    if config.model_type == "mistral" and getattr(config, "sliding_window", None) is not None:
        return "sliding_attention"
    return "full_attention"


def resume(subject: Subject, batch: Batch, start: int, resid_pre: torch.Tensor | None,
           interventions: InterventionsFor = (), capture: Sequence[Site] = (),
           logits: str = "last") -> Forward:
    """Run decoder layers start..L-1, the final norm and the unembedding from `resid_pre` at `start`.

    `resid_pre` ([b, s, d_model], the padded batch) must be the model's own residual stream at the
    input of layer `start` for this batch: it is a cache of the clean run, not an intervention.
    Interventions and captures must all sit at layer `start` or above (ValueError otherwise: the
    cached stream would silently miss them). Families that cannot be resumed, `start` == 0 without a
    cache, and `resid_pre=None` run the full forward instead, which gives the same numbers.
    `logits="last"` unembeds only the last position ([b, vocab]; captures at `final`/`logits` then
    see that position only); "all" gives [b, s, vocab].
    """
    chosen = subject.interventions_for(interventions, batch.rows)
    lowest = first_layer([*chosen, *capture], subject)
    if lowest < start:
        raise ValueError(f"cannot resume at layer {start}: an intervention or capture touches layer {lowest}, "
                         "below the cached residual stream")
    if resid_pre is None or not can_resume(subject):
        return subject.forward(batch, capture, chosen, logits)
    base = subject.model.model
    hidden = resid_pre.to(subject.device).to(next(subject.model.parameters()).dtype)
    if hidden.shape[:2] != batch.input_ids.shape:
        raise ValueError(f"resid_pre has shape {tuple(hidden.shape)}, the batch is {tuple(batch.input_ids.shape)}")
    state = RunState(phase="prompt", pad=batch.pad, prompt_len=batch.input_ids.shape[1])
    with torch.inference_mode(), hooked(subject.model, subject.sitemap, state, chosen, capture) as cap:
        masks = _masks(subject, batch, hidden)
        position_embeddings = base.rotary_emb(hidden, batch.position_ids)
        for layer in range(start, subject.n_layers):
            hidden = subject.sitemap.layers[layer](
                hidden, attention_mask=masks[_layer_type(subject, layer)], position_ids=batch.position_ids,
                position_embeddings=position_embeddings, use_cache=False)
            if isinstance(hidden, tuple):  # older transformers return (hidden, ...)
                hidden = hidden[0]
        if logits == "last":
            hidden = hidden[:, -1:]
        out = subject.sitemap.unembed(subject.sitemap.final_norm(hidden)) if logits else None
    lg = None
    if out is not None:
        lg = out[:, -1].float() if logits == "last" else out.float()
    return Forward(batch, {s: v[-1] for s, v in cap.items()}, lg)


# ---- many variants of one batch, sharing the prompts' common prefix ----------------------------------

def can_share_prefix(subject: Subject) -> bool:
    """Whether `resume_variants` can run a shared prefix once (plain causal attention in every layer)."""
    config = subject.model.config
    return (can_resume(subject) and getattr(config, "_attn_implementation", None) in ("sdpa", "eager")
            and all(_layer_type(subject, layer) == "full_attention" for layer in range(subject.n_layers)))


class _PrefixKV:
    """Stands in for a KV cache: records each layer's keys and values of the prefix (one row per variant),
    then hands them, repeated per prompt, to the rest of the prompts' tokens."""

    def __init__(self) -> None:
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.repeat = 0  # 0: recording the prefix

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        if not self.repeat:
            self.kv[layer_idx] = (key, value)
            return key, value
        pk, pv = self.kv[layer_idx]
        return (torch.cat([pk.repeat_interleave(self.repeat, 0), key], 2),
                torch.cat([pv.repeat_interleave(self.repeat, 0), value], 2))


def _run_layers(subject: Subject, hidden: torch.Tensor, start: int, mask: torch.Tensor,
                position_ids: torch.Tensor, cache: _PrefixKV) -> torch.Tensor:
    if subject.model.config._attn_implementation == "eager":  # additive mask
        mask = torch.zeros(mask.shape, dtype=hidden.dtype, device=hidden.device).masked_fill(
            ~mask, torch.finfo(hidden.dtype).min)
    position_embeddings = subject.model.model.rotary_emb(hidden, position_ids)
    for layer in range(start, subject.n_layers):
        hidden = subject.sitemap.layers[layer](hidden, attention_mask=mask, position_ids=position_ids,
                                               cache=cache, use_cache=False,
                                               position_embeddings=position_embeddings)
        if isinstance(hidden, tuple):
            hidden = hidden[0]
    return hidden


def resume_variants(subject: Subject, batch: Batch, start: int, resid_pre: torch.Tensor, n_variants: int,
                    interventions: Callable[[int], Sequence[Intervention]], prefix: int = 0) -> torch.Tensor:
    """Last-position logits [n_variants * b, vocab] of resuming `batch` at `start` under `n_variants`
    sets of interventions, variant-major (row v * b + i: variant v on prompt i).

    `interventions(n)` gives the interventions for n_variants * n rows, variant-major (per-row vectors
    repeated n times each); they must edit all positions. `resid_pre` is the clean residual stream at
    `start` for the batch. When `prefix` > 0 the batch's prompts all start with the same `prefix` tokens:
    those run once per variant and the other tokens attend to their keys and values, which gives the
    numbers of the full run (the prefix sees only itself) at a fraction of the cost. Models that cannot
    share a prefix (see can_share_prefix) run every row in full through `resume`.
    """
    b = len(batch.rows)
    edits_for_rows = interventions(b)
    for edit in edits_for_rows:
        if getattr(edit, "positions", "all") != "all":
            raise ValueError(f"resume_variants needs interventions on all positions, got {edit.positions!r}")
    if prefix <= 0 or not can_share_prefix(subject):
        rows = [r + v * (max(batch.rows) + 1) for v in range(n_variants) for r in batch.rows]
        rep = Batch(rows, batch.input_ids.repeat(n_variants, 1), batch.attention_mask.repeat(n_variants, 1),
                    batch.position_ids.repeat(n_variants, 1), batch.pad.repeat(n_variants),
                    batch.lengths * n_variants)
        return resume(subject, rep, start, resid_pre.repeat(n_variants, 1, 1), edits_for_rows).logits
    if first_layer(edits_for_rows, subject) < start:
        raise ValueError(f"cannot resume at layer {start}: an intervention touches a lower layer")
    dev, dtype = subject.device, next(subject.model.parameters()).dtype
    hidden = resid_pre.to(dev).to(dtype)
    pad = batch.pad.to(dev)
    cache = _PrefixKV()
    with torch.inference_mode():
        # The prefix, once per variant (row 0's copy: the prefix of every row is the same).
        head = hidden[0, int(pad[0]):int(pad[0]) + prefix].expand(n_variants, prefix, -1).contiguous()
        causal = torch.ones(prefix, prefix, dtype=torch.bool, device=dev).tril()
        pos = torch.arange(prefix, device=dev).expand(n_variants, prefix)
        state = RunState(phase="prompt", pad=torch.zeros(n_variants, dtype=torch.long), prompt_len=prefix)
        with hooked(subject.model, subject.sitemap, state, interventions(1)):
            _run_layers(subject, head, start, causal.expand(n_variants, 1, prefix, prefix), pos, cache)
        # The rest: each row's own tokens, left-padded (row i's pad columns now also hide its prefix).
        tail = hidden[:, prefix:].repeat(n_variants, 1, 1)
        width = tail.shape[1]
        cols = torch.arange(width, device=dev)
        real = (cols[None, :] >= pad[:, None]).repeat(n_variants, 1)  # [rows, width]
        own = torch.ones(width, width, dtype=torch.bool, device=dev).tril()[None] & real[:, None, :]
        seen = torch.ones(len(real), width, prefix, dtype=torch.bool, device=dev)  # the prefix: by every token
        mask = torch.cat([seen, own], -1)[:, None]
        cache.repeat = b
        state = RunState(phase="prompt", pad=batch.pad.repeat(n_variants), prompt_len=width)
        with hooked(subject.model, subject.sitemap, state, edits_for_rows):
            positions = batch.position_ids[:, prefix:].repeat(n_variants, 1)
            out = _run_layers(subject, tail, start, mask, positions, cache)
            logits = subject.sitemap.unembed(subject.sitemap.final_norm(out[:, -1:]))
    return logits[:, -1].float()


# ---- greedy generation from an assembled KV cache --------------------------------------------------

def greedy_from_kv(subject: Subject, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor],
                   first: torch.Tensor, steps: int, eos: int | None) -> list[list[int]]:
    """Greedy continuation of n unpadded rows of one length T whose prompt pass is done: keys/values
    per layer ([n, kv_heads, T, d_head], e.g. clean where a patch could not reach, patched elsewhere),
    `first` the token each row chose after the prompt. Nothing is patched here: generated tokens see
    the patch only through the cache. Returns ids per row, `first` included, without eos."""
    from transformers import DynamicCache

    n, T = len(first), keys[0].shape[2]
    cache = DynamicCache()
    for layer, (k, v) in enumerate(zip(keys, values)):
        cache.update(k, v, layer)
    out = [[int(t)] for t in first]
    done = torch.tensor([eos is not None and int(t) == eos for t in first])
    nxt = first.to(subject.device)
    kw = cache_kwarg(subject.model.forward)
    with torch.inference_mode():
        for step in range(steps):
            if bool(done.all()):
                break
            pos = torch.full((n, 1), T + step, dtype=torch.long, device=subject.device)
            res = subject.model(input_ids=nxt[:, None], position_ids=pos, use_cache=True, logits_to_keep=1,
                                **{kw: cache})
            nxt = res.logits[:, -1].argmax(-1)
            for i in range(n):
                if not done[i]:
                    out[i].append(int(nxt[i]))
            if eos is not None:
                done |= (nxt == eos).cpu()
    return [[t for t in seq if t != eos] for seq in out]


def generate_with_patches(subject: Subject, ids: Sequence[int], position: Positions, targets: Sequence[int],
                          values: torch.Tensor, max_new_tokens: int) -> list[list[int]]:
    """The general path for one prompt written many ways: row r writes values[r] into resid_post of layer
    targets[r] at `position`, full forwards and generation through Subject.generate (an int or "last"
    position touches no generated token: the prompt pass only). Any family; the fast paths must equal it."""
    out: list[list[int]] = [[] for _ in targets]
    for layer in sorted(set(targets)):
        rows = [i for i, t in enumerate(targets) if t == layer]
        vals = values[rows]
        site = Site("resid_post", layer)
        gens = subject.generate([list(ids)] * len(rows), max_new_tokens,
                                lambda r, vals=vals, site=site: [Patch(site, position, values=vals[r])])
        for i, g in zip(rows, gens):
            out[i] = g
    return out
