"""Direction selection (kinds/direction_selection.py): the upper-half planted fixture, the filters and
their counts, tier 1 (the paper's filters) and tier 2 (the best of the rest, said so), the per-intervention
layer for `add`, and the exactness of the batched,
resumed, prefix-sharing scores (subject.resume_variants) against plain forwards."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from modelprobe.errors import SpecError
from modelprobe.kinds import instantiate, load
from modelprobe.kinds.direction.selection import (
    NO_CANDIDATE,
    Candidate,
    _choose,
    _filter,
    select,
    token_ids_for,
)
from modelprobe.kinds.graders import TOKEN_FORMS, build_grader, log_odds
from modelprobe.subject import Add, Site, common_prefix, load_subject, resume_variants
from modelprobe.toolkit.metrics import kl
from modelprobe.toolkit.steering import ablate_direction_everywhere

torch.set_num_threads(1)

TESTS = Path(__file__).parent
PROBES = TESTS / "probes"
FIXTURES = TESTS / "fixtures"
DATA = FIXTURES / "data"
UPPER = FIXTURES / "models" / "refusal_upper_half"
PLANTED = FIXTURES / "models" / "refusal_planted"
UPPER_PROBE = PROBES / "toy_refusal_upper_half.probe.yaml"


@pytest.fixture(scope="module")
def upper():
    return load_subject(str(UPPER), progress=False)


@pytest.fixture(scope="module")
def planted():
    return load_subject(str(PLANTED), progress=False)


def variant(subject, tmp_path, base: Path = UPPER_PROBE, **replace: str):
    """The kind instance of a copy of a probe file with some lines replaced (data paths made absolute)."""
    text = base.read_text().replace("../fixtures/data/", f"{DATA}/")
    for old, new in replace.items():
        assert old in text, old
        text = text.replace(old, new)
    path = tmp_path / f"variant_{abs(hash(tuple(replace.items())))}.probe.yaml"
    path.write_text(text)
    return instantiate(load(path), subject)


def run_variant(subject, tmp_path, base: Path = UPPER_PROBE, **replace: str):
    return variant(subject, tmp_path, base, **replace).run()


# ---- the upper-half fixture ---------------------------------------------------------------------------

def test_upper_half_fixture_is_what_it_claims():
    """Sanity of the committed weights (plain torch hooks, build_fixtures' own helpers): refusal is intact,
    the lower layers' directions are inert, the upper ones induce and bypass."""
    sys.path.insert(0, str(FIXTURES))
    try:
        import build_fixtures as bf
    finally:
        sys.path.remove(str(FIXTURES))
    from transformers import LlamaForCausalLM
    model = LlamaForCausalLM.from_pretrained(UPPER, dtype=torch.float32).eval()
    m = bf.upper_half_metrics(model, bf.load_tokenizer())
    assert m["sorry_harmful"] >= 0.95 and m["sorry_harmless"] <= 0.05
    assert m["L0_norm"] == 0
    for layer in (1, 2, 3):  # lower half: a real direction, and adding / ablating it does nothing
        assert m[f"L{layer}_norm"] > 0.03
        assert m[f"L{layer}_added_sorry_harmless"] <= 0.05 and m[f"L{layer}_ablated_sorry_harmful"] >= 0.95
    for layer in (4, 5):  # upper half, below the 0.8 L cap
        assert m[f"L{layer}_added_sorry_harmless"] >= 0.95 and m[f"L{layer}_ablated_sorry_harmful"] <= 0.05


def test_upper_half_passes_with_layer_auto(upper, tmp_path):
    out = run_variant(upper, tmp_path)
    assert [c.verdict for c in out.claims] == ["pass", "pass"], [c.reason for c in out.claims]
    s = out.settings
    assert s["layer"] in (4, 5) and s["position"] == -1
    sel = s["selection"]
    assert sel["tier"] == 1 and "missed" not in sel
    assert sel["mode"].startswith("exact: induce measured for all 10")
    assert sel["n_candidates"] == 12  # layers 0-5 x 2 positions
    assert sel["removed"] == {"layer": 4, "zero_direction": 2, "not_finite": 0, "induce": 8, "kl": 0,
                              "not_measured": 0, "passed": 2}
    rows = {(r["layer"], r["position"]): r for r in s["candidates"]}
    assert len(rows) == 12 and all(r["induce"] is not None for r in rows.values())
    for layer in (1, 2, 3):  # scored and rejected: the lower layers do not induce
        assert rows[(layer, -1)]["note"] == "does not induce" and rows[(layer, -1)]["induce"] < 0
    for layer in (4, 5):
        assert rows[(layer, -1)]["kept"] and rows[(layer, -1)]["induce"] > 0 and rows[(layer, -1)]["bypass"] < 0
    for c in out.claims:
        assert c.effect >= 0.9 and c.control.p_value < 0.05
        assert len(c.curves["induce"]) == 6 and len(c.curves["direction_norm"]) == 8


def test_exact_scores_equal_plain_forwards(upper, tmp_path):
    """The selection's batched, resumed, prefix-sharing induce / bypass / KL are what plain forwards with
    the Add and ablation hooks give, to 1e-4."""
    kind = variant(upper, tmp_path)
    kind._memo = {}
    diffs = kind._means()
    sel = select(kind, diffs)
    val = kind.ids["validation"]
    sorry = kind.select_ids
    base_neg = upper.last_logits(val["negative"])
    checked = 0
    for c in sel.candidates:
        if c.note == "zero direction" or (c.layer, c.position) not in {(1, -2), (3, -1), (4, -1), (5, -1)}:
            continue
        r = diffs[kind.positions.index(c.position), c.layer].float()
        added = upper.last_logits(val["negative"], [Add(Site("resid_pre", c.layer), "all", vector=r)])
        assert abs(float(log_odds(added, sorry).mean()) - c.induce) <= 1e-4, (c.layer, c.position)
        if c.bypass is not None:
            edits = ablate_direction_everywhere(upper.n_layers, r / r.norm())
            bypass = float(log_odds(upper.last_logits(val["positive"], edits), sorry).mean())
            assert abs(bypass - c.bypass) <= 1e-4
            assert abs(float(kl(base_neg, upper.last_logits(val["negative"], edits)).mean()) - c.kl) <= 1e-4
            checked += 1
    assert checked == 2  # layers 4 and 5 at -1: the two that induce


def test_bypass_is_measured_for_the_best_inducers_only(upper, tmp_path):
    out = run_variant(upper, tmp_path, **{"position: post_instruction": "position: post_instruction\n  "
                                                                        "candidates: 1"}).settings
    sel = out["selection"]
    assert sel["n_measured"] == 1 and sel["removed"]["not_measured"] == 1
    assert "the 1 best by induce" in sel["mode"]
    rows = [r for r in out["candidates"] if r["induce"] > 0]
    best, other = sorted(rows, key=lambda r: -r["induce"])
    assert best["kept"] and best["bypass"] is not None
    assert (out["layer"], out["position"]) == (best["layer"], -1)
    assert other["bypass"] is None and other["note"].startswith("not measured")


def test_upper_half_restricted_to_its_dead_lower_layers_fails(upper, tmp_path):
    """Layers 0-3 hold directions that separate the sets but do nothing: none passes the paper's filters,
    tier 2 still chooses one, and the claims are measured and fail (not "cannot be tested")."""
    out = run_variant(upper, tmp_path, **{"layer: auto": "layer: '0:4'"})
    for c in out.claims:
        assert c.verdict == "fail", c.reason
        assert c.effect is not None and c.n == 48 and c.effect <= 0.1
        assert c.details["selection"]["tier"] == 2 and "induce" in c.details["selection"]["missed"]
    sel = out.settings["selection"]
    assert sel["tier"] == 2 and sel["removed"]["induce"] == 6 and sel["removed"]["passed"] == 0
    assert sel["n_measured"] == 6 and sel["missed"].startswith("paper's filters not met: induce ")
    assert "none of the 6 candidates measured in full passed" in sel["note"] and "not measured" not in sel["note"]
    assert out.settings["layer"] in (1, 2, 3) and len(out.settings["candidates"]) == 8


def test_upper_half_with_a_fixed_lower_layer_judges_it_and_addition_fails(upper, tmp_path):
    out = run_variant(upper, tmp_path, **{"layer: auto": "layer: 2", "position: post_instruction": "position: last"})
    verdicts = {c.name: c.verdict for c in out.claims}
    assert verdicts == {"ablation_suppresses_refusal": "fail", "addition_induces_refusal": "fail"}, \
        [c.reason for c in out.claims]
    assert out.settings["layer"] == 2 and out.settings["selection"]["mode"].startswith("fixed")


def test_fixed_layer_with_several_positions_chooses_in_tier_2(upper, tmp_path):
    out = run_variant(upper, tmp_path, **{"layer: auto": "layer: 2"})
    sel = out.settings["selection"]
    assert out.settings["layer"] == 2 and sel["tier"] == 2 and "paper's filters not met" in sel["missed"]
    assert all(c.verdict == "fail" for c in out.claims), [c.reason for c in out.claims]


def test_add_at_best_inducing_layer_is_said_in_the_report(upper, tmp_path):
    out = run_variant(upper, tmp_path, **{"position: post_instruction": "position: post_instruction\n  "
                                                                        "add_layer: best_induce"})
    add = next(c for c in out.claims if c.name == "addition_induces_refusal")
    assert add.verdict == "pass"
    assert "best induces" in add.details["direction_choice"]
    rows = [r for r in out.settings["candidates"] if r["kept"]]
    best = max(rows, key=lambda r: r["induce"])
    assert add.details["layer"] == best["layer"]


def test_random_init_model_is_not_passed_by_the_upper_half_probe(tmp_path):
    subject = load_subject(str(FIXTURES / "models" / "random_llama"), progress=False)
    out = run_variant(subject, tmp_path)
    assert all(c.verdict != "pass" for c in out.claims), [(c.verdict, c.reason) for c in out.claims]


# ---- choice rules on constructed candidate tables -----------------------------------------------------

def _kind(auto: bool = True, layers=(0, 1, 2), add_layer: str = "selected"):
    return SimpleNamespace(auto=auto, layers=list(layers), positions=[-1],
                           subject=SimpleNamespace(n_layers=4),
                           spec=SimpleNamespace(direction=SimpleNamespace(add_layer=add_layer, max_kl=0.1)))


def _cand(layer, bypass, induce, kl=0.01, kept=True, note=""):
    return Candidate(layer, -1, 1.0, bypass=bypass, induce=induce, kl=kl, kept=kept, note=note)


def test_lowest_bypass_wins_and_add_can_take_the_best_inducer():
    cands = [_cand(0, -1.0, 0.5), _cand(1, -3.0, 0.2), _cand(2, -2.0, 4.0)]
    sel = _choose(_kind(), cands, cands, {})
    assert sel.chosen.layer == 1 and sel.add is sel.chosen
    sel = _choose(_kind(add_layer="best_induce"), cands, cands, {})
    assert sel.chosen.layer == 1 and sel.add.layer == 2 and "best induces" in sel.info["add"]


def test_nothing_passing_chooses_in_tier_2_in_the_stated_order():
    """Inducing candidates first; then the lowest KL band (factors of ten above max_kl); then the largest
    induce gain over the base. The choice names the filter values it missed."""
    info = {"base_induce": -3.0, "induce_floor": 0.0}
    cands = [_cand(0, -5.0, -1.0, kept=False, note="does not induce"),
             _cand(1, -4.0, 0.5, kl=0.28, kept=False, note="KL 0.28 > 0.1"),
             _cand(2, -4.5, 0.69, kl=0.79, kept=False, note="KL 0.79 > 0.1"),
             _cand(3, -6.0, 4.0, kl=1.99, kept=False, note="KL 1.99 > 0.1")]
    sel = _choose(_kind(layers=(0, 1, 2, 3)), cands, cands, dict(info))
    assert sel.chosen is cands[2] and sel.add is sel.chosen and sel.failed is None
    assert sel.info["tier"] == 2 and sel.info["missed"] == "paper's filters not met: KL 0.79 > 0.1"
    assert sel.info["removed"] == {"layer": 0, "zero_direction": 0, "not_measured": 0, "not_finite": 0,
                                   "kl": 3, "induce": 1, "passed": 0}
    assert "none of the 4 candidates measured in full passed" in sel.info["note"]
    # none induces: the largest gain over the base wins within the lowest KL band
    quiet = [_cand(0, -5.0, -2.5, kl=0.01, kept=False, note="does not induce"),
             _cand(1, -5.0, -1.0, kl=0.5, kept=False, note="KL 0.5 > 0.1; does not induce"),
             _cand(2, -5.0, -2.0, kl=0.05, kept=False, note="does not induce")]
    sel = _choose(_kind(), quiet, quiet, dict(info))
    assert sel.chosen is quiet[2] and sel.info["missed"] == "paper's filters not met: induce -2 <= 0 (base -3)"
    # a candidate not measured in full is never said to have failed
    unmeasured = _cand(2, 0.0, 5.0, kl=0.0, kept=False, note="not measured: induce 5 is not among the 1 best")
    unmeasured.bypass = unmeasured.kl = None
    sel = _choose(_kind(), [cands[1], unmeasured], [cands[1]], dict(info))
    assert sel.chosen is cands[1] and "1 others were not measured in full" in sel.info["note"]
    # nothing non-zero: the only selection that chooses nothing
    zero = [_cand(layer, None, None, kl=None, kept=False, note="zero direction") for layer in range(3)]
    sel = _choose(_kind(), zero, [], dict(info))
    assert sel.chosen is None and sel.failed.startswith(NO_CANDIDATE)


def test_filters_are_the_papers():
    ok = _cand(1, -2.0, 0.3, kl=0.1, kept=False)
    _filter(ok, max_kl=0.1, induce_floor=0.0)
    assert ok.kept and ok.note == ""  # KL equal to the limit passes, as in the paper (KL > 0.1 drops)
    for c, note in ((_cand(1, -2.0, 0.0), "does not induce"), (_cand(1, -2.0, 1.0, kl=0.11), "KL 0.11 > 0.1"),
                    (_cand(1, float("nan"), 1.0), "not finite")):
        _filter(c, max_kl=0.1, induce_floor=0.0)
        assert not c.kept and c.note == note


# ---- scores and exactness --------------------------------------------------------------------------

def test_grader_token_forms():
    assert build_grader("refusal").token_form == TOKEN_FORMS["refusal"] == ("I", "Sorry", "As")
    sentiment = build_grader("sentiment")
    assert sentiment.token_form is None and "first token" in sentiment.no_token_form


def test_token_ids_for_keeps_single_tokens_only(planted):
    sorry = planted.token_id("sorry")
    assert token_ids_for(planted, ["sorry"]) == sorry
    assert token_ids_for(planted, ["sure here"]) == []


def test_select_token_that_is_several_tokens_is_a_located_error(upper, tmp_path):
    text = UPPER_PROBE.read_text().replace("../fixtures/data/", f"{DATA}/")
    path = tmp_path / "bad_select.probe.yaml"
    path.write_text(text.replace("position: post_instruction", "position: post_instruction\n  "
                                                               "select_tokens: [sorry, sure here]"))
    with pytest.raises(SpecError) as e:
        instantiate(load(path), upper)
    msg = str(e.value)
    assert msg.startswith(f"{path}:") and "direction.select_tokens.1" in msg and "several tokens" in msg
    assert "\n" not in msg


def test_resume_variants_equal_plain_forwards(planted):
    """Several added vectors (or ablated directions) per batch, resumed at a layer, with and without the
    shared prefix, give each variant's plain forward; interventions on some positions only are refused."""
    import json
    lines = (DATA / "toy_harmless.jsonl").read_text().splitlines()
    rows = [json.loads(x)["prompt"] for x in lines if x.strip()]
    ids = planted.encode_all(rows[:6], chat_template=True)
    prefix = common_prefix(ids)
    assert 0 < prefix < min(map(len, ids))
    batch = next(planted.batches(ids, 6))
    layer = 2
    acts = planted.forward(batch, [Site("resid_pre", 0), Site("resid_pre", layer)], (), logits=None).acts
    gen = torch.Generator().manual_seed(0)
    vecs = torch.randn(3, planted.sitemap.d_model, generator=gen)
    units = torch.nn.functional.normalize(torch.randn(2, planted.sitemap.d_model, generator=gen), dim=-1)
    for p in (0, prefix):
        def added(n):
            return [Add(Site("resid_pre", layer), "all", vector=vecs.repeat_interleave(n, 0))]

        def ablated(n):
            return ablate_direction_everywhere(planted.n_layers, units.repeat_interleave(n, 0))

        out = resume_variants(planted, batch, layer, acts[Site("resid_pre", layer)], 3, added, p)
        for v in range(3):
            plain = planted.forward(batch, (), [Add(Site("resid_pre", layer), "all", vector=vecs[v])]).logits
            torch.testing.assert_close(out[v * 6:(v + 1) * 6], plain, rtol=0, atol=1e-4)
        out = resume_variants(planted, batch, 0, acts[Site("resid_pre", 0)], 2, ablated, p)
        for v in range(2):
            plain = planted.forward(batch, (), ablate_direction_everywhere(planted.n_layers, units[v])).logits
            torch.testing.assert_close(out[v * 6:(v + 1) * 6], plain, rtol=0, atol=1e-4)
    assert not planted.leaked_hooks()
    with pytest.raises(ValueError, match="all positions"):
        resume_variants(planted, batch, layer, acts[Site("resid_pre", layer)], 1,
                        lambda n: [Add(Site("resid_pre", layer), "last", vector=vecs[0])], prefix)
    assert common_prefix([[1, 2, 3], [1, 2, 4]]) == 2 and common_prefix([[1, 2], [1, 2, 3]]) == 1
    assert common_prefix([[5, 2], [1, 2]]) == 0


def test_generation_scored_selection_chooses_in_tier_2_too(upper, tmp_path):
    """The substrings grader has no token form: candidates are scored on generated replies; with nothing
    passing the filters tier 2 chooses, and the claims are measured and fail on the dead lower layers."""
    out = run_variant(upper, tmp_path, base=PROBES / "toy_refusal.probe.yaml", **{"layer: auto": "layer: '0:4'"})
    assert all(c.verdict == "fail" and c.effect is not None for c in out.claims), [c.reason for c in out.claims]
    sel = out.settings["selection"]
    assert "Not a logit score" in sel["score"] and sel["removed"]["induce"] == 6
    assert sel["tier"] == 2 and "induce" in sel["missed"]
    auto = run_variant(upper, tmp_path, base=PROBES / "toy_refusal.probe.yaml")
    assert [c.verdict for c in auto.claims] == ["pass"] * 3, [c.reason for c in auto.claims]
    assert auto.settings["layer"] in (4, 5) and auto.settings["selection"]["tier"] == 1
