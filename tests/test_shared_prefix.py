"""Generation over a shared prompt prefix (subject/prefix.py): the prefix runs once per distinct set of
interventions on it, and every row's tokens equal those of the padded path (`share_prefix` off)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from modelprobe.subject import (
    AblateDirection,
    Add,
    From,
    MeanAblate,
    Patch,
    SetUnit,
    Site,
    Span,
    WeightDelta,
    ZeroAblate,
)
from modelprobe.subject import subject as subject_module
from modelprobe.subject.prefix import SharedPrefix, plan

SYSTEM = "you are a good friend and this is good"  # the chat template puts it first: a shared prefix
PROMPTS = ["how do i make a cake", "tell me", "write a poem about the day", "a", "tell me a story about my friend",
           "please write about food and music"]
N_NEW = 10


@pytest.fixture
def llama(tiny_subject):
    subject = tiny_subject("llama")
    yield subject
    subject.share_prefix = True


def _ids(subject) -> list[list[int]]:
    return subject.encode_all(PROMPTS, True, SYSTEM)


def _first_calls(subject, fn) -> tuple[object, list[tuple[int, int]]]:
    """fn()'s result and the (rows, positions) of every call of the first decoder layer."""
    shapes: list[tuple[int, int]] = []

    def pre(mod, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        shapes.append((h.shape[0], h.shape[1]))

    handle = subject.sitemap.layers[0].register_forward_pre_hook(pre, with_kwargs=True)
    try:
        return fn(), shapes
    finally:
        handle.remove()


def _both(subject, ids, interventions=(), **kw):
    """(padded path's ids, shared path's ids, the shared run's layer-0 call shapes)."""
    subject.share_prefix = False
    plain = subject.generate(ids, N_NEW, interventions, batch_size=len(ids), **kw)
    subject.share_prefix = True
    shared, shapes = _first_calls(subject, lambda: subject.generate(ids, N_NEW, interventions,
                                                                    batch_size=len(ids), **kw))
    assert subject.leaked_hooks() == []  # the prefix call's hooks and weight edits are undone too
    return plain, shared, shapes


def _vec(subject, seed: int, rows: int | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (rows, subject.sitemap.d_model) if rows else (subject.sitemap.d_model,)
    return torch.randn(*shape, generator=g) * 3.0


def test_the_test_prompts_share_a_prefix_and_pad_differently(llama):
    ids = _ids(llama)
    batch = next(llama.batches(ids, len(ids)))
    shared = plan(llama, batch, [])
    assert shared is not None and shared.length >= 8
    assert len(set(batch.pad.tolist())) > 2  # rows of several lengths: left padding in the batch
    assert shared.saved == len(ids) * shared.length - batch.input_ids.shape[1]


def test_no_intervention(llama):
    ids = _ids(llama)
    plain, shared, shapes = _both(llama, ids, stop_at_eos=False)
    assert shared == plain
    plen = plan(llama, next(llama.batches(ids, len(ids))), []).length
    width = max(map(len, ids))
    assert shapes[:2] == [(1, width), (len(ids), width - plen)]  # the prefix once, then the columns after it


@pytest.mark.parametrize("kind", ["add", "ablate", "both", "zero_heads", "weight"])
def test_an_intervention_at_every_position(llama, kind):
    """The prefix is computed under the intervention (one prefix row: the intervention is the same for all)."""
    v = _vec(llama, 1)
    ivs = {"add": [Add(Site("resid_pre", 1), "all", vector=v)],
           "ablate": [AblateDirection(Site("resid_post", 0), "all", direction=v)],
           "both": [AblateDirection(Site("attn_out", 0), "all", direction=v),
                    Add(Site("resid_pre", 1), "prompt", vector=v, scale=0.5)],
           "zero_heads": [ZeroAblate(Site("attn.z", 0, heads=(1,)), "all")],
           "weight": [WeightDelta("model.layers.0.mlp.down_proj.weight",
                                  torch.randn(32, 64, generator=torch.Generator().manual_seed(3)) * 0.5)]}[kind]
    ids = _ids(llama)
    plain, shared, shapes = _both(llama, ids, ivs, stop_at_eos=False)
    assert shared == plain
    assert shapes[0][0] == 1
    base = llama.generate(ids, N_NEW, batch_size=len(ids), stop_at_eos=False)
    assert shared != base  # the intervention did act (on the prefix too: see the next test)


def test_an_intervention_on_the_prefix_alone_changes_the_replies(llama):
    """Positions inside the prefix only: the prefix row must carry the edit for the replies to match."""
    ids = _ids(llama)
    plen = plan(llama, next(llama.batches(ids, len(ids))), []).length
    ivs = [Add(Site("resid_pre", 1), Span(2, plen - 1), vector=_vec(llama, 2))]
    plain, shared, shapes = _both(llama, ids, ivs, stop_at_eos=False)
    assert shared == plain and shapes[0][0] == 1
    assert shared != llama.generate(ids, N_NEW, batch_size=len(ids), stop_at_eos=False)


# Positions as functions of the prefix length: inside it, across its end, in the rows' own tokens only.
POSITIONS = {"last": lambda p: "last", "generated": lambda p: "generated", "int in prefix": lambda p: 3,
             "int after prefix": lambda p: p + 1, "int from the end": lambda p: -1, "-2": lambda p: -2,
             "From in prefix": lambda p: From(2), "From after prefix": lambda p: From(p + 1),
             "From from the end": lambda p: From(-1), "From before the start": lambda p: From(-99),
             "Span in prefix": lambda p: Span(0, 3), "Span across": lambda p: Span(p - 2, p + 2),
             "Span from the padding": lambda p: Span(-2, 40), "Span after prefix": lambda p: Span(p, p + 2)}


@pytest.mark.parametrize("where", sorted(POSITIONS))
def test_positions_touch_the_same_tokens(llama, where):
    ids = _ids(llama)
    plen = plan(llama, next(llama.batches(ids, len(ids))), []).length
    ivs = [Add(Site("resid_pre", 1), POSITIONS[where](plen), vector=_vec(llama, 3))]
    plain, shared, shapes = _both(llama, ids, ivs, stop_at_eos=False)
    assert shared == plain
    assert shapes[0] == (1, max(map(len, ids)))


def test_per_row_interventions_get_one_prefix_row_each(llama):
    """Two variants side by side (as behave_variants stacks them): two prefix rows; rows whose vectors all
    differ: no saving, so the padded path."""
    ids = _ids(llama)
    vecs = torch.stack([_vec(llama, 4), torch.zeros(llama.sitemap.d_model)])

    def two(rows):
        return [AblateDirection(Site("resid_post", 0), "all", direction=vecs[[r % 2 for r in rows]])]
    plain, shared, shapes = _both(llama, ids, two, stop_at_eos=False)
    assert shared == plain and shapes[0] == (2, shapes[0][1])

    every = _vec(llama, 5, len(ids))
    plain, shared, shapes = _both(llama, ids, lambda rows: [Add(Site("resid_pre", 1), "all", vector=every[rows])],
                                  stop_at_eos=False)
    assert shared == plain and shapes[0] == (len(ids), max(map(len, ids)))


def test_rows_that_stop_at_eos_or_settle(llama, monkeypatch):
    """Rows leave the batch (EOS, `settled`) at different steps, with a per-row callable asked again."""
    ids = _ids(llama)
    free = llama.generate(ids, N_NEW, batch_size=len(ids), stop_at_eos=False)
    # An end token the replies do say, at different steps: rows stop at different points.
    eos = free[0][3]
    stops = [r.index(eos) if eos in r else None for r in free]
    assert len(set(stops)) > 2
    monkeypatch.setattr(llama.tokenizer, "eos_token_id", eos)
    vecs = torch.stack([_vec(llama, 6) * 0.1, torch.zeros(llama.sitemap.d_model)])
    per_row = lambda rows: [Add(Site("resid_pre", 1), "all", vector=vecs[[r % 2 for r in rows]])]  # noqa: E731
    for edits in ([], per_row):
        plain, shared, _ = _both(llama, ids, edits)
        assert shared == plain
        assert len({len(s) for s in shared}) > 2
    settled = lambda reply: len(reply) >= 2 + reply[0] % 4  # noqa: E731
    plain, shared, _ = _both(llama, ids, per_row, stop_at_eos=False, settled=settled)
    assert shared == plain and len({len(s) for s in shared}) > 1


def test_a_batch_without_a_common_prefix_takes_the_padded_path(llama):
    ids = llama.encode_all(PROMPTS)  # no chat template: the BOS alone is shared
    batch = next(llama.batches(ids, len(ids)))
    assert plan(llama, batch, []) is None
    plain, shared, shapes = _both(llama, ids, stop_at_eos=False)
    assert shared == plain and shapes[0] == (len(ids), max(map(len, ids)))


def test_per_position_means_and_per_row_positions_after_the_prefix(llama):
    """MeanAblate per position indexes means by token index, which both calls keep; per-row positions that
    stay out of the prefix touch only the columns after it, where positions keep their meaning."""
    ids = _ids(llama)
    plen = plan(llama, next(llama.batches(ids, len(ids))), []).length
    sm = llama.sitemap
    means = torch.randn(40, sm.n_heads, sm.d_head, generator=torch.Generator().manual_seed(9)) * 3
    starts = torch.tensor([plen + i % 3 for i in range(len(ids))])
    for ivs in ([MeanAblate(Site("attn.z", 0, heads=(1,)), "all", means=means)],
                [Add(Site("resid_pre", 1), From(starts), vector=_vec(llama, 8))],
                [Add(Site("resid_pre", 1), -1 - starts % 2, vector=_vec(llama, 8))]):
        plain, shared, shapes = _both(llama, ids, ivs, stop_at_eos=False)
        assert shared == plain and shapes[0][0] == 1, ivs


def test_interventions_it_cannot_carry_over_take_the_padded_path(llama):
    ids = _ids(llama)
    batch = next(llama.batches(ids, len(ids)))
    n = len(ids)

    @dataclasses.dataclass
    class Shifted(Add):  # a type not known to subject/prefix: its edit might read the call's layout
        pass

    unshareable = [
        Patch(Site("resid_pre", 1), "all", values=torch.zeros(n, batch.input_ids.shape[1], llama.sitemap.d_model),
              per_position=True),  # values laid out like the padded batch's columns
        SetUnit(Site("resid_pre", 1), "all", read=_vec(llama, 7), write=_vec(llama, 7)),  # not cut by row here
        Add(Site("resid_pre", 1), torch.tensor([i % 2 for i in range(n)]), vector=_vec(llama, 8)),  # rows differ
        Add(Site("resid_pre", 1), From(torch.tensor([i % 2 for i in range(n)])), vector=_vec(llama, 8)),
        Add(Site("resid_pre", 1), -(min(map(len, ids)) - 1), vector=_vec(llama, 8)),  # from the end, into the prefix
        Shifted(Site("resid_pre", 1), "all", vector=_vec(llama, 8)),
    ]
    for iv in unshareable:
        assert plan(llama, batch, [iv]) is None, iv
    # Acting after the prefix only, SetUnit rides along (its edit reads no layout).
    assert plan(llama, batch, [dataclasses.replace(unshareable[1], positions="last")]) is not None
    plain, shared, shapes = _both(llama, ids, unshareable[2:3], stop_at_eos=False)
    assert shared == plain and shapes[0][0] == n


@pytest.mark.parametrize("broken", [None, "prefix positions", "cache columns", "unmasked pad"])
def test_single_prompts_catch_a_wrong_position_or_an_unmasked_pad(llama, monkeypatch, broken):
    """Each prompt alone (no padding, no shared prefix) is the reference: the shared run matches it, and one
    whose prefix runs at positions off by one, whose cache ignores the rows' padding, or whose pad columns
    are not masked, does not."""
    ids = _ids(llama)
    single = [llama.generate([x], N_NEW, stop_at_eos=False)[0] for x in ids]
    fill = SharedPrefix.fill

    def wrong(subject, batch, edits):
        if broken == "unmasked pad":
            batch.attention_mask.fill_(1)
        shared = plan(subject, batch, edits)
        if broken == "prefix positions":
            shared.prefix_positions = shared.prefix_positions + 1
        return shared

    monkeypatch.setattr(subject_module, "plan", wrong)
    if broken == "cache columns":
        monkeypatch.setattr(SharedPrefix, "fill", lambda self, cache, own, pad: fill(self, cache, own, pad * 0))
    llama.share_prefix = True
    got = llama.generate(ids, N_NEW, batch_size=len(ids), stop_at_eos=False)
    assert (got == single) == (broken is None)
