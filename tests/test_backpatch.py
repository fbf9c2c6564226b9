"""The backpatch kind on hand-built two-hop models whose mechanism is known exactly
(tests/fixtures/build_backpatch_fixtures.py): a planted late hop passes, random-source patches and a model
with no late hop do not; s = t changes nothing; the batched, resumed patches equal full forwards with a
Patch; bad inputs are located one-line errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from modelprobe.errors import DataError, SpecError
from modelprobe.kinds import check_data_files, instantiate, load
from modelprobe.report.record import HeatMap
from modelprobe.subject import clean_pass, load_subject
from modelprobe.toolkit.answers import could_give_answer, gives_answer
from modelprobe.toolkit.prompt_writes import generate_with_patches, patch_last_and_generate

HERE = Path(__file__).parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE / "fixtures"))
import build_backpatch_fixtures as planted  # noqa: E402

PROBE = """\
kind: backpatch
about: Back-patching fixes two-hop queries the model gets wrong.
queries: data/two_hop.jsonl
filter: {hops_known: true, no_shortcut: true}
source_position: last
layers: {source: all, target: all}
split: {dev: 0.3, seed: 0}
max_new_tokens: 2
claims:
  oracle_fixes:
    expect: {fix_rate_over_null: {at_least: 0.2}}
  best_pair_fixes:
    expect: {fix_rate: {at_least: 0.1}}
  few_breaks:
    expect: {break_rate: {at_most: 0.1}}
"""


def _build(tmp_path_factory, variant: str) -> tuple[Path, object]:
    d = planted.save(tmp_path_factory.mktemp(variant), variant=variant)
    return d, load_subject(str(d / "model"), progress=False)


@pytest.fixture(scope="module")
def late(tmp_path_factory):
    return _build(tmp_path_factory, "late")


def run(directory: Path, subject, text: str = PROBE) -> tuple[dict, object]:
    path = directory / "bp.probe.yaml"
    path.write_text(text)
    out = instantiate(load(path), subject).run()
    return {c.name: c for c in out.claims}, out


def test_planted_late_hop_passes(late):
    claims, out = run(*late)
    counts = out.settings["filter_counts"]
    assert counts["kept"] == 64 and counts["wrong"] == 24 and counts["right"] == 40 and counts["shortcut"] == 0
    assert claims["oracle_fixes"].verdict == "pass", claims["oracle_fixes"].reason
    assert claims["oracle_fixes"].effect == 1.0 and claims["oracle_fixes"].control.effect == 0.0
    assert claims["best_pair_fixes"].verdict == "pass" and claims["best_pair_fixes"].effect == 1.0
    assert claims["few_breaks"].verdict == "pass" and claims["few_breaks"].effect == 0.0
    # the planted mechanism: only s >= 2 -> t = 0 fixes (hop 2 is read at layer 1, the bridge written at 2)
    best = claims["best_pair_fixes"].details["best_pair"]
    assert best["target"] == 0 and best["source"] >= 2
    heat = next(p for p in claims["oracle_fixes"].plots if isinstance(p, HeatMap))
    fixing = {(s, t) for s, row in zip(heat.y_ticks, heat.values) for t, v in zip(heat.x_ticks, row) if v}
    assert fixing == {("2", "0"), ("3", "0")}
    # own state and random source on one colour scale (0 .. the larger map's top), so they compare by eye
    own, null = [p for p in claims["oracle_fixes"].plots if isinstance(p, HeatMap)]
    assert own.value_range == null.value_range == (0.0, 1.0)
    assert max(v for row in null.values for v in row if v is not None) < 1.0
    assert out.settings["identity_first_token_changed"] == 0 and out.settings["identity_fixed"] == 0
    assert out.settings["identity_rows"] == 24 * 4


def test_random_source_patches_do_not_pass(late):
    claims, out = run(*late, PROBE.replace("max_new_tokens: 2", "max_new_tokens: 2\npatch_source: other_query"))
    assert claims["oracle_fixes"].verdict == "fail"
    # 0 of 17 test queries: the Wilson interval still straddles 0.1, so "no pass" is all it can say
    assert claims["best_pair_fixes"].verdict != "pass" and claims["best_pair_fixes"].effect == 0.0
    assert claims["oracle_fixes"].effect <= 0.0


def test_no_late_hop_does_not_pass(tmp_path_factory):
    claims, out = run(*_build(tmp_path_factory, "no_compose"))
    assert out.settings["filter_counts"]["wrong"] == 64
    assert claims["oracle_fixes"].verdict == "fail" and claims["oracle_fixes"].effect == 0.0
    assert claims["best_pair_fixes"].verdict != "pass" and claims["best_pair_fixes"].effect == 0.0
    claims, out = run(*_build(tmp_path_factory, "early"))  # every composition right: nothing to fix
    assert out.settings["filter_counts"]["wrong"] == 0
    assert claims["oracle_fixes"].verdict == "inconclusive" and claims["best_pair_fixes"].verdict == "inconclusive"


def test_identity_patch_changes_nothing_and_batched_equals_full_forwards(late):
    directory, subject = late
    rows = planted.queries()
    clean = clean_pass(subject, subject.encode(rows[20]["query"]))
    full = subject.model(torch.tensor([clean.ids])).logits[0, -1]
    assert torch.allclose(clean.logits, full, atol=1e-5)
    pairs = [(s, t) for s in range(4) for t in range(4) if s >= t]
    values = torch.stack([clean.resid[s, -1] for s, _ in pairs])
    fast = patch_last_and_generate(subject, clean, [t for _, t in pairs], values, 3)
    slow = generate_with_patches(subject, clean.ids, "last", [t for _, t in pairs], values, 3)
    assert fast == slow
    plain = subject.generate([clean.ids], 3)[0]
    assert all(g == plain for g, (s, t) in zip(fast, pairs) if s == t)


def test_answer_matching():
    assert gives_answer(" Paris.", ["Paris"]) and gives_answer("the USA is", ["United States", "the USA"])
    assert not gives_answer(" Parisian", ["Paris"]) and not gives_answer(" in Paris", ["Paris"])
    assert could_give_answer(" Par", ["Paris"]) and could_give_answer("  ", ["Paris"])
    assert not could_give_answer(" the", ["Paris"])


# ---- bad input: one located line each ------------------------------------------------------------

def test_query_without_an_answer(late, tmp_path):
    row = {k: v for k, v in planted.queries()[0].items() if k != "answer"}
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "two_hop.jsonl").write_text(json.dumps(row) + "\n")
    (tmp_path / "bp.probe.yaml").write_text(PROBE)
    with pytest.raises(DataError, match=r"two_hop.jsonl:1: missing field 'answer'"):
        check_data_files(load(tmp_path / "bp.probe.yaml"))


def test_bridge_entity_not_in_the_query(late, tmp_path):
    rows = planted.queries()
    rows[3]["entity"] = "a99"
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "two_hop.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = tmp_path / "bp.probe.yaml"
    path.write_text(PROBE.replace("source_position: last", "source_position: bridge_entity_last"))
    with pytest.raises(DataError, match=r"two_hop.jsonl:4: field 'entity': 'a99' does not occur in 'a3 r12'"):
        instantiate(load(path), late[1])


def test_layers_out_of_range(late, tmp_path):
    path = late[0] / "bad.probe.yaml"
    path.write_text(PROBE.replace("layers: {source: all, target: all}", "layers: {source: [1, 7], target: all}"))
    with pytest.raises(SpecError) as info:
        instantiate(load(path), late[1])
    assert "bad.probe.yaml:6:" in str(info.value) and "layers.source.1: layer 7 is beyond" in str(info.value)


@pytest.mark.parametrize("edit, message", [
    ("split: {dev: 0.3, seed: 0}", "split: {dev: 1.5, seed: 0}"),
    ("max_new_tokens: 2", "max_new_tokens: 0"),
    ("layers: {source: all, target: all}", "layers: {source: all, target: all, stride: 0}"),
    ("source_position: last", "source_position: first"),
])
def test_options_are_range_checked(tmp_path, edit, message):
    path = tmp_path / "x.probe.yaml"
    path.write_text(PROBE.replace(edit, message))
    with pytest.raises(SpecError, match=r"x\.probe\.yaml:\d+:\d+: "):
        load(path)


def test_no_pair_above_the_diagonal(late):
    path = late[0] / "flat.probe.yaml"
    path.write_text(PROBE.replace("layers: {source: all, target: all}", "layers: {source: 1, target: 2}"))
    with pytest.raises(SpecError, match=r"flat.probe.yaml:6:\d+: layers: no source layer lies above"):
        instantiate(load(path), late[1])


def test_bridge_entity_position_is_the_entity_token(late):
    path = late[0] / "bridge.probe.yaml"
    path.write_text(PROBE.replace("source_position: last", "source_position: bridge_entity_last"))
    kind = instantiate(load(path), late[1])
    assert kind.src_pos == [1] * len(planted.queries())  # <bos> aK r12: the entity is token 1
