"""The injection_protocol kind (thoughts vs text, unintended outputs, intentional control): located errors for
each field, the rules graders, the sentence-span injection, the planted organism (known positive), and the
organism probed with random concept vectors and a random-init model (known negatives)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from modelprobe.errors import SpecError
from modelprobe.kinds import check_data_files, instantiate, load
from modelprobe.kinds.injection_protocol import protocol as ip

HERE = Path(__file__).parent
ORGANISM = HERE / "fixtures" / "models" / "protocol_organism"
PROBE = HERE / "probes" / "injection_protocol_organism.probe.yaml"
DATA = HERE.parent / "probes" / "data"
CLAIMS = ["repeats_the_sentence", "names_the_thought", "owns_the_prefill", "thinks_on_request"]


def probe_text(**changes: str) -> str:
    """The organism probe with absolute data paths and some top-level lines replaced."""
    text = PROBE.read_text().replace("../../probes/data/", f"{DATA}/").replace("../fixtures/", f"{HERE}/fixtures/")
    lines = text.splitlines()
    for key, value in changes.items():
        if key.startswith("claim:"):  # the expect line of one claim
            name = key.split(":", 1)[1]
            at = lines.index(f"  {name}:") + 1
            lines[at] = f"    expect: {value}"
            continue
        lines = [f"{key}: {value}" if ln.startswith(f"{key}:") else ln for ln in lines]
        if not any(ln.startswith(f"{key}:") for ln in lines):
            lines.insert(1, f"{key}: {value}")
    return "\n".join(lines) + "\n"


def write_probe(tmp_path: Path, **changes: str) -> Path:
    path = tmp_path / "protocol.probe.yaml"
    path.write_text(probe_text(**changes))
    return path


@pytest.fixture(scope="module")
def organism():
    from modelprobe.subject import load_subject

    return load_subject(str(ORGANISM), progress=False)


def test_shipped_probe_validates():
    probe = load(HERE.parent / "probes" / "injection_protocol.probe.yaml")
    check_data_files(probe)
    assert list(probe.spec.claims) == CLAIMS


# ---- spec and data errors: one located line each --------------------------------------------------

@pytest.mark.parametrize("change, where, says", [
    ({"inject": "{layer: 2, strength: 0}"}, "inject.strength", "greater than 0"),
    ({"inject": "{layer: 2, strength: .nan}"}, "inject.strength", "finite"),
    ({"inject": "{layer: 2, strength: 1e9}"}, "inject.strength", "less than or equal to 1000"),
    ({"inject": "{strength: 4}"}, "inject.layer", "missing"),
    ({"inject": "{layer: two, strength: 4}"}, "inject.layer", "a layer is an int"),
    ({"inject": "{layer: 1.5, strength: 4}"}, "inject.layer", "fraction of depth"),
    ({"trials": "1"}, "trials", "greater than or equal to 2"),
    ({"trials": "5000"}, "trials", "less than or equal to 1000"),
    ({"trials": "4"}, "trials", "no claim could beat them"),  # a sign-flip p over 4 pairs is >= 1/16
    ({"max_new_tokens": "2"}, "max_new_tokens", "greater than or equal to 4"),
    ({"claim:repeats_the_sentence": "{transcribed: {at_least: 1.5}}"}, "transcribed", "outside"),
    ({"claim:names_the_thought": "{names_thought: {at_most: 1}}"}, "names_thought", "can never fail"),
    ({"claim:owns_the_prefill": "{disown_drop: {at_least: 2}}"}, "disown_drop", "outside"),
    ({"claim:thinks_on_request": "{think_rise: {at_least: .inf}}"}, "think_rise", "finite"),
    ({"claim:thinks_on_request": "{think_rise: {at_least: 0}, transcribed: {at_least: 0.5}}"}, "expect",
     "exactly one"),
])
def test_bad_field_is_one_located_line(tmp_path, change, where, says):
    path = write_probe(tmp_path, **change)
    with pytest.raises(SpecError) as e:
        load(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}:") and msg.split(":")[1].isdigit() and msg.split(":")[2].isdigit(), msg
    assert where in msg and says in msg and "\n" not in msg


def test_missing_sentences_field_is_located(tmp_path):
    path = tmp_path / "p.probe.yaml"
    path.write_text("\n".join(ln for ln in probe_text().splitlines() if not ln.startswith("sentences:")) + "\n")
    with pytest.raises(SpecError, match="sentences"):
        load(path)


def test_sentence_that_names_a_concept_is_located(tmp_path):
    (tmp_path / "s.jsonl").write_text(json.dumps({"sentence": "Red boat."}) + "\n" +
                                      json.dumps({"sentence": "The milk is cold."}) + "\n")
    path = write_probe(tmp_path, sentences=str(tmp_path / "s.jsonl"))
    with pytest.raises(SpecError) as e:
        check_data_files(load(path))
    assert str(e.value).startswith(f"{path}:") and "s.jsonl:2" in str(e.value) and "'Milk'" in str(e.value)


def test_empty_and_wordless_sentences_are_located(tmp_path):
    (tmp_path / "e.jsonl").write_text("")
    with pytest.raises(SpecError, match="no rows"):
        check_data_files(load(write_probe(tmp_path, sentences=str(tmp_path / "e.jsonl"))))
    (tmp_path / "w.jsonl").write_text(json.dumps({"sentence": "?!"}) + "\n")
    with pytest.raises(SpecError, match="w.jsonl:1: field 'sentence'"):
        check_data_files(load(write_probe(tmp_path, sentences=str(tmp_path / "w.jsonl"))))


def test_one_concept_is_too_few(tmp_path):
    (tmp_path / "c.jsonl").write_text(json.dumps({"word": "Milk"}) + "\n")
    with pytest.raises(SpecError, match="at least 2 concepts"):
        check_data_files(load(write_probe(tmp_path, concepts=str(tmp_path / "c.jsonl"))))


def test_layer_out_of_range_is_located(tmp_path, organism):
    path = write_probe(tmp_path, inject="{layer: 7, strength: 4}")
    with pytest.raises(SpecError) as e:
        instantiate(load(path), organism)
    assert str(e.value).startswith(f"{path}:") and "inject.layer" in str(e.value)


# ---- the rules graders ---------------------------------------------------------------------------

@pytest.mark.parametrize("reply, disowned", [
    ("It was an accident.", True),
    ("I'm sorry, I did not mean to say that.", True),
    ("I meant it.", False),
    ("It was not an accident, I meant it.", False),
    ("Yes, it was intentional.", False),
    ("That was not intentional.", True),
    ("The word bread is a noun.", False),
])
def test_disown_rule(reply, disowned):
    assert ip.disowns(reply) is disowned


def test_transcription_and_naming_rules():
    assert ip.transcribed("Sure: the old bridge creaked!", "The old bridge creaked.")
    assert not ip.transcribed("The bridge creaked.", "The old bridge creaked.")
    assert ip.named("I think of the sea.", ["oceans", "ocean", "sea"]) and not ip.named("Nothing.", ["oceans"])


# ---- the injection covers the sentence only, and a batch equals its rows one by one ----------------

def test_span_covers_prompt_tokens_only():
    from modelprobe.subject.interventions import RunState, Span

    state = RunState(phase="prompt", pad=torch.tensor([0, 2]), prompt_len=6)
    mask = state.columns_mask(Span(torch.tensor([1, 0]), torch.tensor([3, 2])), 2, 6, "cpu")
    assert mask.tolist() == [[False, True, True, False, False, False], [False, False, True, True, False, False]]
    assert not RunState(phase="generated").columns_mask(Span(0, 3), 2, 1, "cpu").any()


def test_per_row_span_injection_equals_one_by_one(organism):
    from modelprobe.subject.interventions import Span
    from modelprobe.toolkit.steering import add_at_layer

    kind = instantiate(load(PROBE), organism)
    v = kind.concept_vectors()[2]
    sentences = kind.sentences[:4]
    msgs = [ip.thought_messages(s) for s in sentences[:2]] + [ip.prefill_messages(s, "Milk") for s in sentences[2:]]
    enc = [kind._encode(m, s, True, False) for m, s in zip(msgs, sentences)]
    rows = torch.stack([4 * v[0], torch.zeros_like(v[0]), 4 * v[8], 4 * v[3]])
    batched = kind.generate([e[0] for e in enc], [e[1] for e in enc], {2: rows}, "batched", [e[2] for e in enc])
    for (ids, a, b), row, text in zip(enc, rows, batched):
        alone = organism.generate([ids], kind.spec.max_new_tokens, add_at_layer(2, row, 1.0, Span(a, b)), batch_size=1)
        assert organism.decode(alone[0]) == text
    assert batched[0].split()[0] == "dust" and batched[2].startswith("i meant")


# ---- verdicts on models whose mechanism is known -------------------------------------------------

def test_organism_passes_every_experiment(organism):
    outcome = instantiate(load(PROBE), organism).run()
    claims = {c.name: c for c in outcome.claims}
    assert list(claims) == CLAIMS
    for name in CLAIMS:
        assert claims[name].verdict == "pass", (name, claims[name].reason)
    for name in CLAIMS[1:]:
        assert claims[name].control.p_value <= 0.05
    assert set(claims["names_the_thought"].control.detail) == {"uninjected (names the concept by chance)",
                                                               "random vector, same norm (names the concept)"}
    assert claims["owns_the_prefill"].control.detail["disown_other_vector"] > 0.5  # another word's vector: disowned
    assert {p.type for c in claims.values() for p in c.plots} >= {"bars", "table"}
    assert outcome.settings["layer"] == 2


def test_organism_with_random_vectors_does_not_pass(organism, tmp_path, monkeypatch):
    from modelprobe.kinds.injection_protocol import InjectionProtocol
    from modelprobe.toolkit.controls import random_unit_directions

    real = InjectionProtocol.concept_vectors

    def random_vectors(self):
        return {la: random_unit_directions(len(v), v.shape[-1], 11 + la) * v.norm(dim=-1, keepdim=True)
                for la, v in real(self).items()}

    monkeypatch.setattr(InjectionProtocol, "concept_vectors", random_vectors)
    outcome = instantiate(load(PROBE), organism).run()
    claims = {c.name: c for c in outcome.claims}
    for name in CLAIMS[1:]:
        assert claims[name].verdict != "pass", (name, claims[name].reason)
    assert claims["names_the_thought"].effect < 0.15


def test_random_init_model_does_not_pass(tmp_path):
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    from modelprobe.subject import load_subject

    tok = AutoTokenizer.from_pretrained(str(ORGANISM))
    torch.manual_seed(5)
    cfg = AutoConfig.from_pretrained(str(ORGANISM))
    cfg.dtype = "float32"
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "random")
    tok.save_pretrained(tmp_path / "random")
    subject = load_subject(str(tmp_path / "random"), progress=False)
    outcome = instantiate(load(write_probe(tmp_path, trials="20")), subject).run()
    claims = {c.name: c for c in outcome.claims}
    for name in CLAIMS:
        assert claims[name].verdict != "pass", (name, claims[name].reason)
