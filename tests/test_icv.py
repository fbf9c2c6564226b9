"""The icv kind on hand-built models (tests/fixtures/build_icv_fixtures.py): demo pairs sad -> happy give a
vector along HAPPY - SAD in every layer; turning each layer's (constant, norm C) MLP output toward it makes
every sad query's reply happy, and a random vector of the same norm does not (known positive). When the
MLPs write nothing, the norm-preserving shift has nothing to turn and the claim fails (known negative).
When the shift makes the replies degenerate ("h0 h0 h0 ..."), the lexicon counts them happy but they are
not coherent, so they do not count and the claim must not pass (known false positive, stopped).
Bad inputs are located errors; the shift keeps norms."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from modelprobe.errors import DataError, SpecError
from modelprobe.kinds import check_data_files, instantiate, load
from modelprobe.subject import load_subject
from modelprobe.subject.interventions import NormShift, RunState
from modelprobe.subject.sites import Site

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE / "fixtures"))
import build_icv_fixtures as planted  # noqa: E402

HAPPY = ", ".join(f"h{i}" for i in range(planted.K))
SAD = ", ".join(f"s{i}" for i in range(planted.K))
PROBE = f"""\
kind: icv
about: the sad-to-happy in-context vector makes replies happy
demos: {{pairs: data/pairs.jsonl}}
queries: {{prompts: data/queries.jsonl, chat_template: false}}
strength: 0.1
behaviour:
  grader: {{lexicon: {{positive: [{HAPPY}], negative: [{SAD}]}}}}
  max_new_tokens: 12
random_seeds: 2
claims:
  turns_happy:
    expect: {{rate_rise: {{at_least: 0.5}}}}
"""


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = {}
    for variant in ("icv", "no_mlp", "degenerate"):
        d = planted.save(tmp_path_factory.mktemp(variant), variant=variant)
        out[variant] = (d, load_subject(str(d / "model"), progress=False))
    return out


def _run(built, variant: str, text: str = PROBE):
    d, subject = built[variant]
    (d / "icv.probe.yaml").write_text(text)
    probe = load(d / "icv.probe.yaml")
    check_data_files(probe)
    out = instantiate(probe, subject).run()
    return {c.name: c for c in out.claims}, out


def test_planted_vector_restyles_replies(built):
    claims, out = _run(built, "icv")
    c = claims["turns_happy"]
    assert c.verdict == "pass", c.reason
    assert c.details["base"]["rate"] == 0.0 and c.effect == 1.0
    assert c.control.effect == 0.0 and c.control.p_value <= 0.05
    assert out.settings["queries"] == 2 * planted.K
    coh = out.settings["coherence"]  # replies walk through distinct words: coherent with and without the shift
    assert coh["no shift"]["coherent"]["rate"] == 1.0 and coh["in-context vector"]["coherent"]["rate"] == 1.0
    assert {p.title for p in c.plots} >= {"graded and coherent replies", "examples"}


def test_degenerate_replies_do_not_count(built):
    """The lexicon counts every shifted reply happy ("h0 h0 h0 ..."), but none is coherent: no pass."""
    claims, out = _run(built, "degenerate")
    c = claims["turns_happy"]
    coh = out.settings["coherence"]
    assert coh["in-context vector"]["graded"]["rate"] == 1.0  # what the lexicon alone would have passed
    assert coh["in-context vector"]["coherent"]["rate"] == 0.0
    assert coh["in-context vector"]["graded_but_incoherent"] == 2 * planted.K
    assert coh["no shift"]["coherent"]["rate"] == 1.0
    assert c.verdict == "fail" and c.effect == 0.0, c.reason


def test_degenerate_replies_do_not_count_with_a_logit_grader(built):
    """A tokens grader reads only the first reply token; the replies are generated for the coherence check."""
    text = PROBE.replace(f"{{lexicon: {{positive: [{HAPPY}], negative: [{SAD}]}}}}", "{tokens: [" + HAPPY + "]}")
    claims, out = _run(built, "degenerate", text)
    coh = out.settings["coherence"]
    assert coh["in-context vector"]["graded"]["rate"] == 1.0 and coh["in-context vector"]["coherent"]["rate"] == 0.0
    assert claims["turns_happy"].verdict != "pass"
    claims, _ = _run(built, "icv", text)  # the same grader on the coherent model still passes
    assert claims["turns_happy"].verdict == "pass", claims["turns_happy"].reason


def test_no_mlp_output_means_nothing_to_turn(built):
    claims, _ = _run(built, "no_mlp")
    assert claims["turns_happy"].verdict == "fail" and claims["turns_happy"].effect == 0.0


def test_norm_shift_keeps_the_norm_and_turns_toward_v():
    x = torch.randn(2, 3, 8)
    v = torch.randn(8)
    mask = torch.ones(2, 3, dtype=torch.bool)
    y = NormShift(Site("mlp_out", 0), vector=v, strength=0.5).edit(x, mask, RunState())
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), atol=1e-5)
    cos = torch.nn.functional.cosine_similarity
    assert bool((cos(y, v.expand_as(y), dim=-1) > cos(x, v.expand_as(x), dim=-1)).all())


def test_bad_input_is_located(built):
    d, _ = built["icv"]
    with pytest.raises(SpecError, match=r"icv.probe.yaml:5:\d+: strength: .*less than or equal to 2"):
        _run(built, "icv", PROBE.replace("strength: 0.1", "strength: 5"))
    (d / "data" / "same.jsonl").write_text('{"source": "the s1", "target": "the h1"}\n'
                                           '{"source": "the s2", "target": "the s2"}\n')
    with pytest.raises(DataError, match=r"same.jsonl:2: source and target are the same text"):
        _run(built, "icv", PROBE.replace("data/pairs.jsonl", "data/same.jsonl"))
    (d / "data" / "one.jsonl").write_text('{"source": "the s1", "target": "the h1"}\n')
    with pytest.raises(DataError, match=r"one.jsonl: 1 demo pair; a principal component needs at least 2"):
        _run(built, "icv", PROBE.replace("data/pairs.jsonl", "data/one.jsonl"))
    (d / "data" / "empty.jsonl").write_text('{"source": "the s1", "target": ""}\n{"source": "a", "target": "b"}\n')
    with pytest.raises(DataError, match=r"empty.jsonl:1: field 'target' is empty"):
        _run(built, "icv", PROBE.replace("data/pairs.jsonl", "data/empty.jsonl"))


def test_coherence_rule_counts_symbol_runs():
    """The shared rule (toolkit.behaviour.coherent): word or emoji n-grams repeated 4 times in a row are
    degenerate; punctuation and letters outside a-z are not units, so ordinary text is unaffected."""
    from modelprobe.toolkit.behaviour import coherent

    for bad in ("", "!!!", "🌊🌊", "Happy arrival! 🌼🏼🏼🏼🏼🏼🏼🏼🏼\ufffd", "Enjoy! 🎼🌊🌊🌊🌊🌊",
                "so happy so happy so happy so happy", "h0 h0 h0 h0 h0 h0 h0 h0 h0 h0 h0 h0"):
        assert not coherent(bad), bad
    for good in ("Happy new day with your happy pet 🌼🌮🌻🌮🌻", "Wait.... ok!!!! café au lait",
                 "Yes, I notice a thought about milk.", "h4 h5 h6 h7 h8 h9 h10 h11 h0 h1 h2 h3"):
        assert coherent(good), good
