"""The README's example kind, installed as another package would ship it (an entry point of the group
`modelprobe.kinds` in a dist-info on sys.path) and run by pytest on the induction fixture: the true
claim passes, the false one fails, and the control is measured."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from modelprobe.kinds import KINDS

ROOT = Path(__file__).parent.parent
INDUCTION = ROOT / "tests" / "fixtures" / "models" / "induction"

PROBE = """\
kind: priming
about: the first half of a repeated segment makes the induction fixture predict the second half
prompts: data/primed.jsonl
claims:
  context_raises_the_answer:
    expect: {logprob_rise: {at_least: 1.0}}
  context_changes_nothing:
    expect: {logprob_rise: {at_most: 0.1}}
"""


def example_source() -> str:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- example-kind -->\n```python\n(.*?)```\n<!-- /example-kind -->", text, re.S)
    assert block, "README has no example kind between <!-- example-kind --> markers"
    return block.group(1)


@pytest.fixture
def installed_kind(tmp_path, monkeypatch):
    """A 'pip install'-free installation: the module plus a dist-info declaring the entry point."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "priming_kind.py").write_text(example_source())
    info = site / "priming_kind-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: priming-kind\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[modelprobe.kinds]\npriming = priming_kind:Priming\n")
    monkeypatch.syspath_prepend(str(site))
    KINDS.refresh()
    yield
    sys.modules.pop("priming_kind", None)
    KINDS.refresh()


def test_example_kind_is_short():
    assert len(example_source().splitlines()) < 70


def test_example_kind_gets_a_skeleton_from_modelprobe_new(installed_kind, tmp_path, capsys):
    """An entry-point kind's `skeleton` is what `modelprobe new` writes: its header added, and valid."""
    from modelprobe.cli import main

    assert KINDS["priming"].skeleton.startswith("# yaml-language-server: $schema=")
    assert main(["new", "priming", "mine", "--directory", str(tmp_path)]) == 0
    text = (tmp_path / "mine.probe.yaml").read_text()
    assert text == KINDS["priming"].skeleton and "\nkind: priming\n" in text
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "primed.jsonl").write_text('{"context": "a b ", "prompt": "a", "answer": " b"}\n')
    capsys.readouterr()
    assert main(["validate", str(tmp_path / "mine.probe.yaml")]) == 0
    assert "mine.probe.yaml: ok" in capsys.readouterr().out


def test_example_kind_installs_through_the_entry_point_and_runs(installed_kind, pytester):
    if not INDUCTION.is_dir():
        pytest.skip("the induction fixture is not built")
    rows = []
    for line in (ROOT / "tests" / "fixtures" / "data" / "induction.jsonl").read_text().splitlines()[:24]:
        row = json.loads(line)
        toks = row["prompt"].split()
        half = (len(toks) + 1) // 2  # the prompt is a segment and its repetition minus the answer
        rows.append({"context": " ".join(toks[:half]) + " ", "prompt": " ".join(toks[half:]),
                     "answer": row["answer"]})
    data = pytester.path / "probes" / "data"
    data.mkdir(parents=True)
    (data / "primed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (pytester.path / "probes" / "primed.probe.yaml").write_text(PROBE)
    assert "priming" in KINDS
    result = pytester.runpytest("probes", f"--model={INDUCTION}", "--probe-report-dir=out", "-v",
                                "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*primed.probe.yaml::context_raises_the_answer PASSED*",
                                 "*primed.probe.yaml::context_changes_nothing FAILED*"])
    report = json.loads(next((pytester.path / "out").rglob("report.json")).read_text())
    claim = report["probes"][0]["claims"][0]
    assert claim["effect"] > 1.0 and claim["control"]["p_value"] <= 0.05
    assert claim["plots"][0]["type"] == "bars"
