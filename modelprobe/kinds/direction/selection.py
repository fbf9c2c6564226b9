"""Step 3 of the `direction` kind: choose the candidate direction (layer, position) on validation.

Arditi et al. 2024 score every candidate r[p, l] on validation with a logit score at
the last prompt position (log-odds of the behaviour's first tokens): bypass = the score on positives with
r̂ projected out everywhere, induce = the score on negatives with r added at layer l, KL = next-token
KL(base ‖ ablated) on negatives. Candidates at l >= int(0.8 L), with KL > 0.1, induce <= 0 or a
non-finite score are dropped; the lowest bypass wins.

Those filters choose the best direction on 2B-72B chat models; on a small model they can drop every
candidate (SmolLM2-135M: no refusal candidate makes "I / Sorry / As" more likely than not; a fine-tuned
refuser's working direction has KL 0.28). Selection runs on validation and the claims are judged on test
against random directions, so choosing a direction that misses a filter biases nothing, and what the KL
filter protects against (an intervention that "works" because it breaks the model) is the claim's
side-effect guard (toolkit/guard.py) on test. So selection always chooses when a candidate is non-zero:
- tier 1: the candidates that pass the paper's filters, and the paper's choice among them (lowest bypass);
- tier 2, when none of those measured in full passes: the measured, finite, non-zero candidates in the
  order TIER2_ORDER states (those that pass the induce filter first; then the least side effect, KL in
  bands of factors of ten above max_kl; then the largest induce gain over the base score), and the report
  says which filter values the chosen direction missed ("paper's filters not met: KL 0.28 > 0.1").
A selection without a non-zero candidate (or without a finite score) chooses nothing, and the claims are
inconclusive with that reason. "No candidate passed" is only ever said of the candidates measured in full.

Here, when the grader has a token form (graders.TOKEN_FORMS, a `tokens` grader, or
direction.select_tokens):
- every (layer, position) candidate below the depth cap gets its EXACT induce score: the validation
  negatives resume from their clean residual stream at the candidate's layer (cached by the validation
  pass), all positions of one layer in the same forwards (`subject.resume_variants`), and the
  chat template's shared prefix runs once per candidate instead of once per prompt. That is about
  (L - l) / L of a forward over the negatives per candidate, without the prefix;
- bypass and KL (one ablated forward over the validation positives and negatives each, prefix shared
  too) are measured for the candidates that pass induce > 0 - the `candidates` best of them by induce
  when more pass (the others are reported as not measured); when none passes induce > 0, for the
  `candidates` best by induce of all, so that tier 2 has measured candidates to choose from.
Every number a filter or the choice reads is exact (the batched, resumed scores equal plain forwards,
tests/test_direction_selection.py). On SmolLM2-135M (24 layers x 6 positions, 32 validation prompts per
set) the whole selection costs 0.95x the old 8-point generation grid (benchmarks/bench_direction.py
W3: 122 s vs 128 s, 2 threads, same process, idle machine; 1.2x on a loaded one). Sharing the template's 24-token prefix
halves the induce cost; what is left is compute (wider or unpadded batches were no faster on CPU).
A grader without a token form (sentiment, custom substrings...) scores on short generated replies, on a
grid of `candidates` layers, each at its best-separating position: generation per candidate is costly.

"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch

from ...subject import Add, Site, common_prefix, resume_variants
from ...toolkit.behaviour import behave_variants
from ...toolkit.metrics import kl as _kl
from ...toolkit.steering import ablate_direction_everywhere, stack_variants
from ..graders import log_odds

NO_CANDIDATE = "no candidate direction is non-zero"  # the only selection that chooses nothing
NO_FINITE = "no candidate direction has finite scores"
TIER2_ORDER = ("tier 2 (no candidate measured in full passed the paper's filters): the measured, finite, non-zero "
               "candidates, those that pass the induce filter first; then the least side effect (validation KL in "
               "bands of factors of ten above max_kl: <= max_kl, <= 10 x, <= 100 x, ...); then the largest induce "
               "gain over the base score; then the lowest bypass")


@dataclass
class Candidate:
    layer: int
    position: int
    norm: float
    separation: float | None = None
    bypass: float | None = None
    induce: float | None = None
    kl: float | None = None
    kept: bool = False
    note: str = ""

    def row(self) -> dict[str, Any]:
        return {k: (round(v, 5) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


@dataclass
class Selection:
    """The chosen direction (None only when no candidate is non-zero or finite), the one `add` claims use,
    every candidate, what the report says about the selection (its tier, the filters the choice missed),
    and per-layer curves."""

    chosen: Candidate | None
    add: Candidate | None
    candidates: list[Candidate]
    info: dict[str, Any]
    curves: dict[str, list[float]] = field(default_factory=dict)

    @property
    def failed(self) -> str | None:
        return None if self.chosen is not None else self.info.get("failed")


def token_ids_for(subject: Any, texts: Sequence[str]) -> list[int]:
    """Single-token ids for the texts, as written and with a leading space (first reply tokens come
    either way depending on the template and tokenizer); texts that are several tokens both ways are
    skipped."""
    ids: list[int] = []
    for text in texts:
        for form in dict.fromkeys((text, text if text.startswith(" ") else " " + text)):
            toks = subject.token_id(form)
            if len(toks) == 1 and toks[0] not in ids:
                ids.append(toks[0])
    return ids


@dataclass
class Validation:
    """What one clean pass over the validation prompts gives selection."""

    separation: torch.Tensor  # [P, L] Cohen's d of the projections, held out
    logits: torch.Tensor  # [n_pos + n_neg, vocab] base next-token logits, positives first
    # Each batch of validation positives / negatives with its clean resid_pre, by layer (logit scoring only):
    positive: list[tuple[Any, dict[int, torch.Tensor]]] = field(default_factory=list)
    negative: list[tuple[Any, dict[int, torch.Tensor]]] = field(default_factory=list)


def validation_pass(kind: Any, diffs: torch.Tensor, keep: bool = False) -> Validation:
    """Held-out separation of each candidate and the base next-token logits of the validation prompts,
    from one pass; with `keep`, the residual streams that exact scoring resumes from (layer 0 for the
    positives, every candidate layer for the negatives)."""
    subject = kind.subject
    val = kind.ids["validation"]
    units = diffs / diffs.norm(dim=-1, keepdim=True).clamp(min=1e-30)  # [P, L, d]
    sites = [Site("resid_pre", layer) for layer in range(subject.n_layers)]
    s1 = torch.zeros(2, *units.shape[:2], dtype=torch.float64)
    s2 = torch.zeros_like(s1)
    parts: list[torch.Tensor] = []
    out = Validation(torch.empty(0), torch.empty(0))
    for g, (which, layers) in enumerate((("positive", [0]), ("negative", sorted({0, *kind.layers})))):
        logits = torch.empty(0)
        for fw in subject.run(val[which], capture=sites, logits="last", batch_size=kind.spec.batch_size,
                              desc=f"direction: validation ({which})"):
            if logits.shape[0] == 0:
                logits = torch.empty(len(val[which]), fw.logits.shape[-1])
            logits[fw.batch.rows] = fw.logits.cpu()
            for li, site in enumerate(sites):
                for pi, p in enumerate(kind.positions):
                    proj = fw.at(site, p).double().cpu() @ units[pi, li]  # [b]
                    s1[g, pi, li] += proj.sum()
                    s2[g, pi, li] += (proj ** 2).sum()
            if keep:
                getattr(out, which).append((fw.batch, {layer: fw.acts[sites[layer]] for layer in layers}))
        parts.append(logits)
    n = torch.tensor([len(val["positive"]), len(val["negative"])], dtype=torch.float64)[:, None, None]
    mean = s1 / n
    var = (s2 / n - mean ** 2).clamp(min=0)
    out.separation = (mean[0] - mean[1]) / torch.sqrt((var[0] + var[1]) / 2 + 1e-12)
    out.logits = torch.cat(parts)
    return out


def _filter(c: Candidate, max_kl: float, induce_floor: float) -> None:
    reasons = []
    if not math.isfinite(c.bypass + c.induce + c.kl):
        reasons.append("not finite")
    if c.kl > max_kl:
        reasons.append(f"KL {c.kl:.3g} > {max_kl:g}")
    if not c.induce > induce_floor:
        reasons.append("does not induce")
    c.kept = not reasons
    c.note = "; ".join(reasons)


# Rows (variants x prompts) per resumed forward: on CPU, wider batches are no faster per token (192-row
# forwards made the exact induce scores of the refusal probe 15% slower than 64-row ones).
ROWS_PER_FORWARD = 64


def _variant_chunks(n: int, b: int) -> list[slice]:
    step = max(1, ROWS_PER_FORWARD // max(1, b))
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


def _added(site: Site, vecs: torch.Tensor, n: int) -> list[Add]:
    """Each vector added at `site`, all positions, to n rows in a row (variant-major batches)."""
    return [Add(site, "all", vector=vecs.repeat_interleave(n, 0))]


def _ablated(n_layers: int, units: torch.Tensor, n: int) -> list:
    """Each unit direction projected out everywhere, for n rows in a row (variant-major batches)."""
    return ablate_direction_everywhere(n_layers, units.repeat_interleave(n, 0))


def _exact_induce(kind: Any, diffs: torch.Tensor, todo: list[Candidate], val: Validation, score) -> None:
    """Exact induce score of every candidate: the negatives resumed at the candidate's layer with r added
    at all positions, the candidates of one layer side by side in the same forwards."""
    subject = kind.subject
    prefix = common_prefix(kind.ids["validation"]["negative"])
    n_neg = len(kind.ids["validation"]["negative"])
    for layer in sorted({c.layer for c in todo}):
        here = [c for c in todo if c.layer == layer]
        vecs = torch.stack([diffs[kind.positions.index(c.position), layer].float() for c in here])
        sums = torch.zeros(len(here), dtype=torch.float64)
        for batch, acts in val.negative:
            b = len(batch.rows)
            for part in _variant_chunks(len(here), b):
                v = vecs[part]
                logits = resume_variants(subject, batch, layer, acts[layer], len(v),
                                         partial(_added, Site("resid_pre", layer), v), prefix)
                sums[part] += score(logits.cpu()).double().view(len(v), b).sum(1)
        for c, s in zip(here, sums / n_neg):
            c.induce = float(s)


def _exact_ablation(kind: Any, diffs: torch.Tensor, measured: list[Candidate], val: Validation,
                    score) -> None:
    """Exact bypass (score on positives) and KL (on negatives) with each candidate's unit direction
    projected out everywhere, several candidates per forward."""
    subject, ids = kind.subject, kind.ids["validation"]
    n_vp = len(ids["positive"])
    base_neg = val.logits[n_vp:]
    units = torch.stack([diffs[kind.positions.index(c.position), c.layer].float() for c in measured])
    units = units / units.norm(dim=-1, keepdim=True)
    bypass = torch.zeros(len(measured), dtype=torch.float64)
    kl = torch.zeros(len(measured), dtype=torch.float64)
    for which, batches in (("positive", val.positive), ("negative", val.negative)):
        prefix = common_prefix(ids[which])
        for batch, acts in batches:
            b = len(batch.rows)
            for part in _variant_chunks(len(measured), b):
                u = units[part]
                logits = resume_variants(subject, batch, 0, acts[0], len(u),
                                         partial(_ablated, subject.n_layers, u), prefix).cpu()
                if which == "positive":
                    bypass[part] += score(logits).double().view(len(u), b).sum(1)
                else:
                    base = base_neg[batch.rows].repeat(len(u), 1)
                    kl[part] += torch.from_numpy(_kl(base, logits)).view(len(u), b).sum(1)
    for c, bp, k in zip(measured, bypass / n_vp, kl / len(ids["negative"])):
        c.bypass, c.kl = float(bp), float(k)


def _score_logits(kind: Any, diffs: torch.Tensor, todo: list[Candidate], val: Validation,
                  info: dict[str, Any]) -> list[Candidate]:
    """Exact logit scores: induce for every candidate, bypass and KL for those that induce (the
    `candidates` best by induce when more do). Returns the candidates whose bypass and KL were measured."""
    d = kind.spec.direction
    n_vp = len(kind.ids["validation"]["positive"])
    score = partial(log_odds, token_ids=kind.select_ids)
    base_bypass, base_induce = float(score(val.logits[:n_vp]).mean()), float(score(val.logits[n_vp:]).mean())
    _exact_induce(kind, diffs, todo, val, score)
    passing = []
    for c in todo:
        c.note = "" if math.isfinite(c.induce) else "not finite"
        if c.note == "" and not c.induce > 0.0:
            c.note = "does not induce"
        if not c.note:
            passing.append(c)
    # None inducing: the best inducers are measured anyway, so that tier 2 chooses among measured candidates.
    pool = passing or [c for c in todo if math.isfinite(c.induce)]
    measured = sorted(pool, key=lambda c: -c.induce)[:d.candidates]
    for c in passing:
        if c not in measured:
            c.note = f"not measured: induce {c.induce:.3g} is not among the {d.candidates} best"
    if measured:
        _exact_ablation(kind, diffs, measured, val, score)
    for c in measured:
        _filter(c, d.max_kl, 0.0)
    tokens = [kind.subject.tokenizer.convert_ids_to_tokens([i])[0] for i in kind.select_ids]
    info.update(
        mode=(f"exact: induce measured for all {len(todo)} candidates, bypass and KL for "
              + (f"all {len(measured)} that induce" if len(measured) == len(passing) else
                 f"the {len(measured)} best by induce of {len(passing)} that induce" if passing else
                 f"the {len(measured)} best by induce of {len(pool)} (none induces)")),
        score=(f"mean log-odds of the first reply token being one of {tokens} at the last prompt position "
               "(Arditi et al.'s refusal score); the paper's filter asks induce > 0"),
        base_bypass=base_bypass, base_induce=base_induce, induce_floor=0.0, score_tokens=tokens)
    return measured


def _score_generation(kind: Any, diffs: torch.Tensor, todo: list[Candidate], val: Validation,
                      info: dict[str, Any]) -> list[Candidate]:
    """Behaviour rates on short generated replies, for graders without a token form."""
    subject, d, bs = kind.subject, kind.spec.direction, kind.spec.batch_size
    ids = kind.ids["validation"]
    n_vp = len(ids["positive"])
    k_new = min(d.select_new_tokens, kind.spec.behaviour.max_new_tokens)
    if len(todo) <= d.candidates:
        measured, mode = todo, "exhaustive"
    else:
        layers = sorted({c.layer for c in todo})
        grid = sorted({layers[int(round(i))] for i in np.linspace(0, len(layers) - 1, min(d.candidates, len(layers)))})
        best = {layer: kind.positions[int(torch.argmax(val.separation[:, layer]))] for layer in grid}
        measured = [c for c in todo if best.get(c.layer) == c.position]
        for c in todo:
            if c not in measured:
                c.note = f"not measured: outside the grid of {len(grid)} layers"
        mode = f"grid: {len(grid)} of {len(layers)} layers, each at its best-separating position"
    vecs = [diffs[kind.positions.index(c.position), c.layer].float() for c in measured]
    ablations = [kind._ablate(r / r.norm()) for r in vecs]
    # Every candidate's replies (and the base replies) side by side: one batched generation per set.
    base_pos, *bypass = behave_variants(subject, kind.grader, ids["positive"], [[], *ablations], k_new, bs,
                                        "direction: validation bypass (positive)")
    base_neg, *induce = behave_variants(subject, kind.grader, ids["negative"],
                                        [[], *(kind._add(r, c.layer) for r, c in zip(vecs, measured))], k_new, bs,
                                        "direction: validation induce (negative)")
    base_bypass, base_induce = float(base_pos.flags.mean()), float(base_neg.flags.mean())
    n_vn = len(ids["negative"])
    stacked = stack_variants(ablations, n_vn)
    if stacked is not None and measured:
        ablated = subject.last_logits([x for _ in measured for x in ids["negative"]], stacked, bs)
        kls = [ablated[i * n_vn:(i + 1) * n_vn] for i in range(len(measured))]
    else:
        kls = [subject.last_logits(ids["negative"], a, bs) for a in ablations]
    for c, by, ind, abl in zip(measured, bypass, induce, kls):
        c.bypass, c.induce = float(by.flags.mean()), float(ind.flags.mean())
        c.kl = float(_kl(val.logits[n_vp:], abl).mean())
        _filter(c, d.max_kl, base_induce)
    info.update(mode=mode, score=(
        f"behaviour rate on validation replies of {k_new} new tokens, graded by the probe's grader (bypass: "
        f"positives with the direction ablated; induce: negatives with it added; a candidate must induce more "
        f"than the base rate {base_induce:.3g}). Not a logit score: {kind.grader.no_token_form}"),
        base_bypass=base_bypass, base_induce=base_induce, induce_floor=base_induce)
    return measured


def _order(c: Candidate) -> tuple:
    return (c.bypass, -c.induce, c.kl, c.layer)


def _removed(kind: Any, cands: list[Candidate]) -> dict[str, int]:
    """How many candidates each filter removed (a candidate failing two filters counts in both), and how
    many were not measured (bypass and KL skipped: beyond `candidates`, or outside the generation grid)."""
    n_pos = len(kind.positions)
    out = {"layer": (kind.subject.n_layers - len(kind.layers)) * n_pos if kind.auto else 0,
           "zero_direction": sum(c.note == "zero direction" for c in cands),
           "not_finite": sum("not finite" in c.note for c in cands),
           "induce": sum("does not induce" in c.note for c in cands),
           "kl": sum("KL " in c.note for c in cands),
           "not_measured": sum(c.note.startswith("not measured") for c in cands)}
    out["passed"] = sum(c.kept for c in cands)
    return out


def _why(removed: dict[str, int], n_measured: int) -> str:
    """The filter counts in words: '36 past the layer cap, 6 zero; does not induce: 90, ...; 8 measured'."""
    parts = [f"{removed[key]} {label}" for key, label in (
        ("layer", "past the layer cap"), ("zero_direction", "zero direction"), ("not_finite", "not finite"),
        ("induce", "do not induce"), ("kl", "KL above max_kl"),
        ("not_measured", "not measured (bypass and KL)")) if removed[key]]
    return "; ".join([", ".join(parts)] * bool(parts) + [f"{n_measured} measured in full"])


def _band(kl: float, max_kl: float) -> int:
    """Side-effect band of a validation KL: 0 within max_kl, then 1 per factor of ten above it."""
    return 0 if kl <= max_kl else max(1, math.ceil(math.log10(kl / max_kl)))


def _tier2_key(c: Candidate, max_kl: float, base_induce: float) -> tuple:
    return ("does not induce" in c.note, _band(c.kl, max_kl), -(c.induce - base_induce), c.bypass, c.layer)


def _missed(c: Candidate, max_kl: float, floor: float, base_induce: float) -> str:
    """The paper's filter values the candidate missed, in words."""
    out = []
    if c.kl > max_kl:
        out.append(f"KL {c.kl:.3g} > {max_kl:g}")
    if not c.induce > floor:
        out.append(f"induce {c.induce:.3g} <= {floor:.3g} (base {base_induce:.3g})")
    return "paper's filters not met: " + ", ".join(out)


def _choose(kind: Any, cands: list[Candidate], measured: list[Candidate], info: dict[str, Any]) -> Selection:
    d = kind.spec.direction
    kept = [c for c in cands if c.kept]
    removed = info["removed"] = _removed(kind, cands)
    if kept:
        chosen = min(kept, key=_order)
        info.update(tier=1, tier_rule="tier 1: the candidates that pass the paper's filters; the lowest bypass "
                                      "wins (Arditi et al.)")
    else:
        pool = [c for c in measured if c.note != "zero direction" and "not finite" not in c.note
                and None not in (c.bypass, c.induce, c.kl)]
        if not pool:
            info["failed"] = NO_CANDIDATE if not any(c.note != "zero direction" for c in cands) else NO_FINITE
            info["failed"] += f" ({len(cands)} candidates: {_why(removed, len(measured))})"
            return Selection(None, None, cands, info)
        base, floor = info.get("base_induce", 0.0), info.get("induce_floor", 0.0)
        chosen = min(pool, key=lambda c: _tier2_key(c, d.max_kl, base))
        unmeasured = removed["not_measured"]  # the others failed a filter already, from their induce score
        info.update(tier=2, tier_rule=TIER2_ORDER, missed=_missed(chosen, d.max_kl, floor, base),
                    note=(f"none of the {len(measured)} candidates measured in full passed the paper's filters "
                          f"({_why(removed, len(measured))})"
                          + (f"; {unmeasured} others were not measured in full, so whether one of them would "
                             "pass is not known" if unmeasured > 0 else "")
                          + f"; tier 2 chose layer {chosen.layer}, position {chosen.position}: "
                          + _missed(chosen, d.max_kl, floor, base)))
    add = chosen
    if d.add_layer == "best_induce" and kept:
        add = max(kept, key=lambda c: (c.induce, -c.bypass))
        info["add"] = (f"add claims use the candidate that best induces among those that passed the filters "
                       f"(direction.add_layer: best_induce): layer {add.layer}, position {add.position}")
    else:
        info["add"] = "add claims use the chosen direction at its own layer (Arditi et al.)"
    return Selection(chosen, add, cands, info)


def _curves(kind: Any, sel: Selection, norms: torch.Tensor, sep: torch.Tensor) -> None:
    pi = (kind.positions.index(sel.chosen.position) if sel.chosen is not None
          else int(sep.max(dim=1).values.argmax()))
    sel.curves["direction_norm"] = norms[pi].tolist()
    sel.curves["separation"] = sep[pi].tolist()
    at_pos = {c.layer: c for c in sel.candidates if c.position == kind.positions[pi]}
    if kind.layers != list(range(len(kind.layers))) or not all(layer in at_pos for layer in kind.layers):
        return
    for key in ("bypass", "induce", "kl"):
        values = [getattr(at_pos[layer], key) for layer in kind.layers]
        if all(v is not None for v in values):
            sel.curves[key] = [float(v) for v in values]


def select(kind: Any, diffs: torch.Tensor) -> Selection:
    """Choose (layer, position) on validation for the `direction` kind instance `kind`."""
    d = kind.spec.direction
    norms = diffs.norm(dim=-1)  # [P, L]
    pairs = [(layer, pi) for layer in kind.layers for pi in range(len(kind.positions))]
    if len(pairs) == 1:
        layer, pi = pairs[0]
        if not float(norms[pi, layer]) > 0:  # adding or ablating nothing: no claim can be measured
            c = Candidate(layer, kind.positions[pi], 0.0, note="zero direction")
            return Selection(None, None, [c], {"mode": "fixed (one candidate)", "score": None,
                                               "failed": f"{NO_CANDIDATE} (the one fixed candidate, layer {layer}, "
                                                         f"position {c.position}, is zero: the two prompt sets look "
                                                         "identical there)"})
        c = Candidate(layer, kind.positions[pi], float(norms[pi, layer]), kept=True, note="fixed")
        sel = Selection(c, c, [c], {"mode": "fixed (one candidate: nothing to choose)", "score": None,
                                    "tier": "fixed",
                                    "add": "add claims use the fixed direction"})
        sel.curves["direction_norm"] = norms[pi].tolist()
        return sel
    val = validation_pass(kind, diffs, keep=bool(kind.select_ids))
    sep = val.separation
    cands = [Candidate(layer, kind.positions[pi], float(norms[pi, layer]), separation=float(sep[pi, layer]))
             for layer, pi in pairs]
    todo = []
    for c in cands:
        if c.norm > 1e-9 * float(norms.max()):
            todo.append(c)
        else:  # a zero difference of means: ablating or adding it changes nothing
            c.note = "zero direction"
    info: dict[str, Any] = {"filters": {
        "layer": f"< int({d.max_layer_fraction} * L) = {kind.layers[-1] + 1}" if kind.auto else "as given",
        "max_kl": d.max_kl, "induce": "> 0 (logit score)" if kind.select_ids else "> base rate"}}
    if not todo:
        measured = []
        info.update(mode="none: every candidate direction is zero", score=None)
    elif kind.select_ids:
        measured = _score_logits(kind, diffs, todo, val, info)
    else:
        measured = _score_generation(kind, diffs, todo, val, info)
    for c in cands:
        if c.note == "zero direction" and "base_bypass" in info:  # ablating or adding nothing: the base
            c.bypass, c.induce, c.kl = info["base_bypass"], info["base_induce"], 0.0
    info.update(n_candidates=len(cands), n_measured=len(measured))
    sel = _choose(kind, cands, measured, info)
    _curves(kind, sel, norms, sep)
    return sel


__all__ = ["NO_CANDIDATE", "Candidate", "Selection", "select", "token_ids_for", "validation_pass"]
