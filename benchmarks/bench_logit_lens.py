"""Logit lens over every layer: modelprobe vs plain transformers, same work, same process.

Plain transformers: `output_hidden_states=True`, then final norm + unembedding of every layer's last
position, on the same left-padded batches. Prints seconds and the ratio (modelprobe / plain).

    python benchmarks/bench_logit_lens.py [--model smollm2-135m-instruct] [--threads 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from tabulate import tabulate

from modelprobe.kinds import instantiate, load
from modelprobe.subject import load_subject

PROBE = Path(__file__).resolve().parent.parent / "probes" / "logit_lens_capitals.probe.yaml"


def plain_lens(subject, ids, targets) -> float:
    """The same measurement written directly against transformers."""
    model, norm, head = subject.model, subject.sitemap.final_norm, subject.sitemap.unembed
    start = time.perf_counter()
    with torch.inference_mode():
        for batch in subject.batches(ids):
            out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                        position_ids=batch.position_ids, output_hidden_states=True)
            tgt = torch.tensor([targets[r] for r in batch.rows])[:, None]
            for h in out.hidden_states[1:]:
                logits = head(norm(h[:, -1]))
                (logits > logits.gather(1, tgt)).sum(-1)
                logits.softmax(-1).gather(1, tgt)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    subject = load_subject(args.model, progress=False)
    probe = load(PROBE)
    kind = instantiate(probe, subject)
    ids, targets = kind.ids, kind.targets
    plain_lens(subject, ids, targets)  # warm-up
    plain, ours = [], []
    for _ in range(args.repeats):
        plain.append(plain_lens(subject, ids, targets))
        start = time.perf_counter()
        kind.run()
        ours.append(time.perf_counter() - start)
    p, o = min(plain), min(ours)
    rows = [["logit lens, all layers", len(ids), f"{p:.2f}", f"{o:.2f}", f"{o / p:.2f}"]]
    print(tabulate(rows, headers=["workload", "prompts", "plain s", "modelprobe s", "ratio"]))
    print(json.dumps({"workload": "logit_lens", "plain_s": p, "modelprobe_s": o, "ratio": o / p}))


if __name__ == "__main__":
    main()
