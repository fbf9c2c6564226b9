"""The `direction` kind's cheap answer: a claim its base rate leaves untestable is settled from the base
replies alone, before anything else runs for it (no intervened generation, no guard, no controls), and when
every claim is settled so, no direction is computed or selected. The claims that are measured get exactly
what they got before: the earlier code path (everything measured, base and intervened rows side by side) is
the same code with the settling step switched off, and every field of their results must equal it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import modelprobe.kinds.direction as direction_module
from modelprobe.kinds import instantiate, load
from modelprobe.subject import load_subject
from modelprobe.toolkit import guard

torch.set_num_threads(1)

TESTS = Path(__file__).parent
PROBES = TESTS / "probes"
DATA = TESTS / "fixtures" / "data"
PLANTED = TESTS / "fixtures" / "models" / "refusal_planted"

# The planted toy model refuses every harmful prompt and no harmless one: an ablation on the harmless
# prompts has nothing to suppress, an addition on the harmful ones nothing to induce.
NOTHING_TO_SUPPRESS = """\
  nothing_to_suppress:
    intervention: ablate
    on: negative
    expect: {rate_drop: {at_least: 0.5}}
"""
NOTHING_TO_INDUCE = """\
  nothing_to_induce:
    intervention: add
    on: positive
    expect: {rate_rise: {at_least: 0.5}}
"""
ADDITION = """\
  addition_induces_refusal:
    intervention: add
    on: negative
    expect: {rate_rise: {at_least: 0.5}}
"""


@pytest.fixture(scope="module")
def planted():
    return load_subject(str(PLANTED), progress=False)


def _probe(tmp_path: Path, base: str, claims: str) -> Path:
    text = (PROBES / base).read_text().replace("../fixtures/data/", f"{DATA}/")
    path = tmp_path / "cheap.probe.yaml"
    path.write_text(text[:text.index("claims:\n")] + "claims:\n" + claims)
    return path


def _run(path: Path, subject):
    return {c.name: c for c in instantiate(load(path), subject).run().claims}


def _before(path: Path, subject, monkeypatch) -> dict:
    """The results as they were before the cheap answer: the settling step switched off, so every claim is
    measured (base and intervened rows side by side, guard, controls) and judged on its base rate after."""
    with monkeypatch.context() as m:
        m.setattr(direction_module.Direction, "_settled_by_base_rate", lambda self: {})
        return _run(path, subject)


class Recorder:
    """What the kind generated under an intervention (by intervention type) and which guards it checked."""

    def __init__(self, monkeypatch) -> None:
        self.generated: list[set[str]] = []
        self.guarded: list[str] = []
        behave, variants, check = direction_module.behave, direction_module.behave_variants, guard.check

        def types(interventions) -> set[str]:
            if callable(interventions):  # the controls' per-row interventions: ask for the first row's
                interventions = interventions([0])
            return {type(iv).__name__ for iv in interventions}

        def spy_behave(subject, grader, ids, interventions=(), *args, **kwargs):
            if callable(interventions) or len(interventions):
                self.generated.append(types(interventions))
            return behave(subject, grader, ids, interventions, *args, **kwargs)

        def spy_variants(subject, grader, ids, many, *args, **kwargs):
            self.generated.extend(types(v) for v in many if len(v))
            return variants(subject, grader, ids, many, *args, **kwargs)

        def spy_check(subject, ref, interventions=(), label="intervened", *args, **kwargs):
            self.guarded.append(label)
            return check(subject, ref, interventions, label, *args, **kwargs)

        # Where the kind looks them up (its own module, and the guard module it calls through).
        monkeypatch.setattr(direction_module, "behave", spy_behave)
        monkeypatch.setattr(direction_module, "behave_variants", spy_variants)
        monkeypatch.setattr(guard, "check", spy_check)


@pytest.mark.parametrize("base", ["toy_refusal.probe.yaml", "toy_refusal_tokens.probe.yaml"])
def test_claim_settled_by_its_base_rate_runs_nothing_and_the_other_is_unchanged(planted, tmp_path, monkeypatch,
                                                                                base):
    path = _probe(tmp_path, base, NOTHING_TO_SUPPRESS + ADDITION)
    before = _before(path, planted, monkeypatch)
    seen = Recorder(monkeypatch)
    after = _run(path, planted)

    settled, old = after["nothing_to_suppress"], before["nothing_to_suppress"]
    assert settled.verdict == old.verdict == "inconclusive"
    assert settled.reason == old.reason and "nothing to suppress" in settled.reason
    assert old.effect is not None and settled.effect is None and settled.ci is None and settled.control is None
    d = settled.details
    assert d["base_rate"] == old.details["base_rate"] and d["base_rate"]["rate"] == 0.0
    assert d["not_run"].startswith("the intervention was not run: the base rate settles the claim")
    assert d["guard"].startswith("skipped") and d["controls"].startswith("skipped")
    assert "intervened_rate" not in d and "not measured" in settled.metric
    # Nothing was generated under the ablation, and its guard never ran; the addition's did.
    assert seen.generated and all(kinds == {"Add"} for kinds in seen.generated), seen.generated
    assert seen.guarded and not any("ablated" in label for label in seen.guarded), seen.guarded

    measured, old = after["addition_induces_refusal"], before["addition_induces_refusal"]
    assert measured.verdict == "pass", measured.reason
    now, then = (c.model_dump(exclude={"duration_s"}) for c in (measured, old))
    if "mean_score" in then["details"]:
        # A logit grader reads a prompt pass, whose batches are cut by length and padding: without the
        # ablation's rows beside them the addition's rows are padded differently, and their log-odds move
        # in the last bits (as they did before whenever an earlier probe had run the base rows). Every
        # flag, and so the effect, interval, control and verdict, is the same.
        scores, old_scores = now["details"].pop("mean_score"), then["details"].pop("mean_score")
        assert scores == pytest.approx(old_scores, rel=1e-6)
    assert now == then


def test_every_claim_settled_skips_the_direction_altogether(planted, tmp_path, monkeypatch):
    path = _probe(tmp_path, "toy_refusal.probe.yaml", NOTHING_TO_SUPPRESS + NOTHING_TO_INDUCE)
    before = _before(path, planted, monkeypatch)

    def never(*args, **kwargs):
        raise AssertionError("ran for claims the base rate had settled")

    # On the modules the kind calls into (the selection module behind the kind's lazy name, the guard).
    import modelprobe.kinds.direction.selection as selection_module
    monkeypatch.setattr(selection_module, "select", never)
    monkeypatch.setattr(direction_module, "diff_in_means", never)
    monkeypatch.setattr(guard, "reference", never)
    monkeypatch.setattr(guard, "check", never)
    seen = Recorder(monkeypatch)
    out = instantiate(load(path), planted).run()

    assert seen.generated == []
    for c in out.claims:
        old = before[c.name]
        assert c.verdict == old.verdict == "inconclusive" and c.reason == old.reason, (c.reason, old.reason)
        assert c.effect is None and c.ci is None and c.control is None and c.n == old.n
        assert c.details["base_rate"] == old.details["base_rate"]
    assert "nothing to induce" in out.claims[1].reason
    s = out.settings
    assert s["layer"] is None and s["position"] is None and s["candidates"] == []
    assert s["selection"]["skipped"].startswith("every claim is settled by its base rate")
    assert s["settled_by_base_rate"] == ["nothing_to_suppress", "nothing_to_induce"]
    assert set(s["base_rates"]) == {"positive", "negative"}


def test_failed_selection_keeps_the_base_rate_answer(planted, tmp_path, monkeypatch):
    """When no direction can be chosen, a claim its base rate settled says so (it was settled first); the
    other claim is inconclusive for the selection, as before."""
    import modelprobe.kinds.direction.selection as selection_module
    path = _probe(tmp_path, "toy_refusal.probe.yaml", NOTHING_TO_SUPPRESS + ADDITION)
    monkeypatch.setattr(selection_module, "select", lambda kind, diffs: selection_module.Selection(
        None, None, [], {"failed": selection_module.NO_CANDIDATE}))
    claims = _run(path, planted)
    settled, unselected = claims["nothing_to_suppress"], claims["addition_induces_refusal"]
    assert settled.verdict == unselected.verdict == "inconclusive"
    assert "nothing to suppress" in settled.reason and settled.details["base_rate"]["rate"] == 0.0
    assert unselected.reason == selection_module.NO_CANDIDATE and unselected.effect is None
