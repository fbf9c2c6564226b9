"""Properties that must hold for any input (hypothesis), and the preflight checks that guard them at
model load, including proof that those checks can fail."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modelprobe.subject import AblateDirection, Add, Intervention, Site, Subject
from modelprobe.subject.preflight import (
    PREFLIGHT_PROMPTS,
    check_hooks_are_transparent,
    check_no_hooks_left,
    check_padding_invariance,
    run_preflight,
)

SETTINGS = settings(max_examples=15, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])
FIRST_WORD = 7  # ids below are special tokens in the toy tokenizer
RESIDUAL = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")
SITES = [Site(c, layer) for layer in (0, 1) for c in RESIDUAL]


def _prompts(vocab: int):
    """Lists of 2-5 prompts of random length, each starting with BOS like encoded text does."""
    prompt = st.lists(st.integers(FIRST_WORD, vocab - 1), min_size=1, max_size=12).map(lambda x: [2, *x])
    return st.lists(prompt, min_size=2, max_size=5)


def _direction(seed: int, d: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(d, generator=g) * scale


def _batch(subject, ids):
    return subject.make_batch(ids, list(range(len(ids))))


def _single_last_logits(model, ids) -> torch.Tensor:
    """Each prompt alone, unpadded, straight through transformers: the independent answer."""
    with torch.inference_mode():
        return torch.stack([model(input_ids=torch.tensor([x])).logits[0, -1] for x in ids])


# ---- algebra of interventions ------------------------------------------------------------------

@SETTINGS
@given(family=st.sampled_from(["llama", "gpt2", "gpt_neox", "gemma2"]), site=st.sampled_from(SITES),
       seed=st.integers(0, 2**31 - 1), positions=st.sampled_from(["all", "last", 0]))
def test_ablating_a_direction_twice_equals_once(tiny_subject, family, site, seed, positions):
    subject = tiny_subject(family)
    if site.component == "resid_mid" and family == "gpt_neox":
        site = Site("resid_pre", site.layer)
    batch = _batch(subject, subject.encode_all(["how do i make a cake", "tell me"]))
    u = _direction(seed, subject.sitemap.d_model, 3.0)
    once = subject.forward(batch, [site], [AblateDirection(site, positions, direction=u)], logits="all")
    twice = subject.forward(batch, [site], [AblateDirection(site, positions, direction=u)] * 2, logits="all")
    torch.testing.assert_close(twice.logits, once.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(twice.acts[site], once.acts[site], atol=1e-6, rtol=1e-6)


@SETTINGS
@given(family=st.sampled_from(["llama", "gpt2", "qwen3", "gemma3"]), site=st.sampled_from(SITES),
       seed=st.integers(0, 2**31 - 1), scale=st.floats(0.1, 10.0))
def test_add_then_subtract_is_identity(tiny_subject, family, site, seed, scale):
    subject = tiny_subject(family)
    batch = _batch(subject, subject.encode_all(["write a poem about the day", "a"]))
    v = _direction(seed, subject.sitemap.d_model)
    base = subject.forward(batch, logits="all").logits
    there_and_back = [Add(site, vector=v, scale=scale), Add(site, vector=-v, scale=scale)]
    got = subject.forward(batch, interventions=there_and_back, logits="all").logits
    real = batch.attention_mask.bool()
    torch.testing.assert_close(got[real], base[real], atol=1e-4, rtol=1e-4)
    moved = subject.forward(batch, interventions=there_and_back[:1], logits="all").logits
    assert (moved[real] - base[real]).abs().max() > 1e-4  # one of them alone does move the logits


# ---- left padding ------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox"])
def test_padded_batch_equals_single_runs(tiny_subject, family):
    subject = tiny_subject(family)
    site = Site("resid_mid", 1) if family != "gpt_neox" else Site("attn_out", 1)

    @SETTINGS
    @given(ids=_prompts(len(subject.tokenizer)))
    def check(ids):
        batched = subject.last_logits(ids, batch_size=len(ids))
        torch.testing.assert_close(batched, _single_last_logits(subject.model, ids), atol=1e-4, rtol=1e-4)
        # Forward.at picks the same token in the padded batch as in a lone run.
        fw = subject.forward(_batch(subject, ids), [site])
        middle = [len(x) // 2 for x in ids]
        picked = {index: fw.at(site, index) for index in (0, -1)} | {"middle": fw.at(site, middle)}
        for i, x in enumerate(ids):
            alone = subject.forward(_batch(subject, [x]), [site]).acts[site][0]
            for index, expected in ((0, alone[0]), (-1, alone[-1]), ("middle", alone[middle[i]])):
                torch.testing.assert_close(picked[index][i], expected, atol=1e-4, rtol=1e-4)

    check()


def _positions_by_column(monkeypatch):
    """Break the engine the classic way: position ids that count padding columns too."""
    original = Subject.make_batch

    def make_batch(self, ids, rows):
        b = original(self, ids, rows)
        b.position_ids = torch.arange(b.input_ids.shape[1], device=b.input_ids.device).expand_as(b.input_ids)
        return b

    monkeypatch.setattr(Subject, "make_batch", make_batch)


def test_without_position_ids_gpt2_padding_changes_logits(tiny_subject, monkeypatch):
    """Negative control for the test above: the check can fail, and does when positions are wrong."""
    subject = tiny_subject("gpt2")
    ids = subject.encode_all(["how do i make a cake now please", "tell me", "a"])
    single = _single_last_logits(subject.model, ids)
    b = _batch(subject, ids)
    with torch.inference_mode():  # transformers alone, attention mask but no position ids
        plain = subject.model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits[:, -1]
    assert (plain - single)[1:].abs().max() > 1e-2
    _positions_by_column(monkeypatch)
    assert (subject.last_logits(ids, batch_size=3) - single)[1:].abs().max() > 1e-2


# ---- preflight ---------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_preflight_passes_on_every_family(tiny_subject, family):
    results = run_preflight(tiny_subject(family))
    assert [r.name for r in results] == ["hooks_transparent", "left_padding_invariance", "no_hooks_left"]
    assert all(r.passed for r in results), [r.detail for r in results if not r.passed]
    lengths = {len(x) for x in tiny_subject(family).encode_all(PREFLIGHT_PROMPTS)}
    assert len(lengths) > 1  # the padding check really pads


def test_padding_check_fails_on_a_broken_subject(tiny_subject, monkeypatch):
    subject = tiny_subject("gpt2")
    ids = subject.encode_all(PREFLIGHT_PROMPTS)
    assert check_padding_invariance(subject, ids).passed
    _positions_by_column(monkeypatch)
    result = check_padding_invariance(subject, ids)
    assert not result.passed and result.value > result.tolerance


class _Shift(Intervention):
    def edit(self, x, mask, state):
        return x + 1e-3


def test_hook_and_leak_checks_can_fail(tiny_subject, monkeypatch):
    from modelprobe.subject import preflight

    subject = tiny_subject("llama")
    ids = subject.encode_all(PREFLIGHT_PROMPTS)
    # A "transparent" hook that is not: the check must notice.
    monkeypatch.setattr(preflight, "_Identity", _Shift)
    assert not check_hooks_are_transparent(subject, ids).passed
    # A hook tagged as ours and left behind.
    layer = subject.sitemap.layers[1]

    def stray(mod, args, out):
        return out

    stray._modelprobe = True
    handle = layer.register_forward_hook(stray)
    try:
        result = check_no_hooks_left(subject)
        assert not result.passed and "model.layers.1" in result.detail
    finally:
        handle.remove()
    assert check_no_hooks_left(subject).passed
