"""The side-effect guard (toolkit/guard.py) in the `direction` kind, and selection's tier 2 on known answers:
a direction that works although its ablation moves harmless next-token distributions past the paper's KL
limit passes, with the guard's values shown; a "direction" that only works by breaking the model is
inconclusive, never a pass; the guard's thresholds are fixed in code."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from modelprobe.kinds import instantiate, load
from modelprobe.subject import load_subject
from modelprobe.toolkit import guard

torch.set_num_threads(1)

TESTS = Path(__file__).parent
PROBES = TESTS / "probes"
FIXTURES = TESTS / "fixtures"
DATA = FIXTURES / "data"
COLLATERAL = FIXTURES / "models" / "refusal_collateral"

C, D, R = 0, 1, 2  # residual dimensions of the breaker: "harmful-heavy" constant, plain constant, "refuse"
HARMFUL = ("bomb", "poison", "virus", "weapon", "drug", "malware", "explosive", "gun", "toxin", "bioweapon",
           "ransomware", "grenade")


def run(path: Path, subject):
    return instantiate(load(path), subject).run()


# ---- a direction the paper's KL filter drops, that works ------------------------------------------------

@pytest.fixture(scope="module")
def collateral():
    return load_subject(str(COLLATERAL), progress=False)


def test_collateral_fixture_is_what_it_claims():
    """Re-measured from the committed weights with build_fixtures' own helpers (plain torch hooks)."""
    import sys
    sys.path.insert(0, str(FIXTURES))
    try:
        import build_fixtures as bf
    finally:
        sys.path.remove(str(FIXTURES))
    from transformers import LlamaForCausalLM
    model = LlamaForCausalLM.from_pretrained(COLLATERAL, dtype=torch.float32).eval()
    m = bf.collateral_metrics(model, bf.load_tokenizer())
    assert m["greedy_replies_as_planted"] and m["t7_mass_harmless"] > 0.05
    for layer in (1, 2):
        assert m[f"L{layer}_sorry_harmful"] == 1.0 and m[f"L{layer}_sorry_harmful_ablated"] == 0.0
        assert m[f"L{layer}_sorry_harmless_added"] == 1.0 and m[f"L{layer}_ablated_kl_harmless"] > 0.1


def test_direction_beyond_the_kl_limit_passes_with_the_guard_shown(collateral):
    out = run(PROBES / "toy_refusal_tokens.probe.yaml", collateral)
    assert [c.verdict for c in out.claims] == ["pass", "pass"], [c.reason for c in out.claims]
    s = out.settings
    sel = s["selection"]
    assert sel["tier"] == 2 and sel["removed"]["passed"] == 0 and sel["removed"]["kl"] == 2
    assert sel["missed"].startswith("paper's filters not met: KL ") and "> 0.1" in sel["missed"]
    assert "none of the 2 candidates measured in full passed" in sel["note"]
    assert s["layer"] in (1, 2) and s["position"] == -1 and s["collateral_kl"]["mean"] > 0.1
    for c in out.claims:
        g = c.details["guard"]
        assert c.details["selection"]["tier"] == 2 and "KL" in c.details["selection"]["missed"]
        assert {"agreement", "coherent", "coherent_clean", "min_agreement", "min_coherent", "rule"} <= set(g)
        assert any(p.type == "bars" and p.title.startswith("side-effect guard") for p in c.plots)
    ablate = out.claims[0].details["guard"]
    assert ablate["passed"] and ablate["agreement"] >= guard.MIN_AGREEMENT and ablate["coherent"] == 1.0
    assert out.claims[1].details["guard"]["gates"].startswith("no")  # add changes these replies by design


def test_guard_runs_on_the_probes_neutral_prompts_when_given(collateral, tmp_path):
    text = (PROBES / "toy_refusal_tokens.probe.yaml").read_text().replace("../fixtures/data/", f"{DATA}/")
    path = tmp_path / "neutral.probe.yaml"
    path.write_text(text.replace("  chat_template: true\n", f"  chat_template: true\n  neutral: {DATA}/toy_harmful.jsonl\n", 1))
    out = run(path, collateral)
    g = out.claims[0].details["guard"]
    assert "toy_harmful.jsonl" in g["prompts"] and g["n"] == guard.PROMPTS
    # teacher forcing: only the first reply token of a harmful prompt changes ("sorry" -> "sure")
    assert g["agreement"] < 1.0 and g["passed"] and out.claims[0].verdict == "pass"
    path.write_text(text.replace("  chat_template: true\n", "  chat_template: true\n  neutral: nowhere.jsonl\n", 1))
    from modelprobe.errors import SpecError
    with pytest.raises(SpecError, match="prompts.neutral"):
        run(path, collateral)


# ---- a "direction" that only works by breaking the model ------------------------------------------------

def build_breaker(tok):
    """A 2-layer Llama written by hand. Every token embeds the constants C and D (4.0); harmful nouns embed
    C = 6. The normal reply "." reads C (and beats "t3", which reads D); refusal neurons in L1.mlp fire when C exceeds 1.25 D (a harmful
    noun) and write R, which "sorry" reads. The difference of means of harmful and harmless prompts at
    their last token (the noun) is therefore 2 e_C: a real direction, but one the whole model needs.
    Ablating it stops refusal (harmful prompts 1 -> 0, random directions of the same norm change nothing)
    only because the model stops working: without C every reply is "t3 t3 t3"."""
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                      tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    vocab = tok.get_vocab()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.02)
        emb = model.model.embed_tokens.weight
        emb.normal_(0, 0.1)
        emb[:, [C, D, R]] = 0
        emb[:, C] = emb[:, D] = 4.0
        for w in HARMFUL:
            emb[vocab[w]] = 0
            emb[vocab[w], C], emb[vocab[w], D] = 6.0, 4.0
        head = model.lm_head.weight
        head.normal_(0, 0.1)
        head[:, [C, D, R]] = 0
        head[vocab["sorry"], R] = 6.0
        head[vocab["."], C] = 1.5
        head[vocab["t3"], D] = 1.0  # the reply of a model without C: "t3 t3 t3"
        mlp = model.model.layers[1].mlp
        rows = slice(0, 8)
        mlp.gate_proj.weight[rows] = 0
        mlp.gate_proj.weight[rows, C], mlp.gate_proj.weight[rows, D] = 8.0, -10.0
        mlp.up_proj.weight[rows] = 0
        mlp.up_proj.weight[rows, D] = 0.5
        mlp.down_proj.weight[:, rows] = 0
        mlp.down_proj.weight[R, rows] = 0.5
    return model


BREAKER_PROBE = """\
kind: direction
about: Refusal in the breaker model is mediated by one direction (it is not, the direction is a hub).
prompts:
  positive: harmful.jsonl
  negative: harmless.jsonl
  chat_template: false
  split: {train: 32, validation: 0, test: 32}
direction: {layer: 0, position: last}
behaviour:
  grader: {substrings: [sorry]}
  max_new_tokens: 4
claims:
  ablation_suppresses_refusal:
    intervention: ablate
    on: positive
    expect: {rate_drop: {at_least: 0.5}}
"""


@pytest.fixture(scope="module")
def breaker(toy_tokenizer):
    from modelprobe.report.record import ModelInfo
    from modelprobe.subject import SiteMap, Subject
    model = build_breaker(toy_tokenizer)
    info = ModelInfo(id="breaker", slug="breaker", model_type="llama", n_layers=2, dtype="float32", device="cpu")
    return Subject(model, toy_tokenizer, info, SiteMap(model), batch_size=16, progress=False)


def test_direction_that_only_breaks_the_model_is_inconclusive(breaker, tmp_path, monkeypatch):
    shutil.copy(DATA / "toy_harmful.jsonl", tmp_path / "harmful.jsonl")
    shutil.copy(DATA / "toy_harmless.jsonl", tmp_path / "harmless.jsonl")
    path = tmp_path / "breaker.probe.yaml"
    path.write_text(BREAKER_PROBE)
    claim = run(path, breaker).claims[0]
    d = claim.details
    assert d["base_rate"]["rate"] == 1.0 and d["intervened_rate"]["rate"] == 0.0, d
    assert claim.ci[0] > 0.5  # the interval alone would pass, and random directions leave refusal intact
    g = d["guard"]
    assert not g["passed"] and g["agreement"] < guard.MIN_AGREEMENT and g["agreement_clean"] == 1.0, g
    assert claim.verdict == "inconclusive", claim.reason
    assert claim.reason.startswith("the intervention breaks the model: the direction ablated"), claim.reason
    assert "greedy next token matches the clean model's on only" in claim.reason
    assert claim.control is None  # not judged against its control: it cannot pass
    # The false pass the guard is there for (switched off here by hand; no probe setting can):
    monkeypatch.setattr(guard.GuardResult, "reason", lambda self: None)
    unguarded = run(path, breaker).claims[0]
    assert unguarded.verdict == "pass" and unguarded.control.p_value < 0.05, unguarded.reason


# ---- the guard's rule ----------------------------------------------------------------------------------

def _result(agreement, coherent, clean_texts):
    ref = guard.Reference([[1]] * len(clean_texts), [[1, 2]] * len(clean_texts), clean_texts, "neutral prompts")
    return guard.GuardResult(np.array(agreement, float), np.array(coherent, bool), ref, "ablated")


def test_guard_thresholds_are_fixed_and_relative_to_the_clean_model():
    ok = ["here is a fine reply"] * 4
    assert _result([1, 1, 0.5, 0.5], [1, 1, 1, 0], ok).passed  # agreement 0.75, coherent 0.75 of 1.0
    low = _result([1, 1, 0.5, 0.4], [1, 1, 1, 1], ok)
    assert not low.passed and low.reason().startswith(f"{guard.BREAKS}: ablated: the greedy next token")
    incoherent = _result([1, 1, 1, 1], [1, 1, 0, 0], ok)
    assert not incoherent.passed and "coherent" in incoherent.reason()
    # a model whose clean replies are degenerate is held to its own share, not to 1
    assert _result([1, 1, 1, 1], [0, 0, 0, 0], ["a a a a a a"] * 4).passed
    assert guard.MIN_AGREEMENT == 0.75 and guard.MIN_COHERENT_KEPT == 0.75
