#!/usr/bin/env python3
"""Shared-prefix generation against the padded path on a real model: token-identical replies, layer-tokens.

Runs the refusal probe's test prompts (chat template, 48 new tokens, EOS stops a row) through
`Subject.generate` twice per setting, `share_prefix` off and on: no intervention, the difference of means
ablated at every layer and position, added at layer 12, and a per-row callable (behave_variants' stack of
base, ablation and addition). Counts rows x positions per decoder-layer call (a pre-hook on every layer),
split into prompt calls and generation steps, and compares every call's next-token logits bit for bit
(a digest per call; the shared prefix's own call is left out). Where a reply differs, prints the row, the first step that
differs, both tokens and the padded path's top-2 logit gap there (teacher-forced, one row).

Usage: OMP_NUM_THREADS=1 PYTHONPATH=$PWD python benchmarks/check_shared_prefix.py [--new 48] [--json out.json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
LAYER, POSITION = 12, -2  # the probe's chosen layer and post-instruction position in the committed baseline


def refusal_ids(subject):
    """Train and test ids of both sets, split and encoded as the direction kind does (seed 0, 64/32/64)."""
    from modelprobe.toolkit.prompts import split_indices

    out = {}
    for which, name in (("positive", "harmful_instructions"), ("negative", "harmless_instructions")):
        rows = [json.loads(line) for line in (ROOT / f"probes/data/{name}.jsonl").read_text().splitlines()
                if line.strip()]
        parts = split_indices(len(rows), {"train": 64, "validation": 32, "test": 64}, 0)
        for part in ("train", "test"):
            out[part, which] = subject.encode_all([rows[i]["prompt"] for i in parts[part]], True, None)
    return out


class Counter:
    """Rows x positions per decoder-layer call (prompt calls and generation steps apart), and a digest of
    every call's next-token logits (the shared prefix's own call left out: it has no counterpart)."""

    def __init__(self, subject):
        from modelprobe.subject.hooks import add_hook

        self.prompt = self.steps = 0
        self.digests: list[str] = []

        def logits(mod, args, kwargs, output):
            mask = kwargs.get("attention_mask")
            if mask is not None and not bool(mask[:, -1].all()):  # right-padded: the shared prefix call
                return
            self.digests.append(hashlib.sha1(output.logits[:, -1].float().contiguous().numpy().tobytes()).hexdigest())

        def pre(mod, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            n = h.shape[0] * h.shape[1]
            if h.shape[1] > 1:
                self.prompt += n
            else:
                self.steps += n
        self.handles = [add_hook(layer, pre, "check_shared_prefix counter", pre=True, with_kwargs=True)
                        for layer in subject.sitemap.layers]
        self.handles.append(add_hook(subject.model, logits, "check_shared_prefix logits", with_kwargs=True))

    def take(self):
        got = (self.prompt, self.steps, self.digests)
        self.prompt = self.steps = 0
        self.digests = []
        return got


def gap_at(subject, prompt, reply, step):
    """Top-2 logit gap of the padded path's choice at `step` (one row, teacher-forced)."""
    x = torch.tensor([list(prompt) + list(reply[:step])])
    with torch.inference_mode():
        lg = subject.model(input_ids=x).logits[0, -1].float()
    top = lg.topk(2)
    return float(top.values[0] - top.values[1]), [int(t) for t in top.indices]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--new", type=int, default=48)
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from modelprobe.subject import AblateDirection, Add, Site, load_subject
    from modelprobe.toolkit.steering import ablate_direction_everywhere, add_at_layer, stack_variants

    subject = load_subject("smollm2-135m-instruct", batch_size="auto", progress=False)
    ids = refusal_ids(subject)
    site = Site("resid_pre", LAYER)
    means = {}
    for which in ("positive", "negative"):
        acts = [fw.at(site, POSITION).float().cpu() for fw in subject.run(ids["train", which], [site])]
        means[which] = torch.cat(acts).mean(0)
    r = means["positive"] - means["negative"]
    u = r / r.norm()
    ablate, add = ablate_direction_everywhere(subject.n_layers, u), add_at_layer(LAYER, r)
    stacked = stack_variants([[], ablate, add], 64)
    settings = {
        "none (positive)": (ids["test", "positive"], []),
        "none (negative)": (ids["test", "negative"], []),
        "ablate (positive)": (ids["test", "positive"], ablate),
        "add L12 (negative)": (ids["test", "negative"], add),
        "per-row callable: base|ablate|add (negative)": (ids["test", "negative"] * 3, stacked),
    }
    assert all(type(iv) in (AblateDirection, Add) for iv in ablate + add)
    counter = Counter(subject)
    report = {"direction_norm": float(r.norm()), "settings": {}}
    print(f"diff of means at resid_pre {LAYER}, position {POSITION}: norm {float(r.norm()):.3f}", flush=True)
    try:
        for name, (prompts, edits) in settings.items():
            got = {}
            for share in (False, True):
                subject.share_prefix = share
                t0 = time.perf_counter()
                gens = subject.generate(prompts, args.new, edits)
                got[share] = (gens, counter.take(), time.perf_counter() - t0)
            (plain, (p0, s0, d0), w0), (shared, (p1, s1, d1), w1) = got[False], got[True]
            same = sum(a == b for a, b in zip(plain, shared))
            calls = sum(a == b for a, b in zip(d0, d1)) if len(d0) == len(d1) else None
            diffs = []
            for i, (a, b) in enumerate(zip(plain, shared)):
                if a != b:
                    k = next((j for j in range(min(len(a), len(b))) if a[j] != b[j]), min(len(a), len(b)))
                    gap, top2 = gap_at(subject, prompts[i], a, k) if k < len(a) else (None, None)
                    diffs.append({"row": i, "step": k, "plain": a[k] if k < len(a) else "EOS/end",
                                  "shared": b[k] if k < len(b) else "EOS/end", "plain_top2": top2, "gap": gap,
                                  "plain_text": subject.decode(a), "shared_text": subject.decode(b)})
            entry = {"rows": len(prompts), "identical": same, "calls": len(d0), "calls_with_identical_logits": calls, "prompt_layer_tokens": [p0, p1],
                     "step_layer_tokens": [s0, s1], "wall_s": [round(w0, 1), round(w1, 1)], "differ": diffs}
            report["settings"][name] = entry
            print(f"{name}: identical {same}/{len(prompts)}; calls with bit-identical logits {calls}/{len(d0)}; prompt layer-tokens {p0} -> {p1} "
                  f"({1 - p1 / p0:.1%} fewer); step layer-tokens {s0} -> {s1}; wall {w0:.1f}s -> {w1:.1f}s", flush=True)
            for d in diffs:
                print("   differs:", {k: v for k, v in d.items() if not k.endswith("text")}, flush=True)
    finally:
        for h in counter.handles:
            h.remove()
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
