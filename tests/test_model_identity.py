"""One identity for a model: whatever form --model takes, the report folder, --probe-save and --probe-compare
agree (resolve decides the slug), and the gate holds dtype and device class as part of the identity."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from modelprobe.report.baseline import BaselineError, compare, load_report
from modelprobe.report.record import ModelInfo, RunRecord
from modelprobe.subject.resolve import DEFAULT_ALIAS, cache_dir, resolve
from tests.helpers.hub_server import Hub, HubServer, folder_files
from tests.helpers.toy_models import copy_task_rows, save_copy_model, write_jsonl
from tests.test_plugin import LENS_PROBE

ROOT = Path(__file__).resolve().parent.parent
COMMITTED = ROOT / "reports" / "baselines" / "smollm2-135m-instruct" / "default.json"
# Read before pytester points HOME at a temporary folder: the alias's GGUF is converted there already.
CONVERTED = cache_dir()
# One claim on a dozen prompts: the identity is under test here, not the measurement.
PROBE = LENS_PROBE.split("  emerges_late:")[0]


@pytest.fixture(scope="module")
def model_files(tmp_path_factory) -> dict[str, bytes]:
    return folder_files(save_copy_model(tmp_path_factory.mktemp("identity_model")))


@pytest.fixture
def probes(pytester):
    write_jsonl(pytester.path / "probes" / "data" / "copy.jsonl", copy_task_rows(n=12))
    (pytester.path / "probes" / "lens.probe.yaml").write_text(PROBE)
    return pytester.path / "probes"


def run(pytester, model: str, *args: str):
    return pytester.runpytest("probes", f"--model={model}", "--probe-report-dir=out", "--probe-threads=1",
                              "-p", "no:cacheprovider", "-p", "no:randomly", *args)


def _place(pytester, files: dict[str, bytes], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)


FOLDER_FORMS = {
    "relative": "models/toy",
    "absolute": "{root}/models/toy",
    "trailing slash": "models/toy/",
    "dot": ".",
    "symlink": "models/current",
}


@pytest.mark.parametrize("form", FOLDER_FORMS)
def test_save_then_compare_for_each_folder_form(pytester, probes, model_files, form):
    root = pytester.path
    _place(pytester, model_files, root if form == "dot" else root / "models" / "toy")
    (root / "models").mkdir(exist_ok=True)
    os.symlink(root / "models" / "toy", root / "models" / "current")
    model = FOLDER_FORMS[form].format(root=root)
    slug = resolve(model, fetch=False).slug
    assert slug == (root.name.lower() if form == "dot" else "toy")
    run(pytester, model, "--probe-save=base").assert_outcomes(passed=1)
    assert (root / "out" / "baselines" / slug / "base.json").is_file()
    assert (root / "out" / slug / "report.json").is_file()
    result = run(pytester, model, "--probe-compare=base")
    result.assert_outcomes(passed=1)
    out = result.stdout.str()
    assert "no baseline" not in out and "regression" not in out and "cannot compare" not in out
    assert "no regressions" in (root / "out" / slug / "report.md").read_text()


def test_one_folder_named_two_ways_is_one_model(pytester, probes, model_files):
    """Saved through a symlink, compared through the absolute path of the folder it points to."""
    _place(pytester, model_files, pytester.path / "models" / "toy")
    os.symlink(pytester.path / "models" / "toy", pytester.path / "latest")
    run(pytester, "latest/", "--probe-save=base")
    result = run(pytester, str(pytester.path / "models" / "toy"), "--probe-compare=base")
    result.assert_outcomes(passed=1)
    assert "no regressions" in (pytester.path / "out" / "toy" / "report.md").read_text()


@pytest.mark.parametrize("form", ["acme/tiny-lm", "acme/tiny-lm@v1"])
def test_save_then_compare_for_hub_ids(pytester, probes, model_files, form, monkeypatch, tmp_path):
    hub = Hub()
    hub.add("acme/tiny-lm", model_files, ref="v1")
    hub.add("acme/tiny-lm", model_files, ref="main")
    with HubServer(hub) as url:
        monkeypatch.setenv("HF_ENDPOINT", url)
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        run(pytester, form, "--probe-save=base").assert_outcomes(passed=1)
        assert (pytester.path / "out" / "baselines" / "acme--tiny-lm" / "base.json").is_file()
        result = run(pytester, form, "--probe-compare=base")
    result.assert_outcomes(passed=1)
    assert "no regressions" in (pytester.path / "out" / "acme--tiny-lm" / "report.md").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("form", ["alias", "gguf"])
def test_save_then_compare_for_the_alias_and_a_gguf_file(pytester, probes, form, monkeypatch):
    """The embedded default model, by its alias and by the path of its GGUF file (converted once, cached)."""
    if form == "alias":
        monkeypatch.setenv("MODELPROBE_CACHE", str(CONVERTED))
    gguf = resolve(DEFAULT_ALIAS, fetch=False)
    model = DEFAULT_ALIAS if form == "alias" else str(gguf.path / gguf.gguf_file)
    slug = resolve(model, fetch=False).slug
    run(pytester, model, "--probe-save=base", "--probe-batch-size=16")
    assert (pytester.path / "out" / "baselines" / slug / "base.json").is_file()
    result = run(pytester, model, "--probe-compare=base", "--probe-batch-size=16")
    assert "no regressions" in (pytester.path / "out" / slug / "report.md").read_text()
    assert "no baseline" not in result.stdout.str()


def test_another_dtype_refuses_like_another_model(pytester, probes, model_files):
    _place(pytester, model_files, pytester.path / "toy")
    run(pytester, "toy", "--probe-save=base")
    bf16 = run(pytester, "toy", "--probe-compare=base", "--probe-dtype=bfloat16")
    assert bf16.ret == pytest.ExitCode.TESTS_FAILED
    line = ("*cannot compare runs of different numerics: the baseline was made in float32 on cpu, this run in "
            "bfloat16 on cpu*")
    bf16.stdout.fnmatch_lines([f"baseline: {line}"])  # on the terminal, once for the run
    md = (pytester.path / "out" / "toy" / "report.md").read_text()
    assert "no comparison: cannot compare runs of different numerics" in md
    assert "baseline made in float32 on cpu; this run in bfloat16 on cpu" in md
    allowed = run(pytester, "toy", "--probe-compare=base", "--probe-dtype=bfloat16", "--probe-allow-dtype-change")
    allowed.assert_outcomes(passed=1)
    assert "cannot compare" not in allowed.stdout.str()
    md = (pytester.path / "out" / "toy" / "report.md").read_text()
    assert "numerics changed: baseline made in float32 on cpu, this run in bfloat16 on cpu" in md


def _run_record(model: ModelInfo) -> RunRecord:
    return RunRecord(model=model)


def test_device_class_is_part_of_the_identity_and_old_records_read_as_float32_on_cpu():
    base = ModelInfo(id="m", slug="m", hash="h", dtype="float32", device="cuda:0")
    assert compare(_run_record(base), _run_record(base.model_copy(update={"device": "cuda:1"}))).ok
    with pytest.raises(BaselineError, match="made in float32 on cuda, this run in float32 on cpu"):
        compare(_run_record(base), _run_record(base.model_copy(update={"device": "cpu"})))
    old = ModelInfo(id="m", slug="m", hash="h")  # a record from before the gate held numerics
    assert compare(_run_record(old), _run_record(base.model_copy(update={"device": "cpu"}))).ok
    with pytest.raises(BaselineError, match="this run in bfloat16 on cpu"):
        compare(_run_record(old), _run_record(base.model_copy(update={"device": "cpu", "dtype": "bfloat16"})))


def test_the_committed_baseline_still_matches_a_plain_default_run():
    """The identity a default run gets today (alias, float32, cpu) is the one the committed baseline recorded,
    and a copy of it without the dtype / device fields (as older baselines are) is read as float32 on cpu."""
    before = load_report(COMMITTED)
    now = resolve(DEFAULT_ALIAS, fetch=False)
    assert (now.slug, now.fingerprint) == (before.model.slug, before.model.hash)
    default_run = ModelInfo(id=DEFAULT_ALIAS, slug=now.slug, hash=now.fingerprint, dtype="float32", device="cpu",
                            model_type="llama", n_layers=30)
    assert compare(before, RunRecord(model=default_run, collected_files=[])).ok
    data = json.loads(COMMITTED.read_text())
    data["model"].pop("dtype"), data["model"].pop("device")
    older = RunRecord.model_validate(data)
    assert compare(older, RunRecord(model=default_run, collected_files=[])).ok
    with pytest.raises(BaselineError, match="made in float32 on cpu, this run in bfloat16 on cpu"):
        compare(before, RunRecord(model=default_run.model_copy(update={"dtype": "bfloat16"}), collected_files=[]))


def test_modelprobe_compare_refuses_other_numerics_unless_allowed(tmp_path, capsys):
    from modelprobe.cli import main
    from modelprobe.report.writers import write_json

    info = ModelInfo(id="m", slug="m", hash="h", dtype="float32", device="cpu")
    before = write_json(RunRecord(model=info), tmp_path / "a")
    after = write_json(RunRecord(model=info.model_copy(update={"dtype": "float16"})), tmp_path / "b")
    assert main(["compare", str(before), str(after)]) == 2
    assert "the baseline was made in float32 on cpu, this run in float16 on cpu" in capsys.readouterr().err
    assert main(["compare", str(before), str(after), "--allow-dtype-change"]) == 0
    assert "numerics changed" in capsys.readouterr().out
