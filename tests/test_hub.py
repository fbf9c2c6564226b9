"""Hub models against a local stand-in for the Hugging Face Hub (tests/helpers/hub_server.py, behind
HF_ENDPOINT): download on first use, revisions, the gate across runs, offline use, and every way a download can
go wrong, each one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from modelprobe.errors import ModelLoadError
from modelprobe.subject.resolve import resolve
from tests.helpers.hub_server import Hub, HubServer, folder_files
from tests.helpers.toy_models import copy_task_rows, save_copy_model, write_jsonl
from tests.test_plugin import LENS_PROBE


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> Hub:
    files = folder_files(save_copy_model(tmp_path_factory.mktemp("hub_model")))
    hub = Hub()
    hub.v1 = hub.add("acme/tiny-lm", files, ref="v1")  # type: ignore[attr-defined]
    hub.main = hub.add("acme/tiny-lm", files, ref="main")  # type: ignore[attr-defined]  # same files, new commit
    hub.add("acme/gated-lm", files, gated=True)
    pickled = {k: v for k, v in files.items() if k != "model.safetensors"} | {"pytorch_model.bin": b"not read"}
    hub.add("acme/pickled-lm", pickled)
    return hub


@pytest.fixture
def hub_url(hub, tmp_path, monkeypatch):
    """The stand-in hub serving, an empty Hugging Face cache, no token, online."""
    hub.cut.clear()
    hub.requests.clear()
    with HubServer(hub) as url:
        monkeypatch.setenv("HF_ENDPOINT", url)
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
        for name in ("HF_TOKEN", "HF_HUB_OFFLINE", "HUGGING_FACE_HUB_TOKEN"):
            monkeypatch.delenv(name, raising=False)
        yield url


# The claims the copy model passes: a run that matches its baseline exits 0.
PROBE = LENS_PROBE.replace("  emerges_late:\n    expect: {median_first_layer: {at_least: 0.9}}\n", "")


@pytest.fixture
def probes(pytester):
    write_jsonl(pytester.path / "probes" / "data" / "copy.jsonl", copy_task_rows())
    (pytester.path / "probes" / "lens.probe.yaml").write_text(PROBE)
    return pytester.path / "probes"


def run(pytester, model: str, *args: str):
    return pytester.runpytest("probes", f"--model={model}", "--probe-report-dir=out", "--probe-threads=1",
                              "-p", "no:cacheprovider", "-p", "no:randomly", *args)


def report(pytester) -> dict:
    return json.loads((pytester.path / "out" / "acme--tiny-lm" / "report.json").read_text())


def _one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert text and "\n" not in text
    return text


def test_download_run_save_compare_then_offline(pytester, probes, hub, hub_url, monkeypatch):
    assert "emerges_late" not in PROBE
    first = run(pytester, "acme/tiny-lm", "--probe-save=v1")
    assert first.ret == 0
    # CI logs (stderr is not a terminal here): one line per downloaded file, safetensors weights
    first.stderr.fnmatch_lines(["modelprobe: downloading acme/tiny-lm: model.safetensors (502.3 kB)"])
    rec = report(pytester)
    assert rec["model"]["hash"] == hub.main and rec["model"]["slug"] == "acme--tiny-lm"
    assert (pytester.path / "out" / "baselines" / "acme--tiny-lm" / "v1.json").is_file()

    hub.requests.clear()
    again = run(pytester, "acme/tiny-lm", "--probe-compare=v1")
    assert again.ret == 0
    assert "regression" not in again.stdout.str() and "no baseline" not in again.stdout.str()
    assert not [r for r in hub.requests if r.startswith("GET /acme")]  # nothing downloaded twice
    assert "no regressions" in (pytester.path / "out" / "acme--tiny-lm" / "report.md").read_text()

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub.requests.clear()
    offline = run(pytester, "acme/tiny-lm", "--probe-compare=v1")
    assert offline.ret == 0
    assert hub.requests == []  # HF_HUB_OFFLINE: not even a look-up
    assert report(pytester)["model"]["hash"] == hub.main


def test_a_pinned_revision_is_in_the_report_and_gates_itself(pytester, probes, hub, hub_url):
    assert run(pytester, "acme/tiny-lm@v1", "--probe-save=pinned").ret == 0
    rec = report(pytester)
    assert (rec["model"]["hash"], rec["model"]["revision"]) == (hub.v1, "v1") and hub.v1 != hub.main
    assert hub.v1 in (pytester.path / "out" / "acme--tiny-lm" / "report.md").read_text()
    same = run(pytester, "acme/tiny-lm", "--probe-revision=v1", "--probe-compare=pinned")
    assert same.ret == 0 and "regression" not in same.stdout.str()
    assert report(pytester)["model"]["hash"] == hub.v1
    # Another revision of the same model is what a release gate compares: a warning, not a refusal.
    newer = run(pytester, "acme/tiny-lm@main", "--probe-compare=pinned")
    assert newer.ret == 0
    assert "weights changed since the baseline" in (pytester.path / "out" / "acme--tiny-lm" / "report.md").read_text()


def test_offline_with_an_empty_cache_is_one_line(pytester, probes, hub_url, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = run(pytester, "acme/tiny-lm")
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines(["*model 'acme/tiny-lm' is not in the local Hugging Face cache (*hf-cache) and "
                                 "HF_HUB_OFFLINE is set*"])
    assert "Traceback" not in result.stdout.str() + result.stderr.str()


def test_gated_missing_and_unknown_revision_are_one_line_each(hub_url, monkeypatch):
    with pytest.raises(ModelLoadError) as err:
        resolve("acme/gated-lm", progress=False)
    assert "is gated on the hub" in _one_line(err) and "set HF_TOKEN" in _one_line(err)
    monkeypatch.setenv("HF_TOKEN", "hf_someone_else")
    with pytest.raises(ModelLoadError, match="the token in HF_TOKEN has no access to it"):
        resolve("acme/gated-lm", progress=False)
    monkeypatch.setenv("HF_TOKEN", "hf_granted")  # a token with access downloads it
    assert resolve("acme/gated-lm", progress=False).fingerprint
    with pytest.raises(ModelLoadError) as err:
        resolve("acme/no-such-lm", progress=False)
    assert "'acme/no-such-lm' is neither a local folder nor a model on the hub" in _one_line(err)
    with pytest.raises(ModelLoadError) as err:
        resolve("acme/tiny-lm@v9", progress=False)
    assert "has no revision 'v9'" in _one_line(err)


def test_pickle_weights_only_when_allowed(hub, hub_url):
    with pytest.raises(ModelLoadError) as err:
        resolve("acme/pickled-lm", progress=False)
    assert "only PyTorch pickle weights (pytorch_model.bin)" in _one_line(err) and "--probe-allow-pickle" in str(err.value)
    assert not [r for r in hub.requests if r.startswith("GET /acme/pickled-lm/resolve")]  # refused before fetching
    got = resolve("acme/pickled-lm", allow_pickle=True, progress=False)
    assert (got.path / "pytorch_model.bin").read_bytes() == b"not read"
    # a repo with safetensors never sends its pickles along
    assert not list(resolve("acme/tiny-lm", allow_pickle=True, progress=False).path.glob("*.bin"))


def test_a_cut_download_is_one_line_and_the_next_run_fetches_the_rest(hub, hub_url, tmp_path):
    hub.cut.add("model.safetensors")  # every attempt is cut half-way (huggingface_hub retries 5 times, 1 s apart)
    with pytest.raises(ModelLoadError) as err:
        resolve("acme/tiny-lm", progress=False)
    assert "the download was cut off" in _one_line(err) and "run again to fetch the rest" in str(err.value)
    assert not list((tmp_path / "hf-cache").rglob("*.safetensors"))  # no half file passes for the weights
    hub.cut.clear()
    hub.requests.clear()
    got = resolve("acme/tiny-lm", progress=False)
    assert got.fingerprint == hub.main and (got.path / "model.safetensors").stat().st_size == 502336
    fetched = [r.split()[1].rsplit("/", 1)[1] for r in hub.requests if r.startswith("GET /acme")]
    assert fetched == ["model.safetensors"]  # the files completed before the cut are not fetched again


def test_hub_unreachable_uses_the_cache_or_says_so(hub_url, monkeypatch, tmp_path):
    first = resolve("acme/tiny-lm", progress=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    assert resolve("acme/tiny-lm", progress=False) == first
    with pytest.raises(ModelLoadError) as err:
        resolve("acme/other-lm", progress=False)
    assert "cannot be reached" in _one_line(err)


@pytest.mark.parametrize("args, message", [
    (["--probe-revision=../../etc"], "--probe-revision=../../etc: expected a branch, tag or commit sha*"),
    (["--probe-revision="], "--probe-revision=: expected a branch, tag or commit sha*"),
    (["--probe-allow-dtype-change"], "--probe-allow-dtype-change needs --probe-compare*"),
])
def test_revision_and_flags_are_checked_options(pytester, probes, args, message):
    result = run(pytester, "acme/tiny-lm", *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"*modelprobe: {message}"])


def test_revisions_that_cannot_apply_are_one_line(tmp_path, hub_url):
    folder = save_copy_model(tmp_path / "local")
    with pytest.raises(ModelLoadError, match="is not a hub id"):
        resolve(str(folder), "v1")
    with pytest.raises(ModelLoadError, match="name two revisions"):
        resolve("acme/tiny-lm@v1", "main")
    with pytest.raises(ModelLoadError, match="revision 'a..b'"):
        resolve("acme/tiny-lm@a..b")
    assert resolve("acme/tiny-lm@v1", "v1", fetch=False).slug == "acme--tiny-lm"
    assert Path(resolve("acme/tiny-lm@v1", progress=False).path).name == resolve("acme/tiny-lm@v1").fingerprint
