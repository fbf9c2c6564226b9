"""function_vector: the batched head patch against full forwards, the planted known positive (a tiny
model trained in the session to infer its task from context), known negatives, and located errors."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from modelprobe.errors import DataError, SpecError
from modelprobe.kinds import check_data_files, instantiate, load
from modelprobe.subject import clean_pass
from modelprobe.toolkit.prompt_writes import _patch_heads_full, patch_heads_last

sys.path.insert(0, str(Path(__file__).parent / "fixtures"))
import build_function_vector_fixture as fixture  # noqa: E402

FORMAT = '{example: "{input}{output} . ", query: "{input}"}'


# ---- the engine -------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_batched_head_patch_equals_full_forwards(tiny_subject, family):
    subject = tiny_subject(family)
    sm = subject.sitemap
    ids = subject.encode("cake good . kite bad . song")
    clean = clean_pass(subject, ids)
    layers = [layer for layer in range(subject.n_layers) for _ in range(sm.n_heads)]
    heads = [h for _ in range(subject.n_layers) for h in range(sm.n_heads)]
    values = torch.randn(len(layers), sm.d_head, generator=torch.Generator().manual_seed(0))
    fast = patch_heads_last(subject, clean, layers, heads, values, batch_size=3)
    slow = _patch_heads_full(subject, clean, torch.tensor(layers), torch.tensor(heads), values)
    assert torch.allclose(fast, slow, atol=1e-4, rtol=1e-4)
    assert (fast - clean.logits).abs().max() > 1e-3  # the patches change something


def test_non_resumable_family_takes_the_full_path(tiny_subject):
    """GPT-2 cannot be resumed: head effects come from full forwards, with the same numbers."""
    from modelprobe.kinds.function_vector.heads import few_shot_pass, head_effects
    subject = tiny_subject("gpt2")
    ids = [subject.encode("cake good . song"), subject.encode("kite bad . day")]
    answers = subject.token_id(" good") + subject.token_id(" bad")
    few = few_shot_pass(subject, ids, answers)
    assert head_effects(subject, ids, answers, few.head_means).shape == (2, subject.n_layers, subject.sitemap.n_heads)


# ---- probes on models ---------------------------------------------------------------------------------

def _write(tmp_path: Path, name: str, rows: list[dict]) -> None:
    (tmp_path / "data").mkdir(exist_ok=True)
    (tmp_path / "data" / name).write_text("".join(json.dumps(r) + "\n" for r in rows))


def _probe(tmp_path: Path, claims: str, extra: str = "", task: str = "data/icl_t0.jsonl",
           select_on: str = "zero_shot") -> Path:
    for k in range(fixture.TASKS):
        if not (tmp_path / "data" / f"icl_t{k}.jsonl").exists():
            _write(tmp_path, f"icl_t{k}.jsonl", fixture.rows(k))
    path = tmp_path / "fv.probe.yaml"
    path.write_text(f"kind: function_vector\ntask: {task}\nformat: {FORMAT}\nshots: 4\nprompts: 16\ndev: 4\n"
                    f"test: 20\nheads: {{top: 4, select_on: {select_on}}}\n{extra}claims:\n" + textwrap.indent(textwrap.dedent(claims), "  "))
    return path


def _run(path: Path, subject):
    probe = load(path)
    check_data_files(probe)
    outcome = instantiate(probe, subject).run()
    return {c.name: c for c in outcome.claims}, outcome.settings


GAIN = """\
zero_shot_gain:
  expect: {accuracy_gain: {at_least: 0.2}}
"""
ALL = GAIN + """\
beats_controls:
  expect: {accuracy_gain_over_control: {at_least: 0.1}}
other_task_vector:
  algebra: {plus: [t1]}
  task: data/icl_t0.jsonl
  expect: {accuracy_gain: {at_least: 0.2}}
"""


def _subject(model, tok, name: str):
    from modelprobe.report.record import ModelInfo
    from modelprobe.subject import SiteMap, Subject
    info = ModelInfo(id=name, slug=name, model_type="llama", n_layers=model.config.num_hidden_layers,
                     dtype="float32", device="cpu")
    return Subject(model, tok, info, SiteMap(model), batch_size=16, progress=False)


@pytest.fixture(scope="session")
def task_subject():
    model, tok = fixture.train()
    return _subject(model, tok, "fv-trained")


@pytest.fixture(scope="session")
def random_subject():
    model, tok = fixture.random_model()
    return _subject(model, tok, "fv-random")


def test_known_positive_and_another_tasks_vector(tmp_path, task_subject):
    claims, settings = _run(_probe(tmp_path, ALL), task_subject)
    gain = claims["zero_shot_gain"]
    assert gain.verdict == "pass", (gain.reason, gain.details)
    assert claims["beats_controls"].verdict == "pass", (claims["beats_controls"].reason, claims["beats_controls"].details)
    assert settings["fewshot_accuracy"] >= 0.9
    assert claims["other_task_vector"].verdict != "pass", claims["other_task_vector"].details
    assert claims["other_task_vector"].effect < gain.effect
    table = next(p for p in claims["beats_controls"].plots if p.type == "table")
    assert len(table.rows) == 5  # the vector, none, and three controls
    kinds = {p.type for p in gain.plots}
    assert kinds == {"heatmap", "lines"}


def test_shuffled_labels_selection_reports_when_it_cannot_rank_heads(tmp_path, task_subject):
    """The fixture's task is named by its output tokens alone, so shuffled-label prompts are still answered:
    every head's effect there is ~0 and the kind says so (the heads it then picks are arbitrary)."""
    _, settings = _run(_probe(tmp_path, GAIN, select_on="shuffled_labels"), task_subject)
    assert settings["heads_selected_on"] == "shuffled_labels"
    assert settings["selection_prompt_accuracy"] >= 0.9
    assert settings["largest_mean_head_effect"] < 0.01


def test_random_model_does_not_pass(tmp_path, random_subject):
    claims, _ = _run(_probe(tmp_path, ALL), random_subject)
    for c in claims.values():
        assert c.verdict != "pass", (c.name, c.reason)


def test_task_not_done_in_context_is_untestable(tmp_path, task_subject):
    """Outputs shuffled across rows: no mapping the model knows, so few-shot accuracy is near zero."""
    rows = fixture.rows(0)
    shuffled = [{"input": r["input"], "output": rows[(i + 7) % len(rows)]["output"]} for i, r in enumerate(rows)]
    _write(tmp_path, "scrambled.jsonl", shuffled)
    claims, _ = _run(_probe(tmp_path, GAIN, task="data/scrambled.jsonl"), task_subject)
    c = claims["zero_shot_gain"]
    assert c.verdict == "inconclusive" and c.reason.startswith("untestable"), c.reason


def test_fixed_layer_is_used(tmp_path, task_subject):
    claims, settings = _run(_probe(tmp_path, GAIN, "layer: 1\n"), task_subject)
    assert settings["layer"] == 1 and settings["layer_chosen"] == "given"
    assert claims["zero_shot_gain"].details["layer"] == 1


# ---- located errors -----------------------------------------------------------------------------------

def test_empty_answer_is_a_data_line(tmp_path):
    rows = fixture.rows(0)
    rows[4]["output"] = " "
    _write(tmp_path, "icl_t0.jsonl", rows)
    with pytest.raises(DataError) as e:
        check_data_files(load(_probe(tmp_path, GAIN)))
    assert "icl_t0.jsonl:5: field 'output' is empty" in str(e.value)


def test_algebra_task_without_data_is_located(tmp_path):
    claims = GAIN + "composes:\n  algebra: {plus: [t1, nowhere]}\n  task: data/icl_t2.jsonl\n" \
                    "  expect: {accuracy_gain: {at_least: 0.1}}\n"
    with pytest.raises(SpecError) as e:
        check_data_files(load(_probe(tmp_path, claims)))
    msg = str(e.value)
    assert "fv.probe.yaml:13:" in msg and "claims.composes.algebra.plus.1" in msg and "task 'nowhere' has no data" in msg


def test_tasks_mapping_names_a_file(tmp_path):
    _write(tmp_path, "other_name.jsonl", fixture.rows(1))
    claims = "composes:\n  algebra: {plus: [one]}\n  task: data/icl_t1.jsonl\n  expect: {accuracy_gain: {at_least: 0.1}}\n"
    probe = load(_probe(tmp_path, claims, "tasks: {one: data/other_name.jsonl}\n"))
    check_data_files(probe)


def test_layer_out_of_range_is_located(tmp_path, tiny_subject):
    subject = tiny_subject("llama")
    rows = [{"input": w, "output": " " + w} for w in fixture._tokens()[0]]
    _write(tmp_path, "icl_t0.jsonl", rows)
    with pytest.raises(SpecError) as e:
        _run(_probe(tmp_path, GAIN, "layer: 7\n"), subject)
    assert "fv.probe.yaml:9:" in str(e.value) and "layer" in str(e.value) and "depth" in str(e.value)


def test_beats_controls_needs_another_task(tmp_path):
    claims = "beats_controls:\n  expect: {accuracy_gain_over_control: {at_least: 0.1}}\n"
    with pytest.raises(SpecError) as e:
        check_data_files(load(_probe(tmp_path, claims)))
    assert "control_task" in str(e.value) and "claims.beats_controls" in str(e.value)


def test_composes_needs_its_task(tmp_path):
    claims = "composes:\n  algebra: {plus: [t1]}\n  expect: {accuracy_gain: {at_least: 0.1}}\n"
    with pytest.raises(SpecError) as e:
        load(_probe(tmp_path, claims))
    assert "claims.composes" in str(e.value) and "'task'" in str(e.value)


def test_too_few_items_is_located(tmp_path):
    _write(tmp_path, "icl_t0.jsonl", fixture.rows(0)[:20])
    with pytest.raises(SpecError) as e:
        check_data_files(load(_probe(tmp_path, GAIN)))
    assert "fv.probe.yaml:2:" in str(e.value) and "29 are needed" in str(e.value)


@pytest.mark.slow
def test_shipped_probe_validates_and_sets_up_on_the_default_model():
    from modelprobe.subject import load_subject
    probe = load(Path(__file__).parent.parent / "probes" / "function_vector_antonyms.probe.yaml")
    check_data_files(probe)
    kind = instantiate(probe, load_subject("smollm2-135m-instruct", progress=False))
    assert kind.layer is None and len(kind.rows) == 6



BAD_FIELDS = [  # (line of the probe replaced, by what, the field, a fragment of the message)
    ("shots: 4", "shots: 0", 4, "shots", "greater than or equal to 1"),
    ("prompts: 16", "prompts: 1", 5, "prompts", "greater than or equal to 2"),
    ("dev: 4", "dev: 1", 6, "dev", "greater than or equal to 2"),
    ("test: 20", "test: 2", 7, "test", "greater than or equal to 5"),
    ("heads: {top: 4, select_on: zero_shot}", "heads: {top: 0}", 8, "heads.top", "greater than or equal to 1"),
    ("heads: {top: 4, select_on: zero_shot}", "heads: {top: 4, select_on: clean}", 8, "heads.select_on", ""),
    ("claims:", "layer: middle\nclaims:", 9, "layer", ""),
    ("claims:", "min_fewshot_accuracy: 1.5\nclaims:", 9, "min_fewshot_accuracy", "less than or equal to 1"),
    ("claims:", "tasks: {'bad name': data/icl_t1.jsonl}\nclaims:", 9, "tasks", "may hold only"),
]


@pytest.mark.parametrize("old, new, line, field, fragment", BAD_FIELDS, ids=[f"{b[3]}-{b[1][:12]}" for b in BAD_FIELDS])
def test_bad_field_is_located(tmp_path, old, new, line, field, fragment):
    path = _probe(tmp_path, GAIN)
    path.write_text(path.read_text().replace(old, new, 1))
    with pytest.raises(SpecError) as e:
        load(path)
    msg = str(e.value)
    assert f"fv.probe.yaml:{line}:" in msg and field in msg and fragment in msg, msg


@pytest.mark.parametrize("claim, where, fragment", [
    ("g:\n  expect: {accuracy_gain: {at_least: 1.5}}\n", "claims.g.expect.accuracy_gain", "outside"),
    ("g:\n  expect: {accuracy_gain: {at_least: 0.1}, accuracy_gain_over_control: {at_least: 0.1}}\n",
     "claims.g.expect", "exactly one"),
    ("g:\n  algebra: {plus: []}\n  task: data/icl_t1.jsonl\n  expect: {accuracy_gain: {at_least: 0.1}}\n",
     "claims.g.algebra.plus", "at least 1"),
    ("g:\n  algebra: {plus: [t1]}\n  task: data/icl_t1.jsonl\n"
     "  expect: {accuracy_gain_over_control: {at_least: 0.1}}\n", "claims.g", "accuracy_gain"),
])
def test_bad_claim_is_located(tmp_path, claim, where, fragment):
    with pytest.raises(SpecError) as e:
        load(_probe(tmp_path, claim))
    msg = str(e.value)
    assert "fv.probe.yaml:1" in msg and where in msg and fragment in msg, msg


def test_heads_top_beyond_the_model_is_located(tmp_path, tiny_subject):
    rows = [{"input": w, "output": " " + w} for w in fixture._tokens()[0]]
    _write(tmp_path, "icl_t0.jsonl", rows)
    path = _probe(tmp_path, GAIN)
    path.write_text(path.read_text().replace("top: 4", "top: 999"))
    with pytest.raises(SpecError) as e:
        _run(path, tiny_subject("llama"))
    assert "fv.probe.yaml:8:" in str(e.value) and "heads.top" in str(e.value)
