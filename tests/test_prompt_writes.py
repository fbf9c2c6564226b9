"""toolkit.prompt_writes.patch_at_and_generate: a write at (layer, token) of one prompt, many rows at once, resumed from the clean run.

The resumed path must give exactly the tokens of the general path (full forwards with a Patch at that
token, prompt pass only, through Subject.generate); the identity write (the clean state put back where
it was) must change nothing; a write at the last token must agree with patch_last_and_generate."""

from __future__ import annotations

import pytest
import torch

from modelprobe.subject import can_share_prefix, clean_pass
from modelprobe.toolkit import prompt_writes
from modelprobe.toolkit.prompt_writes import generate_with_patches, patch_last_and_generate

PROMPT = "how do i make a cake for my friend"
OTHER = ["tell me a story about the garden", "write a poem about water", "please help me build a kite"]


def _rows(subject):
    """Every (layer, other prompt) pair: the other prompt's last-token state at that layer."""
    others = [clean_pass(subject, subject.encode(t)) for t in OTHER]
    targets = [layer for _ in others for layer in range(subject.n_layers)]
    values = torch.stack([c.resid[layer, -1] for c in others for layer in range(subject.n_layers)])
    return targets, values


@pytest.mark.parametrize("position", [1, 4, -2, -1])
def test_resumed_rows_equal_full_forwards(tiny_subject, position):
    subject = tiny_subject("llama")
    assert can_share_prefix(subject)  # the resumed path is the one under test
    clean = clean_pass(subject, subject.encode(PROMPT), resid_pre=True)
    targets, values = _rows(subject)
    fast = prompt_writes.patch_at_and_generate(subject, clean, position, targets, values, 4, batch_size=4)
    full = generate_with_patches(subject, clean.ids, position % len(clean.ids), targets, values, 4)
    assert fast == full
    assert len({tuple(g) for g in fast}) > 1  # the writes matter: not every row says the same


def test_identity_write_changes_nothing(tiny_subject):
    subject = tiny_subject("llama")
    ids = subject.encode(PROMPT)
    clean = clean_pass(subject, ids, resid_pre=True)
    unpatched = subject.generate([ids], 4)[0]
    for position in range(len(ids)):
        targets = list(range(subject.n_layers))
        values = clean.resid[targets, position]
        assert prompt_writes.patch_at_and_generate(subject, clean, position, targets, values, 4) == [unpatched] * len(targets)


def test_last_token_agrees_with_patch_last(tiny_subject):
    subject = tiny_subject("llama")
    clean = clean_pass(subject, subject.encode(PROMPT), resid_pre=True)
    targets, values = _rows(subject)
    assert (prompt_writes.patch_at_and_generate(subject, clean, -1, targets, values, 4)
            == patch_last_and_generate(subject, clean, targets, values, 4))


def test_other_tokens_stay_clean_and_generation_is_unpatched(tiny_subject):
    """A write at token p changes nothing before p; generated tokens are not written (prompt pass only):
    the general path, which the resumed one equals, patches an int position in the prompt only."""
    subject = tiny_subject("llama")
    ids = subject.encode(PROMPT)
    clean = clean_pass(subject, ids, resid_pre=True)
    targets, values = _rows(subject)
    p = 3
    _, keys, _ = prompt_writes._resume_from(subject, clean, p, 0, values[:2])
    for layer in range(subject.n_layers):
        assert torch.equal(keys[layer][:, :, :p], clean.keys[layer][:, :, :p].expand(2, -1, -1, -1))
    with pytest.raises(ValueError, match="outside the prompt"):
        prompt_writes.patch_at_and_generate(subject, clean, len(ids), targets, values, 2)


def test_families_without_resume_take_the_general_path(tiny_subject):
    subject = tiny_subject("gpt2")
    assert not can_share_prefix(subject)
    ids = subject.encode(PROMPT)
    clean = clean_pass(subject, ids, resid_pre=True)
    values = clean.resid[[0, 1], 2]
    assert prompt_writes.patch_at_and_generate(subject, clean, 2, [0, 1], values, 3) == [subject.generate([ids], 3)[0]] * 2
