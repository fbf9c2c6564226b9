"""--probe-shard and `modelprobe merge`: shards of one run join into that run's report and gate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from modelprobe.cli import main
from modelprobe.options import OptionError, read_options
from modelprobe.shard import deal, parse_shard
from tests.helpers.toy_models import copy_task_rows, save_copy_model, write_jsonl
from tests.test_plugin import LENS_PROBE

# Four probes with passing, failing and inconclusive claims, and one that does not collect.
PROBES = {
    "lens_a": LENS_PROBE,
    "lens_b": LENS_PROBE.replace("at_most: 0.5", "at_most: 0.75"),
    "lens_c": LENS_PROBE.replace("final_accuracy: {at_least: 0.9}", "final_accuracy: {at_least: 1.0}"),
    "lens_d": LENS_PROBE.replace("at_least: 0.9}}\n  final", "at_least: 0.1}}\n  final"),
    "lens_broken": LENS_PROBE.replace("final_accuracy: {at_least: 0.9}", "final_accuracy: {at_least: 1.01}"),
}


@pytest.fixture(scope="module")
def copy_model(tmp_path_factory) -> Path:
    return save_copy_model(tmp_path_factory.mktemp("copy_model"))


@pytest.fixture
def probes(pytester):
    write_jsonl(pytester.path / "probes" / "data" / "copy.jsonl", copy_task_rows())
    for name, text in PROBES.items():
        (pytester.path / "probes" / f"{name}.probe.yaml").write_text(text)
    return pytester.path / "probes"


def run(pytester, model: Path, out: str, *args: str):
    return pytester.runpytest("probes", f"--model={model}", f"--probe-report-dir={out}", "-p", "no:cacheprovider",
                              "-p", "no:randomly", *args)


def claims(path: Path) -> dict[str, tuple]:
    rec = json.loads(path.read_text())
    return {f"{p['file']}::{c['name']}": (c["verdict"], c["effect"], tuple(c["ci"] or ())) for p in rec["probes"]
            for c in p["claims"]}


def test_parse_shard_is_range_checked():
    assert parse_shard("2/4") == (2, 4) and parse_shard(" 1 / 1 ") == (1, 1)
    for bad in ("0/4", "5/4", "1/0", "a/b", "2", "1/1001", "-1/3"):
        with pytest.raises(ValueError):
            parse_shard(bad)
    opts = {"probe_shard": "3/2"}
    with pytest.raises(OptionError, match=r"^--probe-shard=3/2: the shard must be between 1 and 2$"):
        read_options(lambda name: opts.get(name), lambda name: None)


def test_deal_balances_costs_and_is_deterministic():
    files = [f"probes/p{i}.probe.yaml" for i in range(7)]
    costs = {files[0]: 100.0, files[1]: 60.0, files[2]: 50.0, files[3]: 10.0}  # the rest unknown: the median
    got = deal(files, costs, 2)
    assert got == deal(list(reversed(files)), costs, 2)  # the order files come in does not matter
    assert set(got) == set(files) and set(got.values()) == {1, 2}
    load = {k: sum(costs.get(f, 50.0) for f in files if got[f] == k) for k in (1, 2)}
    assert abs(load[1] - load[2]) <= 50.0 and got[files[0]] != got[files[1]]
    by_hash = deal(files, {}, 3)  # nothing known: dealt evenly in hash order
    assert sorted(list(by_hash.values()).count(k) for k in (1, 2, 3)) == [2, 2, 3]
    assert by_hash == deal(files, {}, 3)


def test_shards_merged_equal_one_run_and_a_missing_shard_fails(pytester, probes, copy_model, capsys):
    run(pytester, copy_model, "whole")
    whole = pytester.path / "whole" / copy_model.name / "report.json"
    reports = []
    for i in (1, 2, 3):
        run(pytester, copy_model, f"s{i}", f"--probe-shard={i}/3")
        reports.append(pytester.path / f"s{i}" / copy_model.name / "report.json")
        rec = json.loads(reports[-1].read_text())
        assert rec["shard"]["index"] == i and rec["shard"]["count"] == 3
    owned = [set(json.loads(r.read_text())["shard"]["files"]) for r in reports]
    assert sum(len(o) for o in owned) == 5 and set.union(*owned) == set(json.loads(whole.read_text())["collected_files"])
    merged = pytester.path / "merged" / "report.json"
    code = main(["merge", *map(str, reports), "-o", str(merged)])
    assert code == 1  # some claims fail, as in the whole run
    assert claims(merged) == claims(whole) and len(claims(whole)) == 12
    assert (pytester.path / "merged" / "report.html").exists()
    rec = json.loads(merged.read_text())
    assert rec["shard"] is None and rec["deselected"] == []

    # the whole run as a baseline: the joined shards match it, and lose it when a shard never reports
    assert main(["merge", *map(str, reports), "-o", str(merged), "--compare", str(whole)]) == 1  # fails, as one run
    capsys.readouterr()
    lost = next(r for r, o in zip(reports, owned) if o and "probes/lens_broken.probe.yaml" not in o)
    rest = [str(r) for r in reports if r != lost]
    assert main(["merge", *rest, "-o", str(merged), "--compare", str(whole)]) == 1
    out = capsys.readouterr().out
    gone = owned[reports.index(lost)]
    assert all(f"MISSING {f}" in out for f in gone)
    errored = {p["file"]: p["error"] for p in json.loads(merged.read_text())["probes"] if p["error"]}
    assert {f for f, e in errored.items() if "never reported" in e} == gone


def test_merge_of_passing_shards_passes_and_bad_input_is_one_line(pytester, probes, copy_model, capsys):
    for name in ("lens_b", "lens_c", "lens_d", "lens_broken"):
        (probes / f"{name}.probe.yaml").unlink()
    (probes / "lens_a.probe.yaml").write_text(LENS_PROBE.replace("at_least: 0.9}}\n  final", "at_least: 0.1}}\n  final"))
    reports = []
    for i in (1, 2):  # one shard gets the one probe, the other none: it still reports, and passes
        assert run(pytester, copy_model, f"s{i}", f"--probe-shard={i}/2").ret == 0
        reports.append(str(pytester.path / f"s{i}" / copy_model.name / "report.json"))
    merged = str(pytester.path / "m" / "report.json")
    assert main(["merge", *reports, "-o", merged]) == 0
    capsys.readouterr()
    assert main(["merge", reports[0], reports[0], "-o", merged]) == 2
    assert main(["merge", reports[0], str(pytester.path / "nope.json"), "-o", merged]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "given twice" in err[0] and "not found" in err[1]


def test_a_shard_under_xdist_reports_its_share(pytester, probes, copy_model):
    for name in ("lens_c", "lens_d", "lens_broken"):
        (probes / f"{name}.probe.yaml").unlink()
    for i in (1, 2):
        result = pytester.runpytest_subprocess("probes", f"--model={copy_model}", f"--probe-report-dir=s{i}",
                                               "-p", "no:cacheprovider", "-p", "no:randomly", "-n", "2",
                                               "--dist", "loadgroup", f"--probe-shard={i}/2")
        assert result.ret in (0, 1)
        rec = json.loads((pytester.path / f"s{i}" / copy_model.name / "report.json").read_text())
        assert rec["shard"]["index"] == i and len(rec["shard"]["files"]) == 1
        assert [p["file"] for p in rec["probes"]] == rec["shard"]["files"]


def test_under_xdist_the_longest_recorded_probes_run_first(pytester, probes, copy_model):
    """The workers put the probe files with the longest recorded durations first, and xdist's own
    reordering (by claim count) is off, so one worker runs them longest first."""
    (probes / "lens_broken.probe.yaml").unlink()
    run(pytester, copy_model, "out")
    last = pytester.path / "out" / copy_model.name / "report.json"
    rec = json.loads(last.read_text())
    seconds = {"probes/lens_c.probe.yaml": 90.0, "probes/lens_a.probe.yaml": 60.0,
               "probes/lens_d.probe.yaml": 30.0, "probes/lens_b.probe.yaml": 5.0}
    for p in rec["probes"]:
        p["duration_s"] = seconds[p["file"]]
    last.write_text(json.dumps(rec))
    result = pytester.runpytest_subprocess("probes", f"--model={copy_model}", "--probe-report-dir=out", "-p",
                                           "no:cacheprovider", "-p", "no:randomly", "-n", "1", "--dist",
                                           "loadgroup", "-v")
    ran = [line.split("probes/")[1].split(".probe.yaml")[0] for line in result.outlines
           if "probe.yaml::" in line and ("PASSED" in line or "FAILED" in line)]
    order = list(dict.fromkeys(ran))
    assert order == ["lens_c", "lens_a", "lens_d", "lens_b"], result.outlines
