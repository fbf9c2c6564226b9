"""Latent language (pivot vs target through the logit lens): modelprobe vs plain transformers, same work.

Plain transformers: `output_hidden_states=True` on the same left-padded batches, then per layer the final
norm + unembedding of the last position, the softmax, and for the target, the pivot and the control word
the summed probability of their first tokens and their best rank. Prints seconds and the ratio
(modelprobe / plain).

    python benchmarks/bench_latent_language.py [--model smollm2-135m-instruct] [--threads 2] [--repeats 3]
                                               [--rows 154]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from tabulate import tabulate

from modelprobe.kinds import instantiate, load
from modelprobe.kinds.latent_language import ROLES
from modelprobe.subject import load_subject

PROBE = Path(__file__).resolve().parent.parent / "probes" / "latent_language_fr_de.probe.yaml"


def plain_latent(subject, ids, index) -> float:
    """The same measurement written directly against transformers; index[role] = ([n, k] ids, [n, k] mask)."""
    model, norm, head = subject.model, subject.sitemap.final_norm, subject.sitemap.unembed
    start = time.perf_counter()
    with torch.inference_mode():
        for batch in subject.batches(ids):
            out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                        position_ids=batch.position_ids, output_hidden_states=True)
            for h in out.hidden_states[1:]:
                logits = head(norm(h[:, -1])).float()
                probs = logits.softmax(-1)
                for role in ROLES:
                    idx, mask = index[role][0][batch.rows], index[role][1][batch.rows]
                    (probs.gather(1, idx) * mask).sum(1)
                    best = logits.gather(1, idx).masked_fill(~mask, float("-inf")).amax(1)
                    (logits > best[:, None]).sum(1)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rows", type=int, default=None, help="only the first N prompts")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    subject = load_subject(args.model, progress=False)
    kind = instantiate(load(PROBE), subject)
    if args.rows:
        kind.ids = kind.ids[:args.rows]
        kind.sets = {role: s[:args.rows] for role, s in kind.sets.items()}
    index = {role: kind._index(role) for role in ROLES}
    plain_latent(subject, kind.ids, index)  # warm-up
    plain, ours = [], []
    for _ in range(args.repeats):
        plain.append(plain_latent(subject, kind.ids, index))
        start = time.perf_counter()
        kind.lens()
        ours.append(time.perf_counter() - start)
    p, o = min(plain), min(ours)
    rows = [["latent language, all layers, 3 words", len(kind.ids), f"{p:.2f}", f"{o:.2f}", f"{o / p:.2f}"]]
    print(tabulate(rows, headers=["workload", "prompts", "plain s", "modelprobe s", "ratio"]))
    print(json.dumps({"workload": "latent_language", "plain_s": p, "modelprobe_s": o, "ratio": o / p}))


if __name__ == "__main__":
    main()
