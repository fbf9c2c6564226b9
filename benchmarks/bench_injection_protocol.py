#!/usr/bin/env python3
"""Speed of the `injection_protocol` kind's generated trials against plain transformers, in the same process.

The work: greedy replies to the thoughts-vs-text and prefill trials of the shipped probe (9 arms x T trials:
thought / repeat prompts injected, with a random vector and uninjected; prefills uninjected, with their own
and with another word's concept), each row with its own vector added over its sentence's tokens only.
  modelprobe   `InjectionProtocol.generated_trials`: one batched generation, one vector and span per row,
               the chat template's shared prefix run once, finished rows dropped
  loop         `model.generate` per trial with one forward pre-hook (what a replication script does)
Outputs are compared (same greedy text). The ratio is loop / modelprobe (> 1: modelprobe is faster).

    python benchmarks/bench_injection_protocol.py [--model smollm2-135m-instruct] [--trials 8] [--threads 1]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def span_injector(layer_module, add: torch.Tensor, start: int, stop: int):
    """Forward pre-hook adding `add` to prompt columns [start, stop) of one unpadded row; generated tokens
    (later calls) are left alone."""
    state = {"prompt": True}

    def pre(mod, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        if state["prompt"]:
            state["prompt"] = False
            h = h.clone()
            h[:, start:stop] += add.to(h.dtype)
        return ((h, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": h})

    return layer_module.register_forward_pre_hook(pre, with_kwargs=True)


def loop_generate(model, tok, ids, starts, stops, adds, layer: int, max_new: int) -> list[str]:
    out = []
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    for x, a, b, add in zip(ids, starts, stops, adds):
        handle = span_injector(model.model.layers[layer], add, a, b)
        try:
            with torch.inference_mode():
                gen = model.generate(input_ids=torch.tensor([x]), max_new_tokens=max_new, do_sample=False,
                                     pad_token_id=pad)
        finally:
            handle.remove()
        out.append(tok.decode(gen[0, len(x):], skip_special_tokens=True))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--trials", type=int, default=8, help="trials per arm (9 arms)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from modelprobe.kinds import instantiate, load
    from modelprobe.subject import load_subject

    subject = load_subject(args.model, progress=False)
    probe = load(ROOT / "probes" / "injection_protocol.probe.yaml")
    probe.spec = probe.spec.model_copy(update={"trials": args.trials, "batch_size": 9 * args.trials})
    kind = instantiate(probe, subject)
    v = kind.concept_vectors()[kind.layer]
    ids, starts, stops, adds, _ = kind.trial_rows(v)
    max_new = kind.spec.max_new_tokens

    t = time.perf_counter()
    mine = kind.generate(ids, starts, {kind.layer: adds}, "bench", stops)
    t_mine = time.perf_counter() - t
    print(f"modelprobe {t_mine:.1f}s", flush=True)
    t = time.perf_counter()
    loop = loop_generate(subject.model, subject.tokenizer, ids, starts, stops, adds, kind.layer, max_new)
    t_loop = time.perf_counter() - t
    same = sum(a.strip() == b.strip() for a, b in zip(mine, loop))
    print(f"model {args.model}, {len(ids)} rows ({args.trials} trials x 9 arms, layer {kind.layer}, {max_new} new "
          f"tokens, {args.threads} threads)")
    print(f"modelprobe {t_mine:.1f}s | loop, one hooked generate per trial {t_loop:.1f}s (x{t_loop / t_mine:.2f})")
    print(f"same replies: {same}/{len(ids)}")


if __name__ == "__main__":
    main()
