"""feature: a planted causal neuron passes both claims, a neuron that only correlates fails `causes`; a
tiny SAE trained here, saved in the SAELens format and loaded back, runs the claims on one latent; a
direction file works alike; the batched random-unit rows equal one plain hooked forward per unit;
`modelprobe find` picks a planted unit and writes a probe that runs; bad inputs are located errors."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from modelprobe.errors import DataError, SpecError
from modelprobe.kinds import check_data_files, instantiate, load

sys.path.insert(0, str(Path(__file__).parent))
import feature_planted as planted  # noqa: E402

PROBE = """\
kind: feature
about: a planted neuron fires after a trigger word and the model's "sure" depends on it
unit: {layer: 1, component: mlp.post, neuron: NEURON}
inputs: {with: data/with.jsonl, without: data/without.jsonl}
claims:
  correlates:
    expect: {auroc: {at_least: 0.8}}
  causes:
    intervention: INTERVENTION
    metric: {tokens: [" sure"]}
    expect: {metric_drop: {at_least: 0.1}}
    control: random_units
    random_units: 30
"""


@pytest.fixture(scope="module")
def planted_dir(tmp_path_factory):
    from modelprobe.subject import load_subject

    d = tmp_path_factory.mktemp("feature")
    planted.build(d / "model")
    planted.write_data(d)
    return d, load_subject(str(d / "model"), progress=False)


def run(directory: Path, subject, text: str) -> dict:
    path = directory / "f.probe.yaml"
    path.write_text(text)
    probe = load(path)
    check_data_files(probe)
    out = instantiate(probe, subject).run()
    assert not subject.leaked_hooks()
    return {c.name: c for c in out.claims}


def probe(neuron: int, intervention: str = "{zero: true}") -> str:
    return PROBE.replace("NEURON", str(neuron)).replace("INTERVENTION", intervention)


# ---- known positive and known negative --------------------------------------------------------------

@pytest.mark.parametrize("intervention", ["{zero: true}", "{mean: true}", "{clamp: 0.0}"])
def test_planted_causal_neuron_passes_both(planted_dir, intervention):
    claims = run(*planted_dir, probe(planted.CAUSAL, intervention))
    assert claims["correlates"].verdict == "pass" and claims["correlates"].effect == 1.0
    c = claims["causes"]
    assert c.verdict == "pass", c.reason
    assert c.control.p_value <= 0.05 and c.control.detail["null_max"] < 1e-4  # other neurons write nothing


def test_neuron_that_only_correlates_fails_causes(planted_dir):
    claims = run(*planted_dir, probe(planted.ECHO))
    assert claims["correlates"].verdict == "pass"
    assert claims["causes"].verdict == "fail"
    assert abs(claims["causes"].effect) < 1e-4


def test_clamping_high_raises_the_metric(planted_dir):
    """Clamping the causal neuron far above its value makes "sure" likelier: a negative drop."""
    claims = run(*planted_dir, probe(planted.CAUSAL, "{clamp: 600.0}"))
    assert claims["causes"].effect < -0.1 and claims["causes"].verdict == "fail"


# ---- the batched rows are the plain computation ---------------------------------------------------

def _plain_metric(subject, ids, hook_module, edit, sure: int) -> np.ndarray:
    """One plain forward per prompt, a plain torch pre-hook editing the module's input."""
    out = []
    for x in ids:
        h = hook_module.register_forward_pre_hook(lambda m, a: (edit(a[0]),))
        try:
            with torch.no_grad():
                logits = subject.model(torch.tensor([x])).logits[0, -1]
        finally:
            h.remove()
        out.append(float(logits.log_softmax(-1)[sure]))
    return np.array(out)


def test_batched_unit_rows_equal_one_hooked_forward_per_unit(planted_dir):
    from modelprobe.subject.sites import Site
    from modelprobe.subject.units import coordinate_units
    from modelprobe.toolkit.features import metric_with_units_set, token_set_metric, unit_activations

    d, subject = planted_dir
    rows = [json.loads(line)["prompt"] for line in (d / "data" / "with.jsonl").read_text().splitlines()][:6]
    ids = subject.encode_all(rows)
    sure = subject.token_id(" sure")[0]
    units = coordinate_units(Site("mlp.post", 1), subject.sitemap, [planted.CAUSAL, 5, 60])
    acts = unit_activations(subject, ids, [units], keep_from=1, batch_size=4)
    targets = torch.tensor([0.0, 1.5, -2.0])
    from modelprobe.subject import common_prefix

    assert common_prefix(ids) >= 1  # BOS: the shared-prefix path runs
    got = metric_with_units_set(subject, acts.clean, units, targets,
                                lambda lg: token_set_metric(lg, torch.tensor([sure])), len(ids), common_prefix(ids))
    down = subject.model.model.layers[1].mlp.down_proj
    for r, (j, t) in enumerate(zip([planted.CAUSAL, 5, 60], targets.tolist())):
        def edit(x, j=j, t=t):
            x = x.clone()
            x[..., j] = t
            return x
        want = _plain_metric(subject, ids, down, edit, sure)
        np.testing.assert_allclose(got[r], want, atol=1e-4)
    assert got[0].mean() < want.mean() - 1  # the causal neuron's row differs from the others


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox", "gemma2", "qwen3"])
def test_set_unit_equals_the_engine_ablations_on_every_family(tiny_subject, family):
    """SetUnit on a neuron = ZeroAblate of that neuron; on a direction = AblateDirection; resumed rows
    (or the full-forward fallback) = one forward per unit."""
    from modelprobe.subject.interventions import AblateDirection, ZeroAblate
    from modelprobe.subject.sites import Site
    from modelprobe.subject.units import coordinate_units, direction_units
    from modelprobe.toolkit.features import metric_with_units_set, unit_activations

    subject = tiny_subject(family)
    ids = [subject.encode(t) for t in ("cake good day", "t3 t4 t5 home", "water . music")]
    metric = lambda lg: lg.float().log_softmax(-1)[:, 9]  # noqa: E731 - any fixed token
    neurons = coordinate_units(Site("mlp.post", 1), subject.sitemap, [0, 5, 17])
    acts = unit_activations(subject, ids, [neurons], keep_from=1)
    got = metric_with_units_set(subject, acts.clean, neurons, torch.zeros(3), metric, len(ids), 1)
    for r, j in enumerate([0, 5, 17]):
        want = metric(subject.last_logits(ids, [ZeroAblate(Site("mlp.post", 1, neurons=(j,)), "all")]))
        np.testing.assert_allclose(got[r], want.numpy(), atol=1e-4)
    u = torch.randn(2, subject.sitemap.d_model, generator=torch.Generator().manual_seed(0))
    dirs = direction_units(Site("resid_post", 0), u, ["a", "b"])
    acts = unit_activations(subject, ids, [dirs], keep_from=0)
    got = metric_with_units_set(subject, acts.clean, dirs, torch.zeros(2), metric, len(ids))
    for r in range(2):
        want = metric(subject.last_logits(ids, [AblateDirection(Site("resid_post", 0), "all", direction=u[r])]))
        np.testing.assert_allclose(got[r], want.numpy(), atol=1e-4)


def test_residual_dimension_unit(planted_dir):
    """Dimension 1 of layer 1's resid_post is what the causal neuron writes: both claims pass."""
    text = probe(1).replace("component: mlp.post", "component: resid_post")
    claims = run(*planted_dir, text)
    assert claims["correlates"].verdict == "pass" and claims["causes"].verdict == "pass"


# ---- an SAE trained here, saved as SAELens does, loaded back ---------------------------------------

@pytest.fixture(scope="module")
def sae_dir(planted_dir):
    d, subject = planted_dir
    return planted.train_sae(subject, d)


def test_sae_round_trip_encodes_like_saelens(planted_dir, sae_dir):
    from safetensors.torch import load_file

    from modelprobe.subject.units import read_sae, sae_site, sae_units

    d, subject = planted_dir
    files = read_sae(sae_dir)
    assert (files.component, files.layer, files.d_in, files.d_sae) == ("resid_post", 1, 32, 24)
    units = sae_units(files, sae_site(files, subject.sitemap))
    w = load_file(str(sae_dir / "sae_weights.safetensors"))
    x = torch.randn(5, 32)
    want = torch.relu((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"])  # SAELens' standard encode
    torch.testing.assert_close(units.activations(x), want, atol=1e-5, rtol=1e-5)


def test_sae_latent_claims(planted_dir, sae_dir):
    """The latent that best separates the sets: it correlates, and removing its decoded contribution
    lowers "sure" more than removing any other latent's does (the planted feature lives in it)."""
    from modelprobe.subject.units import read_sae, sae_site, sae_units
    from modelprobe.toolkit.features import rank_units, unit_activations

    d, subject = planted_dir
    files = read_sae(sae_dir)
    units = sae_units(files, sae_site(files, subject.sitemap))
    rows = {k: [json.loads(x)["prompt"] for x in (d / "data" / f"{k}.jsonl").read_text().splitlines()]
            for k in ("with", "without")}
    aw, ao = (unit_activations(subject, subject.encode_all(rows[k]), [units]) for k in ("with", "without"))
    order, auc = rank_units(aw.per_prompt[0], ao.per_prompt[0])
    top = int(order[0])
    text = (probe(0).replace("{layer: 1, component: mlp.post, neuron: 0}", f"{{sae: sae, latent: {top}}}")
            .replace("random_units: 30", "random_units: 23"))
    claims = run(d, subject, text)
    assert claims["correlates"].verdict == "pass"
    c = claims["causes"]
    assert c.verdict == "pass", c.reason
    assert c.effect > c.control.detail["null_max"]


# ---- a direction file ------------------------------------------------------------------------------

def test_direction_file(planted_dir, tmp_path):
    from modelprobe.subject.units import save_direction

    d, subject = planted_dir
    e1 = torch.zeros(32)
    e1[1] = 1.0  # what the causal neuron writes
    save_direction(d / "e1.safetensors", e1, "blocks.1.hook_resid_post")
    text = probe(0).replace("{layer: 1, component: mlp.post, neuron: 0}",
                            "{direction: e1.safetensors, layer: 1, component: resid_post}")
    claims = run(d, subject, text)
    assert claims["correlates"].verdict == "pass" and claims["causes"].verdict == "pass"


# ---- modelprobe find ---------------------------------------------------------------------------------

def test_find_picks_a_planted_neuron_and_writes_a_probe_that_runs(planted_dir, capsys):
    from modelprobe.cli import main

    d, subject = planted_dir
    out = d / "found" / "found.probe.yaml"
    code = main(["find", "--model", str(d / "model"), "--with", str(d / "data" / "with.jsonl"), "--without",
                 str(d / "data" / "without.jsonl"), "--layer", "0:2", "--rows", "0:15", "--tokens", " sure",
                 "-o", str(out), "--quiet"])
    assert code == 0
    text = out.read_text()
    assert f"neuron: {planted.CAUSAL}" in text or f"neuron: {planted.ECHO}" in text
    assert 'rows: "15:"' in text and "held out" in text
    claims = run(d, subject, text.replace("../data/", "data/"))  # run from the data's folder
    assert claims["correlates"].verdict == "pass"
    assert claims["causes"].verdict == ("pass" if f"neuron: {planted.CAUSAL}" in text else "fail")


def test_find_ranks_sae_latents(planted_dir, sae_dir):
    from modelprobe.cli import main

    d, subject = planted_dir
    out = d / "found_sae.probe.yaml"
    code = main(["find", "--model", str(d / "model"), "--with", str(d / "data" / "with.jsonl"), "--without",
                 str(d / "data" / "without.jsonl"), "--sae", str(sae_dir), "-o", str(out), "--quiet"])
    assert code == 0
    text = out.read_text()
    assert 'unit: {sae: "sae", latent: ' in text and "SAME lines" in text  # no --rows: says it is optimistic
    claims = run(d, subject, text)
    assert claims["correlates"].verdict == "pass"


def test_find_usage_errors(planted_dir, capsys):
    from modelprobe.cli import main

    d, _ = planted_dir
    base = ["find", "--model", str(d / "model"), "--with", str(d / "data" / "with.jsonl"), "--without",
            str(d / "data" / "without.jsonl"), "--quiet", "-o", str(d / "x.probe.yaml")]
    assert main([*base, "--layer", "9"]) == 2
    assert "beyond the model's depth" in capsys.readouterr().err
    assert main([*base, "--rows", "50:60"]) == 2
    assert "--rows" in capsys.readouterr().err


# ---- bad input: one located line each ----------------------------------------------------------------

def _err(directory: Path, subject, text: str, exc=SpecError) -> str:
    path = directory / "bad.probe.yaml"
    path.write_text(text)
    with pytest.raises(exc) as e:
        p = load(path)
        check_data_files(p)
        instantiate(p, subject)
    return str(e.value)


def test_neuron_out_of_range(planted_dir):
    msg = _err(*planted_dir, probe(64))
    assert "bad.probe.yaml:3:" in msg and "unit.neuron" in msg and "out of range" in msg and "64" in msg


def test_clamp_nan_and_too_few_random_units(planted_dir):
    msg = _err(*planted_dir, probe(3, "{clamp: .nan}"))
    assert "bad.probe.yaml:9:" in msg and "claims.causes.intervention.clamp" in msg
    msg = _err(*planted_dir, probe(3).replace("random_units: 30", "random_units: 5"))
    assert "random_units" in msg and "19" in msg


def _copy_sae(sae_dir: Path, directory: Path, name: str) -> Path:
    target = directory / name
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(sae_dir, target)
    return target


def _sae_probe(name: str, latent: int = 0) -> str:
    return probe(0).replace("{layer: 1, component: mlp.post, neuron: 0}", f"{{sae: {name}, latent: {latent}}}")


@pytest.mark.parametrize("edit, expect", [
    (lambda cfg: cfg["metadata"].update(hook_name="blocks.7.hook_resid_post"), "field 'hook_name'"),
    (lambda cfg: cfg["metadata"].update(hook_name="blocks.1.attn.hook_pattern"), "field 'hook_name'"),
    (lambda cfg: cfg.update(architecture="topk"), "field 'architecture'"),
    (lambda cfg: cfg.update(normalize_activations="expected_average_only_in"), "field 'normalize_activations'"),
])
def test_sae_that_does_not_fit(planted_dir, sae_dir, edit, expect):
    d, subject = planted_dir
    bad = _copy_sae(sae_dir, d, "bad_sae")
    cfg = json.loads((bad / "cfg.json").read_text())
    edit(cfg)
    (bad / "cfg.json").write_text(json.dumps(cfg))
    msg = _err(d, subject, _sae_probe("bad_sae"))
    assert "bad.probe.yaml:3:" in msg and "unit.sae" in msg and "cfg.json" in msg and expect in msg


def test_sae_of_another_width(planted_dir, sae_dir):
    """A consistent SAE trained on a 48-wide site: its d_in does not match the model's 32."""
    from safetensors.torch import save_file

    d, subject = planted_dir
    bad = _copy_sae(sae_dir, d, "wide_sae")
    cfg = json.loads((bad / "cfg.json").read_text())
    cfg["d_in"] = 48
    (bad / "cfg.json").write_text(json.dumps(cfg))
    save_file({"W_enc": torch.ones(48, 24), "W_dec": torch.ones(24, 48), "b_enc": torch.zeros(24),
               "b_dec": torch.zeros(48)}, str(bad / "sae_weights.safetensors"))
    msg = _err(d, subject, _sae_probe("wide_sae"))
    assert "bad.probe.yaml:3:" in msg and "unit.sae" in msg and "field 'd_in' is 48" in msg and "32 wide" in msg
    assert "tiny" not in msg and str(d / "model") in msg  # names the model


def test_sae_latent_out_of_range_and_missing_files(planted_dir, sae_dir):
    d, subject = planted_dir
    msg = _err(d, subject, _sae_probe("sae", 24))
    assert "unit.latent" in msg and "d_sae 24" in msg
    bad = _copy_sae(sae_dir, d, "no_cfg")
    (bad / "cfg.json").unlink()
    msg = _err(d, subject, _sae_probe("no_cfg"))
    assert "unit.sae" in msg and "cfg.json: not found" in msg
    bad = _copy_sae(sae_dir, d, "no_weights")
    (bad / "sae_weights.safetensors").rename(bad / "sae_weights.pt")
    msg = _err(d, subject, _sae_probe("no_weights"))
    assert "sae_weights.safetensors: not found" in msg and "no pickles" in msg
    msg = _err(d, subject, _sae_probe("nowhere"))
    assert "unit.sae" in msg and "not found" in msg


def test_a_pool_too_small_for_the_null_is_inconclusive(planted_dir, sae_dir, tmp_path):
    """An SAE of 12 latents leaves 11 random ones: p >= 1/12, so the claim cannot beat its control either way."""
    from safetensors.torch import load_file, save_file

    d, subject = planted_dir
    small = _copy_sae(sae_dir, d, "small_sae")
    w = load_file(str(small / "sae_weights.safetensors"))
    save_file({"W_enc": w["W_enc"][:, :12].contiguous(), "W_dec": w["W_dec"][:12].contiguous(),
               "b_enc": w["b_enc"][:12].contiguous(), "b_dec": w["b_dec"]}, str(small / "sae_weights.safetensors"))
    cfg = json.loads((small / "cfg.json").read_text())
    cfg["d_sae"] = 12
    (small / "cfg.json").write_text(json.dumps(cfg))
    claims = run(d, subject, _sae_probe("small_sae", 0))
    assert claims["causes"].verdict == "inconclusive" and "only 11 other units" in claims["causes"].reason


def test_unit_shape_errors(planted_dir):
    d, subject = planted_dir
    msg = _err(d, subject, probe(3).replace("neuron: 3}", "neuron: 3, latent: 2}"))
    assert "unit" in msg and "latent" in msg
    msg = _err(d, subject, probe(3).replace("{layer: 1, component: mlp.post, neuron: 3}", "{neuron: 3}"))
    assert "needs 'layer'" in msg
    msg = _err(d, subject, probe(3).replace('tokens: [" sure"]', 'tokens: [" sure cake"]'))
    assert "claims.causes.metric.tokens.0" in msg and "2 tokens" in msg
    msg = _err(d, subject, probe(3).replace('tokens: [" sure"]', 'tokens: [" sure", " sure"]'))
    assert "claims.causes.metric.tokens.1" in msg and "count twice" in msg
    msg = _err(d, subject, probe(3).replace("inputs: {", 'inputs: {rows: "0:1", '), DataError)
    assert "at least 2" in msg
    msg = _err(d, subject, PROBE.replace("NEURON", "3").replace("    intervention: INTERVENTION\n", ""))
    assert "needs 'intervention'" in msg


def test_canonical_names_parse_back():
    from modelprobe.names import COMPONENTS, PER_LAYER, canonical_name, parse_canonical

    for c in COMPONENTS:
        layer = 7 if c in PER_LAYER else None
        assert parse_canonical(canonical_name(c, layer)) == (c, layer)
    for bad in ("blocks.x.hook_resid_post", "blocks.3.hook_nothing", "resid_post", ""):
        assert parse_canonical(bad) is None


# ---- the random-unit null stops early with the full count's verdict ---------------------------------

@pytest.mark.parametrize("neuron,intervention", [(planted.CAUSAL, "{zero: true}"), (planted.ECHO, "{zero: true}"),
                                                 (planted.CAUSAL, "{clamp: 600.0}")])
def test_sequential_random_units_give_the_full_count_verdict(planted_dir, monkeypatch, neuron, intervention):
    from modelprobe.toolkit import controls

    text = probe(neuron, intervention).replace("random_units: 30", "random_units: 60")
    fast = run(*planted_dir, text)["causes"]
    monkeypatch.setattr(controls, "null_settled", lambda observed, null, planned, alternative: len(null) >= planned)
    monkeypatch.setattr(controls, "control_decides", lambda *a: True)
    full = run(*planted_dir, text)["causes"]
    assert full.control.detail["drawn"] == full.control.detail["planned"] == 60
    assert (fast.verdict, fast.effect, fast.ci) == (full.verdict, full.effect, full.ci), (fast.reason, full.reason)
    assert (fast.control.p_value <= 0.05) == (full.control.p_value <= 0.05)
    if full.verdict != "pass":  # a claim that beats its control needs all but hit_limit(60) = 1 draws
        assert fast.control.detail["drawn"] < 60, fast.control.detail
