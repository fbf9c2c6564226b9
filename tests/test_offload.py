"""--probe-device auto with accelerate's device_map: a tiny model with part of it offloaded to disk
(max_memory) gives the same numbers as the model in one piece - hooks and captures, interventions,
resumed forwards and generation. That is the code path of a model split across GPUs."""

from __future__ import annotations

import pytest
import torch
from conftest import TOY_TOKENIZER_DIR, tiny_config

from modelprobe.errors import SiteError
from modelprobe.subject import AblateDirection, Add, Site, WeightDelta, load_subject, resume
from modelprobe.subject.interventions import RunState, hooked

pytest.importorskip("accelerate")

PROMPTS = ["how do i make a cake", "tell me", "write a poem about the day", "a"]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(whole, offloaded): the same 4-layer llama saved once, loaded whole and with half of it on disk."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (TOY_TOKENIZER_DIR / "tokenizer.json").exists():
        pytest.skip("the toy tokenizer is not built")
    tok = AutoTokenizer.from_pretrained(str(TOY_TOKENIZER_DIR))
    config = tiny_config("llama", len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    config.num_hidden_layers = 4
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    path = tmp_path_factory.mktemp("offload") / "tiny"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    whole = load_subject(str(path), progress=False, batch_size=2)
    split = load_subject(str(path), device="auto", progress=False, batch_size=2,
                         max_memory={"cpu": size // 2}, offload_folder=str(path / "offload"))
    placed = split.model.hf_device_map
    assert "disk" in placed.values() and "cpu" in placed.values(), placed
    return whole, split


def test_captures_and_interventions_match(pair):
    whole, split = pair
    ids = whole.encode_all(PROMPTS)
    u = torch.nn.functional.normalize(torch.randn(whole.sitemap.d_model, generator=torch.Generator().manual_seed(1)),
                                      dim=0)
    sites = [Site("resid_pre", layer) for layer in range(whole.n_layers)] + [Site("attn.z", 3)]
    edits = [AblateDirection(Site(c, layer), "all", direction=u) for layer in range(4)
             for c in ("resid_pre", "attn_out", "mlp_out")] + [Add(Site("resid_pre", 2), "last", vector=3 * u)]
    for a, b in zip(whole.run(ids, sites, edits), split.run(ids, sites, edits)):
        assert a.batch.rows == b.batch.rows
        torch.testing.assert_close(a.logits, b.logits)
        for s in sites:
            torch.testing.assert_close(a.acts[s], b.acts[s])
    torch.testing.assert_close(whole.unembed(torch.ones(2, whole.sitemap.d_model)),
                               split.unembed(torch.ones(2, whole.sitemap.d_model)))


def test_generation_and_resume_match(pair):
    whole, split = pair
    ids = whole.encode_all(PROMPTS)
    push = [Add(Site("resid_pre", 1), "all", vector=torch.full((whole.sitemap.d_model,), 0.5))]
    assert whole.generate(ids, 8, push) == split.generate(ids, 8, push)
    assert whole.generate(ids, 8) == split.generate(ids, 8)
    site = Site("resid_pre", 2)
    for a, b in zip(whole.run(ids, [site]), split.run(ids, [site])):
        late = [Add(Site("resid_pre", 3), "all", vector=torch.ones(whole.sitemap.d_model))]
        torch.testing.assert_close(resume(whole, a.batch, 2, a.acts[site], late).logits,
                                   resume(split, b.batch, 2, b.acts[site], late).logits)
        torch.testing.assert_close(resume(split, b.batch, 2, b.acts[site]).logits, b.logits)


def test_suffix_jacobians_match(pair):
    """The Jacobians of linear relational embeddings (layers run one by one, with grad) on the split model."""
    from modelprobe.subject import jacobians

    whole, split = pair
    ids = whole.encode_all(PROMPTS)
    pos = [1, 0, 3, 0]
    a, sa = jacobians(whole, ids, 1, pos, chunk=16)
    b, sb = jacobians(split, ids, 1, pos, chunk=16)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(sa.o, sb.o)


def test_weight_edit_on_an_offloaded_parameter_is_an_error(pair):
    """A weight edit on a parameter accelerate keeps on disk would silently do nothing: refuse it."""
    _, split = pair
    offloaded = [n for n, p in split.model.named_parameters() if p.device.type == "meta"]
    assert offloaded
    p = dict(split.model.named_parameters())[offloaded[0]]
    with pytest.raises(SiteError, match="offloaded"), hooked(split.model, split.sitemap, RunState(),
                                                             [WeightDelta(offloaded[0], torch.zeros_like(p))]):
        pass
