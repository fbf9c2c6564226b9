"""icl_update converges: modelprobe vs plain transformers, same work, same process.

The floor: every prompt's shots + 1 prefixes (no context, 1 example, ..., all), through plain
transformers on the same left-padded batches with logits_to_keep=1, a hook reading the MLP input at
the query token, and dense ΔW matrices for the step norms. modelprobe also runs the shuffled-label
control (shots more prefixes per prompt), stops each pass at the layer it reads, keeps rank-1 factors
and never builds a dense ΔW. Prints forward-pass counts, seconds and the ratio (modelprobe / plain).

    python benchmarks/bench_icl_update.py [--model smollm2-135m-instruct] [--threads 2] [--prompts 64]
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
import time
from pathlib import Path

import torch
from tabulate import tabulate

from modelprobe.kinds import instantiate, load
from modelprobe.subject import load_subject

PROBE = Path(__file__).resolve().parent.parent / "probes" / "icl_update_antonyms.probe.yaml"


def converges_only(prompts: int, layer: float) -> Path:
    """The shipped probe's settings with only its converges claim."""
    text = re.sub(r"\nprompts: \d+", f"\nprompts: {prompts}", PROBE.read_text().split("claims:")[0])
    text = text.replace("task: data/", f"task: {PROBE.parent}/data/").replace("control_task: data/",
                                                                             f"control_task: {PROBE.parent}/data/")
    text += f"claims:\n  converges:\n    layer: {layer}\n    expect: {{spearman_rho: {{at_most: -0.5}}}}\n"
    path = Path(tempfile.mkdtemp()) / "bench.probe.yaml"
    path.write_text(text)
    return path


def plain_converges(subject, prefixes: list[list[list[int]]], layer: int) -> tuple[float, int]:
    """ΔW_i for i = 0..shots per prompt, dense, from hooked plain forwards; returns (seconds, passes)."""
    mlp = subject.model.model.layers[layer].mlp
    ws = [mlp.gate_proj.weight.detach().double(), mlp.up_proj.weight.detach().double()]
    flat = [x for p in prefixes for x in p]
    got: dict[int, torch.Tensor] = {}
    start = time.perf_counter()
    handle = mlp.gate_proj.register_forward_pre_hook(lambda m, a: got.__setitem__(0, a[0][:, -1].double()))
    try:
        u = torch.zeros(len(flat), ws[0].shape[1], dtype=torch.float64)
        with torch.inference_mode():
            for batch in subject.batches(flat):
                subject.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                              position_ids=batch.position_ids, use_cache=False, logits_to_keep=1)
                u[batch.rows] = got[0]
        k = len(prefixes[0])
        u = u.view(len(prefixes), k, -1)
        for row in u:
            b = row[0] / row[0].pow(2).sum()
            dws = [torch.cat([w @ (ui - row[0]) for w in ws])[:, None] * b[None, :] for ui in row]
            [torch.linalg.matrix_norm(dws[i] - dws[i - 1]) for i in range(1, k)]
    finally:
        handle.remove()
    return time.perf_counter() - start, len(flat)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--layer", type=float, default=0.5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    subject = load_subject(args.model, progress=False)
    kind = instantiate(load(converges_only(args.prompts, args.layer)), subject)
    prep, layer = kind.prepared, kind.layers["converges"][0]
    s = prep.shots
    prefixes = [[prep.ids["plain"][j]] + prep.ids["prefix"][j * s:(j + 1) * s] for j in range(args.prompts)]
    plain_converges(subject, prefixes[:2], layer)  # warm-up
    p, p_passes = plain_converges(subject, prefixes, layer)
    start = time.perf_counter()
    outcome = kind.run()
    o = time.perf_counter() - start
    passes = outcome.settings.get("state_pass_sequences", 0)
    rows = [["converges, plain floor (shots + 1 prefixes, dense ΔW)", p_passes, f"{p:.2f}", ""],
            ["converges, modelprobe (+ shuffled control, factors)", passes, f"{o:.2f}", f"{o / p:.2f}"]]
    print(tabulate(rows, headers=["work", "sequences", "seconds", "ratio"]))
    c = outcome.claims[0]
    print(json.dumps({"prompts": args.prompts, "shots": s, "layer": layer, "threads": args.threads,
                      "plain_s": round(p, 2), "modelprobe_s": round(o, 2), "ratio": round(o / p, 2),
                      "sequences_ratio": round(passes / p_passes, 2), "effect": c.effect, "verdict": c.verdict}))


if __name__ == "__main__":
    main()
