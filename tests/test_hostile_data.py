"""Hostile data (issue 8): every bad data row or token is one located line, never a traceback, never
a measurement of something other than what the file says.

Row checks run at collection (`check_data_files`, no model); token and context-length checks run when
the probe is set up against a model.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from modelprobe.errors import DataError, SpecError
from modelprobe.kinds import check_data_files, instantiate, load
from modelprobe.subject import Site, load_subject

TESTS = Path(__file__).parent
PLANTED = TESTS / "fixtures" / "models" / "refusal_planted"

LENS = "kind: logit_lens\nprompts: data/rows.jsonl\nclaims:\n  c:\n    expect: {final_accuracy: {at_least: 0.5}}\n"
CIRCUIT = ("kind: circuit\nprompts: data/rows.jsonl\nablation: zero\ncircuit:\n  - {layer: 0, head: 0}\n"
           "claims:\n  s:\n    test: sufficiency\n    expect: {faithfulness: {at_least: 0.5}}\n")


def _probe(tmp_path: Path, text: str, rows: list, name: str = "rows.jsonl") -> Path:
    (tmp_path / "data").mkdir(exist_ok=True)
    (tmp_path / "data" / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = tmp_path / "p.probe.yaml"
    path.write_text(text)
    return path


GOOD = {"prompt": "the cake", "answer": " the"}

# (probe text, rows, the line the error must hold) — all found without a model
ROW_CASES = {
    "prompt is a number": (LENS, [GOOD, {"prompt": 42, "answer": " a"}], ":2: field 'prompt' must be a string, got int 42"),
    "answer is null": (LENS, [{"prompt": "a", "answer": None}], ":1: field 'answer' must be a string, got null"),
    "empty prompt": (LENS, [GOOD, GOOD, {"prompt": "  ", "answer": " a"}], ":3: field 'prompt' is empty"),
    "answer is a list": (LENS, [{"prompt": "a", "answer": [" a"]}], ":1: field 'answer' must be a string, got list"),
    "missing answer": (LENS, [{"prompt": "a"}], ":1: missing field 'answer'"),
    "wrong is a number": (CIRCUIT, [{"prompt": "a", "answer": " a", "wrong": 3}],
                          ":1: field 'wrong' must be a string, got int 3"),
}


@pytest.mark.parametrize("case", list(ROW_CASES))
def test_bad_rows_are_located_at_collection(tmp_path, case):
    text, rows, where = ROW_CASES[case]
    probe = load(_probe(tmp_path, text, rows))
    with pytest.raises(DataError) as e:
        check_data_files(probe)
    msg = str(e.value)
    assert msg.startswith(str(tmp_path / "data" / "rows.jsonl") + where), msg
    assert "\n" not in msg


def test_direction_prompt_rows_are_checked_without_a_model(tmp_path):
    text = (TESTS / "probes" / "toy_refusal.probe.yaml").read_text()
    harmless = [json.loads(x) for x in (TESTS / "fixtures/data/toy_harmless.jsonl").read_text().splitlines()]
    harmless[5] = {"prompt": None}
    _probe(tmp_path, "", harmless, "harmless.jsonl")
    (tmp_path / "data" / "harmful.jsonl").write_text((TESTS / "fixtures/data/toy_harmful.jsonl").read_text())
    text = text.replace("../fixtures/data/toy_harmful.jsonl", "data/harmful.jsonl")
    path = tmp_path / "p.probe.yaml"
    path.write_text(text.replace("../fixtures/data/toy_harmless.jsonl", "data/harmless.jsonl"))
    with pytest.raises(DataError, match=r"harmless\.jsonl:6: field 'prompt' must be a string, got null"):
        check_data_files(load(path))


# ---- checks that need the model ------------------------------------------------------------------

def test_answer_outside_the_vocabulary_is_an_error_not_unk(tmp_path, tiny_subject):
    subject = tiny_subject("llama")
    path = _probe(tmp_path, LENS, [GOOD, {"prompt": "the cake", "answer": " zebra"}])
    with pytest.raises(DataError) as e:
        instantiate(load(path), subject)
    assert str(e.value).startswith(f"{tmp_path / 'data' / 'rows.jsonl'}:2: answer ' zebra' is not in the "
                                   "vocabulary of model 'tiny-llama'"), str(e.value)


def test_circuit_wrong_token_outside_the_vocabulary(tmp_path, tiny_subject):
    path = _probe(tmp_path, CIRCUIT, [{"prompt": "the cake", "answer": " the", "wrong": " zebra"}])
    with pytest.raises(DataError, match=r"rows\.jsonl:1: wrong ' zebra' is not in the vocabulary"):
        instantiate(load(path), tiny_subject("llama"))


def test_prompt_longer_than_the_context_names_line_model_and_limit(tmp_path, tiny_subject):
    subject = tiny_subject("llama")  # 64 positions
    long = {"prompt": " ".join(["the"] * 80), "answer": " the"}
    path = _probe(tmp_path, LENS, [GOOD, GOOD, long])
    with pytest.raises(DataError) as e:
        instantiate(load(path), subject)
    assert str(e.value) == (f"{tmp_path / 'data' / 'rows.jsonl'}:3: prompt is 81 tokens, more than the 64 "
                            "positions model 'tiny-llama' accepts")


def test_generation_length_counts_against_the_context(tmp_path):
    """A direction probe generates after the prompt: prompt + max_new_tokens must fit too."""
    text = (TESTS / "probes" / "toy_refusal.probe.yaml").read_text().replace("max_new_tokens: 8",
                                                                            "max_new_tokens: 60")
    path = tmp_path / "p.probe.yaml"
    path.write_text(text.replace("../fixtures/", str(TESTS / "fixtures") + "/"))
    with pytest.raises(DataError, match=r"toy_harm\w+\.jsonl:\d+: prompt is \d+ tokens \+ 60 generated, more than "
                                        r"the 64 positions model '.*refusal_planted' accepts"):
        instantiate(load(path), load_subject(str(PLANTED), progress=False))


def test_grader_token_outside_the_vocabulary_is_located_at_the_probe_field(tmp_path):
    text = (TESTS / "probes" / "toy_refusal_tokens.probe.yaml").read_text()
    path = tmp_path / "p.probe.yaml"
    path.write_text(text.replace("../fixtures/", str(TESTS / "fixtures") + "/")
                    .replace('tokens: ["sorry"]', 'tokens: ["sorry", "zebra"]'))
    with pytest.raises(SpecError) as e:
        instantiate(load(path), load_subject(str(PLANTED), progress=False))
    msg = str(e.value)
    assert msg.startswith(f"{path}:") and "behaviour.grader.tokens.1: grader token 'zebra' is not in the " \
        "vocabulary" in msg, msg


def test_generation_and_resume_raise_no_deprecation_warning(tiny_subject):
    """transformers 5.x renamed the KV-cache argument (past_key_values -> cache, removal in 5.40)."""
    from modelprobe.subject import resume

    subject = tiny_subject("llama")
    ids = [subject.encode("the cake"), subject.encode("how do i make a cake")]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        subject.generate(ids, 4)
        batch = subject.make_batch(ids, [0, 1])
        site = Site("resid_pre", 1)
        resume(subject, batch, 1, subject.forward(batch, capture=[site]).acts[site])
    bad = [str(w.message) for w in caught if "past_key_values" in str(w.message)]
    assert not bad, bad


def test_invalid_json_line_is_found_without_a_model(tmp_path):
    path = _probe(tmp_path, LENS, [GOOD])
    (tmp_path / "data" / "rows.jsonl").write_text(json.dumps(GOOD) + "\n{\"prompt\": \"a\", \n")
    with pytest.raises(DataError, match=r"rows\.jsonl:2:\d+: not valid JSON"):
        check_data_files(load(path))


def test_a_blank_line_inside_a_data_file_is_located(tmp_path):
    from modelprobe.errors import DataError
    from modelprobe.spec.load import parse_jsonl

    path = tmp_path / "rows.jsonl"
    path.write_text('{"prompt": "a"}\n\n{"prompt": 42}\n\n\n')
    with pytest.raises(DataError, match=r"rows.jsonl:2: blank line"):
        parse_jsonl(path)
    path.write_text('{"prompt": "a"}\n{"prompt": "b"}\n\n')
    assert len(parse_jsonl(path)) == 2
