"""The patchscope kind on the hand-built two-hop models (tests/fixtures/build_backpatch_fixtures.py).

Source: the composition query "aK r12" at its last token; target: "b0 r2", written at target layer 0.
The planted model reads the bridge at layer 1 only, so a state decodes to the final answer when it
already holds the bridge: from layer 0 on for the 40 early entities, from layer 2 on for the 24 late ones.
So the decode rate is 40/64 at layers 0-1 and 1.0 at layers 2-3, exactly; the no-compose model decodes
nothing; bad inputs are located errors."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from modelprobe.errors import SpecError
from modelprobe.kinds import instantiate, load
from modelprobe.subject import load_subject
from modelprobe.subject.sites import resolve_layer

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE / "fixtures"))
import build_backpatch_fixtures as planted  # noqa: E402

PROBE = """\
kind: patchscope
about: the final answer is decodable from the composition query's last token once the bridge is there
source: {prompts: data/two_hop.jsonl, field: query, position: last, layers: all}
target: {prompt: "b0 r2", position: last, layer: 0}
read: {max_new_tokens: 2, expect_field: answer}
claims:
  decodable_late:
    layers: "2:4"
    expect: {decode_rate: {at_least: 0.9}}
  decodable_early:
    layers: "0:2"
    expect: {decode_rate: {at_least: 0.9}}
"""


def _run(tmp_path_factory, variant: str, text: str = PROBE):
    d = planted.save(tmp_path_factory.mktemp(variant), variant=variant)
    subject = load_subject(str(d / "model"), progress=False)
    (d / "ps.probe.yaml").write_text(text)
    out = instantiate(load(d / "ps.probe.yaml"), subject).run()
    return {c.name: c for c in out.claims}, d, subject


def test_planted_bridge_decodes_late_not_early(tmp_path_factory):
    claims, _, _ = _run(tmp_path_factory, "late")
    late, early = claims["decodable_late"], claims["decodable_early"]
    assert late.verdict == "pass", late.reason
    assert late.effect == 1.0 and late.control.effect < 0.2
    assert early.verdict == "fail" and early.effect == pytest.approx(40 / 64)
    assert late.curves["decode_rate"] == pytest.approx([40 / 64, 40 / 64, 1.0, 1.0])


def test_no_compose_model_decodes_nothing(tmp_path_factory):
    claims, _, _ = _run(tmp_path_factory, "no_compose")
    assert claims["decodable_late"].verdict == "fail" and claims["decodable_late"].effect == 0.0


def test_claim_layers_outside_the_source_layers(tmp_path_factory):
    text = PROBE.replace("layers: all}", "layers: [0, 1]}")
    with pytest.raises(SpecError, match=r"ps.probe.yaml:\d+:\d+: claims.decodable_late.layers: none of these"):
        _run(tmp_path_factory, "late", text)


def test_fraction_ranges():
    """'a:b' bounds with a '.' are fractions of depth, floored like a single fraction (0.25 -> layer 7 of 30)."""
    assert resolve_layer("0.25:0.75", 30, ("layers",)) == list(range(7, 22))
    assert resolve_layer("0.5:", 4, ("layers",)) == [2, 3]
    assert resolve_layer(":0.5", 4, ("layers",)) == [0, 1]
    assert resolve_layer("0.5:1.0", 4, ("layers",)) == [2, 3]
    assert resolve_layer("all", 4, ("layers",)) == [0, 1, 2, 3]


@pytest.mark.parametrize(("spec", "message"), [
    ("0.25:1.5", r"1.5 is a fraction of depth and must lie in \[0, 1\]"),
    ("0.9:0.1", "is empty"),
    ("0.1:0.2", "is empty"),  # floor(0.4) == floor(0.8) on 4 layers
    ("x:0.5", "is not 'start:stop'"),
])
def test_bad_fraction_ranges_are_located(tmp_path_factory, spec, message):
    text = PROBE.replace('layers: "2:4"', f'layers: "{spec}"')
    with pytest.raises(SpecError, match=rf"ps.probe.yaml:\d+:\d+: claims.decodable_late.layers: .*{message}"):
        _run(tmp_path_factory, "late", text)


# ---- the target position: a placeholder that is not the last token (variant relay) ------------------
# In `relay` a layer-1 head copies the bridge from the earlier token that holds a first entity into the
# reading token, where hop 2 needs r2: the state written into "x" of "x r2" at layer 0 decodes (from
# layer 0 on for early entities, from layer 2 on for late ones), the same state written into "r2" (the
# last token, all the kind could patch before) erases the r2 and decodes nothing.
RELAY = PROBE.replace('target: {prompt: "b0 r2", position: last, layer: 0}',
                      'target: {prompt: "x r2", position: {token: "x", occurrence: -1}, layer: 0}')


def test_placeholder_position_decodes(tmp_path_factory):
    claims, _, _ = _run(tmp_path_factory, "relay", RELAY)
    late = claims["decodable_late"]
    assert late.verdict == "pass", late.reason
    assert late.curves["decode_rate"] == pytest.approx([40 / 64, 40 / 64, 1.0, 1.0])
    assert late.control.effect < 0.2


@pytest.mark.parametrize("position", ["last", "-1", "0"])
def test_wrong_target_position_does_not_decode(tmp_path_factory, position):
    """The last token (all the kind could patch before) erases the r2 hop 2 needs: nothing decodes. BOS
    does decode: the relay head reads whichever earlier token holds the written entity features."""
    text = RELAY.replace('position: {token: "x", occurrence: -1}', f"position: {position}")
    claims, _, _ = _run(tmp_path_factory, "relay", text)
    late = claims["decodable_late"]
    if position == "0":  # BOS: the relay head reads whichever earlier token holds ENT, so BOS works too
        assert late.verdict == "pass"
    else:
        assert late.verdict == "fail" and late.curves["decode_rate"] == [0.0] * 4


def test_int_position_is_the_same_token(tmp_path_factory):
    text = RELAY.replace('position: {token: "x", occurrence: -1}', "position: 1")
    claims, _, _ = _run(tmp_path_factory, "relay", text)
    assert claims["decodable_late"].curves["decode_rate"] == pytest.approx([40 / 64, 40 / 64, 1.0, 1.0])


def test_identity_patch_changes_nothing(tmp_path_factory):
    """Source = target prompt, same layer, same token: every layer reads the unpatched answer (b3 is
    hop 1 of a0, an early entity)."""
    d = planted.save(tmp_path_factory.mktemp("identity"), variant="relay")
    (d / "data" / "same.jsonl").write_text('{"query": "a0 r1", "answer": "b3"}\n' * 2)
    subject = load_subject(str(d / "model"), progress=False)
    assert subject.decode(subject.generate([subject.encode("a0 r1")], 1)[0]) == "b3"
    text = """\
kind: patchscope
source: {prompts: data/same.jsonl, field: query, position: {token: "a0"}, layers: all}
target: {prompt: "a0 r1", position: {token: "a0"}, layer: same}
read: {max_new_tokens: 1, expect_field: answer}
claims:
  reads_itself:
    expect: {decode_rate: {at_least: 0.9}}
"""
    (d / "id.probe.yaml").write_text(text)
    out = instantiate(load(d / "id.probe.yaml"), subject).run()
    assert out.claims[0].curves["decode_rate"] == [1.0] * 4


@pytest.mark.parametrize(("position", "message"), [
    ('{token: "y"}', "'y' does not occur in 'x r2'"),
    ('{token: "x", occurrence: 1}', "'x' occurs once in 'x r2'; occurrence 1 does not exist"),
    ("7", r"position 7 is outside the prompt \(3 tokens"),
])
def test_bad_target_position_is_located(tmp_path_factory, position, message):
    text = RELAY.replace('position: {token: "x", occurrence: -1}', f"position: {position}")
    with pytest.raises(SpecError, match=rf"ps.probe.yaml:\d+:\d+: target.position: {message}"):
        _run(tmp_path_factory, "relay", text)


@pytest.mark.parametrize(("old", "new", "where"), [
    ('position: {token: "x", occurrence: -1}', 'position: {token: ""}', "target.position"),
    ('position: {token: "x", occurrence: -1}', 'position: {token: "x", occurrence: 5000}', "target.position"),
    ('position: {token: "x", occurrence: -1}', 'position: {tokn: "x"}', "target.position"),
    ('position: {token: "x", occurrence: -1}', "position: 1.5", "target.position"),
    ("position: last, layers: all}", "position: first, layers: all}", "source.position"),
    ("layers: all}", "layers: all, sample: 1}", "source.sample"),
])
def test_bad_position_and_sample_fields_are_located(tmp_path, old, new, where):
    """Spec-level mistakes in the new fields: one located line each, before any model is loaded."""
    (tmp_path / "ps.probe.yaml").write_text(RELAY.replace(old, new))
    with pytest.raises(SpecError, match=rf"ps.probe.yaml:\d+:\d+: {where}"):
        load(tmp_path / "ps.probe.yaml")
