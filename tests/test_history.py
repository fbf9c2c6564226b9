"""`modelprobe history` over three saved baselines of the toy copy model (two clean releases, then a damaged
one saved under the same model name), and the trend plot a --probe-compare report embeds per claim."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from modelprobe.cli import main
from tests.helpers.toy_models import copy_task_rows, save_copy_model, write_jsonl

PROBE = """\
kind: logit_lens
about: the last token is decoded from the first layer on
prompts: data/copy.jsonl
claims:
  emerges_early:
    expect: {median_first_layer: {at_most: 0.5}}
  final_accuracy:
    expect: {final_accuracy: {at_least: 0.9}}
    tolerance: {abs: 0.05}
"""


def _run(pytester, model: Path, *args: str):
    return pytester.runpytest("probes", f"--model={model}", "--probe-report-dir=out", "-p", "no:cacheprovider",
                              "-p", "no:randomly", *args)


@pytest.fixture
def releases(pytester, tmp_path) -> dict[str, Path]:
    write_jsonl(pytester.path / "probes" / "data" / "copy.jsonl", copy_task_rows())
    (pytester.path / "probes" / "lens.probe.yaml").write_text(PROBE)
    clean = save_copy_model(tmp_path / "clean" / "toy")
    damaged = save_copy_model(tmp_path / "release3" / "toy", damaged=True)  # same name, new weights
    for name, model in (("v1", clean), ("v2", clean), ("v3", damaged)):
        _run(pytester, model, f"--probe-save={name}")
    folder = pytester.path / "out" / "baselines" / "toy"
    return {"folder": folder, "damaged": damaged, **{n: folder / f"{n}.json" for n in ("v1", "v2", "v3")}}


def test_history_draws_every_claim_and_marks_the_flip(releases, tmp_path, capsys):
    v3 = json.loads(releases["v3"].read_text())
    flipped = [c["name"] for p in v3["probes"] for c in p["claims"] if c["verdict"] != "pass"
               and c["name"] in ("emerges_early", "final_accuracy")]
    assert flipped, "the damaged release should lose a claim that the clean ones pass"
    out = tmp_path / "h" / "history.html"
    # given newest first, --by-date restores the release order
    assert main(["history", str(releases["v3"]), str(releases["v1"]), str(releases["v2"]), "-o", str(out),
                 "--by-date"]) == 0
    printed = capsys.readouterr().out
    assert "2 claims over 3 releases" in printed and "wrote" in printed
    html = out.read_text()
    md = out.with_suffix(".md").read_text()
    assert html.count('src="data:image/png;base64,') == 2  # one trend plot per claim
    for name in ("emerges_early", "final_accuracy", "probes/lens.probe.yaml"):
        assert name in html and name in md
    assert html.index(">v1<") < html.index(">v2<") < html.index(">v3<")
    assert "⚑ flipped" in html and "v3: flipped" in md
    assert "v1: flipped" not in md and "v2: flipped" not in md
    header = next(line for line in md.splitlines() if line.startswith("| probe"))
    assert header.index("v1") < header.index("v2") < header.index("v3")

    # without --by-date the order given is the release order
    assert main(["history", str(releases["v3"]), str(releases["v1"]), "-o", str(out)]) == 0
    md = out.with_suffix(".md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| probe"))
    assert header.index("v3") < header.index("v1")
    assert "flipped" not in md  # the damaged release first, then a clean one: an improvement, not a flip


def test_compare_report_embeds_the_trend(pytester, releases):
    result = _run(pytester, releases["damaged"], "--probe-compare=v2")
    assert result.ret != 0
    html = (pytester.path / "out" / "toy" / "report.html").read_text()
    for name in ("emerges_early", "final_accuracy"):
        assert html.count(f'alt="{name} across the saved baselines and this run"') == 1


@pytest.mark.parametrize("args, message", [
    (["missing.json", "other.json"], "report file missing.json not found"),
    (["one.json"], "at least two reports"),
])
def test_history_bad_input_is_one_line(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "one.json").write_text("{}")
    assert main(["history", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def _write(path: Path, started: str, claims: list[dict], slug: str = "toy") -> str:
    rec = {"tool": "modelprobe", "schema_version": 1, "model": {"id": slug, "slug": slug}, "started": started,
           "probes": [{"name": "a", "kind": "logit_lens", "file": "probes/a.probe.yaml", "claims": claims}]}
    path.write_text(json.dumps(rec))
    return str(path)


def test_history_of_odd_reports(tmp_path, capsys):
    """A NaN effect, a claim missing from the middle release, an error verdict, a claim without threshold:
    drawn or listed, never a crash; a move past the claim's tolerance is marked as a regression."""
    c = {"name": "c", "verdict": "pass", "effect": 0.9, "ci": [0.85, 0.95], "threshold": 0.5,
         "comparison": "at_least", "tolerance": {"abs": 0.05}}
    files = [
        _write(tmp_path / "r1.json", "2026-01-01T00:00:00", [c, {"name": "d", "verdict": "error"}]),
        _write(tmp_path / "r2.json", "2026-02-01T00:00:00", [{**c, "effect": float("nan"), "ci": None}]),
        _write(tmp_path / "r3.json", "2026-03-01T00:00:00", [{**c, "effect": 0.7, "ci": [0.6, 0.8]},
                                                              {"name": "d", "verdict": "pass", "effect": 1.0}]),
    ]
    out = tmp_path / "h.html"
    assert main(["history", *files, "-o", str(out), "--by-date"]) == 0
    md = out.with_suffix(".md").read_text()
    assert "r3: regressed" in md and "tolerance ±0.05" in md  # 0.9 → 0.7 past the claim's own ±0.05
    assert "r2: regressed" in md  # a NaN effect is no measurement: the gate fails it
    html = out.read_text()
    assert html.count('src="data:image/png;base64,') == 2 and "⚑ regressed" in html


def test_by_date_needs_dates(tmp_path, capsys):
    files = [_write(tmp_path / f"r{i}.json", "", []) for i in range(2)]
    assert main(["history", *files, "--by-date", "-o", str(tmp_path / "h.html")]) == 2
    assert "no run date" in capsys.readouterr().err
