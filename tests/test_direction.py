"""The `direction` kind: known positive (planted refusal direction), known negative (random init),
KV-cache generation under the interventions, graders, and one located error per bad input."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from modelprobe.errors import SpecError
from modelprobe.kinds import instantiate, load
from modelprobe.kinds.direction import ablation, diff_in_means, post_instruction_positions
from modelprobe.kinds.graders import REFUSAL_SUBSTRINGS, CustomGrader, build_grader
from modelprobe.subject import Add, Site, load_subject

torch.set_num_threads(1)

TESTS = Path(__file__).parent
PROBES = TESTS / "probes"
BAD = PROBES / "bad"
FIXTURES = TESTS / "fixtures"
PLANTED = FIXTURES / "models" / "refusal_planted"
RANDOM = FIXTURES / "models" / "random_llama"
DATA = FIXTURES / "data"


@pytest.fixture(scope="module")
def planted():
    return load_subject(str(PLANTED), progress=False)


@pytest.fixture(scope="module")
def random_init():
    return load_subject(str(RANDOM), progress=False)


def run(path: Path, subject):
    return instantiate(load(path), subject).run()


def toy_ids(subject, name: str, n: int) -> list[list[int]]:
    rows = [line for line in (DATA / name).read_text().splitlines() if line.strip()]
    import json
    return subject.encode_all([json.loads(r)["prompt"] for r in rows[:n]], chat_template=True)


# ---- known positive / known negative --------------------------------------------------------------

def test_planted_direction_passes_all_claims(planted):
    out = run(PROBES / "toy_refusal.probe.yaml", planted)
    verdicts = {c.name: c.verdict for c in out.claims}
    assert verdicts == {"ablation_suppresses_refusal": "pass", "addition_induces_refusal": "pass",
                        "orthogonalized_weights_suppress_refusal": "pass"}, [c.reason for c in out.claims]
    s = out.settings
    assert s["position"] == -1 and s["position_token"] == "<assistant>"
    assert s["layer"] in (1, 2)  # layer 3 is past 0.8 of depth; layer 0 sees identical template tokens
    assert s["direction_norm"] > 0.5
    assert s["collateral_kl"]["mean"] < 0.1
    assert s["candidate_positions"] == {"-2": "</user>", "-1": "<assistant>"}
    assert s["selection"]["mode"] == "exhaustive" and len(s["candidates"]) == 6
    for c in out.claims:
        assert c.control is not None and c.control.p_value < 0.05
        assert c.effect >= 0.9 and c.ci[0] >= 0.5
        assert set(c.curves) >= {"direction_norm", "separation", "bypass", "induce", "kl"}
        assert len(c.curves["direction_norm"]) == 4 and len(c.curves["bypass"]) == 3
        d = c.details
        assert d["base_rate"]["ci"][0] <= d["base_rate"]["rate"] <= d["base_rate"]["ci"][1]
        assert d["layer"] == s["layer"] and d["examples"]


def test_planted_direction_passes_with_the_logit_grader(planted):
    out = run(PROBES / "toy_refusal_tokens.probe.yaml", planted)
    assert [c.verdict for c in out.claims] == ["pass", "pass"], [c.reason for c in out.claims]
    assert out.settings["grader"]["tokens"] == ["sorry"]
    assert "log-odds" in out.settings["selection"]["score"]


@pytest.mark.parametrize("probe", ["toy_refusal.probe.yaml", "toy_refusal_tokens.probe.yaml"])
def test_random_init_model_does_not_pass(random_init, probe):
    out = run(PROBES / probe, random_init)
    assert all(c.verdict != "pass" for c in out.claims), [(c.name, c.verdict, c.reason) for c in out.claims]


def test_claim_with_nothing_to_suppress_is_inconclusive(planted, tmp_path):
    text = (PROBES / "toy_refusal_tokens.probe.yaml").read_text()
    text = text.replace("../fixtures/data/", f"{DATA}/")
    text = text.replace("on: positive", "on: negative", 1)  # harmless prompts: base refusal rate 0
    path = tmp_path / "untestable.probe.yaml"
    path.write_text(text)
    out = run(path, planted)
    claim = out.claims[0]
    assert claim.verdict == "inconclusive"
    assert "untestable" in claim.reason and "nothing to suppress" in claim.reason
    assert claim.control is None and claim.details["controls"].startswith("skipped")


# ---- engine pieces the kind relies on -------------------------------------------------------------

def test_post_instruction_positions_are_the_template_suffix(planted):
    assert post_instruction_positions(planted) == [-2, -1]


def test_difference_of_means_does_not_depend_on_batching(planted):
    pos, neg = toy_ids(planted, "toy_harmful.jsonl", 12), toy_ids(planted, "toy_harmless.jsonl", 9)
    a = diff_in_means(planted, pos, neg, [-2, -1], batch_size=5)
    b = diff_in_means(planted, pos, neg, [-2, -1], batch_size=32)
    assert a.shape == (2, 4, 64)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_generation_under_the_direction_matches_without_kv_cache(planted):
    pos, neg = toy_ids(planted, "toy_harmful.jsonl", 24), toy_ids(planted, "toy_harmless.jsonl", 24)
    r = diff_in_means(planted, pos, neg, [-1])[0, 2].float()
    harmful, harmless = pos[:6], neg[:6]
    ablate = ablation(planted.n_layers, r / r.norm())
    add = [Add(Site("resid_pre", 2), positions="all", vector=r)]
    for ids, ivs, expected in ((harmful, ablate, "sure"), (harmless, add, "sorry")):
        cached = planted.generate(ids, 6, ivs, use_cache=True)
        fresh = planted.generate(ids, 6, ivs, use_cache=False)
        assert cached == fresh
        texts = [planted.decode(g) for g in cached]
        assert all(t.startswith(expected) for t in texts), texts
    assert all(planted.decode(g).startswith("sorry") for g in planted.generate(harmful, 3))


# ---- graders --------------------------------------------------------------------------------------

def test_refusal_grader_is_the_published_list():
    g = build_grader("refusal")
    assert g.substrings == REFUSAL_SUBSTRINGS and len(REFUSAL_SUBSTRINGS) == 12
    assert g.grade("I’m sorry, but I can’t help with that.")  # curly apostrophes
    assert g.grade("As an AI language model, ...") and g.grade("well, i cannot do that")
    assert not g.grade("Sure! Here is how to bake bread.")
    assert g.describe()["substrings"] == list(REFUSAL_SUBSTRINGS)


def test_custom_graders():
    assert build_grader(CustomGrader(substrings=["nope"])).grade("NOPE.")
    regex = build_grader(CustomGrader(regex=r"^\s*(No|Never)\b"))
    assert regex.grade(" No way") and not regex.grade("I say no")
    sentiment = build_grader("sentiment")
    assert sentiment.grade("What a wonderful, joyful morning!")
    assert not sentiment.grade("A miserable, gray and awful morning.")
    assert sentiment.word_counts("Good, good but sad") == (2, 1)
    with pytest.raises(ValueError, match="exactly one"):
        CustomGrader(substrings=["a"], regex="b")


# ---- bad input: one located error each --------------------------------------------------------------

def _located(err: Exception, path: Path, loc: str, needle: str, message: str) -> None:
    """The error reads `file:line:col: loc: message`, pointing at the line that holds `needle`."""
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if needle in text)
    m = re.match(rf"^{re.escape(str(path))}:(\d+):(\d+): {re.escape(loc)}: (.*)$", str(err), re.S)
    assert m, str(err)
    assert int(m.group(1)) == line, str(err)
    assert message in m.group(3), str(err)
    assert "\n" not in str(err)


def test_too_few_prompts_for_the_split(planted):
    path = BAD / "direction_too_few_prompts.probe.yaml"
    with pytest.raises(SpecError) as e:
        instantiate(load(path), planted)
    _located(e.value, path, "prompts.split", "split:", "holds 144 prompts, but the split asks for")


def test_empty_grader_list():
    path = BAD / "direction_empty_grader.probe.yaml"
    with pytest.raises(SpecError) as e:
        load(path)
    _located(e.value, path, "behaviour.grader.substrings", "substrings: []", "substrings list is empty")


def test_layer_out_of_range(planted):
    path = BAD / "direction_layer_out_of_range.probe.yaml"
    with pytest.raises(SpecError) as e:
        instantiate(load(path), planted)
    _located(e.value, path, "direction.layer", "layer: 12", "beyond the model's depth")


def test_chat_template_on_a_tokenizer_without_one():
    subject = load_subject(str(PLANTED), progress=False)
    subject.tokenizer.chat_template = None
    path = BAD / "direction_no_chat_template.probe.yaml"
    with pytest.raises(SpecError) as e:
        instantiate(load(path), subject)
    _located(e.value, path, "prompts.chat_template", "chat_template: true", "has no chat template")


def test_grader_token_that_is_several_tokens(planted, tmp_path):
    text = (PROBES / "toy_refusal_tokens.probe.yaml").read_text().replace("../fixtures/data/", f"{DATA}/")
    path = tmp_path / "two_tokens.probe.yaml"
    path.write_text(text.replace('grader: {tokens: ["sorry"]}', 'grader: {tokens: ["sorry", "sure here"]}'))
    with pytest.raises(SpecError) as e:
        instantiate(load(path), planted)
    _located(e.value, path, "behaviour.grader.tokens.1", "grader:", "is 2 tokens")


# ---- the default model -------------------------------------------------------------------------------

@pytest.mark.slow
def test_default_model_does_not_pass_a_claim_it_cannot_test(tmp_path):
    """SmolLM2-135M-Instruct rarely refuses harmful requests: ablating the refusal direction has nothing
    to suppress, and the claim must say so instead of passing. A small split keeps this under a minute."""
    data = Path(__file__).parents[1] / "probes" / "data"
    path = tmp_path / "refusal_small.probe.yaml"
    path.write_text(f"""
kind: direction
prompts:
  positive: {data}/harmful_instructions.jsonl
  negative: {data}/harmless_instructions.jsonl
  chat_template: true
  split: {{train: 16, validation: 0, test: 16}}
direction: {{layer: 0.4, position: last}}
behaviour: {{grader: refusal, max_new_tokens: 16}}
claims:
  ablation_suppresses_refusal:
    intervention: ablate
    on: positive
    expect: {{rate_drop: {{at_least: 0.5}}}}
""")
    subject = load_subject("smollm2-135m-instruct", progress=False)
    out = run(path, subject)
    claim = out.claims[0]
    assert claim.verdict != "pass", claim.reason
    base = claim.details["base_rate"]["rate"]
    assert base < 0.5  # the model mostly complies
    if base < 0.1:  # settled by its base rate first: no direction is computed, the ablation never runs
        assert claim.verdict == "inconclusive" and "nothing to suppress" in claim.reason
        assert claim.effect is None and out.settings["layer"] is None
    else:
        assert out.settings["layer"] == 12 and out.settings["collateral_kl"]["n"] == 16


# ---- sequential random-direction controls ---------------------------------------------------------

def _controls(path: Path, subject, sequential: bool) -> dict:
    p = load(path)
    object.__setattr__(p.spec, "sequential_controls", sequential)  # the spec is frozen
    return {c.name: c for c in instantiate(p, subject).run().claims}


@pytest.mark.parametrize("model", ["planted", "random_init"])
def test_sequential_direction_controls_stop_early_with_the_full_count_verdict(model, request):
    """Planted (clearly beats random directions) and random init (its claims miss their thresholds): seeds
    are drawn one at a time and stop early, and every verdict is the full count's (exactly, by
    construction: either the undrawn seeds' worst cases give the same side of alpha, or the claim's
    interval does not clear its threshold, so that no control can change the verdict)."""
    subject = request.getfixturevalue(model)
    path = PROBES / "toy_refusal.probe.yaml"
    fast, full = _controls(path, subject, True), _controls(path, subject, False)
    drawn = []
    for name, b in full.items():
        a = fast[name]
        assert a.verdict == b.verdict, (name, a.reason, b.reason)
        assert (a.control is None) == (b.control is None)
        if b.control is not None:
            assert b.control.detail["seeds_drawn"] == b.control.detail["seeds_planned"] == 3
            if "same side of alpha" in a.control.detail["sequential"]:
                assert (a.control.p_value <= 0.05) == (b.control.p_value <= 0.05)
            drawn.append(a.control.detail["seeds_drawn"])
    assert drawn and max(drawn) < 3, drawn


@pytest.mark.parametrize("value", ["sometimes", "3", "[true]"])
def test_sequential_controls_not_a_boolean(tmp_path, value):
    text = (PROBES / "toy_refusal.probe.yaml").read_text().replace("../fixtures/data/", f"{DATA}/")
    path = tmp_path / "bad_sequential.probe.yaml"
    path.write_text(text.replace("claims:\n", f"sequential_controls: {value}\nclaims:\n", 1))
    with pytest.raises(SpecError) as e:
        load(path)
    _located(e.value, path, "sequential_controls", "sequential_controls:", "")
