"""Jacobians of linear relational embeddings from the suffix only: where the decoder layers can be driven one
by one, `jacobians` runs layers l+1.. over the tokens from the subject's on (the earlier tokens as clean
keys/values) and must give the Jacobian of the full forward with grad (`_full_jacobians`, every layer and
token, s patched in by the intervention engine) to float rounding: subject at the first token, in the middle
and at the last token, rows of different lengths left-padded in one batch, several layers, sdpa and eager
attention, a sliding window, and a caller inside inference mode. Families that cannot be driven so keep the
full pass: the same numbers as before, bit for bit.
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config

from modelprobe.report.record import ModelInfo
from modelprobe.subject import SiteMap, Subject
from modelprobe.subject.jacobian import _full_jacobians, jacobians
from modelprobe.subject.resumable import can_cut

PROMPTS = ["how do i make a cake", "tell me a story", "the music of my home is good", "sure"]


def _subject(toy_tokenizer, family: str = "llama", attn: str = "sdpa", window: int | None = None) -> Subject:
    """A 4-layer tiny model (the conftest's shape, deeper), so that layers below and above l both exist."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(family, len(toy_tokenizer), toy_tokenizer.bos_token_id, toy_tokenizer.eos_token_id,
                         toy_tokenizer.pad_token_id)
    config.num_hidden_layers = 4
    if getattr(config, "layer_types", None):  # one per layer, set when the config was made
        config.layer_types = [config.layer_types[0]] * 4
    if window is not None:
        config.sliding_window = window
    config._attn_implementation = attn
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    info = ModelInfo(id=f"tiny4-{family}", slug=f"tiny4-{family}", model_type=model.config.model_type,
                     n_layers=4, dtype="float32", device="cpu")
    return Subject(model, toy_tokenizer, info, SiteMap(model), batch_size=8, progress=False)


def _positions(ids: list[list[int]], where: str) -> list[int]:
    return {"first": [0] * len(ids), "last": [len(x) - 1 for x in ids],
            "middle": [len(x) // 2 for x in ids], "mixed": [0, len(ids[1]) - 1, 3, 0]}[where]


def _assert_same(fast: torch.Tensor, full: torch.Tensor) -> None:
    scale = float(full.abs().max())
    assert scale > 0
    torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("where", ["first", "middle", "last", "mixed"])
@pytest.mark.parametrize("layer", [0, 1, 2])
def test_suffix_jacobians_equal_the_full_forward(toy_tokenizer, monkeypatch, where, layer):
    subject = _subject(toy_tokenizer)
    assert can_cut(subject)
    ids = subject.encode_all(PROMPTS)
    assert len({len(x) for x in ids}) == len(ids)  # four lengths: left padding in the one batch
    pos = _positions(ids, where)
    import modelprobe.subject.jacobian as jm

    calls = []
    suffix = jm._suffix_jacobians
    monkeypatch.setattr(jm, "_suffix_jacobians", lambda *a, **k: calls.append(a[3]) or suffix(*a, **k))
    fast, st = jacobians(subject, ids, layer, pos, chunk=5)
    assert calls  # the suffix path ran
    full, base = _full_jacobians(subject, ids, layer, pos, chunk=5)
    _assert_same(fast, full)
    for a, b in ((st.s, base.s), (st.o, base.o), (st.logits, base.logits)):
        assert torch.equal(a, b)  # the clean pass is the same forward as before
    if where == "last":  # s at the last token: o = layers l+1.. of s itself, Jacobian far from zero
        assert float(fast.abs().max()) > 0.1


@pytest.mark.parametrize("attn, family, window", [("eager", "llama", None), ("sdpa", "mistral", 3),
                                                  ("eager", "mistral", 3), ("sdpa", "qwen3", None)])
def test_suffix_jacobians_other_attention(toy_tokenizer, attn, family, window):
    subject = _subject(toy_tokenizer, family, attn, window)
    assert can_cut(subject)
    ids = subject.encode_all(PROMPTS)
    for where in ("first", "mixed"):
        pos = _positions(ids, where)
        fast, _ = jacobians(subject, ids, 1, pos, chunk=16, batch_size=3)  # two batches
        full, _ = _full_jacobians(subject, ids, 1, pos, chunk=16, batch_size=3)
        _assert_same(fast, full)


def test_suffix_jacobians_inside_inference_mode(toy_tokenizer):
    """A caller holding inference mode (the clean states are inference tensors) still gets gradients."""
    subject = _subject(toy_tokenizer)
    ids = subject.encode_all(PROMPTS)
    pos = _positions(ids, "mixed")
    full, _ = _full_jacobians(subject, ids, 1, pos)
    with torch.inference_mode():
        fast, _ = jacobians(subject, ids, 1, pos)
    _assert_same(fast, full)


def test_family_that_cannot_resume_keeps_the_full_pass(tiny_subject, monkeypatch):
    import modelprobe.subject.jacobian as jm

    subject = tiny_subject("gpt2")
    assert not can_cut(subject)
    monkeypatch.setattr(jm, "_suffix_jacobians", lambda *a, **k: pytest.fail("gpt2 took the suffix path"))
    ids = subject.encode_all(PROMPTS)
    pos = _positions(ids, "mixed")
    jac, st = jacobians(subject, ids, 0, pos, chunk=5)
    ref, base = _full_jacobians(subject, ids, 0, pos, chunk=5)
    assert torch.equal(jac, ref) and torch.equal(st.s, base.s) and torch.equal(st.o, base.o)
