"""icl_update: the rank-1 machinery (exact on every supported family, refused on parallel blocks), the
factor norms against dense matrices, the planted known positive / known negatives, and located errors."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modelprobe.errors import DataError, SpecError
from modelprobe.kinds import check_data_files, instantiate, load
from modelprobe.subject.rank1 import Rank1, factors, frobenius, frobenius_diff, mlp_input_site
from modelprobe.subject.sites import Site
from modelprobe.toolkit.icl import identity, last_states

FIXTURES = Path(__file__).parent / "fixtures"
MAP_MODEL = FIXTURES / "models" / "icl_update_map"
SUPPORTED = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "gpt2")
WORDS = ["cake", "good", "bad", "kite", "song", "t1", "t2", "t3", "t7", "t9", "day", "home", "water", "."]


def _ids(subject, words: list[str]) -> list[int]:
    return subject.encode(" ".join(words))


# ---- the machinery ---------------------------------------------------------------------------------

@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(family=st.sampled_from(SUPPORTED),
       contexts=st.lists(st.lists(st.sampled_from(WORDS), min_size=1, max_size=12), min_size=1, max_size=4),
       query=st.lists(st.sampled_from(WORDS), min_size=1, max_size=3))
def test_identity_is_exact_on_every_supported_family(tiny_subject, family, contexts, query):
    subject = tiny_subject(family)
    ctx = [_ids(subject, c + query) for c in contexts]
    plain = [_ids(subject, query)] * len(contexts)
    per_layer, logits, _ = identity(subject, ctx, plain, batch_size=3)
    assert per_layer.max() <= 1e-4 and logits.max() <= 1e-4


def test_identity_needs_the_rank1_updates(tiny_subject):
    """Knock the weight updates out (keep the residual biases): the no-context run no longer follows."""
    subject = tiny_subject("llama")
    ctx = [_ids(subject, ["cake", "good", ".", "kite", "t3"])]
    plain = [_ids(subject, ["t3"])]
    _, _, updates = identity(subject, ctx, plain)
    u = mlp_input_site(subject.sitemap, 1)
    with_upd = last_states(subject, plain, [u], updates={0: updates[0]}).states[u]
    without = last_states(subject, plain, [u]).states[u]
    assert (with_upd - without).norm() > 1e-3 * without.norm()


def test_factor_norms_match_dense_matrices():
    g = torch.Generator().manual_seed(0)
    x = Rank1(torch.randn(5, 7, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g, dtype=torch.float64))
    y = Rank1(torch.randn(5, 7, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g, dtype=torch.float64))
    dx = torch.einsum("na,nb->nab", x.a, x.b)
    dy = torch.einsum("na,nb->nab", y.a, y.b)
    assert torch.allclose(frobenius(x), dx.flatten(1).norm(dim=1))
    assert torch.allclose(frobenius_diff(x, y), (dx - dy).flatten(1).norm(dim=1))
    assert torch.allclose(frobenius_diff(x, x), torch.zeros(5, dtype=torch.float64), atol=1e-6)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_hooked_factors_equal_the_dense_weight_update(tiny_subject, family):
    """W u + a (bᵀu) in the hook equals (W + a bᵀ) u with the dense matrix written into the weights."""
    from modelprobe.subject.interventions import WeightDelta
    subject = tiny_subject(family)
    sm = subject.sitemap
    ids = [_ids(subject, ["cake", "good", "t3"])]
    u = mlp_input_site(sm, 0)
    base = last_states(subject, ids, [u]).states[u]
    upd = factors(sm, 0, base, base + torch.randn(base.shape, dtype=torch.float64) * base.norm())
    out = Site("mlp_out", 0)
    hooked = last_states(subject, ids, [out], updates={0: upd}).states[out]
    deltas, start = [], 0
    for rel in sm.family.mlp_in:
        w = sm.module(0, rel).weight
        width = w.shape[1] if sm.family.conv1d else w.shape[0]
        dense = torch.outer(upd.a[0, start:start + width], upd.b[0]).float()
        deltas.append(WeightDelta(f"{sm.family.layers}.0.{rel}.weight", dense.T if sm.family.conv1d else dense))
        start += width
    state_dense = None
    for fw in subject.run(ids, [out], deltas):
        state_dense = fw.acts[out][:, -1].double()
    assert torch.allclose(hooked, state_dense, rtol=1e-4, atol=1e-5)


# ---- probes on models -------------------------------------------------------------------------------

def _probe(tmp_path, claims: str, task: list[dict], other: list[dict] | None = None, shots: int = 8,
           prompts: int = 48, fmt: str = '{example: "{input}{output} . ", query: "{input}"}') -> Path:
    (tmp_path / "data").mkdir(exist_ok=True)
    (tmp_path / "data" / "task.jsonl").write_text("".join(json.dumps(r) + "\n" for r in task))
    control = ""
    if other is not None:
        (tmp_path / "data" / "other.jsonl").write_text("".join(json.dumps(r) + "\n" for r in other))
        control = "control_task: data/other.jsonl\n"
    path = tmp_path / "icl.probe.yaml"
    path.write_text(f"kind: icl_update\ntask: data/task.jsonl\n{control}format: {fmt}\nshots: {shots}\n"
                    f"prompts: {prompts}\nclaims:\n" + textwrap.indent(textwrap.dedent(claims), "  "))
    return path


def _run(path: Path, subject):
    probe = load(path)
    check_data_files(probe)
    return {c.name: c for c in instantiate(probe, subject).run().claims}


CONVERGES = """\
converges:
  layer: 1
  expect: {spearman_rho: {at_most: -0.5}}
"""


def _rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (FIXTURES / "data" / name).read_text().splitlines()]


@pytest.fixture(scope="module")
def map_subject():
    from modelprobe.subject import load_subject
    if not MAP_MODEL.is_dir():
        pytest.skip("run tests/fixtures/build_icl_update_fixtures.py")
    return load_subject(str(MAP_MODEL), "cpu", "float32", False, 16, False)


@pytest.fixture(scope="module")
def random_subject(map_subject):
    from modelprobe.report.record import ModelInfo
    from modelprobe.subject import SiteMap, Subject
    torch.manual_seed(0)
    model = type(map_subject.model)(map_subject.model.config).eval()
    info = ModelInfo(id="random-map", slug="random-map", model_type="llama", n_layers=2, dtype="float32",
                     device="cpu")
    return Subject(model, map_subject.tokenizer, info, SiteMap(model), batch_size=16, progress=False)


def test_known_positive_converges_and_beats_shuffled_labels(tmp_path, map_subject):
    claims = _run(_probe(tmp_path, CONVERGES, _rows("icl_map.jsonl")), map_subject)
    c = claims["converges"]
    assert c.verdict == "pass", c.reason
    assert c.control.effect > c.effect


def test_shuffled_labels_do_not_converge(tmp_path, map_subject):
    """A task file whose outputs are shuffled across rows fits none of the trained mappings."""
    rows = _rows("icl_map.jsonl")
    outputs = [r["output"] for r in rows]
    shuffled = [{"input": r["input"], "output": outputs[(i + 5) % len(rows)]} for i, r in enumerate(rows)]
    claims = _run(_probe(tmp_path, CONVERGES, shuffled), map_subject)
    assert claims["converges"].verdict != "pass"


def test_random_init_model_does_not_pass(tmp_path, random_subject):
    claims = _run(_probe(tmp_path, CONVERGES, _rows("icl_map.jsonl")), random_subject)
    assert claims["converges"].verdict != "pass"


def test_parallel_blocks_are_not_applicable(tmp_path, tiny_subject):
    rows = [{"input": f"t{i}", "output": f" t{i + 20}"} for i in range(12)]
    claims = _run(_probe(tmp_path, "identity:\n  expect: {max_rel_error: {at_most: 1.0e-4}}\n" + CONVERGES, rows,
                         shots=4, prompts=8), tiny_subject("gpt_neox"))
    for c in claims.values():
        assert c.verdict == "inconclusive" and c.reason.startswith("not applicable"), c.reason


def test_all_claims_on_a_tiny_model(tmp_path, tiny_subject):
    rows = [{"input": f"t{i}", "output": f" t{i + 20}"} for i in range(14)]
    other = [{"input": f"t{i + 20}", "output": f" t{i}"} for i in range(14)]
    claims = _run(_probe(tmp_path, """\
        identity:
          expect: {max_rel_error: {at_most: 1.0e-4}}
        converges:
          expect: {spearman_rho: {at_most: -0.5}}
        transfers:
          layer: [0, 1]
          expect: {gain_recovered: {at_least: 0.3}}
          control: other_task
        """, rows, other, shots=4, prompts=8), tiny_subject("qwen2"))
    assert claims["identity"].verdict == "pass" and claims["identity"].effect < 1e-4
    assert claims["converges"].control.name.startswith("shuffled")
    assert claims["transfers"].control.name == "another task's update"
    assert {"random_rank1_recovered", "other_task_recovered"} <= set(claims["transfers"].details)


# ---- located errors ---------------------------------------------------------------------------------

def test_too_few_items_is_located(tmp_path):
    rows = [{"input": f"t{i}", "output": f" t{i + 20}"} for i in range(8)]
    with pytest.raises(SpecError) as e:
        check_data_files(load(_probe(tmp_path, CONVERGES, rows, shots=8)))
    assert "icl.probe.yaml:2:" in str(e.value) and "task" in str(e.value) and "at least 9" in str(e.value)


def test_format_without_input_is_located(tmp_path):
    rows = [{"input": f"t{i}", "output": f" t{i + 20}"} for i in range(12)]
    with pytest.raises(SpecError) as e:
        load(_probe(tmp_path, CONVERGES, rows, fmt='{example: "{output} .", query: "{input}"}'))
    assert "icl.probe.yaml:3:" in str(e.value) and "format.example" in str(e.value)
    assert "{input}" in str(e.value)


def test_layer_out_of_range_is_located(tmp_path, tiny_subject):
    rows = [{"input": f"t{i}", "output": f" t{i + 20}"} for i in range(12)]
    claims = CONVERGES.replace("layer: 1", "layer: 7")
    with pytest.raises(SpecError) as e:
        _run(_probe(tmp_path, claims, rows, shots=4, prompts=8), tiny_subject("llama"))
    assert "icl.probe.yaml:8:" in str(e.value) and "claims.converges.layer" in str(e.value)


def test_other_task_control_needs_a_control_task(tmp_path):
    rows = [{"input": f"t{i}", "output": f" t{i + 20}"} for i in range(12)]
    path = _probe(tmp_path, "transfers:\n  expect: {gain_recovered: {at_least: 0.3}}\n", rows, shots=4)
    with pytest.raises(SpecError) as e:
        check_data_files(load(path))
    assert "control_task" in str(e.value) and "claims.transfers" in str(e.value)


def test_bad_output_token_is_a_data_line(tmp_path, tiny_subject):
    rows = [{"input": f"t{i}", "output": f" t{i + 20}"} for i in range(12)]
    rows[3]["output"] = " zebra"
    with pytest.raises(DataError) as e:
        _run(_probe(tmp_path, CONVERGES, rows, shots=4, prompts=8), tiny_subject("llama"))
    assert "task.jsonl:4: output" in str(e.value)


@pytest.mark.slow
def test_shipped_probe_sets_up_and_the_identity_holds_on_the_default_model():
    from modelprobe.subject import load_subject
    subject = load_subject("smollm2-135m-instruct", progress=False)
    probe = load(Path(__file__).parent.parent / "probes" / "icl_update_antonyms.probe.yaml")
    check_data_files(probe)
    kind = instantiate(probe, subject)
    prep = kind.prepared
    s = prep.shots
    ctx = [prep.ids["prefix"][j * s + s - 1] for j in range(3)]
    per_layer, logits, _ = identity(subject, ctx, prep.ids["plain"][:3])
    assert per_layer.shape == (3, subject.n_layers)
    assert per_layer.max() <= 1e-4 and logits.max() <= 1e-4
