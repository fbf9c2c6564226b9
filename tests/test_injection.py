"""The injection kind: spec errors, the rules grader, the planted organism (known positive), a random-init
model and the organism probed with random vectors (known negatives), and per-row injection in one batch
equal to the rows run one by one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from modelprobe.errors import DataError, SpecError
from modelprobe.kinds import check_data_files, instantiate, load
from modelprobe.toolkit import introspection as intro

HERE = Path(__file__).parent
ORGANISM = HERE / "fixtures" / "models" / "injection_organism"
PROBE = HERE / "probes" / "injection_organism.probe.yaml"
DATA = HERE.parent / "probes" / "data"


def probe_text(**changes: str) -> str:
    """The organism probe with absolute data paths and some top-level lines replaced."""
    text = PROBE.read_text().replace("../../probes/data/", f"{DATA}/").replace("../fixtures/", f"{HERE}/fixtures/")
    lines = text.splitlines()
    for key, value in changes.items():
        lines = [f"{key}: {value}" if ln.startswith(f"{key}:") else ln for ln in lines]
        if not any(ln.startswith(f"{key}:") for ln in lines):
            lines.insert(1, f"{key}: {value}")
    return "\n".join(lines) + "\n"


def write_probe(tmp_path: Path, **changes: str) -> Path:
    path = tmp_path / "inj.probe.yaml"
    path.write_text(probe_text(**changes))
    return path


@pytest.fixture(scope="module")
def organism():
    from modelprobe.subject import load_subject

    return load_subject(str(ORGANISM), progress=False)


def test_shipped_probe_validates():
    probe = load(HERE.parent / "probes" / "injection_concepts.probe.yaml")
    check_data_files(probe)
    assert list(probe.spec.claims) == ["detects_and_names", "no_false_alarms", "stays_coherent", "not_a_yes_bias"]


# ---- spec and data errors: one located line each --------------------------------------------------

def test_empty_concept_file_is_located(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    path = write_probe(tmp_path, concepts=str(tmp_path / "empty.jsonl"))
    with pytest.raises(SpecError) as e:
        check_data_files(load(path))
    assert str(e.value).startswith(f"{path}:") and "concepts" in str(e.value) and "no rows" in str(e.value)


def test_non_positive_strength_is_located(tmp_path):
    path = write_probe(tmp_path, inject="{layer: auto, strengths: [1, 0, 4]}")
    with pytest.raises(SpecError) as e:
        load(path)
    assert "inject.strengths" in str(e.value) and "positive" in str(e.value)
    assert str(e.value).startswith(f"{path}:")


def test_no_questions_claim_needs_the_file(tmp_path):
    text = "\n".join(ln for ln in probe_text().splitlines() if not ln.startswith("no_questions:"))
    path = tmp_path / "q.probe.yaml"
    path.write_text(text + "\n")
    with pytest.raises(SpecError, match="no_questions"):
        load(path)


def test_transcript_without_marker_is_located(tmp_path):
    (tmp_path / "t.jsonl").write_text(json.dumps({"role": "user", "content": "hello {question}"}) + "\n")
    path = write_probe(tmp_path, trial=str(tmp_path / "t.jsonl"))
    with pytest.raises(SpecError) as e:
        check_data_files(load(path))
    assert "Trial {n}" in str(e.value) and str(e.value).startswith(f"{path}:")


def test_concept_the_tokenizer_cannot_place(tmp_path, organism):
    rows = [json.loads(x) for x in (DATA / "injection_concepts.jsonl").read_text().splitlines()]
    rows[6] = {"word": "Zyzzyvas"}  # not in the organism's vocabulary: it would be the unknown token
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = write_probe(tmp_path, concepts=str(tmp_path / "c.jsonl"))
    with pytest.raises(DataError) as e:
        instantiate(load(path), organism)
    assert str(e.value).startswith(f"{tmp_path / 'c.jsonl'}:7: word") and "Zyzzyvas" in str(e.value)


def test_judge_that_does_not_load_is_located(tmp_path, organism):
    path = write_probe(tmp_path, grader=f"{{judge: {tmp_path / 'no_such_model'}}}")
    with pytest.raises(SpecError) as e:
        instantiate(load(path), organism)
    assert str(e.value).startswith(f"{path}:") and "grader.judge" in str(e.value)


# ---- the rules grader ----------------------------------------------------------------------------

@pytest.mark.parametrize("reply, named", [
    ("Yes, I notice a thought about oceans.", True),
    ("Yes. It seems to be about the sea.", True),
    ("Oceans! Yes, I notice something.", False),  # opens with the word
    ("The ocean is vast. Yes, I detect a thought.", False),  # names the word before detecting
    ("No, I do not detect an injected thought about oceans.", False),
    ("I notice nothing about oceans.", False),
])
def test_rules_grader_detect_then_name(reply, named):
    assert intro.identifies(reply, intro.word_forms("Oceans", ["sea"])) is named


def test_rules_grader_coherence_and_yes():
    assert not intro.coherent("I'm not sure. I'm not sure. I'm not sure. I'm not sure.")
    assert intro.coherent("Yes, I notice a thought about milk.")
    assert intro.says_yes("I'm glad you asked. Yes, cats lay eggs.") and not intro.says_yes("No. Yes.")
    assert intro.word_forms("Memories")[:2] == ["memories", "memory"]


# ---- verdicts on models whose mechanism is known -------------------------------------------------

def test_organism_detects_and_names(organism):
    outcome = instantiate(load(PROBE), organism).run()
    claims = {c.name: c for c in outcome.claims}
    assert outcome.settings["layer"] == 1  # the layer the organism was trained at, found on dev concepts
    assert claims["detects_and_names"].verdict == "pass", claims["detects_and_names"].reason
    assert claims["no_false_alarms"].verdict == "pass", claims["no_false_alarms"].reason
    control = claims["detects_and_names"].control
    assert control.p_value <= 0.05 and set(control.detail) >= {"uninjected trials (claims a detection)",
                                                                "random vector, same norm (names the concept)",
                                                                "permuted concept labels (names another concept)"}
    kinds = {p.type for p in claims["detects_and_names"].plots}
    assert {"heatmap", "bars", "table"} <= kinds


def test_organism_with_random_vectors_does_not_pass(organism, tmp_path, monkeypatch):
    from modelprobe.kinds.injection import Injection
    from modelprobe.toolkit.controls import random_unit_directions

    real = Injection.concept_vectors

    def random_vectors(self):
        vecs = real(self)
        return {la: random_unit_directions(len(v), v.shape[-1], 7 + la) * v.norm(dim=-1, keepdim=True)
                for la, v in vecs.items()}

    monkeypatch.setattr(Injection, "concept_vectors", random_vectors)
    path = write_probe(tmp_path, split="{dev: 6, test: 30, seed: 0}", control_trials="20")
    outcome = instantiate(load(path), organism).run()
    claim = next(c for c in outcome.claims if c.name == "detects_and_names")
    assert claim.verdict != "pass", claim.reason
    assert claim.effect < 0.1


def test_random_init_model_does_not_pass(tmp_path):
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    from modelprobe.subject import load_subject

    tok = AutoTokenizer.from_pretrained(str(ORGANISM))
    torch.manual_seed(3)
    cfg = AutoConfig.from_pretrained(str(ORGANISM))
    cfg.dtype = "float32"
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "random")
    tok.save_pretrained(tmp_path / "random")
    subject = load_subject(str(tmp_path / "random"), progress=False)
    path = write_probe(tmp_path, split="{dev: 4, test: 20, seed: 0}", control_trials="20")
    outcome = instantiate(load(path), subject).run()
    claim = next(c for c in outcome.claims if c.name == "detects_and_names")
    assert claim.verdict != "pass", claim.reason
    assert claim.effect == 0.0


# ---- one batch with one vector per row equals the rows one by one --------------------------------

def test_per_row_injection_equals_one_by_one(organism):
    from modelprobe.subject.interventions import From
    from modelprobe.toolkit.steering import add_at_layer

    kind = instantiate(load(PROBE), organism)
    vecs = kind.concept_vectors()
    ids, starts = kind.trial_ids([kind.spec.question] * 4 + ["Is the sun cold?"] * 2, [1, 2, 3, 4, 5, 6])
    rows = torch.zeros(6, vecs[1].shape[-1])
    rows[0], rows[1], rows[2], rows[4] = 4 * vecs[1][0], 2 * vecs[1][5], 8 * vecs[1][9], 4 * vecs[1][3]
    layer0 = torch.zeros_like(rows)
    layer0[3] = 4 * vecs[0][2]  # another layer in the same batch
    batched = kind.generate(ids, starts, {1: rows, 0: layer0}, "batched")
    for i in range(6):
        edits = add_at_layer(1, rows[i], 1.0, From(starts[i])) + add_at_layer(0, layer0[i], 1.0, From(starts[i]))
        alone = organism.generate([ids[i]], kind.spec.max_new_tokens, edits, batch_size=1)[0]
        assert organism.decode(alone) == batched[i]
    assert batched[0].startswith("yes") and batched[5].split()[:1] != ["yes"]


def test_judge_grader_runs_and_records_the_judge(organism, tmp_path):
    """A second local model grades by its next-token Yes/No logits; its hash goes into the report.
    (The organism serves as its own judge here: this checks the plumbing, not a judge's quality.)"""
    path = write_probe(tmp_path, grader=f"{{judge: {ORGANISM}}}", split="{dev: 2, test: 4, seed: 0}",
                       control_trials="4")
    outcome = instantiate(load(path), organism).run()
    assert outcome.settings["grader"]["hash"] and outcome.settings["grader"]["judge"] == str(ORGANISM)
    assert {c.name for c in outcome.claims} == {"detects_and_names", "no_false_alarms", "stays_coherent",
                                                "not_a_yes_bias"}
