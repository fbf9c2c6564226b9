"""Auto batch size (subject/batching.py) and stacked steering variants (toolkit/steering.stack_variants):
both change which rows share a forward, and neither may change a row's numbers."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from conftest import FAMILIES

from modelprobe.subject import AblateDirection, Site
from modelprobe.subject.batching import CPU_LIMITS, AutoBatch, Shape, chunk_sorted, row_bytes
from modelprobe.toolkit.behaviour import behave, behave_variants
from modelprobe.toolkit.steering import ablate_direction_everywhere, add_at_layer, stack_variants

PROMPTS = ["how do i make a cake", "tell me", "write a poem about the day", "a", "the cat sat on the mat today"]


def _auto(subject):
    return dataclasses.replace(subject, auto_batch=True, cache={}, _auto=None)


def test_auto_rows_stay_within_the_memory_budget_and_the_caps(tiny_subject):
    auto = AutoBatch(tiny_subject("llama").model)
    auto._budget = 10 * row_bytes(auto.shape, 64)  # room for exactly ten rows of 64 tokens
    assert auto.rows(48, 16) == 10
    assert auto.rows(32, 32) == 10
    assert auto.rows(2000) == 1  # never zero: a row that does not fit runs alone
    auto._budget, auto._rows = 1 << 40, {}
    max_rows, max_tokens = CPU_LIMITS
    assert auto.rows(8, 32) == max_rows  # generation: capped by rows
    assert auto.rows(100) == max_tokens // 100  # a prompt pass: capped by tokens


def test_row_bytes_grow_with_length_and_count_the_kv_cache(tiny_subject):
    shape = Shape.of(tiny_subject("llama").model)
    assert row_bytes(shape, 64) > row_bytes(shape, 32) > 0
    kv = 2 * shape.n_layers * shape.n_kv_heads * shape.head_dim * 32 * shape.bytes_per_value
    assert row_bytes(shape, 32) > kv


def test_chunks_keep_sorted_order_and_respect_each_batchs_longest_row():
    lengths = [3, 9, 1, 7, 5, 5, 2]
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    chunks = chunk_sorted(lengths, order, lambda width: 12 // width)
    assert [i for c in chunks for i in c] == order
    assert all(len(c) <= max(1, 12 // max(lengths[i] for i in c)) for c in chunks)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_auto_batches_give_the_numbers_of_fixed_batches(tiny_subject, family):
    fixed = tiny_subject(family)
    auto = _auto(fixed)
    ids = fixed.encode_all(PROMPTS * 7)
    batches = list(auto.batches(ids, new_tokens=6))
    assert sorted(r for b in batches for r in b.rows) == list(range(len(ids)))
    assert len(batches) < len(list(fixed.batches(ids)))  # the point: fewer, fuller batches
    torch.testing.assert_close(auto.last_logits(ids), fixed.last_logits(ids, batch_size=1), atol=1e-5, rtol=1e-5)
    assert auto.generate(ids, 6) == fixed.generate(ids, 6, batch_size=1)


def test_a_zero_direction_projects_out_nothing_bit_for_bit():
    x = torch.randn(3, 4, 8)
    iv = AblateDirection(Site("resid_pre", 0), direction=torch.zeros(3, 8))
    assert torch.equal(iv.edit(x, None, None), x)
    u = torch.randn(8)
    rows = torch.stack([u, torch.zeros(8), u])
    got = AblateDirection(Site("resid_pre", 0), direction=rows).edit(x, None, None)
    alone = AblateDirection(Site("resid_pre", 0), direction=u).edit(x, None, None)
    assert torch.equal(got[1], x[1]) and torch.equal(got[0], alone[0]) and torch.equal(got[2], alone[2])


def _variants(subject):
    d = subject.sitemap.d_model
    g = torch.Generator().manual_seed(3)
    r = torch.randn(d, generator=g) * 4
    return [[], ablate_direction_everywhere(subject.n_layers, r / r.norm()), add_at_layer(1, r),
            add_at_layer(0, -r, scale=0.5)]


class _Grader:
    needs_generation = True
    settles = False

    def grade_all(self, texts):
        return [len(t) % 2 == 0 for t in texts]

    def scores(self, logits):
        return logits[:, 0] - logits[:, 1]


@pytest.mark.parametrize("family", FAMILIES[:3] + ("gpt2",))
def test_stacked_variants_equal_each_variant_run_alone(tiny_subject, family):
    subject = tiny_subject(family)
    ids = subject.encode_all(PROMPTS)
    variants = _variants(subject)
    stacked = behave_variants(subject, _Grader(), ids, variants, max_new_tokens=8, batch_size=64)
    for v, got in zip(variants, stacked):
        alone = behave(subject, _Grader(), ids, v, max_new_tokens=8, batch_size=len(ids))
        assert got.texts == alone.texts
        np.testing.assert_array_equal(got.flags, alone.flags)
    merged = stack_variants(variants, len(ids))
    logits = subject.last_logits([x for _ in variants for x in ids], merged, batch_size=64)
    for k, v in enumerate(variants):
        torch.testing.assert_close(logits[k * len(ids):(k + 1) * len(ids)], subject.last_logits(ids, v),
                                   atol=1e-5, rtol=1e-5)


def test_variants_that_cannot_share_a_batch_run_one_by_one(tiny_subject):
    subject = tiny_subject("llama")
    per_row = add_at_layer(0, torch.randn(len(PROMPTS), subject.sitemap.d_model))
    assert stack_variants([[], per_row], len(PROMPTS)) is None
    ids = subject.encode_all(PROMPTS)
    got = behave_variants(subject, _Grader(), ids, [[], per_row], max_new_tokens=4)
    assert got[1].texts == behave(subject, _Grader(), ids, per_row, max_new_tokens=4).texts


def test_base_replies_are_shared_but_never_across_edited_weights(tiny_subject):
    from modelprobe.subject.weights import perturbed, zero

    subject = _auto(tiny_subject("llama"))
    ids = subject.encode_all(PROMPTS)
    first = behave(subject, _Grader(), ids, (), max_new_tokens=6)
    calls = []
    original = subject.generate
    subject.generate = lambda *a, **k: calls.append(1) or original(*a, **k)
    again = behave(subject, _Grader(), ids, (), max_new_tokens=6)
    assert again.texts == first.texts and not calls  # shared: not generated twice
    behave(subject, _Grader(), ids, (), max_new_tokens=7)
    assert len(calls) == 1  # other settings: generated
    from modelprobe.subject.weights import weight_groups

    with perturbed(subject.sitemap, weight_groups(subject.sitemap, "layer", layers=[0])[0].slices, zero):
        behave(subject, _Grader(), ids, (), max_new_tokens=6)
    assert len(calls) == 2  # edited weights: generated again, never the cached replies


def test_prompt_pass_batches_split_rather_than_pad_much():
    lengths = [10, 10, 11, 30, 31]
    order = list(range(5))
    chunks = chunk_sorted(lengths, order, lambda width: 100, max_padding=0.25)
    assert chunks == [[0, 1, 2], [3, 4]]
    assert chunk_sorted(lengths, order, lambda width: 100) == [order]  # generation: one batch
