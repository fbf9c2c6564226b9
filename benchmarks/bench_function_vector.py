"""function_vector head indirect effects: modelprobe vs plain transformers, same work, same process.

The work: for every head of the chosen layers and every shuffled-label prompt, the gain in the answer
token's probability when the head's output at the last token is replaced by its mean over the few-shot
prompts. The floor: one plain forward per head over the same left-padded batch of prompts, a pre-hook
on o_proj writing the mean into that head's slice at the last position, logits_to_keep=1. modelprobe
runs every head of a prompt as one batch, each row recomputing only the last token from its head's
layer on (clean keys and values of the rest are cached once). The numbers must agree (asserted).

    python benchmarks/bench_function_vector.py [--model smollm2-135m-instruct] [--threads 1] [--prompts 4]
                                               [--layers 10]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from tabulate import tabulate

from modelprobe.kinds import check_data_files, instantiate, load
from modelprobe.kinds.function_vector import _Run
from modelprobe.kinds.function_vector.heads import head_effects
from modelprobe.subject import load_subject

PROBE = Path(__file__).resolve().parent.parent / "probes" / "function_vector_antonyms.probe.yaml"


def plain_effects(subject, ids: list[list[int]], answers: list[int], means: torch.Tensor) -> np.ndarray:
    """[n, layers, heads] by one hooked plain forward per head over the whole batch."""
    model, sm = subject.model, subject.sitemap
    batch = subject.make_batch(ids, list(range(len(ids))))
    target = torch.as_tensor(answers)
    kw = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
              use_cache=False, logits_to_keep=1)
    rows = torch.arange(len(ids))
    out = np.zeros((len(ids), means.shape[0], means.shape[1]))
    with torch.inference_mode():
        base = torch.softmax(model(**kw).logits[:, -1].double(), -1)[rows, target]
        for layer in range(means.shape[0]):
            o_proj = model.model.layers[layer].self_attn.o_proj
            for h in range(means.shape[1]):
                value = means[layer, h].to(batch.input_ids.device).float()

                def hook(module, args, h=h, value=value):
                    x = args[0].clone()
                    x[:, -1, h * sm.d_head:(h + 1) * sm.d_head] = value  # left-padded: last column is the last token
                    return (x,)

                handle = o_proj.register_forward_pre_hook(hook)
                try:
                    p = torch.softmax(model(**kw).logits[:, -1].double(), -1)[rows, target]
                finally:
                    handle.remove()
                out[:, layer, h] = (p - base).cpu().numpy()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prompts", type=int, default=4, help="shuffled-label prompts (the plain loop's batch)")
    ap.add_argument("--layers", type=int, default=10, help="heads of the first LAYERS layers (the batched "
                                                            "path's worst case: the longest resumes)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    subject = load_subject(args.model, progress=False)
    probe = load(PROBE)
    check_data_files(probe)
    kind = instantiate(probe, subject)
    run = _Run(kind)
    p, few = run.prompts(kind.spec.task, {"dev": kind.spec.dev, "test": kind.spec.test})
    ids, answers = p.shuffled[:args.prompts], p.answers[:args.prompts]
    means = few.head_means[:args.layers]
    head_effects(subject, ids[:1], answers[:1], means[:1])  # warm-up
    start = time.perf_counter()
    fast = head_effects(subject, ids, answers, means)
    t_fast = time.perf_counter() - start
    start = time.perf_counter()
    slow = plain_effects(subject, ids, answers, means)
    t_slow = time.perf_counter() - start
    diff = float(np.abs(fast - slow).max())
    assert diff < 1e-4, f"head effects differ by {diff}"
    heads = means.shape[0] * means.shape[1]
    mean_len = float(np.mean([len(x) for x in ids]))
    # modelprobe: per prompt, one clean pass (keys/values cached) and one batched run of every head
    print(tabulate([["modelprobe (batched, last token resumed)", f"{t_fast:.2f}", 2 * len(ids), heads],
                    ["plain transformers (one forward per head)", f"{t_slow:.2f}", heads + 1, heads]],
                   headers=["path", "seconds", "model calls", "heads"]))
    print(f"{len(ids)} prompts of {mean_len:.0f} tokens, {heads} heads; largest difference {diff:.2e}; "
          f"ratio modelprobe / plain = {t_fast / t_slow:.3f} (speed-up {t_slow / t_fast:.1f}x)")


if __name__ == "__main__":
    main()
