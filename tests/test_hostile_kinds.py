"""Issue 23, as tables: a second hostile trial on the newer kinds, `modelprobe find` / `discover` and the gate.

Every row runs a real entry point (`modelprobe.cli.main`, or pytester for `pytest probes`) and checks the
exit status, the one located line that says why, and that nothing passed. Probe rows start from the
fresh `modelprobe new KIND` skeleton and change one thing, as a careless user would.
"""

from __future__ import annotations

import json
import typing
from pathlib import Path

import numpy as np
import pytest
from pydantic import BaseModel

from modelprobe.cli import main
from modelprobe.kinds import KINDS
from modelprobe.spec import ClaimName, Threshold

# --------------------------------------------------------------------------- one rule for every kind

# Statistics with no fixed range, each with why; any other threshold must be bounded (rates in [0, 1],
# differences of rates and correlations in [-1, 1]) so that a threshold that can never fail is refused.
UNBOUNDED = {
    ("circuit", "faithfulness"): "a ratio of metric differences: any real number",
    ("circuit", "min_drop"): "a difference of faithfulness: any real number",
    ("feature", "metric_drop"): "a difference of log-probabilities",
    ("logit_lens", "median_first_layer"): "a layer fraction, ranged by its own validator",
    ("icl_update", "max_rel_error"): "a relative error, ranged by IclExpect (0 < at_most < 1)",
    ("icl_update", "gain_recovered"): "a share of a gain that can be negative or above 1, ranged by IclExpect",
    ("injection_protocol", "think_rise"): "a difference of projections, in units of the concept vector's norm",
}
RATE_WORDS = ("rate", "accuracy", "auroc", "coherence", "share", "agreement")


def _models(annotation: typing.Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models(arg)]


def _walk(model: type[BaseModel], seen: set) -> typing.Iterator[tuple[type[BaseModel], str, typing.Any]]:
    if model in seen:
        return
    seen.add(model)
    for name, info in model.model_fields.items():
        yield model, name, info
        for sub in _models(info.annotation):
            yield from _walk(sub, seen)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_kind_uses_the_shared_types(kind):
    spec = KINDS[kind].Spec
    claims = spec.model_fields["claims"].annotation
    assert typing.get_origin(claims) is dict and typing.get_args(claims)[0] == ClaimName, \
        f"{kind}: claims must be dict[ClaimName, ...]"
    for model, name, info in _walk(spec, set()):
        if name == "seed" or name.endswith("_seed"):
            assert any(getattr(m, "ge", None) == 0 for m in info.metadata), f"{kind}.{model.__name__}.{name}: not a Seed"
        for th in (m for m in _models(info.annotation) if issubclass(m, Threshold)):
            low, high = th.bounds
            if (kind, name) in UNBOUNDED:
                continue
            assert np.isfinite(low) and np.isfinite(high), f"{kind}.{name}: {th.__name__} is unbounded"
            if any(w in name for w in RATE_WORDS):
                assert -1 <= low and high <= 1, f"{kind}.{name}: a rate threshold outside [-1, 1]"


def test_the_unbounded_list_names_real_statistics():
    fields = {(k, n) for k in KINDS for _, n, _ in _walk(KINDS[k].Spec, set())}
    assert set(UNBOUNDED) <= fields


# --------------------------------------------------------------------------- probe files, no model

def _safetensors(path: Path, **tensors: np.ndarray) -> Path:
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}, str(path))
    return path


def _truncated(path: Path) -> Path:
    _safetensors(path, direction=np.ones(64))
    path.write_bytes(path.read_bytes()[:-40])
    return path


def _sae(folder: Path, w_enc: np.ndarray) -> None:
    folder.mkdir()
    (folder / "cfg.json").write_text(json.dumps({"d_in": 4, "d_sae": 3, "hook_name": "blocks.0.hook_resid_post"}))
    _safetensors(folder / "sae_weights.safetensors", W_enc=w_enc, b_enc=np.zeros(3), W_dec=np.ones((3, 4)),
                 b_dec=np.zeros(4))


def _sae_truncated(folder: Path) -> None:
    _sae(folder, np.ones((4, 3)))
    weights = folder / "sae_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8])


SAE_ZERO_LATENT = np.ones((4, 3))
SAE_ZERO_LATENT[:, 1] = 0
SAE_NAN = np.ones((4, 3))
SAE_NAN[2, 0] = np.nan
DIRECTION_UNIT = ('unit: {layer: 10, component: mlp.post, neuron: 1234}',
                  'unit: {direction: d.safetensors, layer: 0, component: resid_post}')
FILES = {
    "zero_direction": lambda d: _safetensors(d / "d.safetensors", direction=np.zeros(64)),
    "nan_direction": lambda d: _safetensors(d / "d.safetensors", direction=np.r_[np.ones(63), np.nan]),
    "truncated_direction": lambda d: _truncated(d / "d.safetensors"),
    "sae_zero_latent": lambda d: _sae(d / "sae", SAE_ZERO_LATENT),
    "sae_nan": lambda d: _sae(d / "sae", SAE_NAN),
    "sae_truncated": lambda d: _sae_truncated(d / "sae"),
}
SAE_UNIT = ('unit: {layer: 10, component: mlp.post, neuron: 1234}', 'unit: {sae: sae, latent: 1}')

# (case id, kind, [(old, new) text edits of the skeleton], files to add, the line's fragment)
VALIDATE_CASES = [
    ("injection_rate_above_one", "injection", [("{rate: {at_most: 0.05}}", "{rate: {at_most: 1.5}}")], None,
     "claims.no_false_alarms.expect.rate: at_most: 1.5 is outside the statistic's range [0, 1]"),
    ("injection_rate_below_zero", "injection", [("{rate: {at_least: 0.05}}", "{rate: {at_least: -1}}")], None,
     "claims.detects_and_names.expect.rate: at_least: -1 is outside the statistic's range [0, 1]"),
    ("injection_coherence_cannot_fail", "injection", [("{at_least: 0.8}", "{at_least: 0}")], None,
     "expect.coherence: at_least: 0 can never fail"),
    ("injection_yes_rate_rise_cannot_fail", "injection", [("{yes_rate_rise: {at_most: 0.05}}",
                                                           "{yes_rate_rise: {at_most: 1}}")], None,
     "expect.yes_rate_rise: at_most: 1 can never fail"),
    ("backpatch_break_rate_above_one", "backpatch", [("{at_most: 0.1}", "{at_most: 1.5}")], None,
     "claims.few_breaks.expect.break_rate: at_most: 1.5 is outside the statistic's range [0, 1]"),
    ("backpatch_fix_rate_negative", "backpatch", [("{fix_rate: {at_least: 0.1}}", "{fix_rate: {at_least: -1}}")],
     None, "expect.fix_rate: at_least: -1 is outside"),
    ("patchscope_decode_rate_cannot_fail", "patchscope", [("{at_least: 0.3}", "{at_least: 0}")], None,
     "expect.decode_rate: at_least: 0 can never fail"),
    ("icl_spearman_cannot_fail", "icl_update", [("{at_most: -0.5}", "{at_least: -1}")], None,
     "expect.spearman_rho: at_least: -1 can never fail"),
    ("injection_claim_name", "injection", [("  stays_coherent:", "  stays::coherent:")], None,
     "claim name 'stays::coherent' may hold only"),
    ("backpatch_claim_name", "backpatch", [("  few_breaks:", "  few[1]:")], None, "claim name 'few[1]' may hold only"),
    ("patchscope_claim_name", "patchscope", [("  bridge_decodable_mid_depth:", "  a b:")], None,
     "claim name 'a b' may hold only"),
    ("feature_claim_name", "feature", [("  correlates:", "  co::rr:")], None, "claim name 'co::rr' may hold only"),
    ("icl_claim_name", "icl_update", [("  converges:", "  con-verges:")], None, "claim name 'con-verges' may hold"),
    ("circuit_unbeatable_control", "circuit", [("random_circuits: 100", "random_circuits: 10")], None,
     "controls.random_circuits: with 10 random circuits the empirical p-value is at least 1/11"),
    ("injection_split_seed_negative", "injection", [("seed: 0}", "seed: -1}")], None,
     "split.seed: Input should be greater than or equal to 0"),
    ("backpatch_split_seed_negative", "backpatch", [("seed: 0}", "seed: -1}")], None,
     "split.seed: Input should be greater than or equal to 0"),
    ("injection_unknown_placeholder", "injection", [('"Tell me about {word}"', '"Tell me about {word} and {topic}"')],
     None, "vector.template: only {word} may appear in braces"),
    ("regex_catastrophic", "weight_perturbation", [("grader: refusal ", "grader: {regex: '(?:(a|aa)+)+\\1\\1b'} ")],
     None, "behaviour.grader.regex: the grader's regex does not finish within"),
    ("judge_outside", "injection", [("grader: rules ", "grader: {judge: /etc} ")], None,
     "grader.judge: data file '/etc' is outside the probe's folder"),
    ("judge_climbs_out", "injection", [("grader: rules ", "grader: {judge: ../../../../../../usr/lib} ")], None,
     "grader.judge: data file '../../../../../../usr/lib' is outside"),
    ("task_missing_outside", "function_vector", [("data/icl_first_country_capital.jsonl", "/no/such/file.jsonl")],
     None, "data file '/no/such/file.jsonl' is outside the probe's folder"),
    ("task_existing_outside", "function_vector", [("data/icl_first_country_capital.jsonl", "/etc/hostname")],
     None, "data file '/etc/hostname' is outside the probe's folder"),
    ("direction_all_zeros", "feature", [DIRECTION_UNIT], "zero_direction",
     "p/d.safetensors: tensor 'direction' is all zeros"),
    ("direction_nan", "feature", [DIRECTION_UNIT], "nan_direction",
     "p/d.safetensors: tensor 'direction' holds 1 values that are not finite"),
    ("direction_truncated", "feature", [DIRECTION_UNIT], "truncated_direction",
     "p/d.safetensors: truncated: its tensors need"),
    ("sae_latent_zero", "feature", [SAE_UNIT], "sae_zero_latent",
     "p/sae/sae_weights.safetensors: latent 1's encoder column W_enc[:, 1] is all zeros"),
    ("sae_nan", "feature", [SAE_UNIT], "sae_nan", "tensor 'W_enc' holds 1 values that are not finite"),
    ("sae_truncated", "feature", [SAE_UNIT], "sae_truncated", "p/sae/sae_weights.safetensors: truncated: its tensors"),
]


@pytest.mark.parametrize("case, kind, edits, files, fragment", VALIDATE_CASES, ids=[c[0] for c in VALIDATE_CASES])
def test_validate(tmp_path, monkeypatch, capsys, case, kind, edits, files, fragment):
    monkeypatch.chdir(tmp_path)
    assert main(["new", kind, "x", "--directory", "p"]) == 0
    probe = tmp_path / "p" / "x.probe.yaml"
    text = probe.read_text()
    for old, new in edits:
        assert old in text, old
        text = text.replace(old, new)
    probe.write_text(text)
    if files:
        FILES[files](tmp_path / "p")
    capsys.readouterr()
    assert main(["validate", "p"]) == 1
    out = capsys.readouterr().out
    line = next((ln for ln in out.splitlines() if fragment in ln), None)
    assert line is not None, out
    assert line.startswith("p/x.probe.yaml:") and "Traceback" not in out and "x.probe.yaml: ok" not in out


def test_outside_is_decided_before_existence(tmp_path, monkeypatch, capsys):
    """A probe file cannot tell a missing path outside from an existing one: both answers are the same."""
    monkeypatch.chdir(tmp_path)
    answers = []
    assert main(["new", "logit_lens", "x", "--directory", "p"]) == 0
    probe = tmp_path / "p" / "x.probe.yaml"
    skeleton = probe.read_text()
    for target in ("/etc/hostname", "/etc/no-such-file-here"):
        probe.write_text(skeleton.replace("data/capitals.jsonl", target))
        capsys.readouterr()
        assert main(["validate", "p"]) == 1
        answers.append(capsys.readouterr().out.replace(target, "TARGET"))
    assert answers[0] == answers[1] and "is outside the probe's folder" in answers[0]


def test_a_link_inside_that_leads_outside_is_outside(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["new", "logit_lens", "x", "--directory", "p"]) == 0
    (tmp_path / "p" / "data" / "capitals.jsonl").unlink()
    (tmp_path / "p" / "data" / "capitals.jsonl").symlink_to("/etc/hostname")
    assert main(["validate", "p"]) == 1
    out = capsys.readouterr().out
    assert "p/x.probe.yaml:" in out and "data file 'data/capitals.jsonl' is outside" in out and ": ok" not in out


# --------------------------------------------------------------------------- `pytest probes` on tiny models

USAGE = pytest.ExitCode.USAGE_ERROR
FAILED = pytest.ExitCode.TESTS_FAILED
ICV = """\
kind: icv
demos: {pairs: data/pairs.jsonl}
queries: {prompts: data/queries.jsonl, chat_template: false}
behaviour: {grader: {substrings: [t1]}, max_new_tokens: 4}
claims:
  c:
    expect: {rate_rise: {at_least: 0.5}}
"""
QUERIES = "".join(json.dumps({"prompt": f"t{i} t{i + 1}"}) + "\n" for i in range(8))


def _pairs(*pairs: tuple[str, str]) -> str:
    return "".join(json.dumps({"source": s, "target": t}) + "\n" for s, t in pairs)


def _icl(claims: str) -> dict[str, str]:
    rows = "".join(json.dumps({"input": f"t{i}", "output": f" t{i + 20}"}) + "\n" for i in range(14))
    other = "".join(json.dumps({"input": f"t{i + 20}", "output": f" t{i}"}) + "\n" for i in range(14))
    return {"data/task.jsonl": rows, "data/other.jsonl": other, "icl.probe.yaml":
            'kind: icl_update\ntask: data/task.jsonl\ncontrol_task: data/other.jsonl\n'
            'format: {example: "{input}{output} . ", query: "{input}"}\nshots: 4\nprompts: 8\nclaims:\n' + claims}


# (case id, {path under probes/: text}, extra args, exit status, fragment, the verdict its claims must not have)
PYTEST_CASES = [
    ("probe_device_mps", {}, ["--probe-device=mps"], USAGE, "--probe-device=mps: this build of torch cannot use mps"),
    ("probe_device_missing_cuda", {}, ["--probe-device=cuda:3"], USAGE, "--probe-device=cuda:3: "),
    ("weights_top_leaves_too_few_for_the_control", "weights5", [], FAILED,
     "claims.c.top: top 5 leaves 3 other groups of 'block_sublayer' on this model, and the control draws 5"),
    ("icv_pairs_tokenize_identically", {"icv.probe.yaml": ICV, "data/queries.jsonl": QUERIES,
                                        "data/pairs.jsonl": _pairs(("t1 zebra", "t1 giraffe"), ("t2", "t3"))}, [],
     FAILED, "data/pairs.jsonl:1: source and target are the same tokens for model"),
    ("icv_words_all_unknown", {"icv.probe.yaml": ICV, "data/queries.jsonl": QUERIES,
                               "data/pairs.jsonl": _pairs(("zebra", "giraffe"), ("t2", "t3"))}, [],
     FAILED, "data/pairs.jsonl:1: every word of the prompt is the unknown token '<unk>'"),
]


@pytest.fixture(scope="module")
def copy_model(tmp_path_factory) -> Path:
    from tests.helpers.toy_models import save_copy_model
    return save_copy_model(tmp_path_factory.mktemp("hostile_kinds") / "toy")


@pytest.fixture
def probes(pytester) -> Path:
    from tests.helpers.toy_models import copy_task_rows, write_jsonl
    from tests.test_hostile import GOOD
    write_jsonl(pytester.path / "probes" / "data" / "copy.jsonl", copy_task_rows())
    (pytester.path / "probes" / "good.probe.yaml").write_text(GOOD)
    return pytester.path / "probes"


def _run(pytester, model: Path, *args: str):
    return pytester.runpytest("probes", f"--model={model}", "--probe-report-dir=out", "-p", "no:cacheprovider",
                              "-p", "no:randomly", "--probe-threads=1", *args)


def _claims(pytester, file: str) -> list[dict]:
    rec = json.loads((pytester.path / "out" / "toy" / "report.json").read_text())
    return [c for p in rec["probes"] if p["file"] == file for c in p["claims"]]


@pytest.mark.parametrize("case, files, args, status, fragment", PYTEST_CASES, ids=[c[0] for c in PYTEST_CASES])
def test_pytest_run(pytester, probes, copy_model, case, files, args, status, fragment):
    from tests.test_hostile import _materialise, weights
    if files == "weights5":
        files = weights(top=5)
    _materialise(probes, files)
    result = _run(pytester, copy_model, *args)
    out = result.stdout.str() + result.stderr.str()
    assert result.ret == status, out
    assert fragment in out and "Traceback" not in out
    if status == FAILED:  # the bad probe is an error with no claim passed; the good probe still ran
        bad = next(f for f in files if f.endswith(".probe.yaml"))
        rec = json.loads((pytester.path / "out" / "toy" / "report.json").read_text())
        probe = next(p for p in rec["probes"] if p["file"] == f"probes/{bad}")
        assert fragment.split(": ", 1)[-1][:40] in probe["error"]
        assert not any(c["verdict"] == "pass" for c in probe["claims"])
        assert _claims(pytester, "probes/good.probe.yaml")


def test_identity_in_bfloat16_is_a_dtype_matter_not_a_failure(pytester, probes, tmp_path_factory):
    """The identity is exact but for rounding: in bfloat16 an error within the dtype's rounding is
    inconclusive with the reason, never 'identity fails'."""
    from tests.helpers.toy_models import save_random_model
    model = save_random_model(tmp_path_factory.mktemp("bf16") / "toy")
    from tests.test_hostile import _materialise
    _materialise(probes, _icl("  identity:\n    expect: {max_rel_error: {at_most: 1.0e-6}}\n"))
    result = _run(pytester, model, "--probe-dtype=bfloat16", "-k", "identity")
    out = result.stdout.str()
    assert result.ret == FAILED and "Traceback" not in out
    (claim,) = _claims(pytester, "probes/icl.probe.yaml")
    assert claim["details"]["dtype"] == "bfloat16" and claim["details"]["dtype_rounding_tolerance"] == 0.05
    assert claim["effect"] > 1e-6  # bfloat16 rounds: the claimed 1e-6 cannot be checked in it
    assert claim["verdict"] == "inconclusive", claim
    assert "within what bfloat16 rounding alone gives (0.05)" in claim["reason"] and "--probe-dtype=float32" in claim["reason"]


def test_transfers_at_most_tests_its_control_in_its_own_direction(tmp_path, tiny_subject):
    from modelprobe.kinds import check_data_files, instantiate, load
    from tests.test_hostile import _materialise
    claims = {}
    for comparison in ("at_least", "at_most"):
        _materialise(tmp_path, _icl("  transfers:\n    layer: [0, 1]\n"
                                    f"    expect: {{gain_recovered: {{{comparison}: 0.3}}}}\n    control: other_task\n"))
        probe = load(tmp_path / "icl.probe.yaml")
        check_data_files(probe)
        (claims[comparison],) = instantiate(probe, tiny_subject("qwen2")).run().claims
    # one-sided in the claim's own direction ("less" for at_most), not the hard-coded "greater"
    assert claims["at_most"].control.detail["test"].endswith("one-sided (less)")
    assert claims["at_least"].control.detail["test"].endswith("one-sided (greater)")
    low, high = claims["at_least"].control.p_value, claims["at_most"].control.p_value
    assert low != high and claims["at_most"].effect == claims["at_least"].effect


def test_a_judge_that_cannot_tell_yes_from_no_is_an_error(pytester, copy_model):
    """A judge whose tokenizer maps 'Yes' and 'No' to the unknown token would answer 'no' to every reply."""
    import shutil

    from tests.test_injection import ORGANISM, probe_text
    shutil.copytree(copy_model, pytester.path / "probes" / "judge")
    (pytester.path / "probes" / "inj.probe.yaml").write_text(probe_text(grader="{judge: judge}"))
    result = pytester.runpytest("probes", f"--model={ORGANISM}", "--probe-report-dir=out", "-p", "no:cacheprovider",
                                "-p", "no:randomly", "--probe-threads=1", f"--probe-data-root={Path(__file__).parent.parent}")
    out = result.stdout.str()
    assert result.ret == FAILED and "Traceback" not in out
    assert "grader.judge: the judge cannot grade: 'Yes' is not in the vocabulary of model" in out
    result.assert_outcomes(passed=0, failed=4)


# --------------------------------------------------------------------------- `modelprobe find` / `discover`

FIND = ["find", "--model", "m", "--with", "w.jsonl", "--without", "o.jsonl"]
DISCOVER = ["discover", "circuit", "--model", "m", "--prompts", "p.jsonl", "--ablation", "zero"]
CLI_CASES = [
    # (case id, files, argv, exit status, fragment): all refused before any model is loaded
    ("find_batch_size_negative", {}, [*FIND, "--batch-size", "-1"], 2,
     "modelprobe find: argument --batch-size: '-1': must be between 1 and 65536"),
    ("find_batch_size_zero", {}, [*FIND, "--batch-size", "0"], 2, "argument --batch-size: '0': must be between 1"),
    ("find_threads_negative", {}, [*FIND, "--threads", "-1"], 2, "argument --threads: '-1': must be between 0"),
    ("find_seed_negative", {}, [*FIND, "--seed", "-1"], 2, "argument --seed: '-1': must be between 0 and 4294967295"),
    ("find_top_zero", {}, [*FIND, "--top", "0"], 2, "argument --top: '0': must be between 1"),
    ("find_overwrites_without_force", {"mine.probe.yaml": "kind: logit_lens  # hand-written\n"},
     [*FIND, "-o", "mine.probe.yaml"], 2, "modelprobe find: mine.probe.yaml exists: give --force to overwrite it"),
    ("find_layer_with_sae", {}, [*FIND, "--sae", "sae", "--layer", "3"], 2,
     "--sae takes its layer and component from the SAE's cfg.json: drop --layer / --component"),
    ("find_component_with_sae", {}, [*FIND, "--sae", "sae", "--component", "resid_post"], 2, "drop --layer"),
    ("find_missing_model", {}, ["find", "--with", "w.jsonl", "--without", "o.jsonl"], 2,
     "modelprobe find: the following arguments are required: --model"),
    ("discover_threads_negative", {}, [*DISCOVER, "--threads", "-1"], 2,
     "modelprobe discover: argument --threads: '-1': must be between 0"),
    ("discover_batch_size_zero", {}, [*DISCOVER, "--batch-size", "0"], 2, "argument --batch-size: '0': must be between 1"),
    ("discover_score_prompts_negative", {}, [*DISCOVER, "--score-prompts", "-3"], 2,
     "argument --score-prompts: '-3': must be between 1"),
    ("discover_device_mps", {}, [*DISCOVER, "--device", "mps"], 2,
     "argument --device: 'mps': this build of torch cannot use mps here"),
    ("discover_dtype_unknown", {}, [*DISCOVER, "--dtype", "float8"], 2, "argument --dtype: 'float8': expected one of"),
    ("discover_seed_negative", {}, [*DISCOVER, "--seed", "-1"], 2, "argument --seed: '-1': must be between 0"),
    ("discover_unbeatable_control", {}, [*DISCOVER, "--random-circuits", "10"], 2,
     "argument --random-circuits: '10': with 10 random circuits the empirical p-value is at least 1/11"),
    ("discover_target_nan", {}, [*DISCOVER, "--target", "nan"], 2, "argument --target: 'nan': must be a finite number"),
]


@pytest.mark.parametrize("case, files, argv, status, fragment", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli(tmp_path, monkeypatch, capsys, case, files, argv, status, fragment):
    monkeypatch.chdir(tmp_path)
    for rel, text in files.items():
        (tmp_path / rel).write_text(text)
    before = {p: p.read_text() for p in tmp_path.rglob("*") if p.is_file()}
    assert main(argv) == status
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert {p: p.read_text() for p in tmp_path.rglob("*") if p.is_file()} == before  # nothing written


def test_find_writes_no_probe_without_a_measurement(tmp_path, monkeypatch, capsys, copy_model):
    """Activations that never vary between prompts measured nothing: no AUROC 0.5 probe of neuron 0."""
    import importlib

    from tests.helpers.toy_models import copy_task_rows, write_jsonl
    features = importlib.import_module("modelprobe.toolkit.features")  # the module `find` imports from
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "w.jsonl", copy_task_rows(8, seed=1))
    write_jsonl(tmp_path / "o.jsonl", copy_task_rows(8, seed=2))
    real = features.unit_activations

    def flat(*args, **kwargs):
        got = real(*args, **kwargs)
        got.per_prompt = [np.zeros_like(a) for a in got.per_prompt]
        return got
    monkeypatch.setattr(features, "unit_activations", flat)
    argv = ["find", "--model", str(copy_model), "--with", "w.jsonl", "--without", "o.jsonl", "--layer", "0",
            "--quiet", "-o", "out.probe.yaml"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "nothing was measured, so no probe is written" in err and "Traceback" not in err
    assert not (tmp_path / "out.probe.yaml").exists()


# --------------------------------------------------------------------------- the gate's "asked for" rule

def _symlinked(root: Path) -> None:
    (root / "b.probe.yaml").unlink()


def _directory(root: Path) -> None:
    (root / "b.probe.yaml").unlink()
    (root / "b.probe.yaml").mkdir()


def _collect_ignore(root: Path) -> None:
    (root / "conftest.py").write_text('collect_ignore = ["b.probe.yaml"]\n')


def _everything(root: Path) -> None:
    for p in root.glob("*.probe.yaml"):
        p.unlink()


HIDE = {"deleted_through_a_symlinked_folder": _symlinked, "replaced_by_a_directory": _directory,
        "hidden_by_collect_ignore": _collect_ignore, "every_probe_deleted": _everything}


@pytest.mark.parametrize("how", list(HIDE))
def test_a_probe_hidden_from_the_gate_is_missing(pytester, copy_model, how):
    from tests.helpers.toy_models import copy_task_rows, write_jsonl
    from tests.test_hostile import GOOD
    real = pytester.path / ("real" if how == "deleted_through_a_symlinked_folder" else "probes")
    write_jsonl(real / "data" / "copy.jsonl", copy_task_rows())
    for name in ("a", "b"):
        (real / f"{name}.probe.yaml").write_text(GOOD)
    if real.name == "real":
        (pytester.path / "probes").symlink_to(real, target_is_directory=True)
    _run(pytester, copy_model, "--probe-save=base").assert_outcomes(passed=2)
    HIDE[how](real)
    result = _run(pytester, copy_model, "--probe-compare=base")
    out = result.stdout.str()
    assert result.ret == FAILED, out
    assert "baseline: probes/b.probe.yaml::early MISSING" in out and "Traceback" not in out
    rec = json.loads((pytester.path / "out" / "toy" / "report.json").read_text())
    assert not any(c["verdict"] == "pass" for p in rec["probes"] if p["file"] == "probes/b.probe.yaml"
                   for c in p["claims"])
    report_md = (pytester.path / "out" / "toy" / "report.md").read_text()
    assert "probes/b.probe.yaml" in report_md and "missing" in report_md.lower()


# --------------------------------------------------------------------------- fresh skeletons run

MODEL_CACHE = Path.home() / ".cache" / "modelprobe"  # read at import: pytester moves HOME


def _bpe_model(directory: Path) -> Path:
    """A random 4-layer model with the default model's byte-level tokenizer: every skeleton word is real
    tokens on it, so a skeleton gets as far as its measurements."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    cached = sorted(MODEL_CACHE.glob("smollm2-135m-instruct-*/tokenizer.json"))
    if not cached:
        pytest.skip("the default model's tokenizer is not converted in ~/.cache/modelprobe")
    tok = AutoTokenizer.from_pretrained(cached[0].parent)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(config).eval().save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def test_every_fresh_skeleton_runs(pytester, tmp_path_factory, monkeypatch):
    """Not only validates: `pytest` on every fresh skeleton ends each claim in a verdict, or the probe in one
    located line (a skeleton names the default model's layers), never a traceback or an internal error."""
    from modelprobe.kinds import KINDS
    SKELETONS = {name: KINDS[name].skeleton for name in KINDS}
    model = _bpe_model(tmp_path_factory.mktemp("bpe") / "tiny")
    monkeypatch.chdir(pytester.path)
    for kind in SKELETONS:
        assert main(["new", kind, kind, "--directory", "probes"]) == 0
    result = pytester.runpytest("probes", f"--model={model}", "--probe-report-dir=out", "-p", "no:cacheprovider",
                                "-p", "no:randomly", "--probe-threads=1", "--probe-batch-size=8")
    out = result.stdout.str() + result.stderr.str()
    assert result.ret in (pytest.ExitCode.OK, FAILED) and "Traceback" not in out, out
    rec = json.loads((pytester.path / "out" / "tiny" / "report.json").read_text())
    assert {p["kind"] for p in rec["probes"]} == set(SKELETONS)
    for p in rec["probes"]:
        if p["error"]:
            assert p["error"].startswith(str(pytester.path / p["file"]) + ":") and "internal error" not in p["error"], p
        else:
            assert p["claims"] and all(c["verdict"] in ("pass", "fail", "inconclusive") for c in p["claims"]), p


# --------------------------------------------------------------------------- single rules

def test_a_reply_the_regex_cannot_finish_on_is_an_error_not_a_hang():
    import regex

    from modelprobe.kinds.graders import Grader, GraderTimeout
    grader = Grader("regex", "custom", pattern=regex.compile(r"(?:(a|aa)+)+\1\1b"))
    with pytest.raises(GraderTimeout) as e:
        grader.grade("a" * 40)
    assert "did not finish within 2 s on a 40-character reply" in str(e.value) and e.value.loc == ("regex",)
    assert grader.grade("aab") is False and Grader("regex", "custom", pattern=regex.compile("b$")).grade("ab")


def test_rankings_that_disagree_are_flagged():
    from modelprobe.kinds.weight_perturbation import ranking_disagreement
    agreement = {"random vs gradient": -0.2, "random vs activation": 0.1, "gradient vs activation": 0.94}
    flag = ranking_disagreement(agreement, "random")
    assert flag and "random vs gradient rho -0.20" in flag and "random vs activation rho 0.10" in flag
    assert "gradient vs activation" not in flag
    assert ranking_disagreement(agreement, "gradient") == "rankings disagree (random vs gradient rho -0.20): the " \
        "claim's groups come from the gradient ranking, which measures something else than the others on this model"
    assert ranking_disagreement({"gradient vs activation": 0.94, "gradient vs random": None}, "gradient") is None


def test_preflight_tolerance_follows_the_dtype_and_says_so(tiny_subject):
    from modelprobe.model_facts import dtype_tolerance
    from modelprobe.subject.preflight import check_padding_invariance
    subject = tiny_subject("llama")
    ids = [subject.encode_all(["how do i make a cake"])[0], subject.encode_all(["tell me"])[0]]
    result = check_padding_invariance(subject, ids)
    assert f"{dtype_tolerance('float32'):g} of the largest logit, following the dtype float32" in result.detail
    assert dtype_tolerance("bfloat16") > dtype_tolerance("float32")
