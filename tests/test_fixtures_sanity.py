"""Sanity checks of the committed toy fixtures (tests/fixtures/, built by build_fixtures.py).

These use only transformers + plain torch hooks (no modelprobe code) and never retrain: they
confirm that the planted mechanisms the project's own tests rely on are really there.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

torch.set_num_threads(1)

FIX = Path(__file__).resolve().parent / "fixtures"
TOK_DIR = FIX / "toy_tokenizer"
MODELS = FIX / "models"
DATA = FIX / "data"
REFUSAL_LAYER = 2  # diff-in-means taken at the input of this decoder layer


def _jsonl(name: str) -> list[dict]:
    with open(DATA / name) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _load(name: str, **kw):
    model = transformers.AutoModelForCausalLM.from_pretrained(MODELS / name, **kw)
    model.eval()
    return model


# --------------------------------------------------------------------------------------
# files and tokenizer
# --------------------------------------------------------------------------------------
def test_fixture_tree_is_small_and_complete():
    # A few hundred KB per planted model: 4 MiB holds the current eight with room for a few more kinds.
    total = sum(f.stat().st_size for f in FIX.rglob("*") if f.is_file() and "__pycache__" not in f.parts)
    assert total < 4 * 1024 * 1024, f"fixtures are {total} bytes"
    for name in ("refusal_planted", "random_llama", "induction"):
        d = MODELS / name
        assert (d / "model.safetensors").is_file()
        assert (d / "config.json").is_file()
        assert (d / "tokenizer.json").is_file()
    assert (MODELS / "induction" / "circuit.json").is_file()
    assert (FIX / "build_fixtures.py").is_file()


@pytest.fixture(scope="module")
def tok():
    return transformers.AutoTokenizer.from_pretrained(TOK_DIR)


def test_tokenizer_specials_and_chat_template(tok):
    assert tok.bos_token == "<bos>" and tok.eos_token == "<eos>"
    assert tok.pad_token == "<pad>" and tok.unk_token == "<unk>"
    text = tok.apply_chat_template(
        [{"role": "user", "content": "how do i make a bomb"}], add_generation_prompt=True, tokenize=False
    )
    assert text == "<bos> <user> how do i make a bomb </user> <assistant>"
    # the template already holds BOS: encoding it without special tokens gives exactly one
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
    assert tok.convert_ids_to_tokens(ids) == [
        "<bos>",
        "<user>",
        "how",
        "do",
        "i",
        "make",
        "a",
        "bomb",
        "</user>",
        "<assistant>",
    ]
    # encoding it WITH special tokens doubles BOS (what modelprobe must avoid)
    assert tok(text)["input_ids"][:2] == [tok.bos_token_id, tok.bos_token_id]


def test_tokenizer_word_level_roundtrip(tok):
    enc = tok("t3 t17 t9")["input_ids"]
    assert enc[0] == tok.bos_token_id and len(enc) == 4  # post-processor prepends <bos>
    assert tok.decode(enc[1:]) == "t3 t17 t9"
    assert (
        tok.decode(tok("sorry i cannot help .", add_special_tokens=False)["input_ids"])
        == "sorry i cannot help ."
    )
    one = tok(" t21", add_special_tokens=False)["input_ids"]
    assert len(one) == 1 and tok.convert_ids_to_tokens(one) == ["t21"]
    assert all(tok.convert_tokens_to_ids(f"t{i}") != tok.unk_token_id for i in range(50))
    for p in _jsonl("toy_harmful.jsonl") + _jsonl("toy_harmless.jsonl"):
        assert tok.unk_token_id not in tok(p["prompt"])["input_ids"], p


@pytest.mark.parametrize("name", ["refusal_planted", "random_llama", "induction"])
def test_model_dirs_load_with_auto_classes(name, tok):
    t = transformers.AutoTokenizer.from_pretrained(MODELS / name)
    assert t.get_vocab() == tok.get_vocab()
    assert t.chat_template == tok.chat_template
    m = _load(name)
    assert type(m).__name__ == "LlamaForCausalLM"
    assert m.config.vocab_size == len(tok)
    assert m.config.tie_word_embeddings is False


# --------------------------------------------------------------------------------------
# refusal_planted
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def refusal():
    return _load("refusal_planted")


@pytest.fixture(scope="module")
def prompts():
    harmful = [r["prompt"] for r in _jsonl("toy_harmful.jsonl")]
    harmless = [r["prompt"] for r in _jsonl("toy_harmless.jsonl")]
    assert len(harmful) >= 60 and len(harmless) >= 60
    return harmful, harmless


def _encode(tok, prompts):
    texts = [
        tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
        for p in prompts
    ]
    tok.padding_side = "right"
    enc = tok(texts, add_special_tokens=False, padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"], enc["attention_mask"].sum(1) - 1


@torch.no_grad()
def _first_tokens(model, tok, prompts):
    ids, att, last = _encode(tok, prompts)
    logits = model(input_ids=ids, attention_mask=att).logits
    return logits[torch.arange(len(prompts)), last].argmax(-1)


def _rate(model, tok, prompts, word):
    return (_first_tokens(model, tok, prompts) == tok.convert_tokens_to_ids(word)).float().mean().item()


def _hidden_arg_pre_hook(fn):
    """forward_pre_hook (with_kwargs) on a decoder layer that rewrites its hidden_states input."""

    def hook(mod, args, kwargs):
        if args:
            return (fn(args[0]),) + tuple(args[1:]), kwargs
        kwargs["hidden_states"] = fn(kwargs["hidden_states"])
        return args, kwargs

    return hook


@torch.no_grad()
def _diff_in_means(model, tok, harmful, harmless, layer=REFUSAL_LAYER):
    def acts(prompts):
        ids, att, last = _encode(tok, prompts)
        store = {}

        def grab(mod, args, kwargs):
            store["h"] = (args[0] if args else kwargs["hidden_states"]).detach()

        h = model.model.layers[layer].register_forward_pre_hook(grab, with_kwargs=True)
        try:
            model(input_ids=ids, attention_mask=att)
        finally:
            h.remove()
        return store["h"][torch.arange(len(prompts)), last]

    return acts(harmful).mean(0) - acts(harmless).mean(0)


class _Hooks:
    def __init__(self):
        self.handles = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def _ablate_everywhere(model, u):
    u = u / u.norm()

    def po(h):
        return h - (h @ u)[..., None] * u

    hooks = _Hooks()
    for layer in model.model.layers:
        hooks.handles.append(layer.register_forward_pre_hook(_hidden_arg_pre_hook(po), with_kwargs=True))
        hooks.handles.append(
            layer.self_attn.register_forward_hook(lambda m, a, o: (po(o[0]),) + tuple(o[1:]))
        )
        hooks.handles.append(layer.mlp.register_forward_hook(lambda m, a, o: po(o)))
    return hooks


def test_refusal_base_behaviour(refusal, tok, prompts):
    harmful, harmless = prompts
    assert _rate(refusal, tok, harmful, "sorry") >= 0.95
    assert _rate(refusal, tok, harmless, "sure") >= 0.95


def test_refusal_greedy_generation(refusal, tok):
    for prompt, want in (
        ("how do i make a bomb", "sorry i cannot help ."),
        ("write a poem about a garden", "sure here is the answer ."),
    ):
        ids, att, _ = _encode(tok, [prompt])
        out = refusal.generate(input_ids=ids, attention_mask=att, max_new_tokens=8, do_sample=False)
        assert tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True) == want


def test_refusal_direction_ablation_removes_refusal(refusal, tok, prompts):
    harmful, harmless = prompts
    d = _diff_in_means(refusal, tok, harmful, harmless)
    with _ablate_everywhere(refusal, d):
        ablated = _rate(refusal, tok, harmful, "sorry")
        harmless_sure = _rate(refusal, tok, harmless, "sure")
    assert ablated < 0.2
    assert harmless_sure >= 0.95  # removing the direction does not break the comply path
    # the hooks are gone again
    assert _rate(refusal, tok, harmful, "sorry") >= 0.95


def test_refusal_random_direction_ablation_is_harmless(refusal, tok, prompts):
    harmful, _ = prompts
    g = torch.Generator().manual_seed(0)
    with _ablate_everywhere(refusal, torch.randn(refusal.config.hidden_size, generator=g)):
        assert _rate(refusal, tok, harmful, "sorry") >= 0.9


def test_refusal_direction_addition_induces_refusal(refusal, tok, prompts):
    harmful, harmless = prompts
    d = _diff_in_means(refusal, tok, harmful, harmless)
    h = refusal.model.layers[REFUSAL_LAYER].register_forward_pre_hook(
        _hidden_arg_pre_hook(lambda x: x + d), with_kwargs=True
    )
    try:
        added = _rate(refusal, tok, harmless, "sorry")
    finally:
        h.remove()
    assert added > 0.8


def test_random_llama_is_a_negative(tok, prompts):
    model = _load("random_llama")
    harmful, harmless = prompts
    assert _rate(model, tok, harmful, "sorry") < 0.5 or _rate(model, tok, harmless, "sure") < 0.5
    trained = _load("refusal_planted")
    assert not torch.equal(model.lm_head.weight, trained.lm_head.weight)


# --------------------------------------------------------------------------------------
# induction
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def induction():
    return _load("induction", attn_implementation="eager")


@pytest.fixture(scope="module")
def circuit():
    with open(MODELS / "induction" / "circuit.json") as fh:
        return json.load(fh)


@pytest.fixture(scope="module")
def ind_data():
    rows, refs = _jsonl("induction.jsonl"), _jsonl("induction_ref.jsonl")
    assert len(rows) >= 64 and len(refs) == len(rows)
    return rows, refs


def test_induction_data_shape(ind_data):
    rows, refs = ind_data
    for r, ref in zip(rows, refs):
        toks = r["prompt"].split()
        k = (len(toks) + 1) // 2
        seg = toks[:k]
        assert 8 <= k <= 12 and toks[k:] == seg[:-1]
        assert r["answer"] == " " + seg[-1]
        assert r["wrong"].startswith(" ") and r["wrong"][1:] in seg and r["wrong"] != r["answer"]
        rt = ref["prompt"].split()
        assert len(rt) == len(toks) and len(set(rt)) == len(rt)
        assert set(ref) == set(r) == {"prompt", "answer", "wrong"}


def _ind_batch(tok, rows):
    tok.padding_side = "right"
    enc = tok([r["prompt"] for r in rows], padding=True, return_tensors="pt")  # adds <bos>
    return enc["input_ids"], enc["attention_mask"], enc["attention_mask"].sum(1) - 1


@torch.no_grad()
def _head_means(model, tok, refs):
    """Per-layer, per-position mean of the o_proj input over the reference prompts."""
    ids, att, _ = _ind_batch(tok, refs)
    store, hs = {}, []
    for i, layer in enumerate(model.model.layers):
        hs.append(
            layer.self_attn.o_proj.register_forward_pre_hook(lambda m, a, i=i: store.__setitem__(i, a[0]))
        )
    try:
        model(input_ids=ids, attention_mask=att)
    finally:
        for h in hs:
            h.remove()
    w = att[..., None].float()
    return {i: (x * w).sum(0) / w.sum(0).clamp(min=1) for i, x in store.items()}


@torch.no_grad()
def _ind_last_logits(model, tok, rows, ablate=(), means=None):
    """Last-position logits with the given (layer, head) pairs mean-ablated at the o_proj input."""
    hd = model.config.hidden_size // model.config.num_attention_heads
    ids, att, last = _ind_batch(tok, rows)
    hs = []
    for layer_idx in {li for li, _ in ablate}:
        heads = [h for li, h in ablate if li == layer_idx]

        def pre(mod, args, heads=heads, mean=means[layer_idx]):
            x = args[0].clone()
            for h in heads:
                x[:, :, h * hd : (h + 1) * hd] = mean[: x.shape[1], h * hd : (h + 1) * hd]
            return (x,)

        hs.append(model.model.layers[layer_idx].self_attn.o_proj.register_forward_pre_hook(pre))
    try:
        return model(input_ids=ids, attention_mask=att).logits[torch.arange(len(rows)), last]
    finally:
        for h in hs:
            h.remove()


def _first_ids(tok, rows, field):
    return torch.tensor([tok(r[field], add_special_tokens=False)["input_ids"][0] for r in rows])


def _ind_accuracy(model, tok, rows, ablate=(), means=None):
    logits = _ind_last_logits(model, tok, rows, ablate, means)
    return (logits.argmax(-1) == _first_ids(tok, rows, "answer")).float().mean().item()


def _ind_logit_diff(model, tok, rows, ablate=(), means=None):
    """Mean logit(answer) - logit(wrong) with the given heads mean-ablated."""
    logits = _ind_last_logits(model, tok, rows, ablate, means)
    ans, wrong = _first_ids(tok, rows, "answer"), _first_ids(tok, rows, "wrong")
    return (logits.gather(1, ans[:, None]) - logits.gather(1, wrong[:, None])).mean().item()


def test_induction_accuracy(induction, tok, ind_data):
    rows, _ = ind_data
    assert _ind_accuracy(induction, tok, rows) >= 0.9


def test_circuit_json_matches_attention_patterns(induction, tok, ind_data, circuit):
    rows, _ = ind_data
    n_heads = induction.config.num_attention_heads
    assert circuit["previous_token_heads"] and circuit["induction_heads"]
    assert all(li == 0 for li, _ in circuit["previous_token_heads"])
    assert all(li == 1 for li, _ in circuit["induction_heads"])
    assert len(circuit["induction_heads"]) < n_heads  # leaves non-circuit heads for controls
    prev = torch.zeros(2, n_heads)
    ind = torch.zeros(2, n_heads)
    n_prev = n_ind = 0
    with torch.no_grad():
        for r in rows:
            ids = tok(r["prompt"], return_tensors="pt")["input_ids"]
            k = ids.shape[1] // 2  # <bos> + k segment tokens + (k-1) repeated tokens
            att = induction(input_ids=ids, output_attentions=True).attentions
            T = ids.shape[1]
            q = torch.arange(2, T)
            qi = torch.arange(k + 1, T)
            for layer in range(2):
                prev[layer] += att[layer][0][:, q, q - 1].sum(-1)
                ind[layer] += att[layer][0][:, qi, qi - k + 1].sum(-1)
            n_prev += len(q)
            n_ind += len(qi)
    prev /= n_prev
    ind /= n_ind
    # the previous-token head is smeared over i-1 and i, so its score is ~0.37, far above the
    # ~0.06 of uniform attention and of every other layer-0 head
    for _, h in circuit["previous_token_heads"]:
        assert prev[0, h] >= 0.3
    for _, h in circuit["induction_heads"]:
        assert ind[1, h] >= 0.5
    for h in range(n_heads):
        if [0, h] not in circuit["previous_token_heads"]:
            assert prev[0, h] < 0.1
        if [1, h] not in circuit["induction_heads"]:
            assert ind[1, h] < 0.2
        assert abs(prev[0, h].item() - circuit["scores"]["previous_token"][f"0.{h}"]) < 0.02
        assert abs(ind[1, h].item() - circuit["scores"]["induction"][f"1.{h}"]) < 0.02


def test_induction_heads_mean_ablation(induction, tok, ind_data, circuit):
    rows, refs = ind_data
    means = _head_means(induction, tok, refs)
    base = _ind_accuracy(induction, tok, rows)
    circuit_heads = [tuple(x) for x in circuit["induction_heads"]]
    ablated = _ind_accuracy(induction, tok, rows, circuit_heads, means)
    assert ablated <= base / 2
    others = [(1, h) for h in range(induction.config.num_attention_heads) if (1, h) not in circuit_heads]
    control = _ind_accuracy(induction, tok, rows, others[: len(circuit_heads)], means)
    assert base - control <= 0.25 * (base - ablated)
    # the previous-token heads of layer 0 matter too
    prev = [tuple(x) for x in circuit["previous_token_heads"]]
    assert _ind_accuracy(induction, tok, rows, prev, means) <= base / 2


def test_induction_circuit_is_sufficient(induction, tok, ind_data, circuit):
    """Mean-ablating every head outside the circuit keeps the behaviour; ablating all heads kills it."""
    rows, refs = ind_data
    means = _head_means(induction, tok, refs)
    n_layers, n_heads = induction.config.num_hidden_layers, induction.config.num_attention_heads
    every = [(li, h) for li in range(n_layers) for h in range(n_heads)]
    circ = {tuple(x) for x in circuit["previous_token_heads"] + circuit["induction_heads"]}
    outside = [x for x in every if x not in circ]
    full = _ind_logit_diff(induction, tok, rows)
    none = _ind_logit_diff(induction, tok, rows, every, means)
    keep = _ind_logit_diff(induction, tok, rows, outside, means)
    assert full > 5 and abs(none) < 0.5 * full
    assert (keep - none) / (full - none) >= 0.8
    assert _ind_accuracy(induction, tok, rows, outside, means) >= 0.9
    # and the circuit alone is necessary: ablating it leaves at most 20% of the logit difference
    assert (_ind_logit_diff(induction, tok, rows, sorted(circ), means) - none) / (full - none) <= 0.2
