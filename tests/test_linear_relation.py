"""The linear_relation kind on hand-built models whose relations are linear by construction
(tests/fixtures/build_lre_fixtures.py): layer 1's attention maps the subject's one-hot state linearly
into both relations' answers and the relation word's embedding biases the answer set. So the LRE of
each relation decodes the model's answer on every held-out subject (faithful passes), the identity map,
the bias alone and the other relation's map do not, and an edit along the pseudo-inverse moves the answer
to the target's. A randomly initialised model of the same shape gets no pass; bad inputs are located errors.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from modelprobe.errors import DataError, SpecError
from modelprobe.kinds import check_data_files, instantiate, load
from modelprobe.subject import load_subject

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE / "fixtures"))
import build_lre_fixtures as planted  # noqa: E402

PROBE = """\
kind: linear_relation
about: the object is an affine function of the subject's state
relations:
  capof: {data: data/capof.jsonl, template: "{subject} capof"}
  langof: {data: data/langof.jsonl, template: "{subject} langof"}
layer: 0
train: 8
claims:
  capof_faithful:
    relation: capof
    expect: {faithfulness: {at_least: 0.8}}
  langof_faithful:
    relation: langof
    against: capof
    expect: {faithfulness: {at_least: 0.8}}
  capof_causal:
    relation: capof
    rank: 64
    expect: {edit_success: {at_least: 0.8}}
"""


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = {}
    for variant in ("linear", "random"):
        d = planted.save(tmp_path_factory.mktemp(variant), variant=variant)
        out[variant] = (d, load_subject(str(d / "model"), progress=False))
    return out


def _run(built, variant: str, text: str = PROBE):
    d, subject = built[variant]
    (d / "lre.probe.yaml").write_text(text)
    probe = load(d / "lre.probe.yaml")
    check_data_files(probe)
    out = instantiate(probe, subject).run()
    return {c.name: c for c in out.claims}, out


def test_planted_linear_relation_is_faithful_and_causal(built):
    claims, out = _run(built, "linear")
    for name in ("capof_faithful", "langof_faithful"):
        c = claims[name]
        assert c.verdict == "pass", c.reason
        assert c.effect == 1.0 and c.n == 40
        ctrl = c.control.detail
        assert ctrl["identity map (o = s)"]["faithfulness"] == 0.0
        assert ctrl["bias alone (W = 0)"]["faithfulness"] < 0.1
        other = next(k for k in ctrl if k.startswith("map of relation"))
        assert ctrl[other]["faithfulness"] == 0.0
        assert c.details["model_answer_is_object"] == 1.0
    causal = claims["capof_causal"]
    assert causal.verdict == "pass", causal.reason
    assert causal.effect >= 0.95 and causal.control.effect < 0.1
    assert out.settings["layer"] == 0


def test_random_model_does_not_pass(built):
    claims, _ = _run(built, "random")
    for c in claims.values():
        assert c.verdict != "pass", (c.name, c.effect, c.reason)


@pytest.mark.parametrize("edit, match", [
    ('template: "{subject} capof"}', r"lre.probe.yaml:4:\d+: relations.capof.template: .*exactly once"),
    ("layer: 0", r"lre.probe.yaml:6:\d+: layer: layer 2 is the last layer"),
    ("layer: 0\n", r"lre.probe.yaml:6:\d+: layer: layer 7 is beyond the model"),
    ("against: capof", r"lre.probe.yaml:\d+:\d+: claims.langof_faithful.against: no relation named 'nope'"),
    ("rank: 64", r"lre.probe.yaml:\d+:\d+: claims.capof_causal.rank: rank 5000 exceeds the model width"),
    ("train: 8", r"lre.probe.yaml:\d+:\d+: train: .*less than or equal to 256"),
    ("beta", r"lre.probe.yaml:\d+:\d+: beta: .*greater than 0"),
    ("  langof: {data", r"lre.probe.yaml:\d+:\d+: relations: .*at least 2"),
    ("expect: {edit_success", r"lre.probe.yaml:\d+:\d+: claims.capof_causal.expect: name exactly one statistic"),
    ("relation: capof\n    rank", r"lre.probe.yaml:\d+:\d+: claims.capof_causal.relation: no relation named 'x'"),
])
def test_bad_input_is_located(built, edit, match):
    new = {'template: "{subject} capof"}': 'template: "capof"}', "layer: 0": "layer: 2", "layer: 0\n": "layer: 7\n",
           "against: capof": "against: nope", "rank: 64": "rank: 5000", "train: 8": "train: 1000",
           "beta": "layer: 0\nbeta: 0", "  langof: {data": "  # langof: {data",
           "expect: {edit_success": "expect: {faithfulness: {at_least: 0.5}, edit_success",
           "relation: capof\n    rank": "relation: x\n    rank"}[edit]
    text = PROBE.replace("layer: 0", new, 1) if edit == "beta" else PROBE.replace(edit, new, 1)
    if edit == "  langof: {data":
        text = text.replace("    against: capof\n", "")
    with pytest.raises(SpecError, match=match):
        _run(built, "linear", text)


def test_subject_not_in_prompt_is_a_located_data_error(built):
    d, _ = built["linear"]
    bad = d / "data" / "bad.jsonl"
    rows = planted.rows("capof")
    rows[4] = {**rows[4], "prompt": "s9 capof"}
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"bad.jsonl:5: field 'subject': 's4' does not occur in field 'prompt'"):
        _run(built, "linear", PROBE.replace("data/capof.jsonl", "data/bad.jsonl"))
    rows[4] = {**rows[4], "prompt": "s4 capof", "object": " "}
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"bad.jsonl:5: field 'object' is empty"):
        _run(built, "linear", PROBE.replace("data/capof.jsonl", "data/bad.jsonl"))


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox", "gemma2"])
def test_batched_jacobians_match_central_differences(tiny_subject, family):
    """Prompts of different lengths in one left-padded batch, several cotangent chunks: each prompt's
    Jacobian equals central differences of o under an edit of s (an independent computation)."""
    import torch

    from modelprobe.subject.jacobian import jacobians

    subject = tiny_subject(family)
    ids = subject.encode_all(["how do i make a cake", "tell me a story", "the music of my home is good"])
    pos = [2, 1, 4]
    jac, st = jacobians(subject, ids, 0, pos, chunk=5)
    d = st.s.shape[1]
    assert jac.shape == (3, d, d)
    g = torch.Generator().manual_seed(0)
    v = torch.randn(3, d, generator=g, dtype=torch.float64)
    eps = 1e-3
    with torch.no_grad():
        subject.model.double()
        try:
            plus = _final_input_under(subject, ids, pos, eps * v)
            minus = _final_input_under(subject, ids, pos, -eps * v)
            base = _final_input_under(subject, ids, pos, 0 * v)
        finally:
            subject.model.float()
    fd = (plus - minus) / (2 * eps)
    got = torch.einsum("nij,nj->ni", jac.double(), v)
    # the Jacobian is float32, the differences float64: agreement to float32 precision
    assert torch.allclose(got, fd, rtol=1e-3, atol=1e-3 * float(fd.abs().max())), (got - fd).abs().max()
    assert torch.allclose(st.o.double(), base, atol=1e-4)


def _final_input_under(subject, ids, pos, deltas):
    """o (the final norm's input at the last token) with deltas added to s, one prompt at a time."""
    import torch

    from modelprobe.subject.interventions import Add, RunState, hooked
    from modelprobe.subject.sites import Site

    out = []
    for i, x in enumerate(ids):
        seen = []
        h = subject.sitemap.final_norm.register_forward_pre_hook(lambda m, a, seen=seen: seen.append(a[0]))
        b = subject.make_batch([x], [0])
        state = RunState(phase="prompt", pad=b.pad, prompt_len=b.input_ids.shape[1])
        try:
            with hooked(subject.model, subject.sitemap, state,
                        [Add(Site("resid_post", 0), positions=pos[i], vector=deltas[i])]):
                subject.model(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids)
        finally:
            h.remove()
        out.append(seen[-1][0, -1].double())
    return torch.stack(out)
