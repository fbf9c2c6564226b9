"""The plugin as a user meets it: collection, verdicts, errors, reports, markers, baselines, xdist."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers.toy_models import copy_task_rows, save_copy_model, save_random_model, write_jsonl

LENS_PROBE = """\
kind: logit_lens
about: the last token is decoded from the first layer on
tags: [lens, toy]
prompts: data/copy.jsonl
claims:
  emerges_early:
    expect: {median_first_layer: {at_most: 0.5}}
  emerges_late:
    expect: {median_first_layer: {at_least: 0.9}}
  final_accuracy:
    expect: {final_accuracy: {at_least: 0.9}}
    tolerance: {abs: 0.05}
"""


@pytest.fixture(scope="session")
def copy_model(tmp_path_factory) -> Path:
    return save_copy_model(tmp_path_factory.mktemp("copy_model"))


@pytest.fixture(scope="session")
def random_model(tmp_path_factory) -> Path:
    return save_random_model(tmp_path_factory.mktemp("random_model"))


@pytest.fixture
def probe_dir(pytester):
    write_jsonl(pytester.path / "probes" / "data" / "copy.jsonl", copy_task_rows())
    (pytester.path / "probes" / "lens.probe.yaml").write_text(LENS_PROBE)
    return pytester.path / "probes"


def run(pytester, model: Path, *args: str, subprocess: bool = False):
    runner = pytester.runpytest_subprocess if subprocess else pytester.runpytest
    return runner("probes", f"--model={model}", "--probe-report-dir=out", "-p", "no:cacheprovider",
                              "-p", "no:randomly", *args)


def report(pytester, model: Path) -> dict:
    return json.loads((pytester.path / "out" / model.name / "report.json").read_text())


def test_planted_true_claim_passes_false_claim_fails(pytester, probe_dir, copy_model):
    result = run(pytester, copy_model, "-v")
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(["*lens.probe.yaml::emerges_early PASSED*",
                                 "*lens.probe.yaml::emerges_late FAILED*"])
    result.stdout.fnmatch_lines(["*FAIL: median first layer*", "*misses at_least 0.9*"])
    assert "Traceback" not in result.stdout.str()
    rec = report(pytester, copy_model)
    claims = {c["name"]: c for c in rec["probes"][0]["claims"]}
    # The copy model decodes the input token at the first layer: first layer = 1/L = 0.25 exactly.
    assert claims["emerges_early"]["effect"] == pytest.approx(0.25)
    assert claims["final_accuracy"]["effect"] == 1.0
    assert claims["emerges_late"]["verdict"] == "fail"
    assert rec["model"]["model_type"] == "llama" and rec["model"]["n_layers"] == 4
    assert all(p["passed"] for p in rec["preflight"])
    assert rec["tokenization"]["plain_example"]["ids"][0] == rec["tokenization"]["bos_token_id"]
    for name in ("report.md", "report.html"):
        assert (pytester.path / "out" / copy_model.name / name).exists()


def test_known_negative_model_fails(pytester, probe_dir, random_model):
    run(pytester, random_model)
    rec = report(pytester, random_model)
    claims = {c["name"]: c for c in rec["probes"][0]["claims"]}
    assert claims["emerges_early"]["verdict"] != "pass"
    assert claims["final_accuracy"]["verdict"] == "fail"


def test_summary_table_and_junit_properties(pytester, probe_dir, copy_model):
    result = run(pytester, copy_model, "--junitxml=junit.xml", "-o", "junit_family=xunit1")
    result.stdout.fnmatch_lines(["*modelprobe*", "*probe*claim*verdict*effect*CI*threshold*control*",
                                 "*lens*emerges_early*pass*0.25*"])
    xml = (pytester.path / "junit.xml").read_text()
    assert 'name="verdict" value="pass"' in xml and 'name="ci_low"' in xml and 'name="threshold"' in xml


def test_tags_are_markers_and_keywords(pytester, probe_dir, copy_model):
    run(pytester, copy_model, "-m", "toy", "-k", "early").assert_outcomes(passed=1, deselected=2)
    run(pytester, copy_model, "-m", "not toy").assert_outcomes(deselected=3)


def test_only_probe_yaml_is_collected(pytester, probe_dir, copy_model):
    (probe_dir / "notes.yaml").write_text("kind: nonsense\n")
    (probe_dir / "data" / "other.yml").write_text("- 1\n")
    run(pytester, copy_model).assert_outcomes(passed=2, failed=1)


BAD_PROBES = {
    "misspelt_key": ("claims:\n  c:\n    expct: {final_accuracy: {at_least: 0.5}}\n",
                     "bad.probe.yaml:8:5: claims.c.expct: unknown key 'expct' (did you mean 'expect'?)"),
    "wrong_type": ("claims:\n  c:\n    top_k: many\n    expect: {final_accuracy: {at_least: 0.5}}\n",
                   "bad.probe.yaml:8:12: claims.c.top_k: Input should be a valid integer*"),
    "bad_threshold": ("claims:\n  c:\n    expect: {final_accuracy: {at_least: 0.5, at_most: 0.9}}\n",
                      "bad.probe.yaml:8:30: claims.c.expect.final_accuracy: give exactly one of at_least or at_most"),
}
# Checks that need the model run when the claim runs (collection never loads it): the claim fails with
# the same one located line.
MODEL_CHECKED = {
    "layer_beyond_depth": ("claims:\n  c:\n    layer: 12\n    expect: {share_by_layer: {at_least: 0.5}}\n",
                           "bad.probe.yaml:8:12: claims.c.layer: layer 12 is beyond the model's depth (4 layers*"),
}


@pytest.mark.parametrize("case", sorted(BAD_PROBES) + sorted(MODEL_CHECKED))
def test_bad_probe_is_one_line_error_and_others_still_run(pytester, probe_dir, copy_model, case):
    body, expected = BAD_PROBES.get(case) or MODEL_CHECKED[case]
    head = "kind: logit_lens\nabout: x\nprompts: data/copy.jsonl\n# a comment\n# another\n"
    (probe_dir / "bad.probe.yaml").write_text(head + body)
    result = run(pytester, copy_model)
    if case in BAD_PROBES:
        result.assert_outcomes(passed=2, failed=1, errors=1)
    else:
        result.assert_outcomes(passed=2, failed=2)
    rec = report(pytester, copy_model)
    bad = next(p for p in rec["probes"] if p["file"] == "probes/bad.probe.yaml")
    assert bad["error"] and expected.split("*")[0] in bad["error"]  # in the report too, not only on screen
    result.stdout.fnmatch_lines([f"*{expected}"])
    assert "Traceback" not in result.stdout.str()


def test_unknown_kind_missing_data_and_multi_token_answer(pytester, probe_dir, copy_model):
    (probe_dir / "a.probe.yaml").write_text("kind: telepathy\nclaims: {}\n")
    (probe_dir / "b.probe.yaml").write_text(
        "kind: logit_lens\nprompts: data/missing.jsonl\nclaims:\n  c:\n    expect: {final_accuracy: {at_least: 1}}\n")
    write_jsonl(probe_dir / "data" / "multi.jsonl", [{"prompt": "t1 t2", "answer": " t3"},
                                                     {"prompt": "t1", "answer": " t3 t4"}])
    (probe_dir / "c.probe.yaml").write_text(
        "kind: logit_lens\nprompts: data/multi.jsonl\ntarget: single_token\n"
        "claims:\n  c:\n    expect: {final_accuracy: {at_least: 1}}\n")
    result = run(pytester, copy_model)
    result.assert_outcomes(passed=2, failed=2, errors=2)  # c's check needs the model: its claim fails
    result.stdout.fnmatch_lines([
        "*a.probe.yaml:1:7: kind: unknown kind 'telepathy' (known: *logit_lens*",
        "*b.probe.yaml:2:10: prompts: data file '*missing.jsonl' not found",
        "*multi.jsonl:2: answer ' t3 t4' is 2 tokens for model *; target: single_token needs one",
    ])
    errors = {p["file"]: p["error"] for p in report(pytester, copy_model)["probes"]}
    assert all(errors[f"probes/{x}.probe.yaml"] for x in "abc") and errors["probes/lens.probe.yaml"] is None
    assert "Traceback" not in result.stdout.str()


def test_unloadable_model_is_one_clear_error(pytester, probe_dir, tmp_path):
    result = run(pytester, tmp_path / "nowhere")
    result.stdout.fnmatch_lines(["*neither the alias 'smollm2-135m-instruct', a local directory*"])
    assert "Traceback" not in result.stdout.str()


def test_report_written_when_interrupted(pytester, probe_dir, copy_model):
    pytester.makeconftest("""
        import pytest
        def pytest_runtest_teardown(item):
            if item.name == "emerges_late":
                raise KeyboardInterrupt
    """)
    run(pytester, copy_model, subprocess=True)  # in-process, the interrupt would stop this session too
    rec = report(pytester, copy_model)
    assert rec["interrupted"] is True
    assert {c["name"] for c in rec["probes"][0]["claims"]} >= {"emerges_early"}


def test_baseline_gate_catches_a_damaged_model(pytester, probe_dir, tmp_path):
    clean = save_copy_model(tmp_path / "clean" / "toy")
    damaged = save_copy_model(tmp_path / "release2" / "toy", damaged=True)  # same model name, new weights
    run(pytester, clean, "--probe-save=clean")
    baseline = pytester.path / "out" / "baselines" / "toy" / "clean.json"
    assert baseline.exists()
    same = run(pytester, clean, "--probe-compare=clean")
    same.assert_outcomes(passed=2, failed=1)  # emerges_late fails on its own, as in the baseline
    assert "regression against baseline" not in same.stdout.str()
    worse = run(pytester, damaged, "--probe-compare=clean")
    worse.stdout.fnmatch_lines(["*regression against baseline: *pass → fail*"])
    assert worse.ret != 0


def test_baseline_errors_are_clear_and_report_still_written(pytester, probe_dir, copy_model):
    (pytester.path / "junk.json").write_text('{"hello": 1}')
    result = run(pytester, copy_model, "--probe-compare=junk.json")
    result.stdout.fnmatch_lines(["*baseline*junk.json*"])
    assert "Traceback" not in result.stdout.str()
    assert report(pytester, copy_model)["probes"]


def test_xdist_matches_serial(pytester, probe_dir, copy_model):
    serial = run(pytester, copy_model)
    serial_rec = report(pytester, copy_model)
    parallel = run(pytester, copy_model, "-n", "2", "--dist", "loadgroup")
    parallel.assert_outcomes(passed=2, failed=1)
    par_rec = report(pytester, copy_model)
    assert serial.ret == parallel.ret

    def key(rec):
        return {(p["name"], c["name"]): (c["verdict"], c["effect"], c["ci"]) for p in rec["probes"]
                for c in p["claims"]}
    assert key(serial_rec) == key(par_rec)


def test_unwritable_report_dir_is_one_clear_line(pytester, probe_dir, copy_model):
    (pytester.path / "blocked").write_text("a file where a directory should be")
    result = pytester.runpytest("probes", f"--model={copy_model}", "--probe-report-dir=blocked/reports")
    # Found before any claim runs, not after the whole run.
    result.stderr.fnmatch_lines(["*modelprobe: --probe-report-dir=blocked/reports: blocked is not a directory"])
    assert "Traceback" not in result.stdout.str() + result.stderr.str()
    assert result.ret == pytest.ExitCode.USAGE_ERROR


def test_last_failed_and_exitfirst_work_on_claims(pytester, probe_dir, copy_model):
    args = ("probes", f"--model={copy_model}", "--probe-report-dir=out", "-p", "cacheprovider")
    pytester.runpytest(*args).assert_outcomes(passed=2, failed=1)
    rerun = pytester.runpytest(*args, "--lf", "-v")
    assert rerun.parseoutcomes().get("failed") == 1 and "passed" not in rerun.parseoutcomes()
    rerun.stdout.fnmatch_lines(["*emerges_late FAILED*"])
    pytester.runpytest(*args, "-x", "-p", "no:randomly").assert_outcomes(passed=1, failed=1)


def test_numbers_do_not_depend_on_batch_size(pytester, probe_dir, random_model):
    """Batch size changes padding, never verdicts or effects (a silent-wrong-number guard)."""
    results = []
    for size in ("1", "7", "auto"):
        run(pytester, random_model, f"--probe-batch-size={size}")
        rec = report(pytester, random_model)
        claims = rec["probes"][0]["claims"]
        results.append(({c["name"]: (c["verdict"], c["effect"]) for c in claims},
                        [p for c in claims for p in c["curves"]["mean_target_prob"]]))
    assert results[0][0] == results[1][0] == results[2][0]
    # Continuous per-layer probabilities would expose a padding or position-id error.
    assert results[0][1] == pytest.approx(results[1][1], abs=1e-6)
    assert results[0][1] == pytest.approx(results[2][1], abs=1e-6)
    assert len(set(results[0][1])) > 3


# --------------------------------------------------------------------------- the gate never passes by accident


def test_a_probe_with_a_typo_fails_the_gate_and_is_in_every_report(pytester, probe_dir, copy_model, capsys):
    run(pytester, copy_model, "--probe-save=base").assert_outcomes(passed=2, failed=1)
    base = pytester.path / "out" / "baselines" / copy_model.name / "base.json"
    saved = json.loads(base.read_text())
    assert saved["model"]["path"] == ""  # no directory of the machine that made it
    (probe_dir / "lens.probe.yaml").write_text(LENS_PROBE.replace("expect: {median_first_layer: {at_most",
                                                                  "expct: {median_first_layer: {at_most"))
    result = run(pytester, copy_model, "--probe-compare=base")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["*baseline: probes/lens.probe.yaml::emerges_early ERRORED: pass → error: probe could "
                                 "not be collected: *lens.probe.yaml:7:5: claims.emerges_early*"])
    md = (pytester.path / "out" / copy_model.name / "report.md").read_text()
    assert "1 error" in md and "regressions against the baseline" in md and "expct" in md
    rec = report(pytester, copy_model)
    assert rec["probes"][0]["collected"] is False and "expct" in rec["probes"][0]["error"]
    from modelprobe.cli import main
    assert main(["compare", str(base), str(pytester.path / "out" / copy_model.name / "report.json")]) == 1
    assert "3 errored" in capsys.readouterr().out


def test_missing_claims_fail_without_strict_and_only_those_selected_count(pytester, probe_dir, copy_model):
    run(pytester, copy_model, "--probe-save=base")
    # -k: the unselected baseline claims are not "missing"
    run(pytester, copy_model, "--probe-compare=base", "-k", "early").assert_outcomes(passed=1, deselected=2)
    rec = report(pytester, copy_model)
    assert rec["collected_files"] == ["probes/lens.probe.yaml"]
    assert rec["deselected"] == ["probes/lens.probe.yaml::emerges_late", "probes/lens.probe.yaml::final_accuracy"]
    # a claim removed from the probe file is missing against the baseline: the run fails, strict or not
    (probe_dir / "lens.probe.yaml").write_text(LENS_PROBE.split("  final_accuracy:")[0])
    result = run(pytester, copy_model, "--probe-compare=base", "-k", "not emerges_late")
    result.assert_outcomes(passed=1, deselected=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["*baseline: probes/lens.probe.yaml::final_accuracy MISSING: claim not measured*"])
    # --probe-strict: a claim new since the baseline fails too, and only with it
    (probe_dir / "lens.probe.yaml").write_text(LENS_PROBE + "  fresh:\n    expect: {final_accuracy: {at_least: 0.5}}\n")
    run(pytester, copy_model, "--probe-compare=base", "-k", "fresh").assert_outcomes(passed=1, deselected=3)
    strict = run(pytester, copy_model, "--probe-compare=base", "--probe-strict", "-k", "fresh")
    strict.assert_outcomes(failed=1, deselected=3)
    strict.stdout.fnmatch_lines(["*claim is new since the baseline*"])


def test_same_file_name_in_two_folders_are_two_probes(pytester, probe_dir, tmp_path):
    clean = save_copy_model(tmp_path / "clean" / "toy")
    damaged = save_copy_model(tmp_path / "release2" / "toy", damaged=True)
    for folder in ("a", "b"):
        (probe_dir / folder).mkdir()
        (probe_dir / folder / "lens.probe.yaml").write_text(LENS_PROBE.replace("data/copy.jsonl", "../data/copy.jsonl"))
    (probe_dir / "lens.probe.yaml").unlink()
    run(pytester, clean, "--probe-save=base")
    files = sorted(p["file"] for p in report(pytester, clean)["probes"])
    assert files == ["probes/a/lens.probe.yaml", "probes/b/lens.probe.yaml"]
    result = run(pytester, clean)
    result.stdout.fnmatch_lines(["probes/a/lens.probe.yaml *emerges_early*", "probes/b/lens.probe.yaml *emerges_early*"])
    (probe_dir / "a" / "lens.probe.yaml").unlink()  # b alone is compared with b's baseline, not a's
    result = pytester.runpytest("probes/b", f"--model={damaged}", "--probe-report-dir=out", "-p", "no:cacheprovider",
                                "-p", "no:randomly", "--probe-compare=base")
    result.stdout.fnmatch_lines(["*regression against baseline: *pass → fail*"])
    assert "probes/a/lens.probe.yaml" not in result.stdout.str()  # not asked for: not missing


def test_a_deleted_probe_under_a_collected_folder_is_missing(pytester, probe_dir, copy_model):
    """Deleting a failing probe must not pass the gate: `pytest probes` asked for every probe under probes/,
    so the baseline claims of a deleted file there are missing, except those -k or -m would have left out."""
    (probe_dir / "a").mkdir()
    gone = LENS_PROBE.replace("data/copy.jsonl", "../data/copy.jsonl").replace("tags: [lens, toy]", "tags: [extra]")
    (probe_dir / "a" / "gone.probe.yaml").write_text(gone.replace(
        "  emerges_late:\n    expect: {median_first_layer: {at_least: 0.9}}\n", ""))
    late = ("-k", "not emerges_late")  # lens.probe.yaml's one failing claim, left out of every run
    run(pytester, copy_model, "--probe-save=base", *late).assert_outcomes(passed=4, deselected=1)
    (probe_dir / "a" / "gone.probe.yaml").unlink()
    result = run(pytester, copy_model, "--probe-compare=base", *late)
    result.assert_outcomes(passed=2, deselected=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["*baseline: probes/a/gone.probe.yaml::emerges_early MISSING: probe not measured*"])
    # -k / -m judged on what the baseline knows of the deleted claims (names, folders, file, tags)
    accuracy = run(pytester, copy_model, "--probe-compare=base", "-k", "final_accuracy")
    assert accuracy.ret == pytest.ExitCode.TESTS_FAILED
    assert "gone.probe.yaml::final_accuracy MISSING" in accuracy.stdout.str()
    assert "gone.probe.yaml::emerges_early" not in accuracy.stdout.str()
    assert run(pytester, copy_model, "--probe-compare=base", "-k", "not gone and not late").ret == pytest.ExitCode.OK
    assert run(pytester, copy_model, "--probe-compare=base", "-m", "lens", *late).ret == pytest.ExitCode.OK
    assert run(pytester, copy_model, "--probe-compare=base", "-m", "extra or lens", *late).ret != pytest.ExitCode.OK
    assert run(pytester, copy_model, "--probe-compare=base", "--ignore=probes/a", *late).ret == pytest.ExitCode.OK
    # the whole folder deleted: still under probes/, still missing
    (probe_dir / "a").rmdir()
    assert run(pytester, copy_model, "--probe-compare=base", *late).ret == pytest.ExitCode.TESTS_FAILED


def test_collection_never_loads_the_model_and_k_loads_it_once(pytester, probe_dir, copy_model, monkeypatch):
    import modelprobe.subject.subject as subject_module
    loads = []
    real = subject_module.load_subject
    monkeypatch.setattr(subject_module, "load_subject", lambda *a, **k: loads.append(a) or real(*a, **k))
    (probe_dir / "other.probe.yaml").write_text(LENS_PROBE.replace("tags: [lens, toy]", "tags: [other]"))
    run(pytester, copy_model, "--co")
    run(pytester, tmp := copy_model.parent / "nowhere", "--co")  # an unloadable model: --co still lists
    assert loads == [] and not (pytester.path / "out").exists() and tmp
    run(pytester, copy_model, "-k", "other and early").assert_outcomes(passed=1, deselected=5)
    assert len(loads) == 1


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGINT"])
def test_a_signal_writes_an_interrupted_report_naming_the_probe(pytester, probe_dir, copy_model, signal_name):
    stale = pytester.path / "out" / copy_model.name / "report.json"
    stale.parent.mkdir(parents=True)
    stale.write_text('{"stale": true}')
    pytester.makeconftest(f"""
        import os, signal, time
        from modelprobe.session import ProbeSession

        def subject(self):  # what a CI timeout (SIGTERM) or Ctrl-C does while a probe is being measured
            os.kill(os.getpid(), signal.{signal_name})
            time.sleep(60)

        ProbeSession.subject = subject
    """)
    result = run(pytester, copy_model, subprocess=True)
    assert result.ret == pytest.ExitCode.INTERRUPTED
    rec = report(pytester, copy_model)
    assert rec["interrupted"] is True and rec["interrupted_probe"] == "probes/lens.probe.yaml"
    assert rec["probes"][0]["error"].startswith("interrupted")
    md = (pytester.path / "out" / copy_model.name / "report.md").read_text()
    assert "interrupted while measuring `probes/lens.probe.yaml`" in md


def test_every_option_is_in_the_docs_table():
    from modelprobe.options import OPTIONS
    table = (Path(__file__).resolve().parent.parent / "docs" / "options.md").read_text()
    for o in OPTIONS:
        assert f"| `{o.flag}` | `{o.ini}` |" in table, o.flag


def test_data_outside_the_rootdir_needs_probe_data_root(pytester, probe_dir, copy_model, tmp_path):
    outside = write_jsonl(tmp_path / "shared" / "copy.jsonl", copy_task_rows())
    (probe_dir / "lens.probe.yaml").write_text(LENS_PROBE.replace("data/copy.jsonl", str(outside)))
    refused = run(pytester, copy_model)
    refused.assert_outcomes(errors=1)
    refused.stdout.fnmatch_lines(["*lens.probe.yaml:4:10: prompts: data file '*copy.jsonl' is outside the probe's "
                                  "folder and the rootdir*"])
    run(pytester, copy_model, f"--probe-data-root={outside.parent}").assert_outcomes(passed=2, failed=1)
