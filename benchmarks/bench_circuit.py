#!/usr/bin/env python3
"""Circuit ablations on the default model: modelprobe (batched + resumed) vs a naive transformers loop.

Two workloads on IOI prompts, mean ablation per position with ABC means per template (the shipped
probe's settings):
  A. 100 random circuits of the shipped circuit's size and layers, each for sufficiency (everything
     else ablated) and necessity (the circuit ablated): 200 ablation sets;
  B. each attention head ablated alone: 270 ablation sets (the per-component sweep).

modelprobe: `AblationRunner.run` — many ablation sets per forward (one unit mask per row, prompts
repeated across rows), every row resumed from the cached residual stream (clean, or everything
ablated) at the first layer where it differs, logits only at the last position. Its time includes
the two cached passes it needs.
Naive floor: plain transformers in the same process, one `model(...)` call per ablation set over all
prompts (left-padded, per-row means aligned to the padding), hooks on o_proj inputs, full depth,
logits at the last position only (`logits_to_keep=1`: a fair floor; unembedding every position, as
transformers does by default, cost the naive loop about a quarter of its time on this model).
Both use the same reference means (computed once, not timed). Every naive forward costs the same,
so the naive loop is timed on an evenly spaced sample of the sets and scaled up (the sample's
numbers are also compared with modelprobe's: they must agree).

Usage: python benchmarks/bench_circuit.py [--prompts 8] [--naive-sample 0.1] [--threads 1]
At the defaults (8 prompts) it runs in about 2 minutes on one idle core. The work grows linearly with
the prompts: --prompts 64 is the 64-prompt workload (about 9 minutes for modelprobe alone on one CPU
core, plus the naive sample); --naive-sample 1 times every naive forward instead of a sample.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from modelprobe.subject import can_resume, load_subject  # noqa: E402
from modelprobe.subject.ablation import AblationRunner, Unit, build_scope  # noqa: E402
from modelprobe.toolkit.ablation_task import prepare_task  # noqa: E402
from modelprobe.toolkit.controls import random_circuits  # noqa: E402

FALLBACK_CIRCUIT = [(23, 3), (20, 0), (17, 4), (29, 1), (19, 2), (16, 0), (8, 1), (15, 7)]


def read(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def shipped_circuit() -> list[tuple[int, int]]:
    """Heads of probes/ioi_circuit.probe.yaml (the workload's size and layers), or a fixed stand-in."""
    path = ROOT / "probes" / "ioi_circuit.probe.yaml"
    if not path.is_file():
        return FALLBACK_CIRCUIT
    from modelprobe.kinds import load
    heads = []
    for c in load(path).spec.circuit:
        for h in [c.head] if isinstance(c.head, int) else c.head:
            heads.append((c.layer, h))
    return heads


class Naive:
    """One plain forward per ablation set: left-padded prompts, o_proj pre-hooks, logits at the last
    position only (`logits_to_keep=1`, what a careful user does when only the last position is read)."""

    def __init__(self, subject, runner):
        self.model = subject.model
        self.sm = subject.sitemap
        tok_ids = runner.task.prompt_ids
        width = max(len(x) for x in tok_ids)
        n = len(tok_ids)
        self.ids = torch.full((n, width), subject.pad_id)
        self.mask = torch.zeros((n, width), dtype=torch.long)
        for i, x in enumerate(tok_ids):
            self.ids[i, width - len(x):] = torch.tensor(x)
            self.mask[i, width - len(x):] = 1
        self.pos = (self.mask.cumsum(-1) - 1).clamp(min=0)
        self.answers, self.wrongs = runner.task.answers, runner.task.wrongs
        # per-row means aligned with each row's padding: [n, width, n_heads * d_head] per layer
        self.means = {}
        for (comp, layer), _ in runner.scope.sites.items():
            from modelprobe.subject import Site
            per_key = runner.values[Site(comp, layer)]
            rows = torch.zeros(n, width, self.sm.n_heads * self.sm.d_head)
            for i, key in enumerate(runner.task.keys):
                m = per_key[key].reshape(key[0], -1)
                rows[i, width - key[0]:] = m
            self.means[layer] = rows

    def metric(self, heads_by_layer: dict[int, list[int]]) -> np.ndarray:
        dh = self.sm.d_head
        handles = []
        for layer, heads in heads_by_layer.items():
            cols = torch.tensor([c for h in heads for c in range(h * dh, (h + 1) * dh)])

            def hook(mod, args, layer=layer, cols=cols):
                x = args[0].clone()
                x[:, :, cols] = self.means[layer][:, :, cols]
                return (x,)
            handles.append(self.sm.module(layer, self.sm.family.attn_out_proj).register_forward_pre_hook(hook))
        try:
            with torch.inference_mode():
                logits = self.model(input_ids=self.ids, attention_mask=self.mask, position_ids=self.pos,
                                    use_cache=False, logits_to_keep=1).logits[:, -1]
        finally:
            for h in handles:
                h.remove()
        return (logits.gather(1, self.answers[:, None]) - logits.gather(1, self.wrongs[:, None]))[:, 0].numpy()


def heads_of(config: np.ndarray, units: list[Unit]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for u, on in zip(units, config):
        if on:
            out.setdefault(u.layer, []).append(u.index)
    return out


def bench(name: str, subject, runner, naive: Naive, configs: np.ndarray, sample: float) -> dict:
    start = time.perf_counter()
    runner.prime(configs)
    fast_vals = runner.run(configs, desc=name)
    fast = time.perf_counter() - start
    step = max(1, round(1 / sample))
    picked = list(range(0, len(configs), step))
    start = time.perf_counter()
    naive_vals = [naive.metric(heads_of(configs[k], runner.scope.units)) for k in picked]
    naive_part = time.perf_counter() - start
    naive_total = naive_part / len(picked) * len(configs)
    diff = max(float(np.abs(fast_vals[k] - v).max()) for k, v in zip(picked, naive_vals))
    return {"workload": name, "ablation_sets": len(configs), "modelprobe_s": fast,
            "naive_s": naive_total, "naive_timed_sets": len(picked), "ratio": naive_total / fast,
            "max_abs_diff": diff}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--naive-sample", type=float, default=0.1)
    ap.add_argument("--random-circuits", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    subject = load_subject("smollm2-135m-instruct", progress=False)
    load_s = time.perf_counter() - t0
    data = ROOT / "probes" / "data"
    prompts, refs = read(data / "ioi.jsonl"), read(data / "ioi_abc.jsonl")
    task = prepare_task(subject, prompts, data / "ioi.jsonl", refs, data / "ioi_abc.jsonl", "logit_diff", "mean",
                        "template", f"0:{args.prompts}")
    scope = build_scope("attention_heads", subject.sitemap)
    runner = AblationRunner(subject, task, scope, task.row_metric("logit_diff"), "mean", "template")
    t0 = time.perf_counter()
    runner.prepare_values()
    means_s = time.perf_counter() - t0
    naive = Naive(subject, runner)

    circuit = [Unit(layer, "head", h) for layer, h in shipped_circuit()]
    nulls, matched = random_circuits(circuit, scope, args.random_circuits, seed=0)
    results = [
        bench(f"{len(nulls)} random circuits (suff + nec)", subject, runner, naive,
              np.concatenate([~nulls, nulls]), args.naive_sample),
    ]
    # a fresh runner: the sweep must not reuse the first workload's cached streams for free
    runner2 = AblationRunner(subject, task, scope, task.row_metric("logit_diff"), "mean", "template")
    runner2.prepare_values()
    results.append(bench(f"each of {len(scope)} heads alone", subject, runner2, naive,
                         np.eye(len(scope), dtype=bool), args.naive_sample))

    print(f"model: {subject.info.id} ({subject.sitemap.n_layers} layers x {subject.sitemap.n_heads} heads), "
          f"torch threads {torch.get_num_threads()}, resume supported: {can_resume(subject)}")
    print(f"prompts: {len(task.prompt_ids)} IOI (token lengths {task.settings['prompt_lengths']}), "
          f"mean ablation per position with ABC means per template; circuit of {len(circuit)} heads "
          f"(layers {sorted({u.layer for u in circuit})}), random circuits layer-matched: {matched}")
    print(f"model load {load_s:.1f}s, reference means {means_s:.1f}s (once, shared; not in the times below)")
    print(f"{'workload':42} {'sets':>5} {'modelprobe':>11} {'naive':>9} {'ratio':>6} {'max|diff|':>10}")
    for r in results:
        print(f"{r['workload']:42} {r['ablation_sets']:>5} {r['modelprobe_s']:>10.1f}s {r['naive_s']:>8.1f}s "
              f"{r['ratio']:>5.2f}x {r['max_abs_diff']:>10.2e}   (naive timed on {r['naive_timed_sets']} sets)")
    per_prompt = sum(r["modelprobe_s"] for r in results) / len(task.prompt_ids)
    print(f"modelprobe time per prompt for both workloads: {per_prompt:.1f}s "
          f"(64 prompts: about {per_prompt * 64 / 60:.0f} min at this speed)")


if __name__ == "__main__":
    main()
