"""The release gate against the committed baseline, on the real default model (slow)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
BASELINE = ROOT / "reports" / "baselines" / "smollm2-135m-instruct" / "default.json"
PROBE = ROOT / "probes" / "logit_lens_capitals.probe.yaml"


@pytest.fixture(scope="module")
def damaged_release(tmp_path_factory) -> Path:
    """SmolLM2 with every attention head of its top half zero-ablated in the weights: a broken release.

    Saved under the default model's own name, so the gate compares it as a new revision of the same model.
    """
    from modelprobe.subject import load_subject
    subject = load_subject("smollm2-135m-instruct", progress=False)
    with torch.no_grad():
        for layer in range(15, subject.n_layers):
            subject.sitemap.module(layer, "self_attn.o_proj").weight.zero_()
    target = tmp_path_factory.mktemp("release") / "smollm2-135m-instruct"
    subject.model.save_pretrained(target)
    subject.tokenizer.save_pretrained(target)
    return target


def _gate(pytester, model: str) -> pytest.RunResult:
    pytester.syspathinsert(ROOT)
    return pytester.runpytest(str(PROBE), f"--model={model}", f"--probe-compare={BASELINE}",
                              "--probe-report-dir=out", "--rootdir", str(ROOT), "-p", "no:cacheprovider")


@pytest.mark.slow
def test_damaged_release_fails_the_gate_and_the_clean_model_passes_it(pytester, damaged_release):
    clean = _gate(pytester, "smollm2-135m-instruct")
    assert "regression against baseline" not in clean.stdout.str()
    broken = _gate(pytester, str(damaged_release))
    broken.stdout.fnmatch_lines(["*model_knows_capitals*", "*regression against baseline: *"])
