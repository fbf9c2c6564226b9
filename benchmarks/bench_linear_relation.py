"""Jacobians for linear relational embeddings: modelprobe's batched path vs a naive plain-torch loop.

Same work: do/ds, s = resid_post of layer l at the subject's last token, o = the last layer's output at
the last token, for a few prompts. modelprobe: one forward with grad per batch, then d/chunk backward
passes that each give `chunk` rows of every prompt's Jacobian (a vmap over cotangents). Naive: per
prompt, a forward with grad (hooks written by hand against transformers), then d backward passes, one
row each. Checks that the Jacobians agree and prints seconds and the ratio (modelprobe / naive).

    python benchmarks/bench_linear_relation.py [--model smollm2-135m-instruct] [--threads 1] [--prompts 2]
"""

from __future__ import annotations

import argparse
import time

import torch
from tabulate import tabulate

from modelprobe.subject import load_subject
from modelprobe.subject.jacobian import jacobians

SUBJECTS = ["France", "Japan", "Egypt", "Peru", "Norway", "Kenya", "Chile", "India"]


def naive(model, ids: list[list[int]], layer: int, positions: list[int]) -> torch.Tensor:
    """Row-by-row backward: the loop one writes without modelprobe."""
    out = []
    for x, p in zip(ids, positions):
        inp = torch.tensor([x])
        with torch.no_grad():
            h = model(input_ids=inp, output_hidden_states=True).hidden_states[layer + 1][0, p]
        s = h.clone().requires_grad_(True)

        def patch(mod, args, output, s=s, p=p):
            hidden = output[0] if isinstance(output, tuple) else output
            hidden = hidden.clone()
            hidden[0, p] = s
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        seen = []
        h1 = model.model.layers[layer].register_forward_hook(patch)
        h2 = model.model.norm.register_forward_pre_hook(lambda mod, args, seen=seen: seen.append(args[0]))
        try:
            model(input_ids=inp, logits_to_keep=1)
        finally:
            h1.remove()
            h2.remove()
        o = seen[-1][0, -1]
        rows = [torch.autograd.grad(o[k], s, retain_graph=True)[0] for k in range(o.shape[0])]
        out.append(torch.stack(rows))
    return torch.stack(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--layer", type=int, default=9)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    subject = load_subject(args.model, progress=False)
    texts = [f"The capital of {s} is" for s in SUBJECTS[:args.prompts]]
    ids = subject.encode_all(texts)
    pos = [len(subject.encode(f"The capital of {s}")) - 1 for s in SUBJECTS[:args.prompts]]
    start = time.perf_counter()
    ours, _ = jacobians(subject, ids, args.layer, pos)
    t_ours = time.perf_counter() - start
    start = time.perf_counter()
    plain = naive(subject.model, ids, args.layer, pos)
    t_plain = time.perf_counter() - start
    err = float((ours - plain).abs().max() / plain.abs().max())
    print(tabulate([["Jacobian do/ds", args.prompts, ours.shape[-1], f"{t_plain:.2f}", f"{t_ours:.2f}",
                     f"{t_ours / t_plain:.2f}", f"{err:.1e}"]],
                   headers=["work", "prompts", "d", "naive s", "modelprobe s", "ratio", "max rel diff"]))
    assert err < 1e-3, f"the Jacobians differ: {err}"


if __name__ == "__main__":
    main()
