#!/usr/bin/env python3
"""Speed of the `injection` kind's trials against plain transformers, in the same process.

The work: greedy replies (max_new_tokens) to T trials of the shipped probe's transcript, each with its own
concept vector x strength added at one layer from the token before "Trial n" on, generated tokens
included (half of them uninjected, as control trials are).
  modelprobe   `Injection.generate`: one batched generation, one vector per row, the shared transcript
               run once (KV cache reused), finished rows dropped
  loop         `model.generate` per trial with one forward pre-hook (what a replication script does)
  batched      `model.generate` on left-padded batches of the same size with a per-row hook (the fair floor
               for batching alone)
Outputs are compared (same greedy text). The ratios are plain / modelprobe (> 1: modelprobe is faster).

    python benchmarks/bench_injection.py [--model smollm2-135m-instruct] [--trials 32] [--threads 2]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def injector(layer_module, adds: torch.Tensor, starts: torch.Tensor, pads: torch.Tensor):
    """Forward pre-hook adding adds[i] to row i from its start column on (prompt call), and to every
    generated token (later calls, one column each)."""
    state = {"prompt": True}

    def pre(mod, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        if state["prompt"]:
            cols = torch.arange(h.shape[1])[None, :]
            mask = (cols >= (pads + starts)[:, None]).to(h.dtype)[..., None]
            state["prompt"] = False
        else:
            mask = torch.ones(h.shape[0], h.shape[1], 1, dtype=h.dtype)
        h = h + mask * adds[:, None, :].to(h.dtype)
        return ((h, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": h})

    return layer_module.register_forward_pre_hook(pre, with_kwargs=True)


def plain_generate(model, tok, ids: list[list[int]], starts: list[int], adds: torch.Tensor, layer: int,
                   max_new: int, batch: int) -> list[str]:
    out = [""] * len(ids)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    for b0 in range(0, len(ids), batch):
        rows = list(range(b0, min(len(ids), b0 + batch)))
        width = max(len(ids[r]) for r in rows)
        x = torch.full((len(rows), width), pad)
        mask = torch.zeros_like(x)
        for j, r in enumerate(rows):
            x[j, width - len(ids[r]):] = torch.tensor(ids[r])
            mask[j, width - len(ids[r]):] = 1
        pads = torch.tensor([width - len(ids[r]) for r in rows])
        handle = injector(model.model.layers[layer], adds[rows], torch.tensor([starts[r] for r in rows]), pads)
        try:
            with torch.inference_mode():
                gen = model.generate(input_ids=x, attention_mask=mask, max_new_tokens=max_new, do_sample=False,
                                     pad_token_id=pad)
        finally:
            handle.remove()
        for j, r in enumerate(rows):
            out[r] = tok.decode(gen[j, width:], skip_special_tokens=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--trials", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from modelprobe.kinds import instantiate, load
    from modelprobe.subject import load_subject

    subject = load_subject(args.model, progress=False)
    kind = instantiate(load(ROOT / "probes" / "injection_concepts.probe.yaml"), subject)
    kind.spec = kind.spec.model_copy(update={"batch_size": args.trials})  # one batch for every path
    vecs = kind.concept_vectors()
    layer = kind.layers[len(kind.layers) // 2]
    n = args.trials
    ids, starts = kind.trial_ids([kind.spec.question] * n, list(range(1, n + 1)))
    adds = torch.zeros(n, vecs[layer].shape[-1])
    adds[: n // 2] = vecs[layer][: n // 2] * torch.tensor([1.0, 2.0, 4.0, 8.0]).repeat(n)[: n // 2, None]
    max_new = kind.spec.max_new_tokens
    model, tok = subject.model, subject.tokenizer

    t = time.perf_counter()
    mine = kind.generate(ids, starts, {layer: adds}, "bench")
    t_mine = time.perf_counter() - t
    print(f"modelprobe {t_mine:.1f}s", flush=True)
    t = time.perf_counter()
    loop = plain_generate(model, tok, ids, starts, adds, layer, max_new, 1)
    t_loop = time.perf_counter() - t
    print(f"loop {t_loop:.1f}s", flush=True)
    t = time.perf_counter()
    batched = plain_generate(model, tok, ids, starts, adds, layer, max_new, n)
    t_batched = time.perf_counter() - t
    same_loop = sum(a.strip() == b.strip() for a, b in zip(mine, loop))
    same_batched = sum(a.strip() == b.strip() for a, b in zip(mine, batched))
    print(f"model {args.model}, {n} trials (layer {layer}, {max_new} new tokens, {args.threads} threads)")
    print(f"modelprobe {t_mine:.1f}s | loop, one hooked generate per trial {t_loop:.1f}s "
          f"(x{t_loop / t_mine:.2f}) | plain batched {t_batched:.1f}s (x{t_batched / t_mine:.2f})")
    print(f"same replies: loop {same_loop}/{n}, batched {same_batched}/{n}")


if __name__ == "__main__":
    main()
