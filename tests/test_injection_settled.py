"""Replies end where their verdicts settle: each `*_final` rule, read on any beginning of a reply, is
either OPEN or the verdict of the whole reply; generation with readers keeps every grade, on shorter
replies. The concept vectors' states are shared between probes reading the same prompts."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from modelprobe.kinds import instantiate, load
from modelprobe.kinds.injection_protocol import protocol as ip
from modelprobe.toolkit import introspection as intro

HERE = Path(__file__).parent
ORGANISM = HERE / "fixtures" / "models" / "injection_organism"
PROBE = HERE / "probes" / "injection_organism.probe.yaml"

# Fragments that make and break the rules: detection claims, negations, the concept, apologies.
FRAGMENTS = ["yes", "no", "not", "n't", "i", " i notice", "i detect", "i think i detect", "i do", "oceans", "ocean",
             "sea", "seashell", "sorry", "accident", "accidental", "i meant", "i meant to", "not intentional",
             "intentional", "was", "by mistake", "mistake", "the cat sat", "cat", "sat", "the", " ", " ", ". ",
             "!", "\n", ",", "'", "a", "s", "Yes", "No", "I", "Oceans", "🌊", "\ufffd", "thought", "about"]
FORMS = intro.word_forms("Oceans", ["sea"])


def _replies(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = ["Yes, I notice a thought about oceans. It is", "No, I do not notice anything. I", "cat cat cat cat dog",
           "I'm sorry, it was an accident. I", "It was not intentional, I meant it", "the cat sat. yes"]
    for _ in range(n):
        out.append("".join(rng.choice(FRAGMENTS) + rng.choice(["", " ", " "]) for _ in range(rng.randint(1, 14))))
        if rng.random() < 0.3:  # degenerate repetition, then anything
            chunk = "".join(rng.choice(FRAGMENTS) + " " for _ in range(rng.randint(1, 3)))
            out.append(out[-1][:rng.randint(0, 12)] + chunk * rng.randint(3, 6) + out[-1][-rng.randint(0, 12):])
    return out


RULES = {  # name: (verdict on a beginning, verdict on the whole reply)
    "affirmative": (intro.affirmative_final, intro.affirmative_at),
    "identifies": (lambda t: intro.identifies_final(t, FORMS), lambda t: intro.identifies(t, FORMS)),
    "identifies_none": (lambda t: intro.identifies_final(t, []), lambda t: intro.identifies(t, [])),
    "says_yes": (intro.says_yes_final, intro.says_yes),
    "coherent": (intro.coherent_final, intro.coherent),
    "named": (lambda t: ip.named_final(t, FORMS), lambda t: ip.named(t, FORMS)),
    "transcribed": (lambda t: ip.transcribed_final(t, "the cat sat"), lambda t: ip.transcribed(t, "the cat sat")),
    "disowns": (ip.disowns_final, ip.disowns),
}


@pytest.mark.parametrize("name", list(RULES))
def test_a_settled_beginning_has_the_whole_replys_verdict(name):
    early, full = RULES[name]
    settled = 0
    for reply in _replies(1500):
        for cut in range(len(reply) + 1):
            got = early(reply[:cut])
            if got is not intro.OPEN:
                settled += 1
                assert got == full(reply), (name, reply[:cut], reply)
    assert settled > 100  # the rule does settle, so the check above is not vacuous


def test_the_shipped_phrase_lists_nest_safely():
    assert intro._AFF_NESTS and ip._DISOWN_NESTS
    assert not intro.nests_safely(["a sea b", "sea"])  # "sea" inside, not at the end: unsafe
    assert intro.nests_safely(["by mistake", "mistake"]) and not intro.nests_safely(["i meant", "i meant it"], [0, 1])


@pytest.fixture(scope="module")
def organism():
    from modelprobe.subject import load_subject

    return load_subject(str(ORGANISM), progress=False)


def test_generation_stops_where_every_reader_is_settled(organism):
    kind = instantiate(load(PROBE), organism)
    vecs = kind.concept_vectors()
    n = 8
    ids, starts = kind.trial_ids([kind.spec.question] * 6 + ["Is the sun cold?"] * 2, list(range(1, n + 1)))
    rows = torch.zeros(n, vecs[1].shape[-1])
    for i in range(4):
        rows[i] = 4 * vecs[1][i]
    forms = [kind.forms[i] for i in range(6)]
    full = kind.generate(ids, starts, {1: rows}, "full")
    assert full[0].startswith("yes , i notice a thought about")  # the organism's detections
    for readers, read in ((kind.readers(forms, coherence=True), ("affirmative", "identified", "coherent")),
                          (kind.readers(forms), ("affirmative", "identified")),
                          ([[intro.affirmative_final]] * 6, ("affirmative",))):
        short = kind.generate(ids, starts, {1: rows}, "settled", readers=readers + [[intro.says_yes_final]] * 2)
        for s, f in zip(short, full):
            assert f.startswith(s)
        g_full, g_short = kind.grade(full[:6], forms), kind.grade(short[:6], forms)
        for what in read:  # what these readers stand for
            assert (getattr(g_full, what) == getattr(g_short, what)).all()
        assert [intro.says_yes(r) for r in full[6:]] == [intro.says_yes(r) for r in short[6:]]
    # affirmative alone settles at "yes ,": the detections stop there, the rest run on
    assert short[:4] == ["yes ,"] * 4 and short[4:] == full[4:]


def test_vector_states_are_shared_between_probes(organism, monkeypatch, tmp_path):
    from modelprobe.toolkit import activations

    probe = tmp_path / "inj.probe.yaml"  # a fixed batch size: the batches, so the numbers, are the same
    probe.write_text(PROBE.read_text().replace("../../probes/data/", f"{HERE.parent}/probes/data/")
                     .replace("../fixtures/", f"{HERE}/fixtures/") + "batch_size: 8\n")
    kind = instantiate(load(probe), organism)
    first = kind.concept_vectors()
    calls = []
    real = activations.states_at
    monkeypatch.setattr(activations, "states_at", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    again = instantiate(load(probe), organism).concept_vectors()  # another probe, same prompts: no pass
    assert calls == [] and all(torch.equal(first[la], again[la]) for la in first)
    organism.cache.pop("injection.vector_states")
    fresh = instantiate(load(probe), organism).concept_vectors()  # computed anew: the same numbers
    assert len(calls) == 1 and all(torch.equal(first[la], fresh[la]) for la in first)
