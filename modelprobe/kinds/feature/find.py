"""`modelprobe find`: rank single units by how well they separate two prompt sets, and write a `feature`
probe for the best one.

Units are every neuron (or dimension) of a component in one or more layers, or every latent of an SAE.
Each unit's activation per prompt is its max (or mean) over the prompt's tokens; units are ranked by
AUROC (with vs without; ties by the standardised mean difference). All units of all layers come from
one forward per batch.

The unit is selected on the data, so a claim measured on the same prompts is optimistic: give `--rows`
(say 0:24) to select on some lines, and the written probe reads the other lines.

    modelprobe find --model M --with data/french.jsonl --without data/english.jsonl --layer 8:20 \\
        --component mlp.post --rows 0:24 --tokens " le" " la" -o probes/feature_french.probe.yaml
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import ModelprobeError
from ...options import CLI_TYPES


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump
        raise _UsageError(message)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="modelprobe find", description="rank units by AUROC and write a feature probe")
    p.add_argument("--model", required=True, help="the model (path, GGUF or alias, as --model of pytest)")
    p.add_argument("--with", dest="with_", required=True, help='JSONL of {"prompt": ...} showing the concept')
    p.add_argument("--without", required=True, help="JSONL of prompts without it")
    p.add_argument("--layer", default=None, help="layers: an int, a list '3,5', a range 'a:b' or all (default)")
    p.add_argument("--component", default=None, help="mlp.post (default), resid_pre, resid_mid, resid_post, "
                   "attn_out or mlp_out", choices=["mlp.post", "resid_pre", "resid_mid", "resid_post", "attn_out",
                                                   "mlp_out"])
    p.add_argument("--sae", default=None, help="rank the latents of this SAELens folder instead of neurons")
    p.add_argument("--rows", default=None, help="'start:stop' lines of each file to select on (the probe reads "
                                                "the others)")
    p.add_argument("--aggregate", default="max", choices=["max", "mean"])
    p.add_argument("--keep-first", action="store_true", help="count each prompt's first token too")
    p.add_argument("--chat-template", action="store_true")
    p.add_argument("--tokens", nargs="*", default=None, help="metric tokens: also write a causes claim")
    p.add_argument("--top", type=CLI_TYPES["count"], default=10, help="how many units to print")
    p.add_argument("-o", "--out", default=None, help="probe file to write (default probes/<with>_feature.probe.yaml)")
    p.add_argument("--force", action="store_true", help="overwrite the probe file if it exists")
    p.add_argument("--batch-size", type=CLI_TYPES["batch_size"], default=16)
    p.add_argument("--threads", type=CLI_TYPES["threads"], default=0)
    p.add_argument("--seed", type=CLI_TYPES["seed"], default=0)
    p.add_argument("--quiet", action="store_true")
    return p


def cli_find(argv: list[str]) -> int:
    """Entry point of `modelprobe find ...`: 0 on success, 2 on a user mistake (one line on stderr)."""
    try:
        args = _parser().parse_args(argv)
        if args.sae and (args.layer is not None or args.component is not None):
            raise _UsageError("--sae takes its layer and component from the SAE's cfg.json: drop --layer / "
                              "--component")
        args.layer = "all" if args.layer is None else args.layer
        args.component = args.component or "mlp.post"
        if _out(args).exists() and not args.force:
            raise _UsageError(f"{_out(args)} exists: give --force to overwrite it, or another -o")
        return _run(args, argv)
    except (_UsageError, ModelprobeError) as e:
        print(f"modelprobe find: {e}", file=sys.stderr)
        return 2


def _prompts(path: Path, rows: str | None) -> tuple[list[str], int]:
    from ...toolkit.ablation_task import parse_rows, read_prompt_rows

    data = read_prompt_rows(path)
    try:
        used = parse_rows(rows, len(data))
    except ValueError as e:
        raise _UsageError(f"--rows: {path}: {e}") from None
    bad = [i for i in used if not isinstance(data[i]["prompt"], str) or not data[i]["prompt"].strip()]
    if bad:
        raise _UsageError(f"{path}:{bad[0] + 1}: field 'prompt' must be a non-empty string")
    return [data[i]["prompt"] for i in used], len(data)


def _unit_sets(args: argparse.Namespace, subject: Any) -> list[Any]:
    from ...errors import SiteError
    from ...subject import Site, UnitFileError, coordinate_units, read_sae, resolve_layer, sae_site, sae_units

    if args.sae:
        try:
            files = read_sae(Path(args.sae))
            site = sae_site(files, subject.sitemap)
        except UnitFileError as e:
            raise _UsageError(f"--sae: {e}") from None
        return [sae_units(files, site)]
    spec: Any = args.layer
    if spec != "all" and ":" not in spec:
        try:
            spec = [int(x) for x in spec.split(",")]
        except ValueError:
            raise _UsageError(f"--layer {args.layer!r}: an int, a list '3,5', a range 'a:b' or all") from None
    try:
        layers = resolve_layer(spec, subject.n_layers)
        sets = [coordinate_units(Site(args.component, layer), subject.sitemap) for layer in layers]
        for s in sets:
            s.site.hook_point(subject.sitemap)
    except SiteError as e:
        raise _UsageError(f"--layer / --component: {e.message}") from None
    return sets


def _run(args: argparse.Namespace, argv: list[str]) -> int:
    import torch

    from ...subject import load_subject
    from ...toolkit.ablation_task import heldout_rows
    from ...toolkit.features import rank_units, unit_activations

    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    with_path, without_path = Path(args.with_), Path(args.without)
    w_prompts, n_w = _prompts(with_path, args.rows)
    o_prompts, n_o = _prompts(without_path, args.rows)
    subject = load_subject(args.model, batch_size=args.batch_size, progress=not args.quiet)
    sets = _unit_sets(args, subject)
    opts = dict(aggregate=args.aggregate, skip_first=not args.keep_first, batch_size=args.batch_size)
    aw = unit_activations(subject, subject.encode_all(w_prompts, args.chat_template), sets, desc="with", **opts)
    ao = unit_activations(subject, subject.encode_all(o_prompts, args.chat_template), sets, desc="without", **opts)
    w, o = np.concatenate(aw.per_prompt, 1), np.concatenate(ao.per_prompt, 1)
    owner = [(k, j) for k, s in enumerate(sets) for j in range(len(s))]
    order, auc = rank_units(w, o)
    top = [(owner[i], float(auc[i]), float(w[:, i].mean()), float(o[:, i].mean())) for i in order[:args.top]]
    print(f"{'unit':<34} {'AUROC':>6} {'mean with':>10} {'mean without':>12}")
    for (k, j), a, mw, mo in top:
        print(f"{sets[k].labels[j]:<34} {a:6.3f} {mw:10.4g} {mo:12.4g}")
    (k, j), best_auc, _, _ = top[0]
    held = heldout_rows(args.rows, min(n_w, n_o)) if n_w == n_o else None
    measured = np.ptp(np.concatenate([w, o], 0), axis=0) > 0
    if not measured.any():
        raise _UsageError(f"no unit's activation differs between any two of the {len(w_prompts) + len(o_prompts)} "
                          "prompts: nothing was measured, so no probe is written")
    out = _out(args)
    unit = ({"sae": _rel(Path(args.sae), out), "latent": j} if args.sae
            else {"layer": sets[k].site.layer, "component": args.component, "neuron": j})
    text = probe_text(args, unit, out, held, best_auc, len(w_prompts), len(sets[0]) * len(sets),
                      "modelprobe find " + " ".join(_quote(a) for a in argv), subject.info.id,
                      time.perf_counter() - start)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")
    except OSError as e:
        raise _UsageError(f"cannot write {out}: {e.strerror or type(e).__name__}") from None
    if not args.quiet:
        print(f"wrote {out} ({sets[k].labels[j]}, AUROC {best_auc:.3f} on the selection lines)", file=sys.stderr)
    return 0


def _out(args: argparse.Namespace) -> Path:
    return Path(args.out) if args.out else Path("probes") / f"{Path(args.with_).stem}_feature.probe.yaml"


def _rel(path: Path, out: Path) -> str:
    return Path(os.path.relpath(path.resolve(), out.parent.resolve())).as_posix()


def _quote(arg: str) -> str:
    return json.dumps(arg) if (not arg or any(c in arg for c in " \"'$")) else arg


def probe_text(args: argparse.Namespace, unit: dict, out: Path, held: str | None, auc: float, n_sel: int,
               n_units: int, command: str, model: str, seconds: float) -> str:
    """The probe file for the selected unit, with a header saying how it was chosen."""
    sel = args.rows or "all"
    if held:
        note = (f"# The claims read lines {held} of both files, held out from the selection: an honest AUROC.")
        rows = f", rows: \"{held}\""
    else:
        note = ("# The claims read the SAME lines the unit was selected on: correlates is optimistic (the best of "
                f"{n_units} units).\n# Select with --rows on part of the lines for a held-out claim.")
        rows = f", rows: \"{args.rows}\"" if args.rows else ""
    opts = "" if args.aggregate == "max" else f", aggregate: {args.aggregate}"
    opts += ", skip_first: false" if args.keep_first else ""
    opts += ", chat_template: true" if args.chat_template else ""
    unit_yaml = "{" + ", ".join(f"{k}: {json.dumps(v) if isinstance(v, str) else v}" for k, v in unit.items()) + "}"
    what = f"latent {unit['latent']} of the SAE" if "latent" in unit else f"neuron {unit['neuron']} of layer {unit['layer']}'s {unit['component']}"
    lines = [
        f"# Written by: {command}",
        f"# Model: {model}. Selected {what} as the best of {n_units} units by AUROC ({auc:.3f}) on lines {sel}",
        f"# ({n_sel} prompts per file); {seconds:.0f} s.",
        note,
        "kind: feature",
        f"about: {json.dumps(f'{what} fires for the with prompts' + (' and the metric tokens depend on it.' if args.tokens else '.'))}",
        f"unit: {unit_yaml}",
        f"inputs: {{with: {json.dumps(_rel(Path(args.with_), out))}, without: {json.dumps(_rel(Path(args.without), out))}"
        f"{rows}{opts}}}",
        f"seed: {args.seed}",
        "claims:",
        "  correlates:",
        "    expect: {auroc: {at_least: 0.8}}",
    ]
    if args.tokens:
        lines += [
            "  causes:",
            "    intervention: {zero: true}",
            f"    metric: {{tokens: [{', '.join(json.dumps(t) for t in args.tokens)}]}}",
            "    expect: {metric_drop: {at_least: 0.1}}",
            "    control: random_units",
        ]
    return "\n".join(lines) + "\n"
