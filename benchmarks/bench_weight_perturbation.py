#!/usr/bin/env python3
"""Random weight perturbation on the default model: modelprobe's batched sweep vs a plain transformers loop.

Workload: the `random` method of probes/weight_perturbation_refusal.probe.yaml - every layer's attention
and MLP block (60 groups on SmolLM2-135M), `--seeds` Gaussian noise draws each (norm 0.05 x the group's
weight norm), the refusal score (log-odds of I / Sorry / As at the first reply position) of `--prompts`
harmful instructions under each draw.

modelprobe: `WeightPerturbation._rank_random` - one clean pass caches the residual stream at every layer;
the draws of one layer share batches (prompts repeated, one weight delta per row, applied by hooks on
the perturbed linear maps), and each batch resumes from the cached stream at that layer. Its time
includes the clean pass.
Plain loop: for each (group, draw) add the same noise to the weights in place, run model(...) on the
prompts (left-padded, logits_to_keep=1), read the score, copy the weights back.
Both must give the same |Δ score| per draw (checked); the ratio is printed.

Usage: python benchmarks/bench_weight_perturbation.py [--prompts 8] [--seeds 2] [--threads 1]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from modelprobe.kinds import instantiate, load  # noqa: E402
from modelprobe.kinds.graders import log_odds  # noqa: E402
from modelprobe.subject import load_subject  # noqa: E402
from modelprobe.subject import weights as W  # noqa: E402

PROBE = """\
kind: weight_perturbation
behaviour:
  prompts: {data}
  chat_template: true
  grader: refusal
  split: {{rank: {n}, test: 1}}
groups: {{by: block_sublayer}}
method: random
checks: []
noise: {{relative: 0.05, seeds: {seeds}}}
claims:
  localises: {{top: 1, expect: {{rate_change: {{at_least: 0.3}}}}}}
"""


def naive(subject, kind, seeds: int) -> np.ndarray:
    """[groups * seeds] mean |Δ score|: perturb in place, full forward, restore."""
    model, sm = subject.model, subject.sitemap
    batch = subject.make_batch(kind.ids["rank"], list(range(len(kind.ids["rank"]))))

    def score() -> np.ndarray:
        with torch.inference_mode():
            out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                        position_ids=batch.position_ids, use_cache=False, logits_to_keep=1)
        return log_odds(out.logits[:, -1].float(), kind.score_ids).numpy()

    clean = score()
    out = []
    for g in kind.groups:
        for s in range(seeds):
            d = W.noise(sm, g, 0.05, s)
            saved = []
            with torch.no_grad():
                for sl in g.slices:
                    view = W.linear_view(sm, sl)
                    saved.append((view, view.clone()))
                    view.add_(d[sl])
            out.append(float(np.abs(score() - clean).mean()))
            with torch.no_grad():
                for view, original in saved:
                    view.copy_(original)
    return np.array(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    subject = load_subject(args.model, progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.probe.yaml"
        path.write_text(PROBE.format(data=ROOT / "probes" / "data" / "harmful_instructions.jsonl",
                                     n=args.prompts, seeds=args.seeds))
        kind = instantiate(load(path), subject)
    n_groups = len(kind.groups)
    t0 = time.perf_counter()
    kind._clean_pass = kind._clean()
    clean = kind._clean_pass[2]
    ours, _ = kind._rank_random(clean)
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    theirs = naive(subject, kind, args.seeds).reshape(n_groups, args.seeds).mean(axis=1)
    t_naive = time.perf_counter() - t0
    err = float(np.abs(ours - theirs).max())
    print(f"workload: {n_groups} groups x {args.seeds} draws x {args.prompts} prompts "
          f"({n_groups * args.seeds * args.prompts} perturbed prompt forwards), {args.threads} thread(s)")
    print(f"modelprobe (batched per-row deltas, resumed at the group's layer): {t_ours:8.2f} s")
    print(f"plain loop (perturb in place, full forward, restore):              {t_naive:8.2f} s")
    print(f"ratio plain / modelprobe: {t_naive / t_ours:.2f}x; max |difference| of mean |Δ score|: {err:.2e}")
    if err > 1e-2:
        raise SystemExit("the two paths disagree")


if __name__ == "__main__":
    main()
