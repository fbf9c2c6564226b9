"""`modelprobe discover circuit`: finds the induction fixture's known circuit, writes a probe file
that validates and passes, and answers user mistakes with one line and exit status 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from modelprobe.kinds import instantiate, load
from modelprobe.kinds.circuit.discover import _components, cli_discover, heldout_rows
from modelprobe.subject import load_subject
from modelprobe.subject.ablation import Unit

HERE = Path(__file__).parent
FIXTURE = HERE / "fixtures" / "models" / "induction"
DATA = HERE / "fixtures" / "data"


def _args(out: Path, *extra: str) -> list[str]:
    return ["circuit", f"--model={FIXTURE}", f"--prompts={DATA / 'induction.jsonl'}",
            f"--reference={DATA / 'induction_ref.jsonl'}", f"--out={out}", "--quiet", *extra]


def test_discovery_finds_the_true_circuit_and_writes_a_passing_probe(tmp_path, capsys):
    if not (FIXTURE / "circuit.json").is_file():
        pytest.skip("the induction fixture is not built")
    truth = json.loads((FIXTURE / "circuit.json").read_text())
    true_heads = {tuple(h) for h in truth["previous_token_heads"] + truth["induction_heads"]}
    out = tmp_path / "probes" / "induction_found.probe.yaml"
    assert cli_discover(_args(out, "--rows=0:64")) == 0, capsys.readouterr().err
    text = out.read_text()
    assert "# How the circuit was found" in text and "m(M) =" in text
    assert 'rows: "64:"' in text  # the probe tests the rows discovery did not see
    probe = load(out)
    subject = load_subject(str(FIXTURE), progress=False)
    kind = instantiate(probe, subject)
    assert {(u.layer, u.index) for u in kind.circuit} == true_heads
    claims = {c.name: c for c in kind.run().claims}
    assert claims["sufficient"].verdict == "pass"
    # Random circuits are drawn outside the circuit: of the 15 other layer-matched two-head circuits, 6 hold
    # head 0.3 or 1.0 and break the induction too, so a control that let them in failed this true circuit.
    assert claims["necessary"].verdict == "pass", claims["necessary"].reason
    assert claims["necessary"].ci[1] <= 0.2  # the circuit itself is necessary: its interval clears at_most 0.2


def test_heldout_rows_is_the_complement_of_a_leading_or_trailing_slice():
    assert heldout_rows("0:100", 200) == "100:"
    assert heldout_rows(":100", 200) == "100:"
    assert heldout_rows("150:", 200) == ":150"
    assert heldout_rows("50:100", 200) is None
    assert heldout_rows(None, 200) is None


def test_components_group_heads_of_a_layer():
    units = [Unit(9, "head", 9), Unit(9, "head", 6), Unit(10, "head", 0), Unit(3, "mlp"), Unit(5, "neuron", 7)]
    assert _components(units) == [
        {"layer": 3, "component": "mlp_out"},
        {"layer": 5, "component": "mlp.post", "neuron": 7},
        {"layer": 9, "component": "attn.z", "head": [6, 9]},
        {"layer": 10, "component": "attn.z", "head": 0},
    ]


@pytest.mark.parametrize("argv, message", [
    (["circuit", "--prompts=x.jsonl"], "the following arguments are required: --model"),
    (["graph", "--model=m", "--prompts=p"], "invalid choice: 'graph'"),
    (["circuit", "--model=m", "--prompts=p", "--scope=everything"], "--scope 'everything' is not"),
    (["circuit", "--model=m", "--prompts=p"], "--ablation mean needs --reference"),
    (["circuit", f"--model={FIXTURE}", "--prompts=/nonexistent/p.jsonl", "--ablation=zero"],
     "/nonexistent/p.jsonl: file not found"),
    (["circuit", f"--model={FIXTURE}", f"--prompts={DATA / 'induction.jsonl'}", "--ablation=zero",
      "--rows=500:"], "--rows: rows '500:' selects no line"),
])
def test_user_mistakes_exit_2_with_one_line(argv, message, capsys):
    assert cli_discover(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("modelprobe discover: ")
    assert message in err


def test_bad_model_exits_2(tmp_path, capsys):
    argv = ["circuit", f"--model={tmp_path / 'no_model'}", f"--prompts={DATA / 'induction.jsonl'}",
            "--ablation=zero"]
    assert cli_discover(argv) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
