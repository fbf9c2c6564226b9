"""The site map: every canonical site reads what its name promises, checked against the model's own
weights and the residual-stream identities, on a tiny model of every supported family."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import FAMILIES

from modelprobe.errors import SiteError
from modelprobe.subject import Site, SiteMap, resolve_layer, resolve_sites

PROMPTS = ["how do i make a cake", "tell me", "write a poem about the day now please"]
PER_LAYER = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "attn.z", "mlp.post")
POST_NORM = {"gemma2", "gemma3"}
ATOL = 1e-5


def _capture_all(subject):
    """One padded forward capturing every site the family has; {(component, layer): tensor}."""
    comps = [c for c in PER_LAYER if c != "resid_mid" or subject.sitemap.family.resid_mid_reader]
    sites = [Site(c, layer) for layer in range(subject.n_layers) for c in comps]
    sites += [Site("embed"), Site("final"), Site("logits")]
    ids = subject.encode_all(PROMPTS)
    fw = subject.forward(subject.make_batch(ids, list(range(len(ids)))), sites, logits="all")
    return {(s.component, s.layer): v for s, v in fw.acts.items()}, fw


def _linear(x: torch.Tensor, module, conv1d: bool) -> torch.Tensor:
    """Apply a projection from its raw weights (GPT-2's Conv1D stores [in, out])."""
    w = module.weight
    y = x @ w if conv1d else x @ w.T
    return y + module.bias if module.bias is not None else y


@pytest.fixture(scope="module")
def captured(tiny_subject):
    return {fam: _capture_all(tiny_subject(fam)) for fam in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_every_component_resolves_at_every_layer(tiny_subject, captured, family):
    sm = tiny_subject(family).sitemap
    for layer in range(sm.n_layers):
        for comp in PER_LAYER:
            if comp == "resid_mid" and family == "gpt_neox":
                continue
            hp = sm.hook_point(comp, layer)
            assert hp.path.startswith(f"{sm.family.layers}.{layer}")
    for comp in ("embed", "final", "logits"):
        assert sm.hook_point(comp, None).module is not None
    acts, _ = captured[family]  # and each one was actually hit by a forward pass
    assert all(v.shape[0] == len(PROMPTS) for v in acts.values())


@pytest.mark.parametrize("family", FAMILIES)
def test_residual_identities(captured, family):
    acts, _ = captured[family]
    # The next block reads exactly what the previous one wrote.
    assert torch.equal(acts["resid_pre", 1], acts["resid_post", 0])
    for layer in (0, 1):
        pre, post = acts["resid_pre", layer], acts["resid_post", layer]
        attn, mlp = acts["attn_out", layer], acts["mlp_out", layer]
        # Sequential, post-norm (read after the norms) and parallel blocks all add both sublayers.
        torch.testing.assert_close(post, pre + attn + mlp, atol=ATOL, rtol=0)
        if family != "gpt_neox":
            torch.testing.assert_close(acts["resid_mid", layer], pre + attn, atol=ATOL, rtol=0)
        # The sublayers actually wrote something (the identity is not 0 == 0).
        assert attn.abs().max() > 1e-3 and mlp.abs().max() > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_final_and_logits_sites(tiny_subject, captured, family):
    subject = tiny_subject(family)
    acts, fw = captured[family]
    with torch.inference_mode():
        expected_final = subject.sitemap.final_norm(acts["resid_post", subject.n_layers - 1])
    torch.testing.assert_close(acts["final", None], expected_final, atol=ATOL, rtol=0)
    # The logit lens on the last residual reproduces the model's own logits (soft-capping included).
    torch.testing.assert_close(subject.unembed(acts["resid_post", subject.n_layers - 1]), fw.logits,
                               atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_embed_site(tiny_subject, captured, family):
    subject = tiny_subject(family)
    acts, fw = captured[family]
    ids = fw.batch.input_ids
    table = subject.model.get_input_embeddings().weight
    if family == "gpt2":
        # Token embedding only; the learned positions join before block 0.
        torch.testing.assert_close(acts["embed", None], table[ids], atol=0, rtol=0)
        wpe = subject.model.transformer.wpe.weight[fw.batch.position_ids]
        torch.testing.assert_close(acts["resid_pre", 0], table[ids] + wpe, atol=ATOL, rtol=0)
    else:
        torch.testing.assert_close(acts["embed", None], acts["resid_pre", 0], atol=0, rtol=0)
        if family not in POST_NORM:  # Gemma scales the embedding by sqrt(d_model)
            torch.testing.assert_close(acts["embed", None], table[ids], atol=0, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_attn_z_through_output_projection_is_attn_out(tiny_subject, captured, family):
    subject = tiny_subject(family)
    sm = subject.sitemap
    acts, _ = captured[family]
    for layer in (0, 1):
        z = acts["attn.z", layer]
        assert z.shape[-2:] == (sm.n_heads, sm.d_head)
        with torch.inference_mode():
            out = _linear(z.flatten(-2), sm.module(layer, sm.family.attn_out_proj), sm.family.conv1d)
            if family in POST_NORM:
                out = sm.module(layer, "post_attention_layernorm")(out)
        torch.testing.assert_close(out, acts["attn_out", layer], atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_mlp_post_through_down_projection_is_mlp_out(tiny_subject, captured, family):
    subject = tiny_subject(family)
    sm = subject.sitemap
    acts, _ = captured[family]
    for layer in (0, 1):
        post = acts["mlp.post", layer]
        assert post.shape[-1] == sm.d_mlp
        with torch.inference_mode():
            out = _linear(post, sm.module(layer, sm.family.mlp_out_proj), sm.family.conv1d)
            if family in POST_NORM:
                out = sm.module(layer, "post_feedforward_layernorm")(out)
        torch.testing.assert_close(out, acts["mlp_out", layer], atol=ATOL, rtol=1e-5)


def test_llama_mlp_post_is_the_gated_activation(tiny_subject, captured):
    """mlp.post is silu(gate(x)) * up(x) of the normed resid_mid, not some other point of the MLP."""
    sm = tiny_subject("llama").sitemap
    acts, _ = captured["llama"]
    with torch.inference_mode():
        x = sm.module(0, "post_attention_layernorm")(acts["resid_mid", 0])
        w_gate, w_up = sm.module(0, "mlp.gate_proj").weight, sm.module(0, "mlp.up_proj").weight
        expected = F.silu(x @ w_gate.T) * (x @ w_up.T)
    torch.testing.assert_close(acts["mlp.post", 0], expected, atol=ATOL, rtol=1e-5)


def test_sequential_neox_has_resid_mid(toy_tokenizer):
    """GPT-NeoX with use_parallel_residual=False is sequential: resid_mid exists and adds up."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from modelprobe.report.record import ModelInfo
    from modelprobe.subject import Subject

    torch.manual_seed(0)
    cfg = GPTNeoXConfig(vocab_size=len(toy_tokenizer), hidden_size=32, intermediate_size=64,
                        num_hidden_layers=2, num_attention_heads=4, use_parallel_residual=False,
                        initializer_range=0.2)
    model = GPTNeoXForCausalLM(cfg).eval()
    subject = Subject(model, toy_tokenizer, ModelInfo(id="seq-neox", slug="seq-neox"), SiteMap(model),
                      progress=False)
    assert subject.sitemap.features()["parallel_attn_mlp"] is False
    acts, _ = _capture_all(subject)
    for layer in (0, 1):
        pre, mid, post = acts["resid_pre", layer], acts["resid_mid", layer], acts["resid_post", layer]
        torch.testing.assert_close(mid, pre + acts["attn_out", layer], atol=ATOL, rtol=0)
        torch.testing.assert_close(post, mid + acts["mlp_out", layer], atol=ATOL, rtol=0)


def test_multimodal_gemma3_reads_its_text_decoder(toy_tokenizer):
    """model_type 'gemma3' (Gemma 3 4B and up) loads with a vision tower; text sites still resolve."""
    import transformers as tf

    from modelprobe.report.record import ModelInfo
    from modelprobe.subject import Subject
    from modelprobe.subject.preflight import run_preflight

    n = len(toy_tokenizer)  # three extra ids for the image markers
    text = dict(vocab_size=n + 3, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, initializer_range=0.2)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    cfg = tf.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4, boi_token_index=n,
                          eoi_token_index=n + 1, image_token_index=n + 2)
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(cfg).eval()
    subject = Subject(model, toy_tokenizer, ModelInfo(id="g3", slug="g3", dtype="float32"), SiteMap(model),
                      progress=False)
    assert subject.sitemap.features()["post_norm_sublayers"] and subject.n_layers == 2
    acts, fw = _capture_all(subject)
    for layer in (0, 1):
        pre, post = acts["resid_pre", layer], acts["resid_post", layer]
        torch.testing.assert_close(post, pre + acts["attn_out", layer] + acts["mlp_out", layer], atol=ATOL, rtol=0)
    torch.testing.assert_close(subject.unembed(acts["resid_post", 1]), fw.logits, atol=1e-4, rtol=0)
    assert all(r.passed for r in run_preflight(subject))


# ---- detected features ------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_features(tiny_subject, family):
    model = tiny_subject(family).model
    feats = tiny_subject(family).sitemap.features()
    cfg = model.config
    n_heads = getattr(cfg, "num_attention_heads", None) or cfg.n_head
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
    tied = model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert feats["post_norm_sublayers"] is (family in POST_NORM)
    assert feats["parallel_attn_mlp"] is (family == "gpt_neox")
    assert feats["gated_mlp"] is (family not in ("gpt2", "gpt_neox"))
    assert feats["grouped_query_attention"] is (n_kv < n_heads)
    assert feats["tied_embeddings"] is tied
    assert feats["n_layers"] == 2 and feats["d_model"] == 32 and feats["n_heads"] == 4
    assert feats["d_head"] == (16 if family == "qwen3" else 8)
    assert feats["d_mlp"] == (128 if family == "gpt2" else 64)


def test_feature_fixtures_cover_both_sides(tiny_subject):
    """The families above really exercise GQA/no-GQA and tied/untied, so test_features can fail."""
    feats = [tiny_subject(f).sitemap.features() for f in FAMILIES]
    assert {f["grouped_query_attention"] for f in feats} == {True, False}
    assert {f["tied_embeddings"] for f in feats} == {True, False}


# ---- errors ------------------------------------------------------------------------------------

def test_neox_resid_mid_is_a_site_error(tiny_subject):
    sm = tiny_subject("gpt_neox").sitemap
    with pytest.raises(SiteError, match="gpt_neox") as err:
        sm.hook_point("resid_mid", 0)
    assert "resid_mid" in err.value.message
    with pytest.raises(SiteError, match="resid_mid") as err:
        resolve_sites({"component": "resid_mid", "layer": 0}, sm, ("site",))
    assert err.value.loc == ("site", "component")


@pytest.mark.parametrize("kind", ["opt", "bloom"])
def test_unsupported_model_type(kind):
    import transformers as tf

    torch.manual_seed(0)
    if kind == "opt":
        cfg = tf.OPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                           num_attention_heads=4, word_embed_proj_dim=32, max_position_embeddings=32)
    else:
        cfg = tf.BloomConfig(vocab_size=64, hidden_size=32, n_layer=2, n_head=4)
    model = tf.AutoModelForCausalLM.from_config(cfg).eval()
    with pytest.raises(SiteError, match=f"'{kind}' is not supported"):
        SiteMap(model)


def test_model_without_lm_head_is_a_site_error(tiny_subject):
    """A bare decoder (LlamaModel, not LlamaForCausalLM): a clear SiteError, not an AttributeError."""
    with pytest.raises(SiteError, match="'llama': LlamaModel has no decoder layers at 'model.layers'"):
        SiteMap(tiny_subject("llama").model.model)


def test_layer_out_of_range(tiny_subject):
    sm = tiny_subject("llama").sitemap
    for bad in (2, -1, None):
        with pytest.raises(SiteError, match="out of range"):
            sm.hook_point("resid_post", bad)
    with pytest.raises(SiteError, match="beyond") as err:
        resolve_sites({"component": "resid_post", "layer": 2}, sm, ("s",))
    assert err.value.loc == ("s", "layer")


def test_head_and_neuron_bounds(tiny_subject):
    sm = tiny_subject("gpt2").sitemap
    ok = resolve_sites({"component": "attn.z", "layer": 1, "head": [0, 3]}, sm)
    assert ok == [Site("attn.z", 1, heads=(0, 3))]
    with pytest.raises(SiteError, match="head index 4") as err:
        resolve_sites({"component": "attn.z", "layer": 1, "head": 4}, sm, ("s",))
    assert err.value.loc == ("s", "head")
    with pytest.raises(SiteError) as err:
        resolve_sites({"component": "attn.z", "layer": 1, "head": [0, 4]}, sm, ("s",))
    assert err.value.loc == ("s", "head", 1)
    assert resolve_sites({"component": "mlp.post", "layer": 0, "neuron": 127}, sm)[0].neurons == (127,)
    with pytest.raises(SiteError, match="neuron index 128"):
        resolve_sites({"component": "mlp.post", "layer": 0, "neuron": 128}, sm)
    with pytest.raises(SiteError, match="head index True"):  # YAML `head: true` is not head 1
        resolve_sites({"component": "attn.z", "layer": 0, "head": True}, sm)
    with pytest.raises(SiteError, match="only applies to components attn.k, attn.q, attn.v, attn.z"):
        resolve_sites({"component": "resid_post", "head": 0}, sm)
    with pytest.raises(SiteError, match="unknown component"):
        resolve_sites({"component": "resid_middle"}, sm)


def test_resolve_sites_layers_and_raw_module(tiny_subject):
    sm = tiny_subject("llama").sitemap
    assert [s.layer for s in resolve_sites({"component": "resid_pre", "layer": "all"}, sm)] == [0, 1]
    assert resolve_sites({"component": "final", "layer": 5}, sm) == [Site("final")]  # not per layer
    assert resolve_sites({}, sm) == [Site("resid_post", 1)]  # default: last layer's output
    raw = resolve_sites({"module": "model.layers.1.self_attn.o_proj", "io": "input"}, sm)[0]
    assert raw.hook_point(sm).module is sm.module(1, "self_attn.o_proj")
    with pytest.raises(SiteError, match="no module"):
        resolve_sites({"module": "model.layers.7.mlp"}, sm)


@pytest.mark.parametrize(("spec", "expected"), [
    (0, [0]), (5, [5]), (-1, [5]), (-6, [0]), (0.0, [0]), (0.5, [3]), (0.99, [5]), (1.0, [5]),
    ([0, -1, 2], [0, 5, 2]), ("1:3", [1, 2]), (":2", [0, 1]), ("4:", [4, 5]), ("-2:", [4, 5]),
    ("-3:-1", [3, 4]), ("all", [0, 1, 2, 3, 4, 5]),
])
def test_resolve_layer(spec, expected):
    assert resolve_layer(spec, 6) == expected


@pytest.mark.parametrize("spec", [6, -7, 1.5, -0.1, True, False, "x:y", "3:1", "0:7", "three", None, [0, 9]])
def test_resolve_layer_rejects(spec):
    with pytest.raises(SiteError):
        resolve_layer(spec, 6, ("layer",))


def test_resolve_layer_locates_list_items():
    with pytest.raises(SiteError) as err:
        resolve_layer([0, 1, 99], 6, ("probe", "layer"))
    assert err.value.loc == ("probe", "layer", 2)


# ---- q, k, v: one head vocabulary with attn.z ------------------------------------------------------

SEPARATE_QKV = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3")


@pytest.mark.parametrize("family", SEPARATE_QKV)
def test_zeroing_one_value_head_zeroes_exactly_the_query_heads_that_read_it(tiny_subject, family):
    """attn.v per key-value head: with grouped-query attention, kv head g serves query heads
    g*group .. (g+1)*group-1; a zero value there gives those heads (and only those) a zero attn.z."""
    from modelprobe.subject import ZeroAblate

    subject = tiny_subject(family)
    sm = subject.sitemap
    group = sm.n_heads // sm.n_kv_heads
    ids = subject.encode_all(PROMPTS)
    batch = subject.make_batch(ids, list(range(len(ids))))
    z = Site("attn.z", 1)
    [v] = resolve_sites({"component": "attn.v", "layer": 1, "head": 0}, sm)
    clean = subject.forward(batch, [z]).acts[z]
    out = subject.forward(batch, [z, Site("attn.v", 1)], [ZeroAblate(v)]).acts
    got = out[z].view(*out[z].shape[:2], sm.n_heads, sm.d_head)
    real = batch.attention_mask.bool()
    assert torch.all(got[real][:, :group] == 0)
    ref = clean.view_as(got)
    assert torch.allclose(got[real][:, group:], ref[real][:, group:], atol=ATOL)
    assert out[Site("attn.v", 1)].shape[-2:] == (sm.n_kv_heads, sm.d_head)
    assert torch.all(out[Site("attn.v", 1)][real][:, 0] == 0)


def test_q_k_v_names_bounds_and_fused_families(tiny_subject):
    sm = tiny_subject("llama").sitemap  # 4 query heads, 2 key-value heads
    assert resolve_sites({"component": "attn.q", "layer": 0, "head": 3}, sm)[0].name == "blocks.0.attn.hook_q[heads=3]"
    with pytest.raises(SiteError, match="head index 2 is out of range"):
        resolve_sites({"component": "attn.k", "layer": 0, "head": 2}, sm)
    with pytest.raises(SiteError, match="one fused matrix"):
        resolve_sites({"component": "attn.q", "layer": 0}, tiny_subject("gpt2").sitemap)
    with pytest.raises(SiteError, match="attn.pattern .* not available"):
        resolve_sites({"component": "attn.pattern", "layer": 0}, sm)
    with pytest.raises(SiteError, match="'head' only applies to components attn.k, attn.q, attn.v, attn.z"):
        resolve_sites({"component": "resid_pre", "layer": 0, "head": 0}, sm)
