"""Greedy generation: the engine's own loop against transformers' generate, KV cache on and off, and
where interventions act while generating."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
from conftest import FAMILIES

from modelprobe.subject import AblateDirection, Add, From, Intervention, MeanAblate, Site

PROMPTS = ["how do i make a cake", "tell me", "write a poem about the day", "a"]
N_NEW = 8


@dataclass
class Recorder(Intervention):
    """Changes nothing; remembers (phase, column mask) of every call."""

    calls: list = field(default_factory=list)

    def edit(self, x, mask, state):
        self.calls.append((state.phase, mask.clone()))
        return x


@dataclass
class RecordingMeanAblate(MeanAblate):
    """MeanAblate that also keeps what it wrote at the newest column of each call."""

    newest: list = field(default_factory=list)

    def edit(self, x, mask, state):
        y = super().edit(x, mask, state)
        self.newest.append(y[:, -1].clone())
        return y


def _hf_greedy(subject, ids: list[int], n: int) -> list[int]:
    model, tok = subject.model, subject.tokenizer
    with torch.inference_mode():
        prompt = torch.tensor([ids])
        out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n,
                             do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=subject.pad_id)
    new = out[0, len(ids):].tolist()
    return new[:new.index(tok.eos_token_id)] if tok.eos_token_id in new else new


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_equals_transformers_generate(tiny_subject, family):
    subject = tiny_subject(family)
    ids = subject.encode_all(PROMPTS[:3])
    for x in ids:
        expected = _hf_greedy(subject, x, N_NEW)
        assert subject.generate([x], N_NEW) == [expected]
        assert subject.generate([x], N_NEW, use_cache=False) == [expected]


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2"])
def test_padded_batch_generates_what_single_prompts_do(tiny_subject, family):
    subject = tiny_subject(family)
    ids = subject.encode_all(PROMPTS)
    single = [subject.generate([x], N_NEW)[0] for x in ids]
    assert subject.generate(ids, N_NEW, batch_size=len(ids)) == single
    assert len(set(map(tuple, single))) > 1  # the prompts do lead to different continuations


def _interventions(kind: str, d: int):
    torch.manual_seed(7)
    if kind == "none":
        return []
    if kind == "add":
        return [Add(Site("resid_pre", 1), "all", vector=torch.randn(d), scale=3.0)]
    if kind == "inject_from":  # concept injection: from a prompt token on, generated tokens included
        return [Add(Site("resid_pre", 1), From(-2), vector=torch.randn(d), scale=3.0)]
    return [AblateDirection(Site("resid_post", 0), "all", direction=torch.randn(d))]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("kind", ["none", "add", "ablate", "inject_from"])
def test_kv_cache_does_not_change_tokens(tiny_subject, family, kind):
    subject = tiny_subject(family)
    ids = subject.encode_all(PROMPTS)
    ivs = _interventions(kind, subject.sitemap.d_model)
    cached = subject.generate(ids, N_NEW, ivs, batch_size=len(ids), use_cache=True, stop_at_eos=False)
    fresh = subject.generate(ids, N_NEW, ivs, batch_size=len(ids), use_cache=False, stop_at_eos=False)
    assert cached == fresh
    assert all(len(seq) == N_NEW for seq in cached)
    if kind != "none":  # the intervention did act, so equality above is not trivial
        assert cached != subject.generate(ids, N_NEW, batch_size=len(ids), stop_at_eos=False)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_mean_ablation_of_generated_tokens_same_with_and_without_cache(tiny_subject, family):
    subject = tiny_subject(family)
    sm = subject.sitemap
    ids = subject.encode_all(PROMPTS)
    T = max(map(len, ids)) + N_NEW  # means long enough to cover generated tokens as well
    torch.manual_seed(8)
    means = torch.randn(T, sm.n_heads, sm.d_head) * 3
    runs = {}
    for use_cache in (True, False):
        iv = RecordingMeanAblate(Site("attn.z", 0, heads=(1, 2)), "all", means=means)
        toks = subject.generate(ids, N_NEW, [iv], batch_size=len(ids), use_cache=use_cache, stop_at_eos=False)
        runs[use_cache] = (toks, iv.newest)
    assert runs[True][0] == runs[False][0]
    for step in range(N_NEW):  # the newest token got the same value in both modes
        torch.testing.assert_close(runs[True][1][step], runs[False][1][step], atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("use_cache", [True, False])
def test_generated_positions_leave_the_first_token_alone(tiny_subject, family, use_cache):
    subject = tiny_subject(family)
    ids = subject.encode_all(PROMPTS)
    torch.manual_seed(9)
    push = Add(Site("resid_pre", 1), "generated", vector=torch.randn(subject.sitemap.d_model), scale=5.0)
    base = subject.generate(ids, N_NEW, batch_size=len(ids), stop_at_eos=False)
    steered = subject.generate(ids, N_NEW, [push], batch_size=len(ids), use_cache=use_cache,
                               stop_at_eos=False)
    assert [s[0] for s in steered] == [b[0] for b in base]
    assert any(s[1:] != b[1:] for s, b in zip(steered, base))
    # Acting on the prompt instead does reach the first token.
    on_prompt = Add(Site("resid_pre", 1), "prompt", vector=push.vector, scale=5.0)
    first = subject.generate(ids, 1, [on_prompt], batch_size=len(ids), use_cache=use_cache)
    assert any(f[:1] != b[:1] for f, b in zip(first, base))


@pytest.mark.parametrize("use_cache", [True, False])
def test_positions_during_generation(tiny_subject, use_cache):
    subject = tiny_subject("llama")
    ids = sorted(subject.encode_all(PROMPTS[:2]), key=len)  # the batch keeps this order
    lengths = [len(x) for x in ids]
    assert lengths[0] < lengths[1]
    width = max(lengths)
    pad = torch.tensor([width - n for n in lengths])
    steps = 4
    for positions in ("all", "prompt", "generated", "last", 1):
        rec = Recorder(Site("resid_pre", 0), positions)
        subject.generate(ids, steps, [rec], batch_size=2, use_cache=use_cache, stop_at_eos=False)
        assert len(rec.calls) == steps
        for k, (_, mask) in enumerate(rec.calls):
            seq = width + k if not use_cache or k == 0 else 1
            assert mask.shape == (2, seq)
            if use_cache and k > 0:  # one new (generated) column per call
                assert mask.all() == (positions in ("all", "generated")) and mask.any() == mask.all()
                continue
            cols = torch.arange(seq)[None, :].expand(2, -1)
            real_prompt = (cols >= pad[:, None]) & (cols < width)
            generated = cols >= width
            expected = {
                "all": real_prompt | generated, "prompt": real_prompt, "generated": generated,
                "last": cols == width - 1, 1: cols == pad[:, None] + 1,
            }[positions]
            assert torch.equal(mask, expected), (positions, k)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2"])
@pytest.mark.parametrize("edits", ["none", "list", "per_row"])
def test_rows_that_stop_early_leave_the_batch_and_match_full_generation(tiny_subject, family, edits):
    """Rows settled early (by content, at different steps) leave the batch and its KV cache; every row's
    tokens equal the full generation's on their common prefix, with left padding, with a static
    intervention list and with per-row interventions (a callable asked again for the rows left)."""
    subject = tiny_subject(family)
    ids = subject.encode_all(PROMPTS) * 2
    d = subject.sitemap.d_model
    g = torch.Generator().manual_seed(0)
    vecs = torch.randn(len(ids), d, generator=g) * 2.0
    ivs = {"none": [], "list": [Add(Site("resid_pre", 1), "all", vector=vecs[0])],
           "per_row": lambda rows: [Add(Site("resid_pre", 1), "all", vector=vecs[rows])]}[edits]
    n_new = 12
    full = subject.generate(ids, n_new, ivs, batch_size=len(ids), stop_at_eos=False)

    def settled(reply: list[int]) -> bool:  # stops rows after 2..6 tokens, depending on what they say
        return len(reply) >= 2 + reply[0] % 5

    rows_seen: list[int] = []
    hook = subject.sitemap.layers[0].register_forward_pre_hook(
        lambda m, a, k: rows_seen.append(int((a[0] if a else k["hidden_states"]).shape[0])), with_kwargs=True)
    try:
        early = subject.generate(ids, n_new, ivs, batch_size=len(ids), stop_at_eos=False, settled=settled)
    finally:
        hook.remove()
    stops = [2 + f[0] % 5 for f in full]
    assert len(set(stops)) > 1  # rows do stop at different steps
    for e, f, k in zip(early, full, stops):
        assert e == f[:k]
    assert rows_seen[0] == len(ids) and rows_seen == sorted(rows_seen, reverse=True)
    assert sum(rows_seen) < len(ids) * len(rows_seen)  # finished rows were not computed any further
