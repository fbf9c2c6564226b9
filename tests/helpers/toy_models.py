"""Small models with a known logit-lens answer, saved as real HF directories (shared by plugin tests)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
TOY_TOKENIZER = FIXTURES / "toy_tokenizer"


def _config(vocab: int, tie: bool) -> LlamaConfig:
    return LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=64, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                       tie_word_embeddings=tie, bos_token_id=2, eos_token_id=3, pad_token_id=0)


def save_copy_model(directory: Path, damaged: bool = False) -> Path:
    """Every sublayer writes nothing, embeddings are tied: each layer's residual decodes to the input token.

    So a logit lens puts the last prompt token at rank 0 from the first layer on: the answer "emerges"
    at 1/L of depth — a planted, exactly known mechanism. `damaged` bakes a broken component into the
    weights (layer 0's MLP writes large noise), as a bad release would.
    """
    tok = AutoTokenizer.from_pretrained(TOY_TOKENIZER)
    torch.manual_seed(0)
    model = LlamaForCausalLM(_config(len(tok), tie=True)).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        if damaged:
            model.model.layers[0].mlp.down_proj.weight.normal_(0, 5.0)
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def save_random_model(directory: Path) -> Path:
    """A random-init model of the same shape: its logit lens finds nothing (the known negative)."""
    tok = AutoTokenizer.from_pretrained(TOY_TOKENIZER)
    torch.manual_seed(1)
    LlamaForCausalLM(_config(len(tok), tie=False)).eval().save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def copy_task_rows(n: int = 40, seed: int = 0) -> list[dict]:
    """Prompts of random t-tokens whose 'answer' is their own last token."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        toks = [f"t{rng.randrange(50)}" for _ in range(rng.randrange(3, 8))]
        rows.append({"prompt": " ".join(toks), "answer": " " + toks[-1]})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
