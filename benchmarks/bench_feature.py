"""The `causes` claim of a feature probe with its random-unit control: modelprobe vs plain transformers, same
work, same process.

Work: the metric (log of the total probability of " le", " la", " les" at the last position) on the French
prompts, clean and with each of 1 + k neurons of one MLP layer zeroed on every token.

- plain loop: plain transformers, one batched forward over the prompts per unit (same batches, left padding,
  position ids, `logits_to_keep=1`), a forward pre-hook on the layer's down projection zeroing the neuron;
- modelprobe: the kind's path (toolkit/features.py): one clean forward keeps the residual stream at the
  layer, then the units ride as rows of resumed forwards (one row per unit and prompt, per-row
  interventions, layers below the unit not recomputed, the prompts' shared prefix run once).

Both give the same numbers (checked). Prints seconds and the ratio.

    python benchmarks/bench_feature.py [--model smollm2-135m-instruct] [--layer 15] [--neuron 775] [--k 20]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from modelprobe.subject import common_prefix, load_subject
from modelprobe.subject.sites import Site
from modelprobe.subject.units import coordinate_units
from modelprobe.toolkit.features import metric_with_units_set, token_set_metric, unit_activations

DATA = Path(__file__).resolve().parent.parent / "probes" / "data" / "feature_french.jsonl"


def plain_loop(subject, ids: list[list[int]], layer: int, neurons: list[int], tokens: torch.Tensor,
               batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    model = subject.model
    down = model.model.layers[layer].mlp.down_proj
    batches = list(subject.batches(ids, batch_size))

    def metric_all() -> np.ndarray:
        out = np.zeros(len(ids))
        for b in batches:
            with torch.inference_mode():
                logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids,
                               use_cache=False, logits_to_keep=1).logits[:, -1]
            out[b.rows] = token_set_metric(logits, tokens).double().numpy()
        return out

    clean = metric_all()
    rows = []
    for j in neurons:
        def zero(mod, args, j=j):
            x = args[0].clone()
            x[..., j] = 0.0
            return (x,)
        h = down.register_forward_pre_hook(zero)
        try:
            rows.append(metric_all())
        finally:
            h.remove()
    return clean, np.stack(rows)


def ours(subject, ids: list[list[int]], layer: int, neurons: list[int], tokens: torch.Tensor,
         batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    units = coordinate_units(Site("mlp.post", layer), subject.sitemap, neurons)
    acts = unit_activations(subject, ids, [units], keep_from=layer, batch_size=batch_size)
    clean = np.zeros(len(ids))
    for batch, _, logits in acts.clean:
        clean[batch.rows] = token_set_metric(logits, tokens).double().numpy()
    after = metric_with_units_set(subject, acts.clean, units, torch.zeros(len(neurons)),
                                  lambda lg: token_set_metric(lg, tokens), len(ids), common_prefix(ids))
    return clean, after


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--layer", type=int, default=15)
    ap.add_argument("--neuron", type=int, default=775)
    ap.add_argument("--k", type=int, default=20, help="random neurons besides the claimed one")
    ap.add_argument("--prompts", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    subject = load_subject(args.model, progress=False)
    rows = [json.loads(line)["prompt"] for line in DATA.read_text(encoding="utf-8").splitlines()][-args.prompts:]
    ids = subject.encode_all(rows)
    rng = np.random.default_rng(0)
    others = np.delete(np.arange(subject.sitemap.d_mlp), args.neuron)
    neurons = [args.neuron, *rng.choice(others, args.k, replace=False).tolist()]
    tokens = torch.tensor([subject.token_id(t)[0] for t in (" le", " la", " les")])
    ours(subject, ids[:2], args.layer, neurons[:2], tokens, args.batch_size)  # warm-up
    t0 = time.perf_counter()
    c1, a1 = plain_loop(subject, ids, args.layer, neurons, tokens, args.batch_size)
    t1 = time.perf_counter()
    c2, a2 = ours(subject, ids, args.layer, neurons, tokens, args.batch_size)
    t2 = time.perf_counter()
    diff = max(float(np.abs(c1 - c2).max()), float(np.abs(a1 - a2).max()))
    drop = (c2 - a2[0]).mean()
    print(f"{args.model}: {len(ids)} prompts x {len(neurons)} neurons of layer {args.layer} (zeroed), "
          f"{args.threads} thread(s)")
    print(f"plain transformers loop: {t1 - t0:.2f} s   modelprobe batched rows: {t2 - t1:.2f} s   "
          f"ratio plain/modelprobe: {(t1 - t0) / (t2 - t1):.2f}x")
    print(f"max |difference| of the metric: {diff:.2e}   claimed neuron's mean drop: {drop:.4f}")
    assert diff < 1e-3, "the two paths disagree"


if __name__ == "__main__":
    main()
