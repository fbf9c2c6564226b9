"""`modelprobe discover circuit`: propose a small circuit for a task and write its probe file.

The search, all with exact ablations (the same batched, resumed runs the circuit kind uses):
1. effects: ablate each unit of the scope alone; its effect is the share of the full-minus-empty gap
   it removes, (m(M) − m(M∖v)) / (m(M) − m(∅));
2. grow: take units in order of effect until sufficiency (everything else ablated) reaches --target;
3. necessity: keep growing in the same order until ablating the circuit alone leaves faithfulness
   at or below --necessity (a proposal that fails its own necessity claim is no proposal);
4. complete: add the remaining units whose effect alone is at least --min-effect (they visibly matter
   in the full model, even where the circuit has a redundant partner for them);
5. prune: drop members whose removal lowers sufficiency by less than --min-effect while both targets
   still hold.
The probe file it writes carries the numbers seen along the way in comments, and tests the rows not
used for discovery when --rows names a leading or trailing part of the file.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import ModelprobeError
from ...options import CLI_TYPES, as_argument
from ...toolkit.ablation_task import heldout_rows, read_prompt_rows

LADDER = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)


@dataclass
class Found:
    """What discovery proposes, and the numbers it saw on the way."""

    circuit: list[Any]  # Units, in the order they were added
    sufficiency: float
    necessity: float
    reached: bool
    m_full: float
    m_empty: float
    effects: list[tuple[str, float]]  # (unit name, effect alone), strongest first
    log: list[str] = field(default_factory=list)


def discover_circuit(runner: Any, target: float = 0.8, necessity: float = 0.2, min_effect: float = 0.05,
                     max_size: int = 64, score_prompts: list[int] | None = None,
                     say: Any = None) -> Found:
    """Greedy circuit search on the runner's prompts (effects scored on `score_prompts`, default all)."""
    search = _Search(runner, target, necessity, min_effect, max_size, score_prompts, say)
    size, s_f, n_f, reached = search.grow()
    if not reached:
        return search.found(search.order[:size], s_f, n_f, False)
    size, s_f, n_f = search.make_necessary(size, s_f, n_f)
    members, s_f, n_f = search.complete(search.order[:size], s_f, n_f)
    members, s_f, n_f = search.prune(members, s_f, n_f)
    search.note(f"result: {len(members)} units, sufficiency {s_f:.3f}, necessity {n_f:.3f}")
    return search.found(members, s_f, n_f, s_f >= target and n_f <= necessity)


class _Search:
    """The steps of `discover_circuit`, sharing the runner, the baselines and the ranking."""

    def __init__(self, runner: Any, target: float, necessity: float, min_effect: float, max_size: int,
                 score_prompts: list[int] | None, say: Any):
        self.runner, self.target, self.necessity, self.min_effect = runner, target, necessity, min_effect
        self.say = say or (lambda msg: None)
        self.scope = runner.scope
        self.n_units = len(self.scope)
        self.log: list[str] = []
        everything = np.ones(self.n_units, dtype=bool)
        self.m_full = m_full = runner.full_model()
        self.m_empty = m_empty = runner.run(everything[None], desc="everything ablated")[0]
        gap = float(m_full.mean() - m_empty.mean())
        if abs(gap) <= 1e-6 * max(1e-12, float(np.abs(m_full).mean())):
            raise ModelprobeError(f"the full model and the fully ablated model score the same "
                                  f"({m_full.mean():.4g}): there is no task behaviour to explain")
        self.note(f"m(M) = {m_full.mean():.4g}, m(∅) = {m_empty.mean():.4g} on {len(m_full)} prompts")
        # 1. rank the units by their effect when ablated alone
        self.score = list(range(len(m_full))) if score_prompts is None else list(score_prompts)
        score = self.score
        alone = runner.run(np.eye(self.n_units, dtype=bool), score, desc="each unit alone")
        s_gap = float(m_full[score].mean() - m_empty[score].mean())
        self.effect = (m_full[score].mean() - alone.mean(axis=1)) / s_gap
        self.order = [int(i) for i in np.argsort(-self.effect, kind="stable")]
        self.note(f"effects of {self.n_units} units ablated alone on {len(score)} prompts; strongest: " + ", ".join(
            f"{self.scope.units[i].name} {self.effect[i]:.3f}" for i in self.order[:8]))
        self.limit = min(max_size, self.n_units - 1)

    def note(self, msg: str) -> None:
        self.log.append(msg)
        self.say(msg)

    def found(self, members: list[int], s_f: float, n_f: float, reached: bool) -> Found:
        units = self.scope.units
        return Found([units[i] for i in members], s_f, n_f, reached, float(self.m_full.mean()),
                     float(self.m_empty.mean()), [(units[i].name, float(self.effect[i])) for i in self.order],
                     self.log)

    def evaluate(self, circuits: list[list[int]], what: str, prompts: list[int] | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
        """Sufficiency and necessity faithfulness of each circuit, in one batched run."""
        from ...toolkit.metrics import faithfulness

        rows = list(range(len(self.m_full))) if prompts is None else prompts
        vs = np.zeros((len(circuits), self.n_units), dtype=bool)
        for k, c in enumerate(circuits):
            vs[k, c] = True
        vals = self.runner.run(np.concatenate([~vs, vs]), rows, desc=what)
        k = len(circuits)
        e, m = self.m_empty[rows], self.m_full[rows]
        suff = np.array([faithfulness(vals[j], e, m) for j in range(k)])
        nec = np.array([faithfulness(vals[k + j], e, m) for j in range(k)])
        return suff, nec

    def grow(self) -> tuple[int, float, float, bool]:
        """2. grow along the ranking: a ladder of sizes in one run, then every size below the first hit."""
        order, limit, target = self.order, self.limit, self.target
        sizes = [s for s in LADDER if s < limit] + [limit]
        suff, nec = self.evaluate([order[:s] for s in sizes], "growing")
        self.note("sufficiency along the ranking: " + ", ".join(f"{s}: {f:.3f}" for s, f in zip(sizes, suff)))
        hit = next((j for j, f in enumerate(suff) if f >= target), None)
        if hit is None:
            best = int(np.argmax(suff))
            self.note(f"no circuit of up to {limit} units along the ranking reaches sufficiency {target}; "
                      f"keeping the best ({sizes[best]} units, {suff[best]:.3f})")
            return sizes[best], float(suff[best]), float(nec[best]), False
        size, s_f, n_f = sizes[hit], float(suff[hit]), float(nec[hit])
        below = sizes[hit - 1] if hit else 0
        if size - below > 1:
            between = list(range(below + 1, size))
            b_suff, b_nec = self.evaluate([order[:s] for s in between], "refining")
            first = next((j for j, f in enumerate(b_suff) if f >= target), None)
            if first is not None:
                size, s_f, n_f = between[first], float(b_suff[first]), float(b_nec[first])
        self.note(f"grow: the top {size} units reach sufficiency {s_f:.3f} (necessity {n_f:.3f})")
        return size, s_f, n_f, True

    def make_necessary(self, size: int, s_f: float, n_f: float) -> tuple[int, float, float]:
        """3. necessity: more units along the ranking until ablating the circuit breaks the task."""
        necessity = self.necessity
        while n_f > necessity and size < self.limit:
            more = list(range(size + 1, min(self.limit, size + 8) + 1))
            m_suff, m_nec = self.evaluate([self.order[:s] for s in more], "necessity")
            ok = next((j for j, (a, b) in enumerate(zip(m_suff, m_nec)) if a >= self.target and b <= necessity),
                      None)
            j = ok if ok is not None else len(more) - 1
            size, s_f, n_f = more[j], float(m_suff[j]), float(m_nec[j])
        if n_f > necessity:
            self.note(f"necessity: even {size} units leave faithfulness {n_f:.3f} > {necessity} when ablated")
        else:
            self.note(f"necessity: {size} units; ablating them leaves faithfulness {n_f:.3f}")
        return size, s_f, n_f

    def complete(self, members: list[int], s_f: float, n_f: float) -> tuple[list[int], float, float]:
        """4. complete: units that matter on their own in the full model belong in the circuit."""
        size = len(members)
        extra = [i for i in self.order[size:] if self.effect[i] >= self.min_effect][: max(0, self.limit - size)]
        if extra:
            members = members + extra
            suff, nec = self.evaluate([members], "completing")
            s_f, n_f = float(suff[0]), float(nec[0])
            self.note(f"complete: added {len(extra)} unit(s) with effect ≥ {self.min_effect} alone "
                      f"({', '.join(self.scope.units[i].name for i in extra)}): sufficiency {s_f:.3f}, "
                      f"necessity {n_f:.3f}")
        return members, s_f, n_f

    def prune(self, members: list[int], s_f: float, n_f: float) -> tuple[list[int], float, float]:
        """5. prune (on the scoring prompts) members whose removal costs less than min_effect of
        sufficiency while both targets hold; then measure the result on every discovery prompt."""
        pruned = False
        base_s, base_n = self.evaluate([members], "pruning", self.score)
        base_s, base_n = float(base_s[0]), float(base_n[0])
        while len(members) > 1:
            trials = [[m for m in members if m != v] for v in members]
            t_suff, t_nec = self.evaluate(trials, "pruning", self.score)
            drops = base_s - t_suff
            keep_ok = (t_suff >= min(self.target, base_s)) & (t_nec <= max(self.necessity, base_n))
            cand = [j for j in np.argsort(drops, kind="stable") if drops[j] < self.min_effect and keep_ok[j]]
            if not cand:
                break
            j = int(cand[0])
            self.note(f"prune: {self.scope.units[members[j]].name} (sufficiency drops by {drops[j]:.4f})")
            members, base_s, base_n, pruned = trials[j], float(t_suff[j]), float(t_nec[j]), True
        if pruned:
            suff, nec = self.evaluate([members], "final")
            s_f, n_f = float(suff[0]), float(nec[0])
        return members, s_f, n_f


# ---- writing the probe file -------------------------------------------------------------------

def _components(units: list[Any]) -> list[dict[str, Any]]:
    """Units grouped into probe-file entries: heads of one layer share an entry, so do neurons."""
    out: list[dict[str, Any]] = []
    for u in sorted(units, key=lambda u: (u.layer, u.kind, u.index)):
        entry = u.to_yaml()
        key = "head" if u.kind == "head" else "neuron" if u.kind == "neuron" else None
        prev = out[-1] if out else None
        if key and prev and prev.get("layer") == u.layer and key in prev:
            vals = prev[key] if isinstance(prev[key], list) else [prev[key]]
            prev[key] = [*vals, entry[key]]
        else:
            out.append(entry)
    return out


def _short(u: Any) -> str:
    """Compact unit names for prose: head 9.6, MLP 3, neuron 5/985."""
    return {"head": f"head {u.layer}.{u.index}", "mlp": f"MLP {u.layer}", "neuron": f"neuron {u.layer}/{u.index}"}[u.kind]


def _flow(d: dict[str, Any]) -> str:
    """A one-line YAML mapping: {layer: 9, component: attn.z, head: [6, 9]}."""
    def value(v: Any) -> str:
        if isinstance(v, str):
            return v if v.replace("_", "").replace(".", "").isalnum() else json.dumps(v)
        return json.dumps(v)
    return "{" + ", ".join(f"{k}: {value(v)}" for k, v in d.items()) + "}"


def probe_text(found: Found, args: argparse.Namespace, out: Path, test_rows: str | None, n_disc: int,
               command: str, model_id: str, seconds: float) -> str:
    rel = lambda p: os.path.relpath(Path(p).resolve(), out.parent.resolve())  # noqa: E731
    schema = os.path.relpath(Path(__file__).parent / "schema" / "modelprobe.schema.json", out.parent.resolve())
    lines = [
        f"# yaml-language-server: $schema={schema}",
        f"# Written by `modelprobe discover circuit` on {dt.date.today().isoformat()} for model '{model_id}'",
        f"# ({seconds:.0f} s):",
        f"#   {command}",
        "# How the circuit was found (exact ablations, same settings as below):",
        "#   1. every unit of the scope ablated alone; ranked by the share of m(M) − m(∅) it removes;",
        f"#   2. grown along that ranking until sufficiency reached {args.target};",
        f"#   3. grown further until ablating the circuit alone left faithfulness ≤ {args.necessity};",
        f"#   4. completed with units whose effect alone is ≥ {args.min_effect};",
        f"#   5. pruned of members whose removal lowered sufficiency by < {args.min_effect}.",
        f"# Numbers seen on the {n_disc} discovery prompts (rows {args.rows or 'all'}; single-unit effects and"
        f" pruning on {args.score_prompts or n_disc} of them):",
        f"#   m(M) = {found.m_full:.4g}, m(∅) = {found.m_empty:.4g} ({args.metric})",
        f"#   sufficiency faithfulness = {found.sufficiency:.3f}, necessity faithfulness = {found.necessity:.3f}"
        + ("" if found.reached else "   (targets NOT reached on the discovery prompts)"),
    ]
    lines += [f"#   {msg}" for msg in found.log[1:]]
    lines.append("#   strongest effects alone: " + ", ".join(f"{n} {e:.3f}" for n, e in found.effects[:12]))
    if test_rows:
        lines.append(f"# The claims below are tested on the held-out rows {test_rows}, not used for discovery.")
    elif args.rows:
        lines.append("# WARNING: the claims below are tested on all rows, including the discovery rows.")
    else:
        lines.append("# The claims below are tested on the same prompts discovery saw (no held-out rows).")
    names = ", ".join(_short(u) for u in sorted(found.circuit, key=lambda u: (u.layer, u.kind, u.index)))
    task = Path(args.prompts).stem
    lines += [
        "kind: circuit",
        "about: >",
        f"  The {len(found.circuit)} units found by discovery ({names}) are sufficient and necessary for",
        f"  the task in {Path(args.prompts).name}, far beyond random circuits of the same size and layers.",
        f"tags: [circuit, discovered, {task}]" if task.isidentifier() else "tags: [circuit, discovered]",
        f"prompts: {rel(args.prompts)}",
        f"reference: {rel(args.reference)}" if args.reference else "# reference: not needed for zero ablation",
    ]
    if test_rows:
        lines.append(f'rows: "{test_rows}"')
    lines += [f"metric: {args.metric}", f"ablation: {args.ablation}"]
    if args.group_by:
        lines.append(f"group_by: {args.group_by}")
    scope = _scope_arg(args.scope)
    lines.append(f"scope: {scope}" if isinstance(scope, str) else f"scope: {{neurons: {json.dumps(scope['neurons'])}}}")
    lines.append(f"seed: {args.seed}")
    lines.append("circuit:")
    lines += [f"  - {_flow(c)}" for c in _components(found.circuit)]
    lines += [
        "claims:",
        "  sufficient:",
        "    test: sufficiency",
        f"    expect: {{faithfulness: {{at_least: {args.target}}}}}",
        "  necessary:",
        "    test: necessity",
        f"    expect: {{faithfulness: {{at_most: {args.necessity}}}}}",
        "controls:",
        f"  random_circuits: {args.random_circuits}",
    ]
    if args.control_prompts:
        lines.append(f"  prompts: {args.control_prompts}")
    return "\n".join(lines) + "\n"


# ---- the command line -------------------------------------------------------------------------

class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump
        raise _UsageError(message)


def _finite_number(text: str) -> float:
    import math

    try:
        value = float(text)
    except ValueError:
        raise ValueError("expected a number") from None
    if not math.isfinite(value):
        raise ValueError("must be a finite number")
    return value


def _random_circuits_number(text: str) -> int:
    from . import CircuitControls

    n = int(CLI_TYPES["count"](text)) if text.strip() != "0" else 0
    CircuitControls._beatable(n)  # the written probe must validate: a control it could never beat is refused
    return n


def _control_prompts_number(text: str) -> int:
    n = CLI_TYPES["count"](text)
    if n < 2:
        raise argparse.ArgumentTypeError(f"{text!r}: must be at least 2")
    return n


_finite = as_argument(_finite_number)
_random_circuits = as_argument(_random_circuits_number)
_control_prompts = as_argument(_control_prompts_number)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="modelprobe discover circuit", add_help=True,
                description="Propose a small circuit for a task and write a ready probe file.")
    p.add_argument("what", choices=["circuit"], help="what to discover (only circuits for now)")
    p.add_argument("--model", required=True, help="model alias, directory or GGUF file")
    p.add_argument("--prompts", required=True, help='JSONL: {"prompt", "answer", "wrong"}')
    p.add_argument("--reference", help="JSONL whose activations replace ablated units (not for zero)")
    p.add_argument("--target", type=_finite, default=0.8, help="sufficiency faithfulness to reach")
    p.add_argument("--necessity", type=_finite, default=0.2, help="faithfulness left when the circuit is ablated")
    p.add_argument("--min-effect", type=_finite, default=0.05,
                   help="a unit whose effect alone (share of m(M) − m(∅)) reaches this joins the circuit, and a "
                        "member whose removal costs less sufficiency than this is pruned")
    p.add_argument("--max-size", type=CLI_TYPES["count"], default=64, help="largest circuit to consider")
    p.add_argument("--metric", default="logit_diff", choices=["logit_diff", "logprob", "accuracy"])
    p.add_argument("--ablation", default="mean", choices=["mean", "mean_all_positions", "zero", "resample"])
    p.add_argument("--group-by", help="field of both files: per-position means within equal values")
    p.add_argument("--scope", default="attention_heads",
                   help="attention_heads | heads_and_mlps | neurons:<layers> (e.g. neurons:5 or neurons:4:6)")
    p.add_argument("--rows", help="discover on these prompt lines only ('start:stop'); the probe tests the rest")
    p.add_argument("--score-prompts", type=CLI_TYPES["count"], default=None,
                   help="score single-unit effects on a seeded sample of this many discovery prompts")
    p.add_argument("--random-circuits", type=_random_circuits, default=100, help="random circuits the probe compares against")
    p.add_argument("--control-prompts", type=_control_prompts, default=None, help="prompts the probe measures random circuits on")
    p.add_argument("--out", help="probe file to write (default: probes/<prompts stem>_circuit.probe.yaml)")
    p.add_argument("--seed", type=CLI_TYPES["seed"], default=0)
    p.add_argument("--device", type=CLI_TYPES["device"], default="cpu")
    p.add_argument("--dtype", type=CLI_TYPES["dtype"], default="float32")
    p.add_argument("--batch-size", type=CLI_TYPES["batch_size"], default=16)
    p.add_argument("--threads", type=CLI_TYPES["threads"], default=0, help="torch threads (0: leave as is)")
    p.add_argument("--quiet", action="store_true")
    return p


def _scope_arg(text: str) -> Any:
    if text in ("attention_heads", "heads_and_mlps"):
        return text
    if text.startswith("neurons:"):
        spec = text.split(":", 1)[1]
        try:
            return {"neurons": int(spec)}
        except ValueError:
            return {"neurons": spec}
    raise _UsageError(f"--scope '{text}' is not attention_heads, heads_and_mlps or neurons:<layers>")


def cli_discover(argv: list[str]) -> int:
    """Entry point of `modelprobe discover ...`: 0 on success, 2 on a user mistake (one line on stderr)."""
    try:
        args = _parser().parse_args(argv)
        scope_spec = _scope_arg(args.scope)
        if args.ablation != "zero" and not args.reference:
            raise _UsageError(f"--ablation {args.ablation} needs --reference")
        if not 0 < args.target <= 1.5:
            raise _UsageError(f"--target {args.target} should be a faithfulness such as 0.8")
        return _run(args, scope_spec, argv)
    except _UsageError as e:
        print(f"modelprobe discover: {e}", file=sys.stderr)
        return 2
    except ModelprobeError as e:
        print(f"modelprobe discover: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace, scope_spec: Any, argv: list[str]) -> int:
    import torch

    from ...subject import AblationRunner, build_scope, load_subject
    from ...toolkit.ablation_task import parse_rows, prepare_task

    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    say = (lambda msg: None) if args.quiet else (lambda msg: print(f"discover: {msg}", file=sys.stderr, flush=True))
    prompt_path = Path(args.prompts)
    ref_path = Path(args.reference) if args.reference else None
    prompt_rows = read_prompt_rows(prompt_path)
    ref_rows = read_prompt_rows(ref_path) if ref_path else None
    try:
        parse_rows(args.rows, len(prompt_rows))
    except ValueError as e:
        raise _UsageError(f"--rows: {e}") from None
    subject = load_subject(args.model, device=args.device, dtype=args.dtype, batch_size=args.batch_size,
                           progress=not args.quiet)
    task = prepare_task(subject, prompt_rows, prompt_path, ref_rows, ref_path, args.metric, args.ablation,
                        args.group_by, args.rows, args.seed)
    scope = build_scope(scope_spec, subject.sitemap)
    runner = AblationRunner(subject, task, scope, task.row_metric(args.metric), args.ablation, args.group_by,
                            args.batch_size)
    n = len(task.prompt_ids)
    score = None
    if args.score_prompts and args.score_prompts < n:
        score = sorted(np.random.default_rng(args.seed).choice(n, args.score_prompts, replace=False).tolist())
    found = discover_circuit(runner, args.target, args.necessity, args.min_effect, args.max_size, score, say)
    out = Path(args.out) if args.out else Path("probes") / f"{prompt_path.stem}_circuit.probe.yaml"
    test_rows = heldout_rows(args.rows, len(prompt_rows))
    command = "modelprobe discover " + " ".join(argv)
    text = probe_text(found, args, out, test_rows, n, command, subject.info.id, time.perf_counter() - start)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    say(f"wrote {out} ({len(found.circuit)} units; targets {'reached' if found.reached else 'NOT reached'})")
    return 0
