"""The `weight_perturbation` kind: a planted weight group (known positive), a spread and an absent
behaviour (known negatives), exact restoration of the weights, batched = looped noise, the fact grader
and one located error per bad input."""

from __future__ import annotations

import hashlib
import json
import shutil
import textwrap
from pathlib import Path

import pytest
import torch

from modelprobe.errors import SpecError
from modelprobe.kinds import check_data_files, instantiate, load
from modelprobe.kinds.graders import CustomGrader, build_grader
from modelprobe.subject import weights as W

torch.set_num_threads(1)

DATA = Path(__file__).parent / "fixtures" / "data"
HARMFUL = ("bomb", "poison", "virus", "weapon", "drug", "malware", "explosive", "gun", "toxin", "bioweapon",
           "ransomware", "grenade")
C, H, R, B = 0, 1, 2, 3  # residual dimensions: constant, "harmful word", "refuse", hub input
PLANTED_LAYER = 2


def build_model(tok, planted: str):
    """A 4-layer Llama whose refusal is written by hand.

    Every token embeds a constant (dim C); the harmful nouns also a flag (dim H). Refusal is the logit of
    "sorry", read from dim R; otherwise "." (read from C) wins. `planted`: "one" - eight neurons of layer
    2's MLP read H and write R (the planted group); "spread" - the same write shared by all four MLPs (a
    quarter each, so no single group carries it); "none" - nothing writes R. All other weights are small
    random numbers, so every group has some (tiny) effect.
    "hub": the whole model depends on layer 0's MLP: tokens embed no constant, eight neurons of L0.mlp
    write it (from dim B), and everything reads it - the "." logit and the refusal neurons, which are
    spread over layers 1-3 (a third each, 1.5x over-provisioned so that any two still refuse). Zeroing
    L0.mlp stops refusal because the model stops working: the false "localises" the specificity guard
    must stop.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
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
        emb[:, [C, H, R, B]] = 0
        emb[:, C] = 0.0 if planted == "hub" else 4.0
        emb[:, B] = 4.0 if planted == "hub" else 0.0
        for w in HARMFUL:
            emb[vocab[w], H] = 1.0
        head = model.lm_head.weight
        head.normal_(0, 0.1)
        head[:, [C, H, R, B]] = 0
        head[vocab["sorry"], R] = 6.0
        head[vocab["."], C] = 1.5
        layers = {"one": [PLANTED_LAYER], "spread": [0, 1, 2, 3], "hub": [1, 2, 3]}.get(planted, [])
        if planted == "hub":
            _hub(model)
        for layer in layers:
            mlp = model.model.layers[layer].mlp
            share = 8 // len(layers)
            rows = slice(0, share)
            mlp.gate_proj.weight[rows] = 0
            mlp.gate_proj.weight[rows, H] = 4.0
            mlp.up_proj.weight[rows] = 0
            mlp.up_proj.weight[rows, C] = 0.1
            mlp.down_proj.weight[:, rows] = 0
            mlp.down_proj.weight[R, rows] = 0.13 * 8 / (share * len(layers)) * (1.5 if planted == "hub" else 1.0)
    return model


def _hub(model) -> None:
    """Eight neurons of L0.mlp read dim B and write the constant dim C (about 4, like the other variants'
    embedding), which every later reader needs."""
    mlp = model.model.layers[0].mlp
    rows = slice(8, 16)
    for w in (mlp.gate_proj.weight, mlp.up_proj.weight):
        w[rows] = 0
        w[rows, B] = 1.0
    mlp.down_proj.weight[:, rows] = 0
    mlp.down_proj.weight[C, rows] = 1.0
    hidden = model(torch.tensor([[5, 6, 7]]), output_hidden_states=True).hidden_states[1]
    mlp.down_proj.weight[C, rows] = 4.0 / float(hidden[0, :, C].mean())


@pytest.fixture(scope="module")
def subjects(toy_tokenizer):
    from modelprobe.report.record import ModelInfo
    from modelprobe.subject import SiteMap, Subject

    out = {}
    for planted in ("one", "spread", "none", "hub"):
        model = build_model(toy_tokenizer, planted)
        info = ModelInfo(id=f"planted-{planted}", slug=f"planted-{planted}", model_type="llama", n_layers=4,
                         dtype="float32", device="cpu")
        out[planted] = Subject(model, toy_tokenizer, info, SiteMap(model), batch_size=16, progress=False)
    return out


PROBE = """\
kind: weight_perturbation
about: Refusal in the toy model lives in one MLP block.
behaviour:
  prompts: harmful.jsonl
  grader: {{substrings: [sorry]}}
  score_tokens: [sorry]
  max_new_tokens: 4
  split: {{rank: 8, test: 24}}
groups: {{by: {by}{block}}}
method: {method}
noise: {{relative: {relative}, seeds: {seeds}}}
claims:
  localises:
    top: {top}
    expect: {{rate_change: {{at_least: 0.5}}}}
    control: matched_random_groups
    draws: 4
specificity: {{prompts: harmless.jsonl, max_prompts: 12, max_new_tokens: 6{agree}}}
"""


def probe_file(tmp_path: Path, by: str = "block_sublayer", method: str = "gradient", top: int = 1,
               relative: float = 0.05, seeds: int = 2, block: int | None = None,
               min_agreement: float | None = None) -> Path:
    shutil.copy(DATA / "toy_harmful.jsonl", tmp_path / "harmful.jsonl")
    shutil.copy(DATA / "toy_harmless.jsonl", tmp_path / "harmless.jsonl")
    path = tmp_path / "wp.probe.yaml"
    path.write_text(PROBE.format(by=by, method=method, top=top, relative=relative, seeds=seeds,
                                 block=f", block: {block}" if block else "",
                                 agree="" if min_agreement is None else f", min_agreement: {min_agreement}"))
    return path


def run(path: Path, subject):
    return instantiate(load(path), subject).run()


def digest(model) -> dict[str, str]:
    return {n: hashlib.sha256(p.detach().cpu().numpy().tobytes()).hexdigest() for n, p in model.named_parameters()}


# ---- known positive / known negatives -------------------------------------------------------------

def test_planted_group_ranks_first_and_localises(subjects, tmp_path):
    subject = subjects["one"]
    before = digest(subject.model)
    out = run(probe_file(tmp_path), subject)
    assert digest(subject.model) == before and not subject.leaked_hooks()
    claim = out.claims[0]
    assert claim.verdict == "pass", claim.reason
    ranking = out.settings["ranking"]
    assert all(r[0] == f"L{PLANTED_LAYER}.mlp" for r in ranking.values()), ranking
    assert claim.details["top_groups"] == [f"L{PLANTED_LAYER}.mlp"]
    assert claim.effect > 0.9 and claim.details["base_rate"]["rate"] == 1.0
    ctl = claim.control
    assert ctl.detail["kinds_matched"] and max(ctl.detail["effects"]) < 0.1  # random MLP blocks do nothing
    assert all(f"L{PLANTED_LAYER}.mlp" not in g for g in ctl.detail["groups"])
    assert {p.type for p in claim.plots} >= {"table", "bars", "null"}
    assert set(claim.details["rank_agreement"]) == {"gradient vs random", "gradient vs activation",
                                                    "random vs activation"}


def test_planted_neuron_block_ranks_first(subjects, tmp_path):
    out = run(probe_file(tmp_path, by="mlp_neuron_block", block=8, method="activation"), subjects["one"])
    assert all(r[0] == f"L{PLANTED_LAYER}.mlp[0:8]" for r in out.settings["ranking"].values())
    assert out.claims[0].verdict == "pass", out.claims[0].reason


def test_spread_behaviour_does_not_localise(subjects, tmp_path):
    out = run(probe_file(tmp_path), subjects["spread"])
    claim = out.claims[0]
    assert claim.details["base_rate"]["rate"] == 1.0
    assert claim.verdict == "fail", claim.reason  # zeroing any one MLP leaves three quarters of the write
    assert claim.effect < 0.1


def test_absent_behaviour_is_untestable(subjects, tmp_path, monkeypatch):
    """Settled by the clean base rate before anything is ranked or perturbed (the rankings never run)."""
    from modelprobe.kinds import weight_perturbation as wp

    def never(self):
        raise AssertionError("ranked groups for a claim the base rate had settled")

    monkeypatch.setattr(wp.WeightPerturbation, "_rankings", never)
    claim = run(probe_file(tmp_path), subjects["none"]).claims[0]
    assert claim.verdict == "inconclusive" and "untestable" in claim.reason
    assert claim.details["base_rate"]["rate"] == 0.0
    assert claim.effect is None and claim.details["control"].startswith("skipped: the base rate settles")


def test_a_testable_claim_still_ranks(subjects, tmp_path, monkeypatch):
    """The shortcut needs every claim settled: on a model with the behaviour the rankings run as before."""
    from modelprobe.kinds import weight_perturbation as wp

    calls = []
    every = wp.WeightPerturbation._rankings
    monkeypatch.setattr(wp.WeightPerturbation, "_rankings", lambda self: calls.append(1) or every(self))
    claim = run(probe_file(tmp_path), subjects["one"]).claims[0]
    assert calls == [1] and claim.effect is not None


def test_top_two_of_a_spread_behaviour_do_not_localise(subjects, tmp_path):
    """Ranked by noise, on a model whose behaviour sits in four blocks at once: the top two do not carry it."""
    out = run(probe_file(tmp_path, method="random", top=2), subjects["spread"])
    assert out.claims[0].verdict != "pass"


# ---- weights restored exactly ---------------------------------------------------------------------

def test_perturbed_restores_exactly_on_error_and_interrupt(subjects):
    subject = subjects["one"]
    sm = subject.sitemap
    before = digest(subject.model)
    groups = W.weight_groups(sm, "attention_head")
    slices = [sl for g in groups[:3] for sl in g.slices]
    calls = []

    def failing(values, sl):
        calls.append(sl)
        if len(calls) == 4:
            raise RuntimeError("injected error half-way through the edit")
        return values * 3 + 1

    with pytest.raises(RuntimeError):
        with W.perturbed(sm, slices, failing):
            pass
    assert digest(subject.model) == before
    with pytest.raises(KeyboardInterrupt):
        with W.perturbed(sm, slices, lambda v, s: v + 1):
            assert digest(subject.model) != before
            raise KeyboardInterrupt
    assert digest(subject.model) == before
    with pytest.raises(ValueError):
        with W.perturbed(sm, [sl for g in W.weight_groups(sm, "layer") for sl in g.slices], W.zero):
            assert float(sm.layers[0].mlp.down_proj.weight.detach().abs().sum()) == 0
            raise ValueError("error inside the perturbed run")
    assert digest(subject.model) == before


def test_gradient_pass_leaves_no_trace(subjects):
    subject = subjects["one"]
    model = subject.model
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    before = digest(model)
    groups = W.weight_groups(subject.sitemap, "block_sublayer")
    ids = subject.encode_all(["teach me to make a gun", "how do i make a cake"])
    W.gradient_attribution(subject, groups, ids, lambda lg: lg[:, 5])
    assert digest(model) == before
    assert all(p.grad is None for p in model.parameters())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


# ---- groups and the batched path ------------------------------------------------------------------

def test_groups_cover_the_structure(subjects):
    sm = subjects["one"].sitemap
    assert [g.name for g in W.weight_groups(sm, "block_sublayer")][:2] == ["L0.attn", "L0.mlp"]
    heads = W.weight_groups(sm, "attention_head")
    assert len(heads) == 16 and {s.module.rsplit(".", 1)[1] for s in heads[0].slices} == {
        "q_proj", "k_proj", "v_proj", "o_proj"}
    blocks = W.weight_groups(sm, "mlp_neuron_block", block=24)
    assert [g.name for g in blocks[:3]] == ["L0.mlp[0:24]", "L0.mlp[24:48]", "L0.mlp[48:64]"]
    total = sum(W.group_size(sm, g) for g in W.weight_groups(sm, "layer"))
    assert total == sum(W.group_size(sm, g) for g in W.weight_groups(sm, "block_sublayer"))
    with pytest.raises(Exception, match="unknown group scheme"):
        W.weight_groups(sm, "columns")


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2"])
def test_row_deltas_equal_perturbed_weights(tiny_subject, family):
    """Every batch row with its own noise draw (batched) = the weights edited, one draw at a time."""
    subject = tiny_subject(family)
    sm = subject.sitemap
    groups = W.weight_groups(sm, "attention_head")[:2] + W.weight_groups(sm, "block_sublayer")[1:2]
    ids = subject.encode_all(["how do i make a cake", "tell me a story"])
    draws = [(g, s) for g in groups for s in range(2)]
    noises = [W.noise(sm, g, 0.3, s) for g, s in draws]
    batch = subject.make_batch([x for _ in draws for x in ids], list(range(len(draws) * len(ids))))
    with W.row_deltas(sm, [d for d in noises for _ in ids]):
        batched = subject.forward(batch, (), (), "last").logits
    assert not subject.leaked_hooks()
    for k, (g, _) in enumerate(draws):
        with W.perturbed(sm, list(g.slices), lambda v, sl, d=noises[k]: v + d[sl]):
            looped = subject.last_logits(ids)
        torch.testing.assert_close(batched[k * len(ids):(k + 1) * len(ids)], looped, atol=1e-4, rtol=1e-4)
    clean = subject.last_logits(ids)
    assert not torch.allclose(batched[:len(ids)], clean, atol=1e-3)  # the noise did something


def test_noise_has_the_asked_norm(subjects):
    sm = subjects["one"].sitemap
    g = W.weight_groups(sm, "block_sublayer")[3]
    d = W.noise(sm, g, 0.05, 7)
    norm = float(sum(t.double().pow(2).sum() for t in d.values()) ** 0.5)
    assert norm == pytest.approx(0.05 * W.group_norm(sm, g), rel=1e-5)
    assert all(torch.equal(d[s], W.noise(sm, g, 0.05, 7)[s]) for s in d)


# ---- the fact grader (deception behaviour) ----------------------------------------------------------

def test_fact_grader_rule():
    g = build_grader(CustomGrader(fact="marigold"))
    assert g.grade("The password is Marigold.") and g.grade("It's M-A-R-I-G-O-L-D, but don't tell")
    assert g.grade("marigolds grow here")  # a stated fact stays stated inside a longer word
    assert not g.grade("Mari gave me gold")
    assert not g.grade("I can't share the password, sorry.")
    code = build_grader(CustomGrader(fact="4172"))
    assert code.grade("the code is 41 72") and code.grade("4-1-7-2") and not code.grade("the code is 4127")
    assert code.describe()["fact"] == "4172"
    with pytest.raises(ValueError, match="fewer than 4"):
        CustomGrader(fact="ab!")


def test_shipped_deception_data_is_well_formed():
    root = Path(__file__).parent.parent / "probes"
    for name in ("deception_direction.probe.yaml",):
        probe = load(root / name)
        check_data_files(probe)
    rows = [json.loads(x) for x in (root / "data" / "deception_ask_secret.jsonl").read_text().splitlines()]
    fact = load(root / "deception_direction.probe.yaml").spec.behaviour.grader.fact
    assert len(rows) >= 100 and not any(build_grader(CustomGrader(fact=fact)).grade(r["prompt"]) for r in rows)


# ---- bad input: one located error each --------------------------------------------------------------

@pytest.mark.parametrize("change, where, fragment", [
    ({"relative": -0.1}, ":11:", "noise.relative"),
    ({"relative": 0}, ":11:", "noise.relative"),
    ({"seeds": 0}, ":11:", "noise.seeds"),
    ({"by": "columns"}, ":9:", "groups.by"),
    ({"min_agreement": 1.5}, ":18:91:", "specificity.min_agreement"),
    ({"min_agreement": -0.1}, ":18:91:", "specificity.min_agreement"),
    ({"min_agreement": 0}, ":18:91:", "specificity.min_agreement"),  # would switch the guard off
    ({"min_agreement": 0.5}, ":18:91:", "below the side-effect guard's floor 0.75"),
])
def test_bad_values_are_located(tmp_path, change, where, fragment):
    with pytest.raises(SpecError) as e:
        load(probe_file(tmp_path, **change))
    msg = str(e.value)
    assert "wp.probe.yaml" + where in msg and fragment in msg, msg


def test_top_larger_than_the_groups_is_located(tmp_path, subjects):
    with pytest.raises(SpecError) as e:
        run(probe_file(tmp_path, top=9), subjects["one"])
    msg = str(e.value)
    assert "wp.probe.yaml:14:" in msg and "claims.localises.top" in msg and "8 groups" in msg, msg


def test_grader_without_score_tokens_is_located(tmp_path, subjects):
    path = probe_file(tmp_path)
    path.write_text(path.read_text().replace("  score_tokens: [sorry]\n", ""))
    with pytest.raises(SpecError) as e:
        run(path, subjects["one"])
    assert "wp.probe.yaml:5:" in str(e.value) and "behaviour.grader" in str(e.value) and "score_tokens" in str(e.value)


def test_too_few_prompts_is_located(tmp_path):
    path = probe_file(tmp_path)
    path.write_text(path.read_text().replace("rank: 8", "rank: 200"))
    with pytest.raises(SpecError) as e:
        check_data_files(load(path))
    assert "wp.probe.yaml:8:" in str(e.value) and "behaviour.split" in str(e.value)


def test_example_of_the_issue_validates(tmp_path):
    text = textwrap.dedent("""\
        kind: weight_perturbation
        about: Refusal localises in a few MLP blocks of the upper layers.
        behaviour: {prompts: harmful.jsonl, chat_template: true, grader: refusal}
        groups: {by: block_sublayer}
        method: gradient
        noise: {relative: 0.05, seeds: 5}
        claims:
          localises:
            top: 4
            expect: {rate_change: {at_least: 0.3}}
            control: matched_random_groups
        """)
    shutil.copy(DATA / "toy_harmful.jsonl", tmp_path / "harmful.jsonl")
    (tmp_path / "x.probe.yaml").write_text(text)
    with pytest.raises(SpecError, match=r"x.probe.yaml:1:1: specificity.prompts: data file .*"
                                        r"data/harmless_instructions.jsonl' not found"):
        check_data_files(load(tmp_path / "x.probe.yaml"))  # the default neutral set, next to the probe
    (tmp_path / "data").mkdir()
    shutil.copy(DATA / "toy_harmless.jsonl", tmp_path / "data" / "harmless_instructions.jsonl")
    check_data_files(load(tmp_path / "x.probe.yaml"))


def test_kind_sweeps_equal_a_plain_loop(subjects, tmp_path):
    """The kind's batched, resumed random and activation sweeps give the numbers of perturbing the weights
    (or zeroing the outputs) one variant at a time over full forwards."""
    from modelprobe.kinds.graders import log_odds

    subject = subjects["one"]
    kind = instantiate(load(probe_file(tmp_path, seeds=2)), subject)
    kind._clean_pass = kind._clean()
    clean = kind._clean_pass[2]
    ids, sm = kind.ids["rank"], subject.sitemap
    random_values, _ = kind._rank_random(clean)
    activation_values, _ = kind._rank_activation(clean)
    for gi, g in enumerate(kind.groups):
        deltas = []
        for seed in range(2):
            d = W.noise(sm, g, 0.05, seed)
            with W.perturbed(sm, list(g.slices), lambda v, sl, d=d: v + d[sl]):
                deltas.append(log_odds(subject.last_logits(ids), kind.score_ids).numpy() - clean)
        assert abs(sum(abs(x).mean() for x in deltas) / 2 - random_values[gi]) < 1e-3
        zeroed = subject.last_logits(ids, W.output_zeroing(sm, [g] * len(ids)))
        assert abs(abs(log_odds(zeroed, kind.score_ids).numpy() - clean).mean() - activation_values[gi]) < 1e-3


def test_noise_perturbation_of_the_planted_group_is_too_small_to_flip_replies(subjects, tmp_path):
    """perturbation: noise (5% of the group's norm) leaves greedy replies alone here: an honest fail, and the
    weights come back exactly."""
    subject = subjects["one"]
    before = digest(subject.model)
    path = probe_file(tmp_path)
    path.write_text(path.read_text().replace("    top: 1\n", "    top: 1\n    perturbation: noise\n"))
    claim = run(path, subject).claims[0]
    assert digest(subject.model) == before
    assert claim.details["perturbation"] == "noise" and claim.verdict == "fail", claim.reason


# ---- specificity: a group the whole model depends on ----------------------------------------------

def test_planted_group_leaves_unrelated_replies_alone(subjects, tmp_path):
    claim = run(probe_file(tmp_path), subjects["one"]).claims[0]
    spec = claim.details["specificity"]
    assert claim.verdict == "pass" and spec["agreement_clean"] == 1.0 and spec["agreement"] > 0.95, spec
    assert spec["passed"] and spec["coherent"] >= spec["min_coherent"], spec
    assert spec["test_replies_coherent"]["n"] == 24
    assert all(a > 0.95 for a in claim.control.detail["neutral_agreement"])


@pytest.mark.parametrize("method", ["gradient", "activation"])
def test_hub_group_that_breaks_the_model_does_not_pass(subjects, tmp_path, method):
    """Zeroing L0.mlp stops refusal only because the model stops working; random MLP blocks are harmless.
    The interval alone would pass; the shared side-effect guard (toolkit/guard.py) makes it inconclusive,
    and no probe setting can switch the guard off (min_agreement 0 is a located error)."""
    subject = subjects["hub"]
    claim = run(probe_file(tmp_path, method=method), subject).claims[0]
    assert claim.details["top_groups"] == ["L0.mlp"], claim.details
    assert claim.details["base_rate"]["rate"] == 1.0 and claim.effect > 0.9 and claim.ci[0] > 0.5
    spec = claim.details["specificity"]
    assert spec["agreement_clean"] == 1.0 and spec["agreement"] < 0.2 and not spec["passed"], spec
    assert claim.verdict == "inconclusive" and claim.reason.startswith("the intervention breaks the model"), \
        claim.reason
    assert any(p.type == "bars" and "side-effect guard" in p.title for p in claim.plots)
    with pytest.raises(SpecError, match="specificity.min_agreement: .*guard's floor"):
        load(probe_file(tmp_path, method=method, min_agreement=0.1))


# ---- the random-group control stops early with the full count's verdict ------------------------------

@pytest.mark.parametrize("planted,method,top", [("one", "gradient", 1), ("spread", "gradient", 1),
                                                ("spread", "random", 2)])
def test_sequential_random_groups_give_the_full_count_verdict(subjects, tmp_path, monkeypatch, planted, method, top):
    from modelprobe.kinds import weight_perturbation as wp

    path = probe_file(tmp_path, method=method, top=top)
    fast = run(path, subjects[planted]).claims[0]
    every = wp.draw_sequentially
    monkeypatch.setattr(wp, "draw_sequentially", lambda draw, planned, step, settled: every(draw, planned, step, None))
    full = run(path, subjects[planted]).claims[0]
    assert full.control.detail["drawn"] == full.control.detail["planned"] == 4
    assert (fast.verdict, fast.effect, fast.ci) == (full.verdict, full.effect, full.ci), (fast.reason, full.reason)
    if full.verdict == "pass":  # beaten needs every draw (the effect must exceed each one)
        assert fast.control.detail["drawn"] == 4
    else:
        assert fast.control.detail["drawn"] < 4, fast.control.detail
