"""The circuit kind: the induction fixture's known circuit passes and a wrong one fails; batched,
resumed ablations equal ablations done by hand one at a time; bad inputs fail at setup, located."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from modelprobe.errors import DataError, SpecError
from modelprobe.kinds import instantiate, load
from modelprobe.kinds.circuit import circuit_units
from modelprobe.report.record import NullHistogram
from modelprobe.subject import load_subject
from modelprobe.subject.ablation import AblationRunner, Unit, build_scope
from modelprobe.toolkit.ablation_task import prepare_task
from modelprobe.toolkit.controls import random_circuits
from modelprobe.toolkit.metrics import faithfulness

HERE = Path(__file__).parent
PROBES = HERE / "probes"
FIXTURE = HERE / "fixtures" / "models" / "induction"
DATA = HERE / "fixtures" / "data"
ROOT = HERE.parent


@pytest.fixture(scope="module")
def induction():
    if not (FIXTURE / "circuit.json").is_file():
        pytest.skip("the induction fixture is not built")
    return load_subject(str(FIXTURE), progress=False)


def true_heads() -> set[tuple[int, int]]:
    c = json.loads((FIXTURE / "circuit.json").read_text())
    return {tuple(h) for h in c["previous_token_heads"] + c["induction_heads"]}


def probe_heads(kind) -> set[tuple[int, int]]:
    return {(u.layer, u.index) for u in kind.circuit}


def rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


# ---- the known positive and the known negative ----------------------------------------------

def test_true_circuit_passes_and_beats_random_circuits(induction):
    kind = instantiate(load(PROBES / "induction_circuit.probe.yaml"), induction)
    assert probe_heads(kind) == true_heads(), "tests/probes/induction_circuit.probe.yaml is out of date"
    out = kind.run()
    claims = {c.name: c for c in out.claims}
    suff, nec = claims["sufficient"], claims["necessary"]
    assert suff.verdict == "pass", suff.reason
    assert nec.verdict == "pass", nec.reason
    assert suff.effect >= 0.8 and nec.effect <= 0.2
    assert suff.control.p_value <= 0.05 and nec.control.p_value <= 0.05
    nulls = [p for p in suff.plots if isinstance(p, NullHistogram)]
    # Sequential controls: no random circuit comes near, so drawing stops once the 4 undrawn circuits
    # could not bring the full count's p-value above alpha even if all were extreme (96 draws, 8 at a time).
    assert len(nulls) == 1 and len(nulls[0].values) == 96
    assert suff.control.detail["drawn"] == 96 and suff.control.detail["planned"] == 100
    assert out.settings["random_circuits"] == 96 and out.settings["random_circuits_planned"] == 100
    assert suff.details["m_full"] > suff.details["m_empty"]
    assert {d["component"] for d in suff.details["per_component"]} == set(out.settings["circuit"])
    assert out.settings["ablation"] == "mean" and "per position" in out.settings["replacement"]
    assert out.settings["random_circuits_layer_matched"] is True


def test_wrong_circuit_of_the_same_size_fails(induction):
    right = instantiate(load(PROBES / "induction_circuit.probe.yaml"), induction)
    kind = instantiate(load(PROBES / "induction_wrong_circuit.probe.yaml"), induction)
    assert len(kind.circuit) == len(right.circuit)
    assert probe_heads(kind) != true_heads()
    claims = {c.name: c for c in kind.run().claims}
    assert claims["sufficient"].verdict == "fail"
    assert claims["necessary"].verdict == "fail"


@pytest.mark.parametrize("probe", ["induction_circuit", "induction_wrong_circuit"])
def test_sequential_random_circuits_stop_early_with_the_full_count_verdict(induction, probe):
    """A clearly significant control (the true circuit) and a clearly null one (a wrong circuit) both stop
    drawing early, and every verdict, beats-control answer and side of alpha equals the full count's."""
    def run(sequential: bool):
        p = load(PROBES / f"{probe}.probe.yaml")
        object.__setattr__(p.spec.controls, "sequential", sequential)  # the spec is frozen
        return instantiate(p, induction).run()

    fast, full = run(True), run(False)
    assert full.settings["random_circuits"] == 100
    assert fast.settings["random_circuits"] < 100
    for a, b in zip(fast.claims, full.claims):
        assert a.verdict == b.verdict, (a.name, a.reason, b.reason)
        if b.control is not None:
            assert a.control.detail["drawn"] < b.control.detail["drawn"] == 100
            assert (a.control.p_value <= 0.05) == (b.control.p_value <= 0.05)


# ---- batched, resumed runs equal hand-made ablations ------------------------------------------

def _hand_metric(subject, task, scope_units, config, ablation, ref_ids, ref_source=None):
    """Logit differences with the config's units ablated, one prompt per forward, plain hooks."""
    sm = subject.sitemap
    model = subject.model
    dh = sm.d_head
    chosen = [u for u, on in zip(scope_units, config) if on]

    def site_inputs(ids_list):
        """Input of o_proj / down_proj per layer, per prompt: {(layer, which): [T, width]}."""
        store: dict = {}
        outs = []
        for ids in ids_list:
            handles = []
            for layer in range(sm.n_layers):
                for which, rel in (("attn", sm.family.attn_out_proj), ("mlp", sm.family.mlp_out_proj)):
                    def hook(mod, args, layer=layer, which=which):
                        store[(layer, which)] = args[0][0].detach().clone()
                    handles.append(sm.module(layer, rel).register_forward_pre_hook(hook))
            with torch.no_grad():
                model(input_ids=torch.tensor([ids]))
            for h in handles:
                h.remove()
            outs.append(dict(store))
        return outs

    ref_acts = site_inputs(ref_ids)
    if ablation == "mean":
        by_len: dict = {}
        for ids, acts in zip(ref_ids, ref_acts):
            by_len.setdefault(len(ids), []).append(acts)
        values = {n: {k: torch.stack([a[k] for a in group]).mean(0) for k in group[0]} for n, group in by_len.items()}
    elif ablation == "mean_all_positions":
        allv = {k: torch.cat([a[k] for a in ref_acts]).mean(0) for k in ref_acts[0]}
    out = []
    for p, ids in enumerate(task.prompt_ids):
        if ablation == "mean":
            val = values[len(ids)]
        elif ablation == "mean_all_positions":
            val = {k: v.expand(len(ids), -1) for k, v in allv.items()}
        elif ablation == "zero":
            val = None
        else:
            val = ref_acts[ref_source[p]]
        handles = []
        for layer in range(sm.n_layers):
            heads = [u.index for u in chosen if u.layer == layer and u.kind == "head"]
            neurons = [u.index for u in chosen if u.layer == layer and u.kind == "neuron"]
            if any(u.layer == layer and u.kind == "mlp" for u in chosen):
                neurons = list(range(sm.d_mlp))
            for which, rel, cols in (("attn", sm.family.attn_out_proj,
                                      [c for h in heads for c in range(h * dh, (h + 1) * dh)]),
                                     ("mlp", sm.family.mlp_out_proj, neurons)):
                if not cols:
                    continue

                def hook(mod, args, layer=layer, which=which, cols=cols, val=val):
                    x = args[0].clone()
                    x[0, :, cols] = 0.0 if val is None else val[(layer, which)][:, cols]
                    return (x,)
                handles.append(sm.module(layer, rel).register_forward_pre_hook(hook))
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
        for h in handles:
            h.remove()
        out.append(float(logits[task.answers[p]] - logits[task.wrongs[p]]))
    return np.array(out)


@pytest.mark.parametrize("ablation", ["mean", "mean_all_positions", "zero", "resample"])
@pytest.mark.parametrize("scope_name", ["attention_heads", "heads_and_mlps", "neurons"])
def test_batched_resumed_ablations_equal_hand_ablations(induction, tiny_subject, ablation, scope_name):
    # the llama fixture resumes; a tiny gpt2 cannot and falls back to full forwards
    for subject in (induction, tiny_subject("gpt2")):
        prompt_rows, ref_rows = rows(DATA / "induction.jsonl")[:10], rows(DATA / "induction_ref.jsonl")[:10]
        task = prepare_task(subject, prompt_rows, DATA / "induction.jsonl", ref_rows, DATA / "induction_ref.jsonl",
                            "logit_diff", ablation, None, None)
        scope_spec = {"neurons": [1]} if scope_name == "neurons" else scope_name
        scope = build_scope(scope_spec, subject.sitemap)
        runner = AblationRunner(subject, task, scope, task.row_metric("logit_diff"), ablation, batch_size=4)
        rng = np.random.default_rng(0)
        configs = rng.random((6, len(scope))) < 0.4
        configs[0] = True  # everything: served from the cached empty run
        configs[1] = False  # nothing: the clean run
        configs[2] = ~configs[3]  # complementary pair: one resumes from each stream
        got = runner.run(configs)
        for k, config in enumerate(configs):
            want = _hand_metric(subject, task, scope.units, config, ablation, task.ref_ids, task.ref_source)
            np.testing.assert_allclose(got[k], want, rtol=1e-4, atol=1e-4, err_msg=f"config {k} on {subject.info.id}")
        assert not subject.leaked_hooks()


def _distinct_layer_rows(configs: np.ndarray, runner, prompts: int) -> int:
    """Layer-rows a shared run computes: per layer, the distinct (prompt, ablated units up to that layer)
    among rows that have started there (a row starts at its plan's layer)."""
    total = 0
    starts = [runner.plan(c)[1] for c in configs]
    for layer in range(runner.subject.n_layers):
        cut = runner.cut[layer]
        total += prompts * len({configs[k][:cut].tobytes() for k in range(len(configs)) if starts[k] <= layer})
    return total


def test_random_circuits_share_the_layers_below_where_they_part(induction, monkeypatch):
    import modelprobe.subject.ablation as circuit_module

    calls: list[tuple[int, int]] = []
    real = circuit_module.run_layers

    def spy(subject, hidden, start, end, *args, **kwargs):
        calls.append((start, end, hidden.shape[0]))
        return real(subject, hidden, start, end, *args, **kwargs)

    monkeypatch.setattr(circuit_module, "run_layers", spy)
    kind = instantiate(load(PROBES / "induction_circuit.probe.yaml"), induction)
    circ = kind.scope.vector(kind.circuit)
    nulls, _ = random_circuits(kind.circuit, kind.scope, 100, 0)
    configs = np.concatenate([~nulls, nulls])
    runner = kind.runner
    runner.prime(configs)
    calls.clear()
    before = runner.layers_run
    got = runner.run(configs, desc="random circuits")
    # 200 configs x 96 prompts, but random circuits of a 2-layer circuit differ in layer 0 in 3 ways: each
    # layer runs once per distinct (prompt, prefix), each forward stacks many of them
    assert all(end == start + 1 for start, end, _ in calls)
    computed = sum(b for _, _, b in calls)
    assert computed == runner.layers_run - before
    # (rows are run in groups of a few forwards: a class split by a group boundary runs once in each)
    assert _distinct_layer_rows(configs, runner, 96) <= computed < 1.2 * _distinct_layer_rows(configs, runner, 96)
    assert computed < 200 * 96 * induction.n_layers / 3
    largest_group = max(len(m) for m in runner.groups.values())
    assert max(b for _, _, b in calls) > 2 * largest_group
    # the same numbers as one resumed forward per config (up to the last float bits, which on this tiny
    # model already move with the batch's size: batch_size 1 and 4 differ by 1e-6 on the plain path)
    plain = circuit_module.AblationRunner(induction, kind.task, kind.scope, kind.task.row_metric("logit_diff"),
                                          "mean", batch_size=4)
    plain.layer_sorted = False  # the per-config path: every row its own resumed forward
    np.testing.assert_allclose(plain.run(configs), got, rtol=1e-5, atol=1e-5)
    # an ablation of layer-1 heads only runs layer 1; keeping only layer-1 heads resumes from the
    # cached all-ablated stream, also at layer 1
    only_l1 = np.array([u.layer == 1 for u in kind.scope.units])
    pair = np.stack([only_l1 & circ, ~(only_l1 & circ)])
    assert [runner.plan(c) for c in pair] == [("clean", 1), ("empty", 1)]
    runner.prime(pair)  # the cached streams themselves are computed once, up front
    calls.clear()
    runner.run(pair)
    assert {s for s, _, _ in calls} == {1}


def test_prefix_states_announced_by_prime_are_kept_across_sequential_steps(induction):
    from modelprobe.subject.ablation import AblationRunner

    kind = instantiate(load(PROBES / "induction_circuit.probe.yaml"), induction)
    nulls, _ = random_circuits(kind.circuit, kind.scope, 40, 0)
    task, scope, metric = kind.task, kind.scope, kind.task.row_metric("logit_diff")
    whole = AblationRunner(induction, task, scope, metric, "mean")
    want = whole.run(nulls)
    stepped = AblationRunner(induction, task, scope, metric, "mean")
    stepped.prime(nulls)
    before = stepped.layers_run
    got = np.concatenate([stepped.run(nulls[k:k + 8]) for k in range(0, 40, 8)])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # layer 0 of a necessity null (its layer-0 head ablated) has 3 forms per prompt: run once each
    n = len(task.prompt_ids)
    layer0 = n * len({c[:stepped.cut[0]].tobytes() for c in nulls})
    layer1 = n * sum(len({c.tobytes() for c in nulls[k:k + 8]}) for k in range(0, 40, 8))  # the last layer: per step
    assert stepped.layers_run - before == layer0 + layer1
    assert not stepped.branch and not stepped.pending  # every kept state is freed after its last user


def test_means_are_computed_once_per_reference_set_and_reused(induction, monkeypatch):
    probe = PROBES / "induction_circuit.probe.yaml"
    first = instantiate(load(probe), induction)
    first.runner.prepare_values()
    keys = [k for k in induction.cache if isinstance(k, tuple) and k[0] == "circuit.means"]
    assert keys
    seen = []
    real = induction.run

    def spy(ids, *a, **kw):
        seen.append(kw.get("desc"))
        return real(ids, *a, **kw)

    monkeypatch.setattr(induction, "run", spy)
    second = instantiate(load(probe), induction)
    second.runner.prepare_values()
    assert "reference activations" not in seen
    site = next(iter(second.runner.values))
    assert second.runner.values[site] is first.runner.values[site]


# ---- random circuits -------------------------------------------------------------------------

def test_random_circuits_match_size_and_layers(induction):
    scope = build_scope("attention_heads", induction.sitemap)
    circuit = [Unit(0, "head", 1), Unit(1, "head", 0)]
    nulls, matched = random_circuits(circuit, scope, 50, seed=3)
    assert matched and nulls.shape == (50, len(scope))
    circ = scope.vector(circuit)
    for v in nulls:
        assert v.sum() == 2 and not (v & circ).any()  # disjoint: no random circuit holds a circuit head
        assert sorted(u.layer for u, on in zip(scope.units, v) if on) == [0, 1]
    # a circuit that is a whole layer leaves no other choice there: layers are then not matched
    whole = [Unit(1, "head", h) for h in range(induction.sitemap.n_heads)]
    nulls, matched = random_circuits(whole, scope, 20, seed=3)
    assert not matched and all(v.sum() == len(whole) for v in nulls)


def test_faithfulness_formula():
    c, e, m = np.array([3.0, 5.0]), np.array([0.0, 2.0]), np.array([4.0, 6.0])
    assert faithfulness(c, e, m) == pytest.approx((4 - 1) / (5 - 1))


# ---- the probe file ---------------------------------------------------------------------------

ISSUE_EXAMPLE = """\
kind: circuit
about: Indirect-object identification is carried by these heads.
prompts: data/ioi.jsonl             # {"prompt": ..., "answer": " Mary", "wrong": " John"}
reference: data/ioi_abc.jsonl       # the distribution whose means replace ablated components
metric: logit_diff                  # or: logprob (answer only), accuracy (top-1 == answer)
ablation: mean                      # mean (per position), mean_all_positions, zero, resample
scope: attention_heads              # what "everything else" means
circuit:
  - {layer: 9, component: attn.z, head: [6, 9]}
  - {layer: 10, component: attn.z, head: 0}
claims:
  sufficient:
    test: sufficiency               # ablate everything in scope except the circuit
    expect: {faithfulness: {at_least: 0.8}}
  necessary:
    test: necessity                 # ablate only the circuit
    expect: {faithfulness: {at_most: 0.2}}
controls:
  random_circuits: 100              # same size, same layers where possible
"""


@pytest.fixture
def example(tmp_path) -> Path:
    (tmp_path / "data").symlink_to(ROOT / "probes" / "data")
    path = tmp_path / "ioi_example.probe.yaml"
    path.write_text(ISSUE_EXAMPLE)
    return path


def test_issue_example_validates(example):
    probe = load(example)
    assert probe.spec.kind == "circuit" and len(probe.spec.circuit) == 2


def test_statistic_must_fit_the_test(tmp_path):
    bad = ISSUE_EXAMPLE.replace("test: necessity  ", "test: minimality")
    path = tmp_path / "x.probe.yaml"
    path.write_text(bad)
    with pytest.raises(SpecError, match="minimality' is judged on 'min_drop'"):
        load(path)


def test_mean_ablation_needs_a_reference(tmp_path):
    path = tmp_path / "x.probe.yaml"
    path.write_text(ISSUE_EXAMPLE.replace("reference: data/ioi_abc.jsonl", ""))
    with pytest.raises(SpecError, match="needs a 'reference' file"):
        load(path)


# ---- bad input: one clear error each, at setup -----------------------------------------------

def _setup_error(subject, name: str) -> str:
    with pytest.raises((SpecError, DataError)) as info:
        instantiate(load(PROBES / "bad" / name), subject)
    return str(info.value)


def test_head_index_beyond_the_model(induction):
    msg = _setup_error(induction, "circuit_head_out_of_range.probe.yaml")
    assert msg.startswith(f"{PROBES / 'bad' / 'circuit_head_out_of_range.probe.yaml'}:7:")
    assert "circuit.1.head.1: head index 4 is out of range (the model has 4)" in msg


def test_neuron_index_beyond_d_mlp(induction):
    msg = _setup_error(induction, "circuit_neuron_out_of_range.probe.yaml")
    assert ":7:" in msg and "circuit.0.neuron.1: neuron index 64 is out of range (the model has 64)" in msg


def test_answer_of_two_tokens(induction):
    msg = _setup_error(induction, "circuit_answer_two_tokens.probe.yaml")
    assert msg.startswith(f"{PROBES / 'bad' / 'circuit_two_token_answer.jsonl'}:4: answer ' t37 t38' is 2 tokens")


def test_reference_positions_do_not_align(induction):
    msg = _setup_error(induction, "circuit_misaligned_reference.probe.yaml")
    assert msg.startswith(f"{PROBES / 'bad' / 'circuit_misaligned_ref.jsonl'}:3: reference prompt has 15 tokens")
    assert "partner" in msg and "mean_all_positions" in msg
    # the same files are fine when one mean over all positions is used
    text = (PROBES / "bad" / "circuit_misaligned_reference.probe.yaml").read_text()
    assert "ablation: mean\n" in text


def test_rows_outside_the_file(induction, tmp_path):
    for name in ("circuit_prompts.jsonl", "circuit_ref.jsonl"):
        shutil.copy(PROBES / "bad" / name, tmp_path / name)
    text = (PROBES / "bad" / "circuit_misaligned_reference.probe.yaml").read_text()
    text = text.replace("circuit_misaligned_ref.jsonl", "circuit_ref.jsonl").replace("ablation: mean\n",
                                                                                      'ablation: mean\nrows: "50:"\n')
    (tmp_path / "r.probe.yaml").write_text(text)
    with pytest.raises(SpecError, match=r"r.probe.yaml:\d+:\d+: rows: rows '50:' selects no line"):
        instantiate(load(tmp_path / "r.probe.yaml"), induction)


def test_circuit_outside_the_scope(induction):
    scope = build_scope({"neurons": [1]}, induction.sitemap)
    from modelprobe.errors import SiteError
    from modelprobe.kinds.circuit import CircuitComponent

    heads = build_scope("attention_heads", induction.sitemap)
    with pytest.raises(SiteError, match="an MLP is not in the scope"):
        circuit_units([CircuitComponent(layer=0, component="mlp_out")], heads, induction.sitemap)
    both = build_scope("heads_and_mlps", induction.sitemap)
    assert circuit_units([CircuitComponent(layer=1, component="mlp.post"),
                          CircuitComponent(layer=0, component="attn_out")], both, induction.sitemap) == [
        Unit(1, "mlp"), *(Unit(0, "head", h) for h in range(induction.sitemap.n_heads))]
    with pytest.raises(SiteError, match="ablates whole MLPs"):
        circuit_units([CircuitComponent(layer=0, component="mlp.post", neuron=2)], both, induction.sitemap)
    with pytest.raises(SiteError, match="not in the scope"):
        circuit_units([CircuitComponent(layer=0, component="mlp.post", neuron=3)], scope, induction.sitemap)
    with pytest.raises(SiteError, match="listed twice"):
        circuit_units([CircuitComponent(layer=1, component="mlp.post", neuron=[3, 3])], scope, induction.sitemap)


@pytest.mark.slow
def test_issue_example_on_the_default_model_names_a_head_it_lacks(example):
    # The issue's example was written for GPT-2 (12 heads); SmolLM2 has 9, so head 9 is refused at setup.
    subject = load_subject("smollm2-135m-instruct", progress=False)
    with pytest.raises(SpecError) as info:
        instantiate(load(example), subject)
    assert "ioi_example.probe.yaml:9:" in str(info.value)
    assert "circuit.0.head.1: head index 9 is out of range (the model has 9)" in str(info.value)
    shipped = instantiate(load(ROOT / "probes" / "ioi_circuit.probe.yaml"), subject)
    assert shipped.task.settings["prompts_used"] > 0


def test_sequential_not_a_boolean_is_located(tmp_path):
    fixtures = str((PROBES.parent / "fixtures" / "data").resolve())
    text = (PROBES / "induction_circuit.probe.yaml").read_text().replace("../fixtures/data", fixtures)
    path = tmp_path / "s.probe.yaml"
    path.write_text(text.replace("  random_circuits: 100", "  random_circuits: 100\n  sequential: maybe"))
    line = next(i for i, t in enumerate(path.read_text().splitlines(), 1) if "sequential:" in t)
    with pytest.raises(SpecError, match=rf"s.probe.yaml:{line}:\d+: controls.sequential: "):
        load(path)


def test_a_circuit_with_no_disjoint_random_circuit_is_not_judged(induction, tmp_path):
    """Five of the eight heads: no five-head set lies outside the circuit, so the random-circuit control the
    probe asks for cannot be run, and its claims are inconclusive rather than judged without it."""
    (tmp_path / "data").symlink_to(PROBES.parent / "fixtures" / "data")
    text = (PROBES / "induction_circuit.probe.yaml").read_text().replace("../fixtures/data/", "data/")
    five = "".join(f"  - {{layer: 0, component: attn.z, head: {h}}}\n" for h in range(4)) + \
        "  - {layer: 1, component: attn.z, head: 0}\n"
    start, end = text.index("circuit:\n") + len("circuit:\n"), text.index("claims:")
    path = tmp_path / "big.probe.yaml"
    path.write_text(text[:start] + five + text[end:])
    claims = {c.name: c for c in instantiate(load(path), induction).run().claims}
    for name in ("sufficient", "necessary"):
        assert claims[name].verdict == "inconclusive", claims[name].reason
        assert "random-circuit control cannot be run" in claims[name].reason
