"""Patchscope grid (source prompts x layers) into a placeholder token: modelprobe vs plain transformers,
same work, same process.

Work: for each of `--queries` two-hop queries, the first entity's last-token state (resid_post) at every
layer l is written into the placeholder " x" of "Syria: Syria; leaf: leaf; Paris: Paris; x:" at layer l
(not the last token: ":" follows), in the prompt pass only, then `--new` greedy tokens are generated
(KV cache on).

- naive loop: plain transformers, one patched forward + greedy continuation per (query, layer) (a forward
  hook on decoder layer l);
- plain batched: plain transformers, all queries of one layer as the rows of one batch (the fair floor:
  every row runs the whole target prompt through every layer);
- modelprobe: `toolkit.prompt_writes.patch_at_and_generate` (rows of one layer resumed at that layer from the target's clean run,
  on the tokens from the placeholder on, with a per-row Patch), without and with the early stop the kind
  uses (rows whose first token already rules the expected answer out stop there).

All give the same tokens (checked). Prints seconds and ratios.

    python benchmarks/bench_patchscope.py [--model smollm2-135m-instruct] [--threads 2] [--queries 8] [--new 6]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from tabulate import tabulate

from modelprobe.spec import TokenPosition
from modelprobe.subject import clean_pass, load_subject
from modelprobe.subject.subject import cache_kwarg
from modelprobe.toolkit.answers import could_give_answer
from modelprobe.toolkit.prompt_writes import patch_at_and_generate
from modelprobe.toolkit.prompts import text_token_index, token_index

DATA = Path(__file__).resolve().parent.parent / "probes" / "data" / "two_hop.jsonl"
TARGET = "Syria: Syria; leaf: leaf; Paris: Paris; x:"


def plain_generate(model, ids: list[int], layer: int, p: int, values: torch.Tensor, new: int) -> list[list[int]]:
    """Rows = values; each row's prompt pass has layer `layer`'s output at token p replaced."""
    from transformers import DynamicCache

    state = {"prompt": True}

    def hook(mod, args, output):
        if not state["prompt"]:
            return output
        h = (output[0] if isinstance(output, tuple) else output).clone()
        h[:, p] = values.to(h.dtype)
        return (h, *output[1:]) if isinstance(output, tuple) else h

    handle = model.model.layers[layer].register_forward_hook(hook)
    n = values.shape[0]
    try:
        cache, out, step = DynamicCache(), [[] for _ in range(n)], torch.tensor([ids] * n)
        for _ in range(new):
            logits = model(input_ids=step, use_cache=True, logits_to_keep=1, **{cache_kwarg(model.forward): cache}).logits
            state["prompt"] = False
            nxt = logits[:, -1].argmax(-1)
            for i in range(n):
                out[i].append(int(nxt[i]))
            step = nxt[:, None]
        return out
    finally:
        handle.remove()


def run_plain(subject, ids, p, states, new: int, batched: bool) -> tuple[float, list]:
    """states [Q, L, d]; returns tokens per (query, layer), query-major."""
    Q, L = states.shape[:2]
    res = {}
    start = time.perf_counter()
    with torch.inference_mode():
        for layer in range(L):
            vals = states[:, layer]
            outs = (plain_generate(subject.model, ids, layer, p, vals, new) if batched
                    else [plain_generate(subject.model, ids, layer, p, v[None], new)[0] for v in vals])
            res.update({(q, layer): o for q, o in enumerate(outs)})
    return time.perf_counter() - start, [res[(q, layer)] for q in range(Q) for layer in range(L)]


def run_ours(subject, ids, p, states, new: int, aliases=None) -> tuple[float, list]:
    Q, L = states.shape[:2]
    start = time.perf_counter()
    clean = clean_pass(subject, ids, resid_pre=True)
    worth = None
    if aliases is not None:
        def worth(row, tok):
            return could_give_answer(subject.decode([tok]), aliases[row // L])
    out = patch_at_and_generate(subject, clean, p, list(range(L)) * Q, states.reshape(Q * L, -1), new, worth)
    return time.perf_counter() - start, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--queries", type=int, default=8)
    ap.add_argument("--new", type=int, default=6)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    subject = load_subject(args.model, progress=False)
    rows = [json.loads(x) for x in DATA.read_text().splitlines()[::7][:args.queries]]
    states = []
    for r in rows:
        q = subject.encode(r["query"])
        states.append(clean_pass(subject, q).resid[:, text_token_index(subject, r["query"], q, r["entity"], 0)])
    states = torch.stack(states)  # [Q, L, d]
    ids = subject.encode(TARGET)
    p = token_index(subject, TARGET, ids, TokenPosition(token=" x"))
    eos = subject.tokenizer.eos_token_id
    ours_t, ours = run_ours(subject, ids, p, states, args.new)
    batched_t, batched = run_plain(subject, ids, p, states, args.new, batched=True)
    naive_t, naive = run_plain(subject, ids, p, states, args.new, batched=False)
    trim = [seq[:seq.index(eos)] if eos in seq else seq for seq in batched]  # ours stops at EOS
    n = len(ours)
    same = sum(a == b for a, b in zip(ours, trim))
    same_naive = sum(a == b for a, b in zip(batched, naive))
    early_t, _ = run_ours(subject, ids, p, states, args.new, [[r["hop1_answer"], *r["hop1_aliases"]] for r in rows])
    table = [["naive loop (plain, one row per (query, layer))", n, f"{naive_t:.2f}", f"{naive_t / ours_t:.1f}x"],
             ["plain batched (rows = queries of one layer)", n, f"{batched_t:.2f}", f"{batched_t / ours_t:.1f}x"],
             ["modelprobe patch_at", n, f"{ours_t:.2f}", "1.0x"],
             ["modelprobe patch_at + early stop", n, f"{early_t:.2f}", f"{early_t / ours_t:.2f}x"]]
    print(tabulate(table, headers=["patchscope, queries x layers", "rows", "seconds", "vs modelprobe"]))
    print(f"same tokens: modelprobe vs plain batched {same}/{n}; plain batched vs naive {same_naive}/{n}; "
          f"{args.threads} threads, {args.new} new tokens, {len(rows)} queries, {subject.n_layers} layers, "
          f"placeholder at token {p} of {len(ids)}")


if __name__ == "__main__":
    main()
