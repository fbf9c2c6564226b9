"""run_until: a capture-only forward stops after the highest layer a capture reads, with the full
forward's captures bit for bit (the layers above cannot change them), and skips those layers."""

from __future__ import annotations

import pytest
import torch

from modelprobe.subject import Add, Site, run_until, stop_point

PROMPTS = ["tell me", "how do i make a cake now", "write a poem about the day"]


def _calls(subject):
    """Count forward calls per decoder layer (plain torch hooks, removed by the caller)."""
    counts = [0] * subject.n_layers
    handles = [layer.register_forward_hook(lambda m, a, o, i=i: counts.__setitem__(i, counts[i] + 1))
               for i, layer in enumerate(subject.sitemap.layers)]
    return counts, handles


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2"])
@pytest.mark.parametrize(("sites", "layers_run"), [
    ([Site("resid_pre", 1)], 1),                       # layer 1's input: layer 1 itself need not run
    ([Site("resid_post", 0)], 1),
    ([Site("attn.z", 0), Site("resid_pre", 1)], 1),
    ([Site("resid_pre", 0), Site("mlp_out", 1)], 2),
])
def test_run_until_equals_full_forward(tiny_subject, family, sites, layers_run):
    subject = tiny_subject(family)
    ids = subject.encode_all(PROMPTS)
    edit = [Add(Site("resid_post", 0), vector=torch.ones(subject.sitemap.d_model))]
    for interventions in ((), edit):
        full = list(subject.run(ids, capture=sites, interventions=interventions, logits=None, batch_size=2))
        counts, handles = _calls(subject)
        try:
            cut = list(run_until(subject, ids, sites, interventions, batch_size=2))
        finally:
            for h in handles:
                h.remove()
        assert len(full) == len(cut) == 2
        for a, b in zip(full, cut):
            assert a.batch.rows == b.batch.rows and b.logits is None
            for site in sites:
                assert torch.equal(a.acts[site], b.acts[site])
        assert counts == [2] * layers_run + [0] * (subject.n_layers - layers_run)
    assert not subject.leaked_hooks()


def test_run_until_needs_the_full_forward_outside_the_layers(tiny_subject):
    subject = tiny_subject("llama")
    assert stop_point(subject, [Site("final")]) is None
    assert stop_point(subject, [Site("embed")]) is None
    assert stop_point(subject, [Site("resid_pre", 1), Site("resid_pre", 0)]) == (1, True)
    assert stop_point(subject, [Site("resid_pre", 1), Site("resid_post", 1)]) == (1, False)
    ids = subject.encode_all(PROMPTS)
    full = list(subject.run(ids, capture=[Site("final")], logits=None))
    cut = list(run_until(subject, ids, [Site("final")]))
    assert torch.equal(full[0].acts[Site("final")], cut[0].acts[Site("final")])
