"""report.json / report.md / report.html and the summary table, from hand-built RunRecords (no model)."""

from __future__ import annotations

import base64
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from modelprobe.report import (
    SUMMARY_HEADERS,
    ClaimResult,
    ControlResult,
    ModelInfo,
    PreflightResult,
    ProbeRecord,
    ReportWriteError,
    RunRecord,
    compare,
    render_html,
    render_markdown,
    summary_rows,
    verdict_counts,
    write_all,
    write_html,
    write_json,
    write_markdown,
)
from modelprobe.report._fmt import fmt_num
from modelprobe.report.record import LinePlot, NullHistogram, Series

PNG = "data:image/png;base64,"


def make_record() -> RunRecord:
    return RunRecord(
        model=ModelInfo(id="tiny-test-model", slug="tiny", hash="abc123", model_type="llama",
                        n_layers=6, dtype="float32", device="cpu"),
        versions={"modelprobe": "0.1.0", "torch": "2.4.1"},
        seed=7,
        preflight=[
            PreflightResult(name="logits match", passed=True, value=2e-5, tolerance=1e-3),
            PreflightResult(name="hooks reconstruct", passed=False, detail="layer 3 off by 0.02"),
        ],
        tokenization={"chat_template": "<|user|>{x}", "example_ids": [1, 2, 3]},
        probes=[
            ProbeRecord(
                name="lens_capitals",
                kind="logit_lens",
                file="probes/lens_capitals.yaml",
                file_hash="f00dfeed" * 4,
                about="Capitals are decodable by layer 4.",
                settings={"layer": 4, "position": -1},
                claims=[
                    ClaimResult(
                        name="top1_at_layer_4",
                        verdict="pass",
                        reason="accuracy above threshold",
                        metric="top-1 accuracy",
                        effect=0.8125,
                        ci=(0.7051, 0.9012),
                        threshold=0.5,
                        comparison="at_least",
                        n=64,
                        control=ControlResult(name="random_direction", effect=0.031, p_value=0.001),
                        details={"top_k": 1},
                        plots=[LinePlot(title="lens", x_label="layer", mark_x=4, mark_label="layer 4",
                                        series=[Series(label="accuracy", y=[0.0, 0.05, 0.2, 0.6, 0.81, 0.9]),
                                                Series(label="rank", y=[0.9, 0.7, 0.5, 0.2, 0.1, 0.05])]),
                               NullHistogram(title="random direction", x_label="accuracy",
                                             values=[0.01, 0.03, -0.02, 0.05, 0.0, 0.02], effect=0.8125)],
                    ),
                    ClaimResult(
                        name="quiet_early",
                        verdict="inconclusive",
                        reason="CI straddles the threshold",
                        metric="accuracy at layer 1",
                        effect=0.09,
                        ci=(0.03, 0.21),
                        threshold=0.1,
                        comparison="at_most",
                        n=64,
                        plots=[LinePlot(title="quiet early", x_label="layer",
                                        series=[Series(label="accuracy", y=[0.0, 0.09, 0.2, 0.6, 0.81, 0.9])])],
                    ),
                ],
            ),
            ProbeRecord(
                name="ioi",
                kind="circuit",
                file="probes/ioi.yaml",
                claims=[
                    ClaimResult(
                        name="faithfulness",
                        verdict="fail",
                        reason="0.421 < 0.8",
                        metric="logit difference recovered",
                        effect=0.4213,
                        threshold=0.8,
                        comparison="at_least",
                        n=128,
                        control=ControlResult(name="random_circuits", effect=0.12, p_value=0.004),
                        details={"logit_diff": 3.21},
                        plots=[NullHistogram(title="random circuits", x_label="faithfulness",
                                             values=[0.1, 0.12, 0.15, 0.09], effect=0.4213)],
                    ),
                ],
            ),
            ProbeRecord(name="broken", kind="direction", file="probes/broken.yaml",
                        error="ValueError: layer 40 out of range"),
        ],
    )


# ---------------------------------------------------------------- summary table


def test_fmt_num_three_significant_digits():
    assert fmt_num(0.8125) == "0.812"
    assert fmt_num(0.031) == "0.031"
    assert fmt_num(1234.5) == "1230"
    assert fmt_num(3.1e-5) == "3.1e-05"
    assert fmt_num(2) == "2"
    assert fmt_num(None) == "—"
    assert fmt_num(float("nan")) == "nan"


def test_summary_rows():
    rows = summary_rows(make_record())
    assert SUMMARY_HEADERS == ["probe", "claim", "verdict", "effect", "CI", "threshold", "control", "why"]
    assert all(len(r) == len(SUMMARY_HEADERS) for r in rows)
    assert rows[0] == ["lens_capitals", "top1_at_layer_4", "pass", "0.812", "[0.705, 0.901]", "≥ 0.5",
                       "random direction: 0.031 (p=0.001)", ""]
    assert rows[1][5] == "≤ 0.1" and rows[1][6] == "—" and rows[1][7] == "CI straddles the threshold"
    assert rows[2][4] == "—"  # no CI
    assert rows[3] == ["broken", "(probe error)", "error", "—", "—", "—", "—", "ValueError: layer 40 out of range"]
    assert verdict_counts(make_record()) == {"pass": 1, "fail": 1, "inconclusive": 1, "error": 1}


@pytest.mark.parametrize("reason, shown", [
    ("interval [0.422, 0.721] straddles at_least 0.5", "interval straddles threshold"),
    ("interval [0.287, 0.591] straddles at_least 0.5; does not beat control",
     "interval straddles threshold; control not beaten"),
    ("interval [0.525, 0.809] clears at_least 0.5, but the effect does not beat its control", "control not beaten"),
    ("interval [0, 0.0713] misses at_least 0.5", "interval misses threshold"),
    ("untestable: the base rate on the test prompts is 0.0312 (1/32), below 0.1: there is nothing to suppress",
     "untestable: the base rate on the test prompts is 0.0312 (1/32), below 0…"),
    ("no candidate direction passed selection (144 candidates: 36 past the layer cap)",
     "no candidate direction passed selection (144 candidates: 36 past the la…"),
    ("", "—"),
])
def test_summary_says_why_a_claim_did_not_pass(reason, shown, tmp_path):
    """The table shows the reason a claim is inconclusive (or failed) in all three outputs, not a bare "—"."""
    rec = make_record()
    claim = rec.probes[0].claims[1]
    claim.reason, claim.verdict = reason, "inconclusive"
    assert summary_rows(rec)[1][7] == shown
    paths = write_all(rec, tmp_path, github_summary=False)
    md, html = paths[1].read_text(), paths[2].read_text()
    summary_md = md.split("## Summary")[1].split("##")[0]
    assert shown in summary_md and "| why " in summary_md
    import html as html_mod
    assert html_mod.escape(shown, quote=False) in html and "<th>why</th>" in html


# ---------------------------------------------------------------- json / markdown


def test_json_round_trips(tmp_path):
    rec = make_record()
    path = write_json(rec, tmp_path / "out")
    assert path == tmp_path / "out" / "report.json"
    text = path.read_text(encoding="utf-8")
    data = json.loads(text)
    assert data["tool"] == "modelprobe" and data["schema_version"] == rec.schema_version
    assert text.startswith("{\n  ")  # indent 2
    for _, c in rec.claims():
        assert f'"{c.name}"' in text
    assert RunRecord.model_validate_json(text) == rec
    assert RunRecord.model_validate(data) == rec


def test_json_nan_effect_survives(tmp_path):
    rec = make_record()
    rec.probes[0].claims[0].effect = float("nan")
    back = RunRecord.model_validate_json(write_json(rec, tmp_path).read_text())
    assert math.isnan(back.probes[0].claims[0].effect)
    assert summary_rows(rec)[0][3] == "nan"


def test_markdown_contains_every_claim_and_number(tmp_path):
    rec = make_record()
    md = write_markdown(rec, tmp_path).read_text(encoding="utf-8")
    assert md.startswith("# modelprobe report — `tiny-test-model`")
    for p, c in rec.claims():
        assert c.name in md and p.name in md
        assert c.reason in md and c.metric in md
        assert f"- **n:** {c.n}" in md
    for s in ["0.812", "[0.705, 0.901]", "≥ 0.5", "≤ 0.1", "0.421", "≥ 0.8",
              "random direction: 0.031 (p=0.001)", "random circuits: 0.12 (p=0.004)",
              "| logit_diff ", "3.21", "| top_k "]:
        assert s in md, s
    # summary table (github format) at the top, before the per-probe sections
    assert md.index("| probe ") < md.index("## Preflight") < md.index("## Probes")
    assert "| claim " in md and "|-----" in md
    # preflight and the errored probe
    assert "logits match" in md and "hooks reconstruct" in md and "❌ failed" in md
    assert "ValueError: layer 40 out of range" in md and "could not be measured" in md
    assert "💥 error" in md


def test_markdown_table_cells_are_escaped():
    rec = make_record()
    rec.probes[0].claims[0].reason = "a | b\nc"
    rec.probes[0].claims[0].details["weird|key"] = "x|y"
    md = render_markdown(rec)
    assert "weird\\|key" in md and "x\\|y" in md
    assert "a | b c" in md  # bullet text: one line


def test_markdown_with_comparison_section():
    before, after = make_record(), make_record()
    after.probes[0].claims[0].verdict = "fail"
    md = render_markdown(after, compare(before, after))
    assert "## Baseline comparison" in md and "FLIPPED" in md and "pass → fail" in md


# ---------------------------------------------------------------- errors / write_all


def test_unwritable_directory_raises_report_write_error(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    target = blocker / "reports"
    for writer in (write_json, write_markdown, write_html):
        with pytest.raises(ReportWriteError) as e:
            writer(make_record(), target)
        msg = str(e.value)
        assert str(target) in msg and "\n" not in msg
    with pytest.raises(ReportWriteError):
        write_all(make_record(), target, github_summary=False)


def test_write_all_and_github_step_summary(tmp_path, monkeypatch):
    summary = tmp_path / "step_summary.md"
    summary.write_text("previous step\n", encoding="utf-8")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    paths = write_all(make_record(), tmp_path / "r")
    assert [p.name for p in paths] == ["report.json", "report.md", "report.html"]
    assert all(p.is_file() and p.stat().st_size > 0 for p in paths)
    text = summary.read_text(encoding="utf-8")
    assert text.startswith("previous step\n")
    assert "# modelprobe report" in text and "top1_at_layer_4" in text
    assert text.count("# modelprobe report") == 1

    write_all(make_record(), tmp_path / "r", github_summary=False)
    assert summary.read_text(encoding="utf-8") == text  # not appended again

    monkeypatch.delenv("GITHUB_STEP_SUMMARY")
    write_all(make_record(), tmp_path / "r")  # no env: nothing to append, no error
    assert summary.read_text(encoding="utf-8") == text


# ---------------------------------------------------------------- html


def _images(html: str) -> list[str]:
    return re.findall(r'src="(data:image/png;base64,[^"]+)"', html)


def test_html_is_self_contained_with_plots(tmp_path):
    rec = make_record()
    path = write_html(rec, tmp_path)
    assert path == tmp_path / "report.html"
    html = path.read_text(encoding="utf-8")
    assert html.startswith("<!DOCTYPE html>")
    assert PNG in html
    # no network: no external src/href, no stylesheet links, no scripts
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", html, re.I)
    assert "http://" not in html and "https://" not in html
    assert "<link" not in html and "<script" not in html
    assert "<style>" in html
    # one image per typed plot of the record, titled
    images = _images(html)
    assert len(images) == sum(len(c.plots) for _, c in rec.claims()) == 4
    assert html.count('alt="quiet early"') == 1
    for img in images:
        assert base64.b64decode(img[len(PNG):])[:8] == b"\x89PNG\r\n\x1a\n"
    for _, c in rec.claims():
        assert c.name in html
    for v in ("pass", "fail", "inconclusive", "error"):
        assert f'class="pill {v}"' in html  # coloured verdicts
    assert "ValueError: layer 40 out of range" in html
    assert "logits match" in html


def test_html_escapes_text():
    rec = make_record()
    rec.probes[0].about = "<script>alert(1)</script>"
    html = render_html(rec)
    assert "<script>" not in html and "&lt;script&gt;" in html


def test_html_comparison_chart():
    before, after = make_record(), make_record()
    after.probes[0].claims[0].effect = 0.3
    after.probes[0].claims[0].verdict = "fail"
    html = render_html(after, compare(before, after))
    assert len(_images(html)) == 5
    assert "Baseline comparison" in html and "flipped" in html


def test_html_without_plots_or_probes():
    rec = RunRecord(model=ModelInfo(id="m", slug="m"))
    html = render_html(rec)
    assert PNG not in html and "No probes were run" in html


def test_report_layer_imports_no_torch_and_leaves_pyplot_alone(tmp_path):
    code = (
        "import sys\n"
        "import modelprobe.report as r\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from helpers.sample_report import sample_record\n"
        f"r.write_all(sample_record(), {str(tmp_path)!r}, github_summary=False)\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
        "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_two_runs_writing_one_folder_never_mix_their_files(tmp_path):
    """Report files are written together under the folder's lock: the folder always holds one run's three."""
    import threading
    import time

    from modelprobe.report._io import report_lock

    runs = [make_record() for _ in range(2)]
    for i, rec in enumerate(runs):
        rec.started = f"run-{i}"
    directory = tmp_path / "tiny"

    def write(rec: RunRecord) -> threading.Thread:
        t = threading.Thread(target=write_all, args=(rec, directory), kwargs={"github_summary": False})
        t.start()
        return t

    with report_lock(directory):  # another run holds the folder: this one waits
        waiting = write(runs[1])
        time.sleep(0.5)
        assert not (directory / "report.json").exists()
    waiting.join(timeout=30)
    assert not waiting.is_alive()
    for _ in range(3):  # two runs racing: whichever finishes last, its three files are the ones left
        for t in [write(runs[0]), write(runs[1])]:
            t.join(timeout=30)
        texts = [(directory / n).read_text() for n in ("report.json", "report.md", "report.html")]
        assert all("run-0" in t for t in texts) or all("run-1" in t for t in texts)
        assert not any("run-0" in t and "run-1" in t for t in texts)
    assert sorted(p.name for p in directory.iterdir()) == [".modelprobe.lock", "report.html", "report.json",
                                                           "report.md"]  # no temp file left behind


# ---------------------------------------------------------------- a signal while writing


def forty_probe_record():
    """A finished 40-probe run with plots (every plot type), made up rather than measured."""
    from tests.helpers.sample_report import sample_record

    rec = sample_record()
    probes = [p.model_copy(update={"name": f"{p.name}_{i}", "file": f"probes/{p.name}_{i}.probe.yaml"})
              for i in range(14) for p in rec.probes][:40]
    return rec.model_copy(update={"probes": probes})


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT"])
def test_a_signal_while_drawing_the_html_keeps_a_complete_report_json(tmp_path, monkeypatch, signame):
    import os
    import signal

    import matplotlib.figure

    from modelprobe.report.errors import ReportInterrupted

    rec = forty_probe_record()
    assert len(rec.probes) == 40 and sum(len(c.plots) for _, c in rec.claims()) > 40
    (tmp_path / "report.html").write_text("an older run's report")
    before = signal.getsignal(getattr(signal, signame))
    drawn: list[int] = []
    savefig = matplotlib.figure.Figure.savefig

    def draw_then_signal(fig, *args, **kwargs):  # the signal arrives as the HTML's 5th plot is drawn
        drawn.append(1)
        if len(drawn) == 5:
            os.kill(os.getpid(), getattr(signal, signame))
        return savefig(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", draw_then_signal)
    with pytest.raises(ReportInterrupted) as err:
        write_all(rec, tmp_path, github_summary=False)
    assert "interrupted while writing report.html" in str(err.value)
    assert [p.name for p in err.value.paths] == ["report.json", "report.md"]
    data = json.loads((tmp_path / "report.json").read_text())
    back = RunRecord.model_validate(data)
    assert back.interrupted and back.interrupted_writing == "report.html" and len(back.probes) == 40
    assert back.model_copy(update={"interrupted": False, "interrupted_writing": ""}) == rec  # nothing lost
    md = (tmp_path / "report.md").read_text()
    assert "The report writing was stopped at `report.html`" in md and "not every probe was measured" not in md
    assert not (tmp_path / "report.html").exists()  # no older run's HTML left beside this run's JSON
    assert len(drawn) == 5  # the drawing stopped at the signal instead of running on
    assert signal.getsignal(getattr(signal, signame)) == before  # the run's own handler is back
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_reports_are_written_json_first(tmp_path, monkeypatch):
    """The cheap, complete record is on disk before the slow HTML drawing starts."""
    import matplotlib.figure

    seen: list[bool] = []
    savefig = matplotlib.figure.Figure.savefig

    def note(fig, *args, **kwargs):
        seen.append((tmp_path / "report.json").is_file() and (tmp_path / "report.md").is_file())
        return savefig(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", note)
    from tests.helpers.sample_report import sample_record

    paths = write_all(sample_record(), tmp_path, github_summary=False)
    assert [p.name for p in paths] == ["report.json", "report.md", "report.html"]
    assert seen and all(seen)


def test_a_run_stopped_while_writing_exits_interrupted_and_saves_no_baseline(pytester, tmp_path):
    from tests.helpers.toy_models import copy_task_rows, save_copy_model, write_jsonl
    from tests.test_plugin import LENS_PROBE

    model = save_copy_model(tmp_path / "toy")
    write_jsonl(pytester.path / "probes" / "data" / "copy.jsonl", copy_task_rows(n=12))
    (pytester.path / "probes" / "lens.probe.yaml").write_text(LENS_PROBE.split("  emerges_late:")[0])
    pytester.makeconftest("""
        import os, signal
        import matplotlib.figure

        real = matplotlib.figure.Figure.savefig

        def savefig(fig, *args, **kwargs):  # CI's timeout arrives while report.html is being drawn
            os.kill(os.getpid(), signal.SIGTERM)
            return real(fig, *args, **kwargs)

        matplotlib.figure.Figure.savefig = savefig

        def pytest_unconfigure(config):  # this run is in-process: leave matplotlib as it was
            matplotlib.figure.Figure.savefig = real
    """)
    result = pytester.runpytest("probes", f"--model={model}", "--probe-report-dir=out", "--probe-threads=1",
                                "--probe-save=base", "-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.INTERRUPTED
    result.stdout.fnmatch_lines(["reports interrupted while writing report.html: report.json, report.md written, "
                                 "marked interrupted"])
    data = json.loads((pytester.path / "out" / "toy" / "report.json").read_text())
    assert data["interrupted"] and data["interrupted_writing"] == "report.html"
    assert data["probes"][0]["claims"][0]["verdict"] == "pass"
    assert not (pytester.path / "out" / "toy" / "report.html").exists()
    assert not (pytester.path / "out" / "baselines").exists()
    import matplotlib.figure
    assert matplotlib.figure.Figure.savefig.__module__ == "matplotlib.figure"
