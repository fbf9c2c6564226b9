"""Weight orthogonalisation: the same model as hook-based ablation where that holds (pre-norm families),
a clear refusal where it does not (post-norm sublayers), and the original weights back afterwards."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import torch

from modelprobe.errors import SiteError, SpecError
from modelprobe.kinds import instantiate, load
from modelprobe.kinds.direction import ablation, diff_in_means
from modelprobe.subject import AblateDirection, Site, load_subject
from modelprobe.subject.interventions import RunState, hooked
from modelprobe.subject.orthogonalize import orthogonalization_notes, orthogonalizing_deltas

torch.set_num_threads(1)


@contextlib.contextmanager
def orthogonalized(model, sitemap, direction):
    """The body runs with the weights orthogonalised to `direction`; the originals come back after."""
    deltas = orthogonalizing_deltas(sitemap, direction)
    with torch.no_grad(), hooked(model, sitemap, RunState(), deltas):
        yield deltas

TESTS = Path(__file__).parent
PLANTED = TESTS / "fixtures" / "models" / "refusal_planted"
DATA = TESTS / "fixtures" / "data"
PRE_NORM = ("llama", "mistral", "qwen2", "qwen3", "gpt2", "gpt_neox")


def _prompts(subject, n: int = 6) -> list[list[int]]:
    lines = (DATA / "toy_harmful.jsonl").read_text().splitlines()[:n // 2]
    lines += (DATA / "toy_harmless.jsonl").read_text().splitlines()[:n - n // 2]
    return subject.encode_all([json.loads(x)["prompt"] for x in lines], chat_template=True)


def _direction(d: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(d, generator=torch.Generator().manual_seed(seed))


def _hook_ablation(subject, u: torch.Tensor) -> list:
    ivs = ablation(subject.n_layers, u)
    if subject.sitemap.tied_embeddings:
        # A tied unembedding is orthogonalised with the embedding: it reads the final normed residual
        # without its component along u, which is what projecting u out of the `final` site does.
        ivs.append(AblateDirection(Site("final"), positions="all", direction=u))
    return ivs


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("family", PRE_NORM)
def test_orthogonalised_weights_equal_hook_ablation(tiny_subject, family):
    subject = tiny_subject(family)
    u = _direction(subject.sitemap.d_model)
    ids = _prompts(subject)
    before = _snapshot(subject.model)
    hooked_logits = subject.last_logits(ids, _hook_ablation(subject, u))
    deltas = orthogonalizing_deltas(subject.sitemap, u)
    orth_logits = subject.last_logits(ids, deltas)
    plain = subject.last_logits(ids)
    torch.testing.assert_close(orth_logits, hooked_logits, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(orth_logits, plain, atol=1e-3)  # the edit did something
    after = _snapshot(subject.model)
    assert all(torch.equal(before[k], after[k]) for k in before)  # restored exactly


def test_residual_stream_is_orthogonal_to_the_direction(tiny_subject):
    subject = tiny_subject("gpt2")  # Conv1D weights, biases and learned position embeddings
    u = _direction(subject.sitemap.d_model, 3)
    with orthogonalized(subject.model, subject.sitemap, u):
        fw = next(subject.run(_prompts(subject), capture=[Site("resid_post", 1)], logits=None))
    x = fw.acts[Site("resid_post", 1)]
    mask = fw.batch.attention_mask.bool()
    assert (x[mask] @ (u / u.norm())).abs().max() < 1e-4
    names = {d.parameter for d in orthogonalizing_deltas(subject.sitemap, u)}
    assert {"transformer.wte.weight", "transformer.wpe.weight", "transformer.h.0.attn.c_proj.bias",
            "transformer.h.1.mlp.c_proj.weight"} <= names


def test_generation_matches_hook_ablation_on_the_planted_model():
    subject = load_subject(str(PLANTED), progress=False)
    ids = _prompts(subject, 8)
    # The planted refusal direction is the one that changes replies; take it from the fixture data.
    harmful = [json.loads(x)["prompt"] for x in (DATA / "toy_harmful.jsonl").read_text().splitlines()[:32]]
    harmless = [json.loads(x)["prompt"] for x in (DATA / "toy_harmless.jsonl").read_text().splitlines()[:32]]
    u = diff_in_means(subject, subject.encode_all(harmful, True), subject.encode_all(harmless, True), [-1])[0, 2]
    u = u.float()
    hooked = subject.generate(ids, 6, ablation(subject.n_layers, u))
    weights = subject.generate(ids, 6, orthogonalizing_deltas(subject.sitemap, u))
    assert hooked == weights
    assert [subject.decode(g) for g in hooked][:4] == ["sure here is the answer ."] * 4  # refusal removed


def test_tied_embeddings_edit_the_unembedding_and_say_so(tiny_subject):
    subject = tiny_subject("gpt2")
    lm_head = subject.sitemap.unembed.weight
    original = lm_head.detach().clone()
    u = _direction(subject.sitemap.d_model, 5)
    with orthogonalized(subject.model, subject.sitemap, u):
        assert (lm_head @ (u / u.norm())).abs().max() < 1e-5
    assert torch.equal(lm_head, original)
    assert any("unembedding" in n for n in orthogonalization_notes(subject.sitemap))


def test_weights_come_back_after_an_exception(tiny_subject):
    subject = tiny_subject("llama")
    before = _snapshot(subject.model)
    with pytest.raises(RuntimeError, match="boom"):
        with orthogonalized(subject.model, subject.sitemap, _direction(subject.sitemap.d_model)):
            raise RuntimeError("boom")
    after = _snapshot(subject.model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert subject.leaked_hooks() == []


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_post_norm_families_are_refused(tiny_subject, family):
    subject = tiny_subject(family)
    with pytest.raises(SiteError, match="post-norm"):
        orthogonalizing_deltas(subject.sitemap, _direction(subject.sitemap.d_model))


def test_probe_refuses_weight_orthogonalize_on_a_post_norm_model(tiny_subject):
    path = TESTS / "probes" / "bad" / "direction_orthogonalize_post_norm.probe.yaml"
    with pytest.raises(SpecError) as e:
        instantiate(load(path), tiny_subject("gemma2"))
    msg = str(e.value)
    line = next(i for i, t in enumerate(path.read_text().splitlines(), 1) if "intervention: weight_orthogonalize" in t)
    assert msg.startswith(f"{path}:{line}:")
    assert ": claims.orthogonalized_weights_suppress_refusal.intervention: weight_orthogonalize is not " \
           "available for model type 'gemma2'" in msg
