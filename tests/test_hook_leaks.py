"""Every hook and weight edit of the package is seen by the per-probe leak check (subject/hooks.py).

Each way modelprobe touches a model outside `hooked()` is left in place on purpose here — a rank-1
update, a weight edit, a per-row weight delta, a Jacobian capture — and `check_no_hooks_left` (what the
plugin runs after every probe) must fire and name it; used normally, each leaves nothing behind.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from modelprobe.subject.hooks import _EDITS, leaked_hooks
from modelprobe.subject.interventions import RunState, WeightDelta, hooked
from modelprobe.subject.jacobian import _final_input, jacobians
from modelprobe.subject.preflight import check_no_hooks_left
from modelprobe.subject.rank1 import (
    Rank1,
    factors,
    online_updates,
    query_mlp_inputs,
    rank1_applied,
)
from modelprobe.subject.weights import noise, perturbed, row_deltas, weight_groups, zero

PACKAGE = Path(__file__).parent.parent / "modelprobe"
PROMPTS = ["how do i make a cake", "tell me a story"]


def _update(subject) -> Rank1:
    """Some rank-1 factors for layer 0, two rows."""
    sm = subject.sitemap
    width = sum(m.weight.shape[1] if sm.family.conv1d else m.weight.shape[0]
                for m in (sm.module(0, rel) for rel in sm.family.mlp_in))
    g = torch.Generator().manual_seed(0)
    return Rank1(torch.randn(2, width, generator=g, dtype=torch.float64),
                 torch.randn(2, sm.d_model, generator=g, dtype=torch.float64))


def _weight_slices(subject):
    return weight_groups(subject.sitemap, "block_sublayer", layers=[0])[1].slices  # L0.mlp


def _left_in_place(subject, what: str):
    """`what` put on the model and not taken off: the leak the check must see. Returns what takes it off."""
    sm = subject.sitemap
    if what == "rank-1 update":
        cm = rank1_applied(sm, {0: _update(subject)}, [0, 1])
    elif what == "weight edit":
        cm = perturbed(sm, _weight_slices(subject), zero)
    elif what == "WeightDelta":
        name = f"{sm.family.layers}.0.{sm.family.mlp_out_proj}.weight"
        param = dict(subject.model.named_parameters())[name]
        cm = hooked(subject.model, sm, RunState(), [WeightDelta(name, torch.ones_like(param))])
    elif what == "per-row weight deltas":
        group = weight_groups(sm, "block_sublayer", layers=[0])[1]
        cm = row_deltas(sm, [noise(sm, group, 0.1, 0), {}])
    else:  # "Jacobian capture"
        return _final_input(subject, []).remove
    cm.__enter__()  # a context entered and never left
    return lambda: cm.__exit__(None, None, None)


EXPECT = {  # what the check must name: (words in the message, where)
    "rank-1 update": ("rank-1 update at layer 0", lambda sm: f"{sm.family.layers}.0.{sm.family.mlp_in[0]}"),
    "weight edit": ("weight edit by perturbed()", lambda sm: f"{sm.family.layers}.0.{sm.family.mlp_out_proj}.weight"),
    "WeightDelta": ("weight edit by hooked(): WeightDelta", lambda sm: f"{sm.family.mlp_out_proj}.weight"),
    "per-row weight deltas": ("per-row weight deltas", lambda sm: f"{sm.family.layers}.0.{sm.family.mlp_out_proj}"),
    "Jacobian capture": ("Jacobian capture", lambda sm: next(n for n, m in sm.model.named_modules()
                                                             if m is sm.final_norm)),
}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("what", sorted(EXPECT))
def test_a_leak_left_on_purpose_is_named(tiny_subject, family, what):
    subject = tiny_subject(family)
    assert check_no_hooks_left(subject).passed
    before = {n: p.detach().clone() for n, p in subject.model.named_parameters()}
    take_off = _left_in_place(subject, what)
    try:
        result = check_no_hooks_left(subject, after="probe leaky")
        words, where = EXPECT[what]
        assert not result.passed
        assert words in result.detail and where(subject.sitemap) in result.detail, result.detail
        assert "after probe leaky" in result.detail
    finally:
        take_off()
    assert check_no_hooks_left(subject).passed, leaked_hooks(subject.model)
    assert all(torch.equal(p, before[n]) for n, p in subject.model.named_parameters())


def test_an_edit_that_raises_half_way_leaves_nothing(tiny_subject):
    subject = tiny_subject("llama")
    calls = []

    def failing(values, sl):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("edit failed")
        return values + 1

    with pytest.raises(RuntimeError, match="edit failed"), perturbed(subject.sitemap, _weight_slices(subject), failing):
        pass
    assert leaked_hooks(subject.model) == []


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_normal_use_leaves_nothing(tiny_subject, family):
    subject = tiny_subject(family)
    sm = subject.sitemap
    ids = subject.encode_all(PROMPTS)
    batch = next(iter(subject.batches(ids)))
    with rank1_applied(sm, {0: _update(subject)}, [0, 1]):
        assert leaked_hooks(subject.model)
        subject.forward(batch)
    u = query_mlp_inputs(subject.model, sm, batch, [0, 1])
    factors(sm, 0, u[0], u[0] * 1.1)
    ctx = torch.full((len(ids), sm.n_layers, sm.d_model), 0.1, dtype=torch.float64)
    online_updates(subject.model, sm, batch, ctx, ctx)
    jacobians(subject, ids, 0, [1, 1], chunk=16)
    with perturbed(sm, _weight_slices(subject), zero):
        assert leaked_hooks(subject.model)
        subject.forward(batch)
    group = weight_groups(sm, "block_sublayer", layers=[0])[1]
    with row_deltas(sm, [noise(sm, group, 0.1, 0), {}]):
        subject.forward(batch)
    assert leaked_hooks(subject.model) == []
    assert check_no_hooks_left(subject, after="probe clean").passed
    alive = [what for ref, what in _EDITS.values() if ref() is not None]
    assert alive == []


def test_every_hook_of_the_package_goes_through_add_hook():
    """Only subject/hooks.py registers hooks on modules; everything else asks it (so each one is tagged)."""
    register = {"register_forward_hook", "register_forward_pre_hook", "register_full_backward_hook",
                "register_full_backward_pre_hook", "register_backward_hook", "register_module_forward_hook",
                "register_module_forward_pre_hook", "register_parametrization"}
    found = []
    for path in PACKAGE.rglob("*.py"):
        if path == PACKAGE / "subject" / "hooks.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            name = node.attr if isinstance(node, ast.Attribute) else node.id if isinstance(node, ast.Name) else None
            if name in register:
                found.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {name}")
    assert found == []
