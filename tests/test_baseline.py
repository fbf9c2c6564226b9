"""Baselines: save / load / compare two RunRecords, and `modelprobe compare` exit codes (no model)."""

from __future__ import annotations

import json

import pytest

from modelprobe.report import (
    SCHEMA_VERSION,
    BaselineError,
    ClaimResult,
    Comparison,
    ModelInfo,
    ProbeRecord,
    RunRecord,
    baseline_path,
    cli_compare,
    compare,
    format_comparison,
    load_report,
    save_baseline,
    write_json,
)


def run(
    claims: dict[tuple[str, str], tuple],
    slug: str = "tiny",
    model_hash: str = "h1",
    seed: int = 0,
    dtype: str = "float32",
    file_hashes: dict[str, str] | None = None,
    errors: dict[str, str] | None = None,
) -> RunRecord:
    """claims: (probe, claim) -> (verdict, effect) or (verdict, effect, tolerance)."""
    probes: dict[str, ProbeRecord] = {}
    for (pname, cname), spec in claims.items():
        verdict, effect, *tol = spec
        p = probes.setdefault(pname, ProbeRecord(name=pname, kind="logit_lens", file=f"probes/{pname}.yaml",
                                                 file_hash=(file_hashes or {}).get(pname, "fh")))
        p.claims.append(ClaimResult(name=cname, verdict=verdict, effect=effect,
                                    tolerance=tol[0] if tol else None))
    for pname, err in (errors or {}).items():
        probes[pname] = ProbeRecord(name=pname, kind="steering", file=f"probes/{pname}.yaml", error=err)
    return RunRecord(
        model=ModelInfo(id=slug, slug=slug, hash=model_hash, dtype=dtype),
        seed=seed,
        probes=list(probes.values()),
    )


def row(c: Comparison, probe: str, claim: str):
    """The row of a claim; rows name a probe by its identity, the file relative to the rootdir."""
    (r,) = [r for r in c.rows if (r.probe, r.claim) == (f"probes/{probe}.yaml", claim)]
    return r


# ---------------------------------------------------------------- compare


def test_identical_runs_are_ok():
    a = run({("p", "c"): ("pass", 0.81), ("p", "d"): ("fail", 0.1)})
    c = compare(a, a)
    assert c.ok and c.warnings == []
    assert [r.status for r in c.rows] == ["ok", "ok"]
    assert row(c, "p", "c").delta == 0


def test_flip_detected_with_before_after_message():
    before = run({("p", "c"): ("pass", 0.81)})
    after = run({("p", "c"): ("fail", 0.12)})
    c = compare(before, after)
    r = row(c, "p", "c")
    assert r.status == "flipped" and r.failing and not c.ok
    assert r.message == "pass → fail (effect 0.81 → 0.12)"
    assert r.delta == pytest.approx(-0.69)
    inconclusive = compare(before, run({("p", "c"): ("inconclusive", 0.6)}))
    assert row(inconclusive, "p", "c").status == "flipped"
    assert row(inconclusive, "p", "c").message.startswith("pass → inconclusive (effect 0.81 → 0.6)")


def test_improved_is_not_failing():
    c = compare(run({("p", "c"): ("fail", 0.4)}), run({("p", "c"): ("pass", 0.45)}))
    assert row(c, "p", "c").status == "improved" and c.ok


def test_no_tolerance_means_effect_moves_never_fail():
    c = compare(run({("p", "c"): ("pass", 0.9)}), run({("p", "c"): ("pass", 0.55)}))
    assert row(c, "p", "c").status == "ok" and c.ok


def test_tolerance_abs():
    before, after = run({("p", "c"): ("pass", 0.8)}), run({("p", "c"): ("pass", 0.7)})
    bad = compare(before, after, tolerance_abs=0.05)
    r = row(bad, "p", "c")
    assert r.status == "regressed" and r.failing and not bad.ok
    assert "0.8 → 0.7" in r.message and "0.05" in r.message
    assert compare(before, after, tolerance_abs=0.2).ok
    # a rise beyond the tolerance is a drift too
    assert not compare(after, before, tolerance_abs=0.05).ok


def test_tolerance_rel():
    before, after = run({("p", "c"): ("pass", 0.8)}), run({("p", "c"): ("pass", 0.7)})
    assert row(compare(before, after, tolerance_rel=0.1), "p", "c").status == "regressed"  # 0.1 > 0.08
    assert compare(before, after, tolerance_rel=0.2).ok  # 0.1 <= 0.16
    # both given: within either is within (allowed = max(abs, rel·|before|))
    assert compare(before, after, tolerance_abs=0.01, tolerance_rel=0.2).ok
    assert not compare(before, after, tolerance_abs=0.01, tolerance_rel=0.1).ok


def test_claim_tolerance_overrides_global():
    before = run({("p", "c"): ("pass", 0.8)})
    loose = run({("p", "c"): ("pass", 0.7, {"abs": 0.5})})
    tight = run({("p", "c"): ("pass", 0.7, {"abs": 0.01})})
    rel = run({("p", "c"): ("pass", 0.7, {"rel": 0.2})})
    assert compare(before, loose, tolerance_abs=0.01).ok
    assert row(compare(before, tight, tolerance_abs=0.5), "p", "c").status == "regressed"
    assert compare(before, rel, tolerance_abs=0.01).ok
    # the AFTER record's tolerance is the one used
    assert compare(run({("p", "c"): ("pass", 0.8, {"abs": 0.5})}), tight).ok is False


def test_missing_always_fails_new_fails_only_with_strict():
    before = run({("p", "kept"): ("pass", 0.8), ("p", "gone"): ("pass", 0.5), ("old", "x"): ("fail", 0.1)})
    after = run({("p", "kept"): ("pass", 0.8), ("p", "added"): ("pass", 0.9), ("newprobe", "y"): ("pass", 1)})
    c = compare(before, after)
    assert not c.ok  # a baseline claim that was not measured never passes the gate
    assert row(c, "p", "added").status == "new" and not row(c, "p", "added").failing
    assert row(c, "newprobe", "y").status == "new"
    assert row(c, "p", "gone").status == "missing" and row(c, "p", "gone").failing
    assert row(c, "old", "x").status == "missing" and row(c, "old", "x").failing
    s = compare(before, after, strict=True)
    assert {(r.probe, r.claim) for r in s.rows if r.failing} == {
        ("probes/p.yaml", "added"), ("probes/newprobe.yaml", "y"), ("probes/p.yaml", "gone"),
        ("probes/old.yaml", "x")}


def test_missing_counts_only_claims_the_selection_asked_for():
    before = run({("p", "kept"): ("pass", 0.8), ("p", "gone"): ("pass", 0.5), ("old", "x"): ("fail", 0.1)})
    after = run({("p", "kept"): ("pass", 0.8)})
    after.collected_files = ["probes/p.yaml"]  # e.g. `pytest probes/p.yaml -k kept`
    after.deselected = ["probes/p.yaml::gone"]
    assert compare(before, after).ok
    after.deselected = []  # asked for but not measured (deleted from the file, interrupted, crashed)
    c = compare(before, after)
    assert not c.ok and row(c, "p", "gone").status == "missing"
    assert [r.claim for r in c.rows] == ["kept", "gone"]  # old::x was not asked for


def test_uncollectable_probe_fails_every_baseline_claim_of_it():
    before = run({("p", "c"): ("pass", 0.8), ("p", "d"): ("fail", 0.1)})
    after = run({}, errors={"p": "probes/p.yaml:3:5: claims.c.expct: unknown key 'expct'"})
    after.probes[0].collected = False
    after.collected_files = ["probes/p.yaml"]  # its claims are unknown: none was deselected
    c = compare(before, after)
    assert {r.status for r in c.rows} == {"errored"} and all(r.failing for r in c.rows)
    assert "could not be collected" in row(c, "p", "d").message and "expct" in row(c, "p", "d").message


def test_probe_error_now_fails_every_claim_of_it():
    before = run({("p", "c"): ("pass", 0.8), ("p", "d"): ("fail", 0.1)})
    after = run({}, errors={"p": "RuntimeError: boom"})
    c = compare(before, after)
    assert row(c, "p", "c").status == "errored" and row(c, "p", "c").failing
    assert "boom" in row(c, "p", "c").message
    assert row(c, "p", "d").status == "errored" and row(c, "p", "d").failing


def test_non_finite_effects_never_pass_a_tolerance():
    before = run({("p", "c"): ("pass", 0.8)})
    for bad in (float("nan"), float("inf"), float("-inf")):
        c = compare(before, run({("p", "c"): ("pass", bad)}), tolerance_abs=0.5)
        assert not c.ok and row(c, "p", "c").status == "regressed" and "not a finite" in row(c, "p", "c").message


def test_same_file_name_in_two_folders_are_two_probes():
    def two(effect_b: float) -> RunRecord:
        rec = RunRecord(model=ModelInfo(id="m", slug="m"))
        for folder, effect in (("a", 0.8), ("b", effect_b)):
            rec.probes.append(ProbeRecord(name="x", kind="logit_lens", file=f"{folder}/x.probe.yaml",
                                          claims=[ClaimResult(name="c", verdict="pass", effect=effect)]))
        return rec
    c = compare(two(0.8), two(0.1), tolerance_abs=0.05)
    assert [(r.probe, r.status) for r in c.rows] == [("a/x.probe.yaml", "ok"), ("b/x.probe.yaml", "regressed")]


def test_metadata_mismatch_gives_warnings():
    before = run({("p", "c"): ("pass", 0.8)}, seed=1, dtype="float32", file_hashes={"p": "aaaa"})
    after = run({("p", "c"): ("pass", 0.8)}, seed=2, dtype="bfloat16", file_hashes={"p": "bbbb"})
    with pytest.raises(BaselineError, match="made in float32 on cpu, this run in bfloat16 on cpu"):
        compare(before, after)  # another dtype is refused like another model (tests/test_model_identity.py)
    c = compare(before, after, allow_dtype_change=True)
    assert c.ok
    text = "\n".join(c.warnings)
    assert "seed" in text and "1 → 2" in text
    assert "numerics changed: baseline made in float32 on cpu, this run in bfloat16 on cpu" in text
    assert "probe p" in text and "aaaa → bbbb" in text


def test_model_mismatch_is_an_error_unless_allowed():
    before = run({("p", "c"): ("pass", 0.8)}, slug="smollm2")
    after = run({("p", "c"): ("pass", 0.8)}, slug="gpt2")
    with pytest.raises(BaselineError) as e:
        compare(before, after)
    assert "smollm2" in str(e.value) and "gpt2" in str(e.value) and "\n" not in str(e.value)
    c = compare(before, after, allow_model_change=True)
    assert c.ok and any("smollm2" in w and "gpt2" in w for w in c.warnings)
    # same slug, different weights hash: a new revision of the same model, compared with a warning
    c = compare(run({}, model_hash="h1"), run({}, model_hash="h2"))
    assert c.ok and any("weights changed" in w for w in c.warnings)
    assert compare(run({}, model_hash="h1"), run({}, model_hash="")).ok  # unknown hash: no error


def test_format_comparison():
    before = run({("p", "c"): ("pass", 0.81)}, seed=1)
    after = run({("p", "c"): ("fail", 0.12)}, seed=2)
    text = format_comparison(compare(before, after))
    assert "probe" in text and "status" in text and "FLIPPED" in text
    assert "pass → fail (effect 0.81 → 0.12)" in text
    assert "warning: seed differs" in text and "FAILED" in text
    assert "OK" in format_comparison(compare(before, before))


# ---------------------------------------------------------------- files


def test_baseline_path_and_save_load(tmp_path):
    rec = run({("p", "c"): ("pass", 0.8)}, slug="smollm2")
    assert baseline_path(tmp_path, "smollm2", "main") == tmp_path / "baselines" / "smollm2" / "main.json"
    path = save_baseline(rec, tmp_path, "main")
    assert path == tmp_path / "baselines" / "smollm2" / "main.json"
    assert load_report("main", tmp_path, "smollm2") == rec
    assert load_report(path, tmp_path, "smollm2") == rec
    assert load_report(str(path)) == rec
    for bad in ("../evil", "a/b", "", ".hidden", "x.json"):
        with pytest.raises(BaselineError):
            save_baseline(rec, tmp_path, bad)


def _err(*args) -> str:
    with pytest.raises(BaselineError) as e:
        load_report(*args)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_load_errors(tmp_path):
    missing = tmp_path / "nope.json"
    assert str(missing) in _err(missing) and "not found" in _err(missing)

    save_baseline(run({}, slug="m"), tmp_path, "main")
    msg = _err("release", tmp_path, "m")
    assert "release" in msg and "release.json" in msg and "available: main" in msg

    notjson = tmp_path / "bad.json"
    notjson.write_text("{not json")
    assert str(notjson) in _err(notjson) and "not JSON" in _err(notjson)

    for content in ([1, 2], {"tool": "other", "schema_version": SCHEMA_VERSION}, {"hello": 1}):
        other = tmp_path / "other.json"
        other.write_text(json.dumps(content))
        assert "not a modelprobe report" in _err(other) and str(other) in _err(other)

    data = run({("p", "c"): ("pass", 0.8)}).model_dump(mode="json")
    data["probes"][0]["claims"][0]["verdict"] = "maybe"
    invalid = tmp_path / "invalid.json"
    invalid.write_text(json.dumps(data))
    msg = _err(invalid)
    assert str(invalid) in msg and "probes.0.claims.0.verdict" in msg

    data = run({}).model_dump(mode="json")
    data["schema_version"] = SCHEMA_VERSION + 1
    future = tmp_path / "future.json"
    future.write_text(json.dumps(data))
    msg = _err(future)
    assert "schema_version" in msg and str(future) in msg and str(SCHEMA_VERSION + 1) in msg


# ---------------------------------------------------------------- CLI


@pytest.fixture
def reports(tmp_path):
    def write(name: str, rec: RunRecord) -> str:
        return str(write_json(rec, tmp_path / name))

    return write


def test_cli_exit_codes(reports, capsys, tmp_path):
    a = reports("a", run({("p", "c"): ("pass", 0.81)}))
    same = reports("same", run({("p", "c"): ("pass", 0.80)}))
    flipped = reports("flipped", run({("p", "c"): ("fail", 0.12)}))
    other_model = reports("other", run({("p", "c"): ("pass", 0.81)}, slug="gpt2"))

    assert cli_compare([a, same]) == 0
    out = capsys.readouterr().out
    assert "p" in out and "OK" in out

    assert cli_compare([a, flipped]) == 1
    assert "pass → fail (effect 0.81 → 0.12)" in capsys.readouterr().out

    assert cli_compare([a, same, "--tolerance-abs", "0.001"]) == 1
    assert cli_compare([a, same, "--tolerance-rel", "0.5"]) == 0

    assert cli_compare([a, str(tmp_path / "missing.json")]) == 2
    err = capsys.readouterr().err
    assert "missing.json" in err and "Traceback" not in err

    assert cli_compare([a, other_model]) == 2
    assert "gpt2" in capsys.readouterr().err
    assert cli_compare([a, other_model, "--allow-model-change"]) == 0

    more = reports("more", run({("p", "c"): ("pass", 0.81), ("p", "new"): ("pass", 1.0)}))
    assert cli_compare([a, more]) == 0
    assert cli_compare([a, more, "--strict"]) == 1
    assert cli_compare([more, a]) == 1  # p::new is in the baseline and missing now
    assert "MISSING" in capsys.readouterr().out


def test_cli_resolves_baseline_names(reports, tmp_path, capsys):
    save_baseline(run({("p", "c"): ("pass", 0.81)}), tmp_path, "main")
    now = reports("now", run({("p", "c"): ("fail", 0.2)}))
    assert cli_compare(["main", now, "--report-dir", str(tmp_path)]) == 1
    assert cli_compare(["nosuch", now, "--report-dir", str(tmp_path)]) == 2
    assert "nosuch" in capsys.readouterr().err
    assert cli_compare(["main", "other"]) == 2
    assert cli_compare(["--bogus-flag"]) == 2
