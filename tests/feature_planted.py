"""A tiny Llama with planted units whose roles are known exactly (built in a second; nothing committed).

Attention and every MLP write nothing (o_proj, down_proj zero), except one neuron: the residual stream
of a token is its embedding, plus, for the five trigger words, what layer 1's neuron CAUSAL writes.

- trigger words have a private embedding coordinate (0); layer 1's neurons CAUSAL and ECHO both read it
  (gate = up = 3 e_0), so both fire on a trigger and are exactly 0 on every other token;
- CAUSAL writes 0.05 e_1 per unit of activation; the unembedding row of "sure" reads e_1: after a
  trigger the model says "sure" (log-probability ~0); zeroing CAUSAL removes that;
- ECHO's down-projection column is zero: it correlates with the trigger perfectly and causes nothing;
- every other neuron of layer 1 writes nothing either, so the random-unit null is exactly 0.

"with" prompts end on a trigger word; "without" prompts end on another word.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

TOY_TOKENIZER = Path(__file__).parent / "fixtures" / "toy_tokenizer"
TRIGGERS = ["cake", "song", "kite", "garden", "salad"]
OTHERS = ["water", "food", "music", "home", "school", "friend", "story", "picture"]
CAUSAL, ECHO = 3, 7
LAYER = 1


def build(directory: Path) -> Path:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(TOY_TOKENIZER)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                         tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, initializer_range=0.2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    trig = [tok.convert_tokens_to_ids(w) for w in TRIGGERS]
    sure = tok.convert_tokens_to_ids("sure")
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb.normal_(0, 0.5)
        emb[:, :2] = 0.0
        emb[trig, 0] = 4.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        mlp = model.model.layers[LAYER].mlp
        for j in (CAUSAL, ECHO):
            mlp.gate_proj.weight[j] = 0.0
            mlp.up_proj.weight[j] = 0.0
            mlp.gate_proj.weight[j, 0] = 3.0
            mlp.up_proj.weight[j, 0] = 3.0
        # other neurons must not read the trigger coordinate (they stay random elsewhere)
        others = [j for j in range(64) if j not in (CAUSAL, ECHO)]
        mlp.gate_proj.weight[others, 0] = 0.0
        mlp.up_proj.weight[others, 0] = 0.0
        mlp.down_proj.weight[1, CAUSAL] = 0.01
        model.lm_head.weight[:, 1] = 0.0
        model.lm_head.weight[sure, 1] = 3.0
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def prompts(n: int, seed: int, trigger: bool) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = [f"t{rng.randrange(50)}" for _ in range(rng.randrange(2, 6))]
        words.append(rng.choice(TRIGGERS if trigger else OTHERS))
        rows.append({"prompt": " ".join(words)})
    return rows


def write_data(directory: Path, n: int = 30) -> None:
    data = directory / "data"
    data.mkdir(parents=True, exist_ok=True)
    for name, trigger, seed in (("with.jsonl", True, 1), ("without.jsonl", False, 2)):
        (data / name).write_text("".join(json.dumps(r) + "\n" for r in prompts(n, seed, trigger)))


def train_sae(subject, directory: Path, d_sae: int = 24, steps: int = 400, seed: int = 0) -> Path:
    """A tiny ReLU SAE on layer 1's resid_post of the planted model, saved in the SAELens format."""
    from safetensors.torch import save_file

    from modelprobe.subject.sites import Site

    site = Site("resid_post", LAYER)
    rows = prompts(120, 11, True) + prompts(120, 12, False)
    ids = subject.encode_all([r["prompt"] for r in rows])
    xs = []
    for fw in subject.run(ids, capture=[site], logits=None, batch_size=64):
        for i, n in enumerate(fw.batch.lengths):
            xs.append(fw.acts[site][i, -n + 1:])  # skip BOS
    x = torch.cat(xs).float()
    g = torch.Generator().manual_seed(seed)
    d = x.shape[1]
    w_enc = (torch.randn(d, d_sae, generator=g) * 0.1).requires_grad_()
    w_dec = (torch.randn(d_sae, d, generator=g) * 0.1).requires_grad_()
    b_enc = torch.zeros(d_sae, requires_grad=True)
    b_dec = x.mean(0).clone().requires_grad_()
    opt = torch.optim.Adam([w_enc, w_dec, b_enc, b_dec], lr=1e-2)
    for _ in range(steps):
        a = torch.relu((x - b_dec) @ w_enc + b_enc)
        loss = ((a @ w_dec + b_dec - x) ** 2).sum(-1).mean() + 0.05 * (a * w_dec.norm(dim=-1)).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = directory / "sae"
    out.mkdir(parents=True, exist_ok=True)
    save_file({"W_enc": w_enc.detach().contiguous(), "W_dec": w_dec.detach().contiguous(),
               "b_enc": b_enc.detach().contiguous(), "b_dec": b_dec.detach().contiguous()},
              str(out / "sae_weights.safetensors"))
    cfg = {"architecture": "standard", "d_in": d, "d_sae": d_sae, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": True, "normalize_activations": "none",
           "metadata": {"model_name": "planted-feature", "hook_name": f"blocks.{LAYER}.hook_resid_post",
                        "hook_layer": LAYER, "hook_head_index": None, "prepend_bos": True}}
    (out / "cfg.json").write_text(json.dumps(cfg, indent=2))
    return out
