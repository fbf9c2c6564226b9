"""Greedy generation for prompts that share a prefix: the prefix runs once, every row resumes from its
KV cache, and rows leave the batch as soon as they end.

Introspection trials are one long transcript that differs only from "Trial n" on; recomputing the
transcript for every trial is most of the work. Interventions must not touch the shared prefix (the
caller cuts it before the first injected token); positions are given relative to each row's suffix.
Finished rows are dropped from the batch and its cache, so a short "No." costs two steps, not
max_new_tokens.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch

from .batching import common_prefix  # noqa: F401  (re-exported for the kinds that share a transcript)
from .interventions import RunState, hooked
from .subject import InterventionsFor, Subject, cache_kwarg


def generate_shared(subject: Subject, prefix: Sequence[int], suffixes: Sequence[Sequence[int]], max_new_tokens: int,
                    interventions: InterventionsFor = (), batch_size: int | None = None,
                    desc: str = "generate") -> list[list[int]]:
    """Greedy continuation of prefix + suffix[i] per row (EOS stops a row). `interventions` (or a callable
    of the caller's row indices) act on the suffix and generated tokens only; their positions index
    the suffix (From(0) = the suffix's first token)."""
    from transformers import DynamicCache

    from ..progress import bar

    model, kw = subject.model, cache_kwarg(subject.model.forward)
    plen = len(prefix)
    if any(len(s) == 0 for s in suffixes):
        raise ValueError("every row needs at least one token after the shared prefix")
    with torch.inference_mode():
        base = DynamicCache()
        ids = torch.tensor([list(prefix)], device=subject.device)
        model(input_ids=ids, position_ids=torch.arange(plen, device=subject.device)[None], use_cache=True,
              logits_to_keep=1, **{kw: base})
    results: list[list[int]] = [[] for _ in suffixes]
    batches = list(subject.batches(suffixes, batch_size))
    for batch in bar(batches, desc, total=len(batches), enabled=subject.progress):
        for row, seq in zip(batch.rows, _generate_batch(subject, base, plen, batch, max_new_tokens, interventions)):
            results[row] = seq
    return results


def _generate_batch(subject: Subject, base, plen: int, batch, max_new: int, interventions) -> list[list[int]]:
    model, kw = subject.model, cache_kwarg(subject.model.forward)
    eos = subject.tokenizer.eos_token_id
    b = len(batch.rows)
    cache = copy.deepcopy(base)
    cache.batch_repeat_interleave(b)
    dev = batch.input_ids.device
    mask = torch.cat([torch.ones(b, plen, dtype=torch.long, device=dev), batch.attention_mask], dim=1)
    step_ids, step_pos = batch.input_ids, batch.position_ids + plen
    active = list(range(b))  # batch-local indices still generating
    out: list[list[int]] = [[] for _ in range(b)]
    state = RunState(phase="prompt", pad=batch.pad, prompt_len=batch.input_ids.shape[1])
    with torch.inference_mode():
        for _ in range(max_new):
            edits = subject.interventions_for(interventions, [batch.rows[i] for i in active])
            with hooked(model, subject.sitemap, state, edits):
                res = model(input_ids=step_ids, attention_mask=mask, position_ids=step_pos, use_cache=True,
                            logits_to_keep=1, **{kw: cache})
            nxt = res.logits[:, -1].argmax(-1)
            keep = []
            for j, i in enumerate(active):
                t = int(nxt[j])
                if eos is not None and t == eos:
                    continue
                out[i].append(t)
                keep.append(j)
            if not keep:
                break
            if len(keep) < len(active):  # drop finished rows from the batch and its cache
                sel = torch.tensor(keep, device=dev)
                cache.batch_select_indices(sel)
                mask, nxt, step_pos = mask[sel], nxt[sel], step_pos[sel]
                active = [active[j] for j in keep]
            mask = torch.cat([mask, torch.ones(len(active), 1, dtype=torch.long, device=dev)], dim=1)
            step_ids, step_pos = nxt[:, None], step_pos[:, -1:] + 1
            state = RunState(phase="generated")
    return out
