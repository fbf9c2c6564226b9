"""The latent_language kind on hand-built six-layer translators (tests/fixtures/build_latent_language_fixtures.py):
a model whose middle layers carry the pivot word passes "the pivot leads in the middle", one that goes
straight to the target fails it, and one whose middle layers carry every pivot word alike fails it on its
control (another row's pivot does as well). Prompts the model does not translate are left out and counted;
too few left is untestable. Bad fields are located errors.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from modelprobe.errors import DataError, SpecError
from modelprobe.kinds import KINDS, check_data_files, instantiate, load
from modelprobe.subject import load_subject

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE / "fixtures"))
import build_latent_language_fixtures as planted  # noqa: E402

PROBE = """\
kind: latent_language
about: the pivot word leads in the middle layers, the target at the end
prompts: data/words.jsonl
min_prompts: 10
claims:
  pivot_in_the_middle:
    layers: "0.4:0.8"
    expect: {pivot_leads: {at_least: 0.8}}
  target_at_the_end:
    expect: {target_leads: {at_least: 0.8}}
  pivot_by_rank:
    layers: [2, 3]
    expect: {pivot_leads: {at_least: 0.8}}
"""


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = {}
    for variant in ("pivot", "straight", "english"):
        d = planted.save(tmp_path_factory.mktemp(variant), variant=variant)
        out[variant] = (d, load_subject(str(d / "model"), progress=False))
    return out


def _run(built, variant: str, text: str = PROBE):
    d, subject = built[variant]
    (d / "ll.probe.yaml").write_text(text)
    probe = load(d / "ll.probe.yaml")
    check_data_files(probe)
    out = instantiate(probe, subject).run()
    return {c.name: c for c in out.claims}, out


def test_planted_pivot_passes_and_beats_its_control(built):
    claims, out = _run(built, "pivot")
    mid = claims["pivot_in_the_middle"]
    assert mid.verdict == "pass", mid.reason
    assert mid.effect == 1.0 and mid.n == planted.K
    assert mid.details["layers"] == [2, 3]
    assert mid.control.effect == 0.0 and mid.control.p_value <= 0.05
    assert claims["target_at_the_end"].verdict == "pass"
    assert claims["target_at_the_end"].details["layers"] == [planted.N_LAYERS - 1]
    assert out.settings["n_translated"] == planted.K and out.settings["left_out_not_translated"] == 0
    curves = mid.curves
    assert curves["mean_pivot_prob"][2] > 0.9 and curves["mean_target_prob"][-1] > 0.9
    assert [p.type for p in mid.plots] == ["lines", "lines"]
    assert all(s.lo is not None for s in mid.plots[0].series)


def test_rank_reading_agrees(built):
    claims, _ = _run(built, "pivot", PROBE.replace("min_prompts: 10", "min_prompts: 10\nby: rank\nvariants: true"))
    assert claims["pivot_by_rank"].verdict == "pass", claims["pivot_by_rank"].reason


def test_straight_to_the_target_fails(built):
    claims, _ = _run(built, "straight")
    mid = claims["pivot_in_the_middle"]
    assert mid.verdict == "fail" and mid.effect == 0.0
    assert claims["target_at_the_end"].verdict == "pass"


def test_generic_english_fails_on_its_control(built):
    claims, _ = _run(built, "english")
    mid = claims["pivot_in_the_middle"]
    assert mid.effect == 1.0 and mid.ci[0] >= 0.8  # the pivot does lead ...
    assert mid.control.effect == 1.0 and mid.control.p_value > 0.05  # ... but so does any other row's pivot
    assert mid.verdict == "fail", mid.reason


def test_untranslated_prompts_are_left_out_and_counted(built):
    d, _ = built["pivot"]
    rows = planted.rows()
    for i in range(0, planted.K - 5):  # wrong targets: the model's answer is not them
        rows[i] = {**rows[i], "target": f"t{(i + 1) % planted.K}"}
    (d / "data" / "wrong.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    claims, out = _run(built, "pivot", PROBE.replace("data/words.jsonl", "data/wrong.jsonl"))
    assert out.settings["left_out_not_translated"] == planted.K - 5 and out.settings["n_translated"] == 5
    for c in claims.values():
        assert c.verdict == "inconclusive" and "only 5 of 32 prompts are translated" in c.reason


def test_too_few_pairs_for_the_control_is_untestable_not_a_fail(built):
    """Three translated prompts: the paired control's p-value cannot go below 1/8, so a true claim would
    fail its control by construction; it is inconclusive with that reason instead."""
    d, _ = built["pivot"]
    (d / "data" / "three.jsonl").write_text("".join(json.dumps(r) + "\n" for r in planted.rows()[:3]))
    text = PROBE.replace("data/words.jsonl", "data/three.jsonl").replace("min_prompts: 10", "min_prompts: 1")
    claims, out = _run(built, "pivot", text)
    assert out.settings["n_translated"] == 3
    claim = claims["pivot_in_the_middle"]
    assert claim.verdict == "inconclusive" and "no claim could beat it" in claim.reason, claim.reason
    assert claim.effect == 1.0  # measured all the same: the pivot leads on every one


@pytest.mark.parametrize("old, new, match", [
    ('layers: "0.4:0.8"', 'layers: "0.9:0.2"', r"ll.probe.yaml:7:\d+: claims.pivot_in_the_middle.layers: .*empty"),
    ("layers: [2, 3]", "layers: [2, 9]", r"ll.probe.yaml:\d+:\d+: claims.pivot_by_rank.layers.1: layer 9 is beyond"),
    ("min_prompts: 10", "min_prompts: 0", r"ll.probe.yaml:4:\d+: min_prompts: .*greater than or equal to 1"),
    ("at_least: 0.8}}\n  target", "at_least: 1.5}}\n  target", r"ll.probe.yaml:\d+:\d+: claims.pivot_in_the_middle"),
    ("min_prompts: 10", "min_prompts: 10\nby: logits", r"ll.probe.yaml:5:\d+: by: "),
    ("pivot_in_the_middle:", "pivot in the middle:", r"ll.probe.yaml:\d+:\d+: claims"),
])
def test_bad_fields_are_located(built, old, new, match):
    with pytest.raises(SpecError, match=match):
        _run(built, "pivot", PROBE.replace(old, new, 1))


@pytest.mark.parametrize("row, match", [
    ({"prompt": "f1 =", "target": "t1"}, r"words2.jsonl:3: .*pivot"),
    ({"prompt": "f1 =", "target": "t1", "pivot": "e1", "pivot_aliases": "e1"},
     r"words2.jsonl:3: field 'pivot_aliases' must be a list of non-empty strings"),
    ({"prompt": "f1 =", "target": 7, "pivot": "e1"}, r"words2.jsonl:3: field 'target' must be a string"),
])
def test_bad_rows_are_located(built, row, match):
    d, _ = built["pivot"]
    rows = planted.rows()
    rows[2] = row
    (d / "data" / "words2.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises((DataError, SpecError), match=match):
        _run(built, "pivot", PROBE.replace("data/words.jsonl", "data/words2.jsonl"))


def test_unknown_word_is_a_located_data_error(built):
    d, _ = built["pivot"]
    rows = planted.rows()
    rows[5] = {**rows[5], "target": "zzz"}
    (d / "data" / "words3.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"words3.jsonl:6: target 'zzz' is not in the vocabulary"):
        _run(built, "pivot", PROBE.replace("data/words.jsonl", "data/words3.jsonl"))


def test_schema_and_skeleton():
    from modelprobe.cli import json_schema

    text = json.dumps(json_schema())
    assert "latent_language" in text and "pivot_leads" in text
    assert KINDS["latent_language"].name == "latent_language"
    assert "kind: latent_language" in KINDS["latent_language"].skeleton
    assert KINDS["latent_language"].skeleton_data


def test_skeleton_validates(tmp_path):
    from modelprobe.cli import main

    assert main(["new", "latent_language", "ll", "--directory", str(tmp_path)]) == 0
    probe = load(tmp_path / "ll.probe.yaml")
    check_data_files(probe)
    assert len(probe.spec.claims) == 2


def test_shipped_probes_validate():
    root = HERE.parent / "probes"
    for name in ("latent_language_fr_de", "latent_language_fr_es"):
        probe = load(root / f"{name}.probe.yaml")
        rows = KINDS["latent_language"].check_data(probe)
        assert len(rows) >= 100


def test_one_row_is_untestable_not_a_crash(built):
    d, _ = built["pivot"]
    (d / "data" / "one.jsonl").write_text(json.dumps(planted.rows()[3]) + "\n")
    text = PROBE.replace("data/words.jsonl", "data/one.jsonl").replace("min_prompts: 10", "min_prompts: 1")
    claims, out = _run(built, "pivot", text)
    assert out.settings["n_translated"] == 1
    assert {c.verdict for c in claims.values()} == {"inconclusive"}
    assert "needs at least two translated prompts" in claims["pivot_in_the_middle"].reason
