"""Interventions and the hook context, each checked against an edit done by hand with a plain
PyTorch hook (or against the arithmetic the intervention promises) on tiny random models."""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field

import pytest
import torch

from modelprobe.errors import SiteError
from modelprobe.subject import (
    AblateDirection,
    Add,
    Intervention,
    MeanAblate,
    Patch,
    RunState,
    Site,
    WeightDelta,
    ZeroAblate,
    hooked,
    leaked_hooks,
)

SHORT_LONG = ["tell me", "how do i make a cake now"]  # left padding puts the short row at pad > 0


def batch_of(subject, prompts):
    ids = subject.encode_all(prompts)
    return subject.make_batch(ids, list(range(len(ids))))


@contextlib.contextmanager
def hand_hook(module, fn, pre: bool):
    """A plain PyTorch hook that rewrites the module's input (pre) or output with fn(x)."""
    if pre:
        def hook(mod, args, kwargs):
            if args:
                return (fn(args[0]), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": fn(kwargs["hidden_states"])}
        handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    else:
        def hook(mod, args, out):
            return (fn(out[0]), *out[1:]) if isinstance(out, tuple) else fn(out)
        handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def plain_logits(subject, batch) -> torch.Tensor:
    with torch.inference_mode():
        return subject.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                             position_ids=batch.position_ids, use_cache=False).logits


@dataclass
class Recorder(Intervention):
    """Changes nothing; remembers the column mask it was given on each call."""

    masks: list = field(default_factory=list)

    def edit(self, x, mask, state):
        self.masks.append(mask.clone())
        return x


# ---- Add ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("positions", ["all", "last"])
def test_add_equals_a_hand_written_hook(tiny_subject, family, positions):
    subject = tiny_subject(family)
    batch = batch_of(subject, SHORT_LONG)
    torch.manual_seed(1)
    v = torch.randn(subject.sitemap.d_model)
    real = batch.attention_mask.bool()
    cols = real.clone()
    if positions == "last":
        cols[:, :-1] = False

    add = Add(Site("resid_pre", 1), positions, vector=v, scale=2.0)
    fw = subject.forward(batch, [Site("resid_post", 1)], [add], logits="all")
    captured = {}
    with hand_hook(subject.sitemap.layers[1], lambda x: x + 2.0 * v * cols[..., None], pre=True), \
            hand_hook(subject.sitemap.layers[1], lambda x: captured.setdefault("post", x.clone()), pre=False):
        expected = plain_logits(subject, batch)
    torch.testing.assert_close(fw.acts[Site("resid_post", 1)], captured["post"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fw.logits, expected, atol=1e-5, rtol=1e-5)
    assert (fw.logits - plain_logits(subject, batch)).abs().max() > 1e-2  # the edit did something


def test_add_per_row_vectors(tiny_subject):
    subject = tiny_subject("llama")
    batch = batch_of(subject, SHORT_LONG)
    torch.manual_seed(2)
    vs = torch.randn(2, subject.sitemap.d_model)
    site = Site("resid_mid", 0)
    base = subject.forward(batch, [site]).acts[site]
    got = subject.forward(batch, [site], [Add(site, vector=vs)]).acts[site]
    real = batch.attention_mask.bool()
    torch.testing.assert_close(got[real], (base + vs[:, None, :])[real], atol=1e-6, rtol=0)
    assert torch.equal(got[~real], base[~real])  # padding columns are left alone


# ---- AblateDirection -----------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_ablate_direction_leaves_activation_orthogonal(tiny_subject, family):
    subject = tiny_subject(family)
    batch = batch_of(subject, SHORT_LONG)
    torch.manual_seed(3)
    u = torch.randn(subject.sitemap.d_model) * 5.0  # not unit: the intervention must normalise
    site = Site("resid_post", 0)
    base = subject.forward(batch, [site]).acts[site]
    got = subject.forward(batch, [site], [AblateDirection(site, direction=u)]).acts[site]
    real = batch.attention_mask.bool()
    unit = u / u.norm()
    assert (got[real] @ unit).abs().max() < 1e-5
    assert (base[real] @ unit).abs().min() > 1e-3  # there was something to remove
    # Only the component along u goes: x - (x.u)u.
    torch.testing.assert_close(got[real], base[real] - (base[real] @ unit)[:, None] * unit, atol=1e-5, rtol=0)
    assert torch.equal(got[~real], base[~real])


def test_ablate_direction_at_last_position_only(tiny_subject):
    subject = tiny_subject("llama")
    batch = batch_of(subject, SHORT_LONG)
    u = torch.ones(subject.sitemap.d_model)
    site = Site("resid_pre", 1)
    base = subject.forward(batch, [site]).acts[site]
    got = subject.forward(batch, [site], [AblateDirection(site, "last", direction=u)]).acts[site]
    assert torch.equal(got[:, :-1], base[:, :-1])
    assert (got[:, -1] @ (u / u.norm())).abs().max() < 1e-5


# ---- ZeroAblate / MeanAblate -----------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen3"])
def test_zero_ablate_one_head(tiny_subject, family):
    subject = tiny_subject(family)
    batch = batch_of(subject, SHORT_LONG)
    z = Site("attn.z", 0)
    base = subject.forward(batch, [z, Site("attn_out", 0)])
    fw = subject.forward(batch, [z, Site("attn_out", 0)], [ZeroAblate(Site("attn.z", 0, heads=(2,)))])
    got, ref = fw.acts[z], base.acts[z]
    real = batch.attention_mask.bool()
    assert torch.equal(got[..., 2, :][real], torch.zeros_like(got[..., 2, :][real]))
    assert ref[..., 2, :][real].abs().max() > 1e-3
    others = [h for h in range(subject.sitemap.n_heads) if h != 2]
    assert torch.equal(got[..., others, :], ref[..., others, :])  # other heads untouched
    assert torch.equal(got[~real], ref[~real])  # padding untouched
    # The output projection saw the edited z: attn_out drops exactly head 2's contribution.
    sm = subject.sitemap
    proj = sm.module(0, sm.family.attn_out_proj)
    w = proj.weight if sm.family.conv1d else proj.weight.T  # [heads * d_head, d_model]
    head_rows = w[2 * sm.d_head:3 * sm.d_head]
    with torch.inference_mode():
        expected = base.acts[Site("attn_out", 0)] - ref[..., 2, :] @ head_rows
    torch.testing.assert_close(fw.acts[Site("attn_out", 0)][real], expected[real], atol=1e-5, rtol=1e-5)


def test_zero_ablate_neurons(tiny_subject):
    subject = tiny_subject("gpt2")
    batch = batch_of(subject, SHORT_LONG)
    site = Site("mlp.post", 1)
    base = subject.forward(batch, [site]).acts[site]
    got = subject.forward(batch, [site], [ZeroAblate(Site("mlp.post", 1, neurons=(0, 5, 127)))]).acts[site]
    real = batch.attention_mask.bool()
    assert torch.equal(got[..., [0, 5, 127]][real], torch.zeros(int(real.sum()), 3))
    keep = [i for i in range(subject.sitemap.d_mlp) if i not in (0, 5, 127)]
    assert torch.equal(got[..., keep], base[..., keep])


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_mean_ablate_indexes_means_by_unpadded_position(tiny_subject, family):
    subject = tiny_subject(family)
    batch = batch_of(subject, SHORT_LONG)
    lengths, pad = batch.lengths, batch.pad.tolist()
    assert pad[0] > 0 and pad[1] == 0
    sm = subject.sitemap
    T = max(lengths)
    means = torch.arange(1.0, T + 1)[:, None, None].expand(T, sm.n_heads, sm.d_head).clone()
    z = Site("attn.z", 1)
    base = subject.forward(batch, [z]).acts[z]
    got = subject.forward(batch, [z], [MeanAblate(Site("attn.z", 1, heads=(1,)), means=means)]).acts[z]
    for row in range(2):
        for j in range(lengths[row]):  # token j of each row gets mean j, wherever padding put it
            assert torch.equal(got[row, pad[row] + j, 1], torch.full((sm.d_head,), float(j + 1)))
        assert torch.equal(got[row, :pad[row]], base[row, :pad[row]])
    assert torch.equal(got[..., [0, 2, 3], :], base[..., [0, 2, 3], :])


def test_mean_ablate_single_mean_whole_vector(tiny_subject):
    subject = tiny_subject("llama")
    batch = batch_of(subject, SHORT_LONG)
    site = Site("mlp_out", 0)
    mean = torch.linspace(-1, 1, subject.sitemap.d_model)
    ablate = MeanAblate(site, "last", means=mean, per_position=False)
    got = subject.forward(batch, [site], [ablate]).acts[site]
    base = subject.forward(batch, [site]).acts[site]
    assert torch.equal(got[:, -1], mean.expand(2, -1))
    assert torch.equal(got[:, :-1], base[:, :-1])


def test_per_row_unit_mask(tiny_subject):
    subject = tiny_subject("llama")
    batch = batch_of(subject, SHORT_LONG)
    z = Site("attn.z", 1)
    base = subject.forward(batch, [z]).acts[z]
    mask = torch.tensor([[True, False, False, False], [False, False, True, True]])
    got = subject.forward(batch, [z], [ZeroAblate(z, unit_mask=mask)]).acts[z]
    real = batch.attention_mask.bool()
    for row in range(2):
        for head in range(4):
            g, b = got[row, :, head][real[row]], base[row, :, head][real[row]]
            if mask[row, head]:
                assert torch.equal(g, torch.zeros_like(g))
            else:
                assert torch.equal(g, b)


def test_per_row_data_follows_caller_rows_through_sorted_batches(tiny_subject):
    """`interventions` as a callable gets Batch.rows, so per-row masks land on the right prompts even
    though batches are sorted by length."""
    subject = tiny_subject("gpt2")
    prompts = ["how do i make a cake now please", "tell me", "write a poem", "a"]
    ids = subject.encode_all(prompts)
    masks = torch.eye(4, dtype=torch.bool)  # prompt i loses head i
    z = Site("attn.z", 0)
    seen = []
    for fw in subject.run(ids, [z], lambda rows: [ZeroAblate(z, unit_mask=masks[rows])], batch_size=3):
        for i, row in enumerate(fw.batch.rows):
            last = fw.acts[z][i, -1]  # [heads, d_head] at the last token
            assert torch.equal(last[row], torch.zeros(subject.sitemap.d_head))
            assert all(last[h].abs().max() > 0 for h in range(4) if h != row)
            seen.append(row)
    assert seen != [0, 1, 2, 3] and sorted(seen) == [0, 1, 2, 3]  # batches really were reordered


# ---- Patch -------------------------------------------------------------------------------------

def test_patch_writes_only_the_given_position(tiny_subject):
    subject = tiny_subject("llama")
    batch = batch_of(subject, SHORT_LONG)
    pad = batch.pad.tolist()
    torch.manual_seed(4)
    values = torch.randn(2, subject.sitemap.d_model)
    post0, post1 = Site("resid_post", 0), Site("resid_post", 1)
    base = subject.forward(batch, [post0, post1]).acts
    got = subject.forward(batch, [post0, post1], [Patch(post0, 1, values=values)]).acts
    for row in range(2):
        col = pad[row] + 1  # unpadded token index 1
        assert torch.equal(got[post0][row, col], values[row])
        others = [c for c in range(batch.input_ids.shape[1]) if c != col]
        assert torch.equal(got[post0][row, others], base[post0][row, others])
        # Causality downstream: earlier tokens unchanged, the patched one changed.
        assert torch.equal(got[post1][row, :col], base[post1][row, :col])
        assert (got[post1][row, col] - base[post1][row, col]).abs().max() > 1e-3


def test_patch_per_row_positions_and_heads(tiny_subject):
    subject = tiny_subject("gpt2")
    batch = batch_of(subject, SHORT_LONG)
    pad = batch.pad.tolist()
    z = Site("attn.z", 0)
    values = torch.full((2, 4, subject.sitemap.d_head), 7.0)
    base = subject.forward(batch, [z]).acts[z]
    where = torch.tensor([0, 3])
    got = subject.forward(batch, [z], [Patch(Site("attn.z", 0, heads=(3,)), where, values=values)]).acts[z]
    changed = (got != base).any(-1)  # [b, s, heads]
    for row in range(2):
        col = pad[row] + int(where[row])
        assert torch.equal(got[row, col, 3], values[row, 3])
        assert changed[row].nonzero().tolist() == [[col, 3]]


def test_negative_per_row_positions_count_from_the_end(tiny_subject):
    subject = tiny_subject("llama")
    batch = batch_of(subject, SHORT_LONG)
    rec = Recorder(Site("resid_pre", 0), torch.tensor([-1, -2]))
    subject.forward(batch, interventions=[rec])
    width = batch.input_ids.shape[1]
    assert rec.masks[0].nonzero().tolist() == [[0, width - 1], [1, width - 2]]


# ---- positions in a plain forward ----------------------------------------------------------

def test_positions_in_a_forward(tiny_subject):
    subject = tiny_subject("llama")
    batch = batch_of(subject, SHORT_LONG)
    real = batch.attention_mask.bool()
    width = real.shape[1]
    pad = batch.pad

    def mask_for(positions):
        rec = Recorder(Site("resid_mid", 1), positions)
        subject.forward(batch, interventions=[rec])
        assert len(rec.masks) == 1
        return rec.masks[0]

    cols = torch.arange(width)[None, :]
    assert torch.equal(mask_for("all"), real)
    assert torch.equal(mask_for("prompt"), real)
    assert not mask_for("generated").any()
    assert torch.equal(mask_for("last"), cols.expand(2, -1) == width - 1)
    assert torch.equal(mask_for(0), cols == pad[:, None])
    assert torch.equal(mask_for(2), cols == pad[:, None] + 2)
    assert torch.equal(mask_for(-2), cols.expand(2, -1) == width - 2)


# ---- WeightDelta -----------------------------------------------------------------------------

@pytest.mark.parametrize(("family", "name"), [("llama", "model.layers.0.mlp.down_proj.weight"),
                                              ("gpt2", "transformer.h.1.attn.c_attn.bias"),
                                              ("gpt2", "lm_head.weight")])
def test_weight_delta_inside_and_restored_bit_exactly(tiny_subject, family, name):
    subject = tiny_subject(family)
    batch = batch_of(subject, SHORT_LONG)
    param = subject.model.get_parameter(name)
    before = param.detach().clone()
    torch.manual_seed(5)
    delta = torch.randn_like(before) * 0.3
    # Independent answer: a copy of the model with the weight changed by hand.
    other = copy.deepcopy(subject.model)
    with torch.no_grad():
        other.get_parameter(name).add_(delta)
    with torch.inference_mode():
        expected = other(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                         position_ids=batch.position_ids).logits[:, -1]
    got = subject.forward(batch, interventions=[WeightDelta(name, delta)]).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert (got - plain_logits(subject, batch)[:, -1]).abs().max() > 1e-3
    assert subject.model.get_parameter(name) is param
    assert torch.equal(param, before)  # bit-exact, not merely close
    # ... and also when the body raises.
    with pytest.raises(RuntimeError, match="boom"), \
            hooked(subject.model, subject.sitemap, RunState(), [WeightDelta(name, delta)]):
        assert not torch.equal(param, before)
        raise RuntimeError("boom")
    assert torch.equal(param, before)


def test_weight_delta_unknown_parameter(tiny_subject):
    subject = tiny_subject("llama")
    with pytest.raises(SiteError, match="no parameter 'model.layers.9.mlp.down_proj.weight'"):
        with hooked(subject.model, subject.sitemap, RunState(),
                    [WeightDelta("model.layers.9.mlp.down_proj.weight", torch.zeros(1))]):
            pass
    assert leaked_hooks(subject.model) == []


# ---- the hook context ------------------------------------------------------------------------

@contextlib.contextmanager
def users_hook(module):
    """A hook the user put on the model before modelprobe ran; counts its calls."""
    calls = []
    handle = module.register_forward_hook(lambda mod, args, out: calls.append(1))
    try:
        yield calls, handle
    finally:
        handle.remove()


def _edits(subject):
    d = subject.sitemap.d_model
    return [Add(Site("resid_post", 0), vector=torch.ones(d)), ZeroAblate(Site("attn.z", 1, heads=(0,))),
            AblateDirection(Site("resid_pre", 0), direction=torch.ones(d))]


@pytest.mark.parametrize("raises", [False, True])
def test_hooked_removes_exactly_its_own_hooks(tiny_subject, raises):
    subject = tiny_subject("llama")
    batch = batch_of(subject, SHORT_LONG)
    layer0 = subject.sitemap.layers[0]  # the same module the context hooks for resid_post 0
    with users_hook(layer0) as (calls, handle):
        ctx = pytest.raises(ValueError, match="inside") if raises else contextlib.nullcontext()
        with ctx, hooked(subject.model, subject.sitemap, RunState(pad=batch.pad), _edits(subject),
                         [Site("resid_post", 0), Site("final")]) as cap:
            assert leaked_hooks(subject.model)
            plain_logits(subject, batch)
            assert len(cap[Site("resid_post", 0)]) == 1
            if raises:
                raise ValueError("inside the context")
        assert leaked_hooks(subject.model) == []
        assert handle.id in layer0._forward_hooks  # the user's hook survived
        n = len(calls)
        plain_logits(subject, batch)
        assert len(calls) == n + 1  # and still fires
    assert not layer0._forward_hooks and not layer0._forward_pre_hooks


def test_hooks_removed_when_an_edit_fails_mid_forward(tiny_subject):
    subject = tiny_subject("llama")
    batch = batch_of(subject, SHORT_LONG)
    bad = Add(Site("resid_post", 1), vector=torch.ones(3))  # wrong width: fails inside the forward
    with pytest.raises(RuntimeError):
        subject.forward(batch, [Site("resid_pre", 0)], [bad])
    assert leaked_hooks(subject.model) == []
    torch.testing.assert_close(subject.forward(batch).logits, plain_logits(subject, batch)[:, -1])


def test_nested_contexts(tiny_subject):
    subject = tiny_subject("gpt2")
    batch = batch_of(subject, SHORT_LONG)
    d = subject.sitemap.d_model
    state = RunState(pad=batch.pad)
    outer_site, inner_site = Site("resid_post", 0), Site("resid_post", 1)
    base = subject.forward(batch, [inner_site]).acts[inner_site]
    with hooked(subject.model, subject.sitemap, state, [], [outer_site]) as outer:
        outer_hooked = set(leaked_hooks(subject.model))
        with hooked(subject.model, subject.sitemap, state, [Add(inner_site, vector=torch.ones(d))],
                    [inner_site]) as inner:
            plain_logits(subject, batch)
            assert set(leaked_hooks(subject.model)) > outer_hooked
        assert set(leaked_hooks(subject.model)) == outer_hooked  # only the inner hooks went
        plain_logits(subject, batch)
        assert len(outer[outer_site]) == 2 and len(inner[inner_site]) == 1
        real = batch.attention_mask.bool()
        torch.testing.assert_close(inner[inner_site][0][real], (base + 1.0)[real])
    assert leaked_hooks(subject.model) == []


def test_two_weight_deltas_on_one_tensor_unwind(tiny_subject):
    """gpt2 ties lm_head to wte: two deltas on one tensor (under either name) restore the original."""
    subject = tiny_subject("gpt2")
    param = subject.model.get_parameter("transformer.wte.weight")
    before = param.detach().clone()
    d1, d2 = torch.full_like(before, 0.5), torch.full_like(before, -0.25)
    with hooked(subject.model, subject.sitemap, RunState(),
                [WeightDelta("transformer.wte.weight", d1), WeightDelta("lm_head.weight", d2)]):
        torch.testing.assert_close(param, before + 0.25)
        assert subject.model.lm_head.weight is param
    assert torch.equal(param, before)


def test_ablate_direction_per_row_matches_one_direction_per_prompt(tiny_subject):
    """A [rows, d] direction ablates each row's own direction (batched random-direction controls)."""
    subject = tiny_subject("llama")
    ids = [[2, 10, 11, 12], [2, 13, 14], [2, 15, 16, 17, 18]]
    torch.manual_seed(3)
    dirs = torch.randn(len(ids), subject.sitemap.d_model)
    site = Site("resid_pre", 1)
    batched = subject.last_logits(ids, lambda rows: [AblateDirection(site, direction=dirs[rows])])
    for i, x in enumerate(ids):
        single = subject.last_logits([x], [AblateDirection(site, direction=dirs[i])])
        torch.testing.assert_close(batched[i], single[0], atol=1e-5, rtol=1e-5)


def test_from_positions_start_at_a_token_and_cover_everything_after():
    from modelprobe.subject import From
    from modelprobe.subject.interventions import RunState

    state = RunState(pad=torch.tensor([0, 2]), prompt_len=6)
    m = state.columns_mask(From(2), 2, 6, "cpu")
    assert m.tolist() == [[False, False, True, True, True, True], [False, False, False, False, True, True]]
    assert state.columns_mask(From(-2), 2, 6, "cpu")[:, 4:].all() and not state.columns_mask(From(-2), 2, 6, "cpu")[:, :4].any()
    per_row = state.columns_mask(From(torch.tensor([1, -1])), 2, 6, "cpu")
    assert per_row.tolist() == [[False, True, True, True, True, True], [False] * 5 + [True]]
    assert RunState(phase="generated").columns_mask(From(3), 2, 1, "cpu").all()
