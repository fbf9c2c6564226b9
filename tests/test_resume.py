"""Resuming from a cached residual stream gives the full forward's numbers, with and without
interventions, on a left-padded batch; families that cannot be resumed fall back to a full forward."""

from __future__ import annotations

import pytest
import torch

from modelprobe.subject import MeanAblate, Site, ZeroAblate, can_resume, first_layer, resume

PROMPTS = ["tell me", "how do i make a cake now", "write a poem about the day"]  # left padding on rows 0, 2


def _batch(subject):
    ids = subject.encode_all(PROMPTS)
    batch = subject.make_batch(ids, list(range(len(ids))))
    assert int(batch.pad.max()) > 0
    return batch


def _cached(subject, batch, layer):
    site = Site("resid_pre", layer)
    return subject.forward(batch, capture=[site], logits=None).acts[site]


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
@pytest.mark.parametrize("start", [0, 1])
def test_resume_equals_full_forward(tiny_subject, family, start):
    subject = tiny_subject(family)
    assert can_resume(subject)
    batch = _batch(subject)
    full = subject.forward(batch, logits="all")
    resumed = resume(subject, batch, start, _cached(subject, batch, start), logits="all")
    _close(resumed.logits, full.logits)
    last = resume(subject, batch, start, _cached(subject, batch, start))
    _close(last.logits, full.logits[:, -1])


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_resume_with_interventions_and_captures(tiny_subject, family):
    subject = tiny_subject(family)
    batch = _batch(subject)
    sm = subject.sitemap
    gen = torch.Generator().manual_seed(0)
    means = torch.randn(batch.input_ids.shape[1], sm.n_heads, sm.d_head, generator=gen)
    unit_mask = torch.tensor([[True, False, False, True], [False, True, False, False], [True, True, True, True]])
    ivs = [MeanAblate(Site("attn.z", 1), means=means, unit_mask=unit_mask[:, :sm.n_heads]),
           ZeroAblate(Site("mlp.post", 1, neurons=(0, 3, 5)))]
    capture = [Site("resid_post", 1), Site("attn.z", 1)]
    full = subject.forward(batch, capture=capture, interventions=ivs, logits="last")
    resumed = resume(subject, batch, 1, _cached(subject, batch, 1), interventions=ivs, capture=capture)
    _close(resumed.logits, full.logits)
    for site in capture:
        _close(resumed.acts[site], full.acts[site])
    # the interventions changed something, so the equality above is not vacuous
    assert not torch.allclose(full.logits, subject.forward(batch).logits)
    # per-row interventions given as a callable of the batch rows work the same way
    call = resume(subject, batch, 1, _cached(subject, batch, 1), interventions=lambda rows: ivs)
    _close(call.logits, full.logits)


def test_resume_refuses_interventions_below_start(tiny_subject):
    subject = tiny_subject("llama")
    batch = _batch(subject)
    with pytest.raises(ValueError, match="below the cached"):
        resume(subject, batch, 1, _cached(subject, batch, 1), interventions=[ZeroAblate(Site("attn.z", 0))])
    assert first_layer([Site("embed")], subject) == -1
    assert first_layer([Site("final")], subject) == subject.n_layers
    assert not subject.leaked_hooks()


@pytest.mark.parametrize("family", ["gpt2", "gemma2"])
def test_unsupported_family_falls_back_to_full_forward(tiny_subject, family):
    subject = tiny_subject(family)
    assert not can_resume(subject)
    batch = _batch(subject)
    iv = [ZeroAblate(Site("attn.z", 1), unit_mask=torch.ones(3, subject.sitemap.n_heads, dtype=torch.bool))]
    full = subject.forward(batch, interventions=iv)
    resumed = resume(subject, batch, 1, _cached(subject, batch, 1), interventions=iv)
    _close(resumed.logits, full.logits)


@pytest.mark.slow
def test_resume_on_the_default_model():
    from modelprobe.subject import load_subject

    subject = load_subject("smollm2-135m-instruct", progress=False)
    prompts = ["When Mary and John went to the store, John gave a drink to", "The capital of France is",
               "Then, Lisa and Andrew had a long chat at the cafe. Andrew offered a cookie to"]
    ids = subject.encode_all(prompts)
    batch = subject.make_batch(ids, list(range(len(ids))))
    sm = subject.sitemap
    means = torch.randn(batch.input_ids.shape[1], sm.n_heads, sm.d_head, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(3, sm.n_heads, dtype=torch.bool)
    mask[0, 6] = mask[2, :4] = True
    ivs = [MeanAblate(Site("attn.z", 12), means=means * 0.1, unit_mask=mask)]
    for interventions in ([], ivs):
        full = subject.forward(batch, interventions=interventions)
        resumed = resume(subject, batch, 12, _cached(subject, batch, 12), interventions=interventions)
        torch.testing.assert_close(resumed.logits, full.logits, rtol=1e-4, atol=1e-4)
