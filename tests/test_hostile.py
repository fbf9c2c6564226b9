"""Issue 8, as a table: what a hostile user tries, the exit status they must get, and the one line that says why.

Every row runs the real entry point in-process (pytester for `pytest probes`, `modelprobe.cli.main` for the
CLI) on the tiny copy model. No row may show a traceback, hang, or pass without a measurement.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from modelprobe.cli import main
from modelprobe.kinds import KINDS
from tests.helpers.toy_models import copy_task_rows, save_copy_model, write_jsonl

SKELETONS = {name: KINDS[name].skeleton for name in KINDS}

GOOD = """\
kind: logit_lens
prompts: data/copy.jsonl
claims:
  early:
    expect: {median_first_layer: {at_most: 0.5}}
"""


def lens(claim: str = "    expect: {final_accuracy: {at_least: 0.5}}\n", head: str = "", name: str = "c") -> str:
    return f"kind: logit_lens\n{head}prompts: data/copy.jsonl\nclaims:\n  {name}:\n{claim}"


DIRECTION = """\
kind: direction
prompts: {{positive: data/copy.jsonl, negative: data/copy.jsonl}}
behaviour: {{grader: refusal}}
claims:
  c:
    intervention: add
    on: negative
    {extra}
    expect: {{rate_rise: {{at_least: 0.5}}}}
"""

WEIGHTS = """\
kind: weight_perturbation
behaviour: {{prompts: data/copy.jsonl, grader: {{substrings: [sorry]}}, score_tokens: [sorry], split: {{rank: 4, test: 4}}}}
groups: {{by: {by}}}
noise: {{relative: {rel}, seeds: {seeds}}}
claims:
  c: {{top: {top}, expect: {{rate_change: {{at_least: 0.3}}}}}}
specificity: {{prompts: {neutral}, min_agreement: {agree}}}
"""


def weights(by: str = "block_sublayer", rel: float = 0.05, seeds: int = 2, top: int = 1,
            neutral: str = "data/copy.jsonl", agree: float = 0.75) -> dict[str, str]:
    return {"bad.probe.yaml": WEIGHTS.format(by=by, rel=rel, seeds=seeds, top=top, neutral=neutral, agree=agree)}


ALIAS_BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n" for p, c in zip("abcdefgh", "bcdefghi"))

NON_UTF8 = b"kind: logit_lens\nabout: caf\xe9\n"

# (case id, {path under probes/: text or bytes}, extra pytest args, exit status, fragment of the one line)
USAGE = pytest.ExitCode.USAGE_ERROR
FAILED = pytest.ExitCode.TESTS_FAILED
PYTEST_CASES = [
    ("batch_size_negative", {}, ["--probe-batch-size=-1"], USAGE, "--probe-batch-size=-1: must be between 1"),
    ("batch_size_zero", {}, ["--probe-batch-size=0"], USAGE, "--probe-batch-size=0: must be between 1"),
    ("threads_negative", {}, ["--probe-threads=-1"], USAGE, "--probe-threads=-1: must be between 0"),
    ("device_banana", {}, ["--probe-device=banana"], USAGE, "--probe-device=banana: expected cpu, cuda"),
    ("dtype_unknown", {}, ["--probe-dtype=float8"], USAGE, "--probe-dtype=float8: expected one of float32"),
    ("ini_batch_size_text", {}, ["-o", "probe_batch_size=abc"], USAGE,
     "ini option probe_batch_size = 'abc': expected auto or a whole number"),
    ("ini_bool_text", {}, ["-o", "probe_strict=maybe"], USAGE,
     "ini option probe_strict = 'maybe': expected true or false"),
    ("model_empty", {}, ["--model="], USAGE, "--model=: must not be empty"),
    ("tolerance_text", {}, ["--probe-compare=x.json", "--probe-tolerance=lots"], USAGE,
     "--probe-tolerance=lots: expected e.g. 0.05"),
    ("tolerance_nan", {}, ["--probe-compare=x.json", "--probe-tolerance=abs:nan"], USAGE,
     "nan is not a finite number >= 0"),
    ("tolerance_without_compare", {}, ["--probe-tolerance=0.05"], USAGE, "--probe-tolerance needs --probe-compare"),
    ("save_outside", {}, ["--probe-save=../../x"], USAGE, "--probe-save=../../x: a baseline NAME"),
    ("threshold_nan", {"bad.probe.yaml": lens("    expect: {final_accuracy: {at_least: .nan}}\n")}, [], FAILED,
     "bad.probe.yaml:5:41: claims.c.expect.final_accuracy.at_least: Input should be a finite number"),
    ("threshold_inf", {"bad.probe.yaml": lens("    expect: {median_first_layer: {at_most: .inf}}\n")}, [], FAILED,
     "claims.c.expect.median_first_layer.at_most: Input should be a finite number"),
    ("threshold_minus_inf", {"bad.probe.yaml": lens("    expect: {median_first_layer: {at_least: -.inf}}\n")}, [],
     FAILED, "at_least: Input should be a finite number"),
    ("threshold_1e400", {"bad.probe.yaml": lens("    expect: {median_first_layer: {at_least: 1e400}}\n")}, [],
     FAILED, "at_least: Input should be a finite number"),
    ("rate_below_zero", {"bad.probe.yaml": lens("    expect: {final_accuracy: {at_least: -0.5}}\n")}, [], FAILED,
     "claims.c.expect.final_accuracy: at_least: -0.5 is outside the statistic's range [0, 1]"),
    ("rate_above_one", {"bad.probe.yaml": lens("    expect: {final_accuracy: {at_least: 1.5}}\n")}, [], FAILED,
     "at_least: 1.5 is outside the statistic's range [0, 1]"),
    ("rate_that_cannot_fail", {"bad.probe.yaml": lens("    expect: {final_accuracy: {at_least: 0}}\n")}, [],
     FAILED, "at_least: 0 can never fail"),
    ("top_k_36_digits", {"bad.probe.yaml": lens("    top_k: 123456789012345678901234567890123456\n"
                                                "    expect: {final_accuracy: {at_least: 0.5}}\n")}, [], FAILED,
     "claims.c.top_k: Input should be less than or equal to 1000000"),
    ("seed_negative", {"bad.probe.yaml": lens(head="seed: -5\n")}, [], FAILED,
     "bad.probe.yaml:2:7: seed: Input should be greater than or equal to 0"),
    ("scale_nan", {"bad.probe.yaml": DIRECTION.format(extra="scale: .nan")}, [], FAILED,
     "claims.c.scale: Input should be a finite number"),
    ("claim_name_colons", {"bad.probe.yaml": lens(name="a::b")}, [], FAILED,
     "claim name 'a::b' may hold only letters, digits and '_'"),
    ("claim_name_brackets", {"bad.probe.yaml": lens(name="x[1]")}, [], FAILED, "claim name 'x[1]' may hold only"),
    ("claim_name_empty", {"bad.probe.yaml": lens(name='""')}, [], FAILED, "claim name '' may hold only"),
    ("tag_with_space", {"bad.probe.yaml": lens(head="tags: [fine, not fine]\n")}, [], FAILED,
     "tag 'not fine' must be a Python identifier"),
    ("empty_probe_name", {".probe.yaml": GOOD}, [], FAILED, ".probe.yaml: the file name gives an empty probe name"),
    ("yaml_alias_bomb", {"bomb.probe.yaml": ALIAS_BOMB}, [], FAILED,
     "bomb.probe.yaml:1:4: <yaml>: YAML anchors and aliases"),
    ("binary_probe", {"bin.probe.yaml": b"\x7fELF\x00\x01\x02"}, [], FAILED,
     "bin.probe.yaml:1:1: a binary file, not text (NUL byte)"),
    ("non_utf8_probe", {"latin.probe.yaml": NON_UTF8}, [], FAILED, "latin.probe.yaml:2:11: not UTF-8 text (byte 0xe9)"),
    ("huge_probe", {"huge.probe.yaml": "# padding\n" * 120_000}, [], FAILED,
     "huge.probe.yaml: file is 1200000 bytes, over the limit of 1048576"),
    ("non_utf8_jsonl", {"data/latin.jsonl": b'{"prompt": "a", "answer": " b"}\n{"prompt": "caf\xe9"}\n',
                        "bad.probe.yaml": GOOD.replace("copy.jsonl", "latin.jsonl")}, [], FAILED,
     "data/latin.jsonl:2:16: not UTF-8 text (byte 0xe9)"),
    ("invalid_json_jsonl", {"data/broken.jsonl": '{"prompt": "a", "answer": " b"}\n{"prompt": \n',
                            "bad.probe.yaml": GOOD.replace("copy.jsonl", "broken.jsonl")}, [], FAILED,
     "data/broken.jsonl:2:12: not valid JSON: Expecting value"),
    ("data_path_absolute", {"bad.probe.yaml": GOOD.replace("data/copy.jsonl", "/etc/passwd")}, [], FAILED,
     "bad.probe.yaml:2:10: prompts: data file '/etc/passwd' is outside the probe's folder and the rootdir"),
    ("data_path_climbs_out", {"bad.probe.yaml": GOOD.replace("data/copy.jsonl", "../../../../../etc/hostname")},
     [], FAILED, "data file '../../../../../etc/hostname' is outside the probe's folder"),
    ("data_is_a_fifo", {"data/fifo.jsonl": "FIFO", "bad.probe.yaml": GOOD.replace("copy.jsonl", "fifo.jsonl")},
     [], FAILED, "data/fifo.jsonl: not a regular file (a FIFO): refused"),
    ("probe_is_a_fifo", {"fifo.probe.yaml": "FIFO"}, [], FAILED, "fifo.probe.yaml: not a regular file (a FIFO)"),
    ("weights_noise_zero", weights(rel=0), [], FAILED,
     "bad.probe.yaml:4:19: noise.relative: Input should be greater than 0"),
    ("weights_noise_negative", weights(rel=-0.5), [], FAILED,
     "bad.probe.yaml:4:19: noise.relative: Input should be greater than 0"),
    ("weights_seeds_zero", weights(seeds=0), [], FAILED,
     "bad.probe.yaml:4:32: noise.seeds: Input should be greater than or equal to 1"),
    ("weights_unknown_scheme", weights(by="columns"), [], FAILED,
     "bad.probe.yaml:3:14: groups.by: Input should be 'block_sublayer', 'attention_head'"),
    ("weights_top_too_large", weights(top=9), [], FAILED,
     "bad.probe.yaml:6:12: claims.c.top: top 9 is not smaller than the 8 groups of 'block_sublayer'"),
    ("weights_min_agreement_above_one", weights(agree=1.5), [], FAILED,
     "bad.probe.yaml:7:56: specificity.min_agreement: Input should be less than or equal to 1"),
    ("weights_neutral_missing", weights(neutral="data/nowhere.jsonl"), [], FAILED,
     "bad.probe.yaml:7:24: specificity.prompts: data file"),
    ("probe_is_a_symlink_loop", {"loop.probe.yaml": "LOOP"}, [], FAILED,
     "loop.probe.yaml: cannot read file: Too many levels of symbolic links"),
]


def _materialise(root: Path, files: dict[str, str | bytes]) -> None:
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if content == "FIFO":
            os.mkfifo(path)
        elif content == "LOOP":
            path.symlink_to(path.name)
        elif isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)


@pytest.fixture(scope="module")
def copy_model(tmp_path_factory) -> Path:
    return save_copy_model(tmp_path_factory.mktemp("hostile") / "toy")


@pytest.fixture
def probes(pytester) -> Path:
    write_jsonl(pytester.path / "probes" / "data" / "copy.jsonl", copy_task_rows())
    (pytester.path / "probes" / "good.probe.yaml").write_text(GOOD)
    return pytester.path / "probes"


def _run(pytester, model: Path, *args: str):
    return pytester.runpytest("probes", f"--model={model}", "--probe-report-dir=out", "-p", "no:cacheprovider",
                              "-p", "no:randomly", *args)


@pytest.mark.parametrize("case, files, args, status, fragment", PYTEST_CASES, ids=[c[0] for c in PYTEST_CASES])
def test_pytest_run(pytester, probes, copy_model, case, files, args, status, fragment):
    _materialise(probes, files)
    result = _run(pytester, copy_model, *args)
    out = result.stdout.str() + result.stderr.str()
    assert result.ret == status, out
    assert fragment in out
    assert "Traceback" not in out
    if status == FAILED:  # a bad probe is an error in the report too, and the good probe still ran
        rec = json.loads((pytester.path / "out" / "toy" / "report.json").read_text())
        errors = [p["error"] for p in rec["probes"] if p["error"]]
        assert len(errors) == 1 and fragment.split(": ", 1)[-1][:30] in errors[0]
        assert any(p["file"] == "probes/good.probe.yaml" and p["claims"] for p in rec["probes"])


# --------------------------------------------------------------------------- broken models


def test_garbage_gguf_and_truncated_safetensors_are_one_line_per_claim(pytester, probes, copy_model, tmp_path):
    garbage = tmp_path / "junk.gguf"
    garbage.write_bytes(b"not a model at all" * 100)
    result = _run(pytester, garbage)
    assert result.ret == FAILED and "Traceback" not in result.stdout.str()
    result.stdout.fnmatch_lines(["*junk.gguf' is not a GGUF file*"])

    import shutil
    broken = tmp_path / "broken"
    shutil.copytree(copy_model, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 3])
    result = _run(pytester, broken)
    assert result.ret == FAILED and "Traceback" not in result.stdout.str()
    result.stdout.fnmatch_lines(["*ERROR: probe could not be measured: *model.safetensors' is truncated: its tensors need*"])


def test_strict_markers_without_xdist(pytester, probes, copy_model):
    result = _run(pytester, copy_model, "-p", "no:xdist", "-p", "no:benchmark", "--strict-markers", "-W", "error::pytest.PytestWarning")
    result.assert_outcomes(passed=1)
    assert "xdist_group" not in result.stdout.str()


# --------------------------------------------------------------------------- CLI

CLI_CASES = [
    # (case id, files under the working directory, argv, exit status, fragment of stdout+stderr)
    ("validate_alias_bomb", {"p/bomb.probe.yaml": ALIAS_BOMB}, ["validate", "p"], 1, "YAML anchors and aliases"),
    ("validate_fifo", {"p/fifo.probe.yaml": "FIFO"}, ["validate", "p"], 1, "not a regular file (a FIFO)"),
    ("validate_binary_then_good", {"p/a.probe.yaml": b"\x00\x01", "p/data/copy.jsonl": '{"prompt": "a", "answer": " b"}\n',
                                   "p/b.probe.yaml": GOOD}, ["validate", "p"], 1, "p/b.probe.yaml: ok"),
    ("validate_invalid_jsonl_without_model", {"p/data/copy.jsonl": '{"prompt": "a"\n', "p/x.probe.yaml": GOOD},
     ["validate", "p"], 1, "p/data/copy.jsonl:1:15: not valid JSON"),
    ("validate_data_outside", {"p/x.probe.yaml": GOOD.replace("data/copy.jsonl", "/etc/passwd")},
     ["validate", "p"], 1, "is outside the probe's folder"),
    ("new_directory_is_a_file", {"afile": "x"}, ["new", "logit_lens", "n", "--directory", "afile"], 2,
     "modelprobe: --directory afile is not a directory"),
    ("new_name_with_path", {}, ["new", "logit_lens", "../n"], 2, "probe name '../n'"),
    ("schema_unwritable", {"afile": "x"}, ["schema", "-o", "afile/schema.json"], 2,
     "modelprobe: cannot write afile/schema.json: "),
]


@pytest.mark.parametrize("case, files, argv, status, fragment", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli(tmp_path, monkeypatch, capsys, case, files, argv, status, fragment):
    monkeypatch.chdir(tmp_path)
    _materialise(tmp_path, files)
    assert main(argv) == status
    out = capsys.readouterr()
    assert fragment in out.out + out.err and "Traceback" not in out.out + out.err


@pytest.mark.parametrize("kind", sorted(SKELETONS))
def test_fresh_skeleton_validates(tmp_path, monkeypatch, capsys, kind):
    monkeypatch.chdir(tmp_path)
    assert main(["new", kind, "mine", "--directory", "fresh"]) == 0
    assert main(["validate", "fresh"]) == 0, capsys.readouterr().out


def _report(tmp_path: Path, name: str, probes: list[dict], slug: str = "toy") -> str:
    rec = {"tool": "modelprobe", "schema_version": 1, "model": {"id": slug, "slug": slug}, "probes": probes}
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(rec))
    return str(path)


def _probe(file: str, effect: float, name: str = "c") -> dict:
    return {"name": Path(file).name, "kind": "logit_lens", "file": file,
            "claims": [{"name": name, "verdict": "pass", "effect": effect}]}


COMPARE_CASES = [
    # (case id, baseline probes, this run's probes, extra args, exit status, fragment)
    ("nan_effect", [_probe("a.probe.yaml", 0.8)], [_probe("a.probe.yaml", float("nan"))],
     ["--tolerance-abs", "0.1"], 1, "not a finite number"),
    ("inf_effect", [_probe("a.probe.yaml", 0.8)], [_probe("a.probe.yaml", float("inf"))], [], 1, "REGRESSED"),
    ("model_change_nothing_matched", [_probe("a.probe.yaml", 0.8)], [_probe("b.probe.yaml", 0.8)],
     ["--allow-model-change"], 1, "1 missing"),
    ("baseline_claim_missing", [_probe("a.probe.yaml", 0.8), _probe("b.probe.yaml", 0.8)],
     [_probe("a.probe.yaml", 0.8)], [], 1, "probe not measured in this run"),
    ("duplicate_probes", [_probe("a.probe.yaml", 0.8), _probe("a.probe.yaml", 0.1)], [_probe("a.probe.yaml", 0.8)],
     [], 2, "lists probe a.probe.yaml more than once"),
    ("tolerance_nan", [_probe("a.probe.yaml", 0.8)], [_probe("a.probe.yaml", 0.8)], ["--tolerance-abs", "nan"], 2,
     "argument --tolerance-abs: 'nan' is not a finite number >= 0"),
    ("tolerance_negative", [_probe("a.probe.yaml", 0.8)], [_probe("a.probe.yaml", 0.8)], ["--tolerance-rel", "-1"],
     2, "argument --tolerance-rel: '-1' is not a finite number >= 0"),
]


@pytest.mark.parametrize("case, before, after, args, status, fragment", COMPARE_CASES,
                         ids=[c[0] for c in COMPARE_CASES])
def test_compare(tmp_path, capsys, case, before, after, args, status, fragment):
    a = _report(tmp_path, "before", before, slug="other" if case == "model_change_nothing_matched" else "toy")
    b = _report(tmp_path, "after", after)
    assert main(["compare", a, b, *args]) == status
    out = capsys.readouterr()
    assert fragment in out.out + out.err and "Traceback" not in out.out + out.err


def test_compare_deeply_nested_json_is_one_line(tmp_path, capsys):
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    ok = _report(tmp_path, "ok", [_probe("a.probe.yaml", 0.8)])
    assert main(["compare", str(deep), ok]) == 2
    err = capsys.readouterr().err
    assert "deep.json" in err and "nested too deeply" in err and "Traceback" not in err
