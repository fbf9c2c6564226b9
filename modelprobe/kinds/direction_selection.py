"""Step 3 of the `direction` kind: choose the candidate direction (layer, position) on validation.

Arditi et al. (papers.md §1 steps 5-7) score every candidate r[p, l] on validation with a logit score at
the last prompt position (log-odds of the behaviour's first tokens): bypass = the score on positives with
r̂ projected out everywhere, induce = the score on negatives with r added at layer l, KL = next-token
KL(base ‖ ablated) on negatives. Candidates at l >= int(0.8 L), with KL > 0.1, induce <= 0 or a
non-finite score are dropped; the lowest bypass wins.

Here, when the grader has a token form (graders.TOKEN_FORMS, a `tokens` grader, or
direction.select_tokens):
- every (layer, position) candidate below the depth cap gets a first-order estimate of its induce score
  from one forward and backward pass over the validation negatives (subject/gradients.py): the
  gradient of the mean score w.r.t. a vector added at each layer, dotted with each candidate;
- the `candidates` best of them (best position per layer, layers ranked by that estimate; all of them
  when there are no more than `candidates`) are measured exactly: one ablated forward over validation
  positives and negatives (bypass and KL), and the addition resumed from the cached residual stream at
  its layer (induce). Filters and the choice are the paper's, on the exact numbers.
Why not measure every candidate exactly: each costs a full ablated forward over the validation set, so
on SmolLM2-135M (24 layers x 6 positions) that is ~11x the old 8-point generation grid; the screen plus
8 exact candidates costs 0.79x of it (benchmarks/bench_direction.py W3). The estimate only decides which
candidates are measured; every number a filter or the choice reads is exact.
A grader without a token form (sentiment, custom substrings...) scores on short generated replies, on a
grid of `candidates` layers, each at its best-separating position: generation per candidate is costly.

Nothing passing the filters is not papered over: the selection then has no direction and the claims are
inconclusive ("no candidate direction passed selection"), unless the probe fixes the layer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch

from ..subject import Add, Site
from ..subject.gradients import addition_gradients
from ..subject.resume import resume
from ..toolkit.metrics import kl as _kl
from .graders import log_odds

NO_CANDIDATE = "no candidate direction passed selection"


@dataclass
class Candidate:
    layer: int
    position: int
    norm: float
    separation: float | None = None
    induce_estimate: float | None = None  # first-order (gradient) estimate; None when not screened
    bypass: float | None = None
    induce: float | None = None
    kl: float | None = None
    kept: bool = False
    note: str = ""

    def row(self) -> dict[str, Any]:
        return {k: (round(v, 5) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


@dataclass
class Selection:
    """The chosen direction (None when nothing passed and the layer is not fixed), the one `add` claims
    use, every candidate, what the report says about the selection, and per-layer curves."""

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


def validation_pass(kind: Any, diffs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Held-out separation of each candidate ([P, L], Cohen's d of the projections on validation)
    and the base next-token logits of the validation prompts (positives first), from one pass."""
    subject = kind.subject
    val = kind.ids["validation"]
    ids = val["positive"] + val["negative"]
    n_pos = len(val["positive"])
    units = diffs / diffs.norm(dim=-1, keepdim=True).clamp(min=1e-30)  # [P, L, d]
    sites = [Site("resid_pre", layer) for layer in range(subject.n_layers)]
    s1 = torch.zeros(2, *units.shape[:2], dtype=torch.float64)
    s2 = torch.zeros_like(s1)
    logits = torch.empty(len(ids), 0)
    for fw in subject.run(ids, capture=sites, logits="last", batch_size=kind.spec.batch_size,
                          desc="direction: validation"):
        rows = torch.tensor(fw.batch.rows)
        neg = rows >= n_pos
        if logits.shape[1] == 0:
            logits = torch.empty(len(ids), fw.logits.shape[-1])
        logits[rows] = fw.logits.cpu()
        for li, site in enumerate(sites):
            for pi, p in enumerate(kind.positions):
                proj = fw.at(site, p).double().cpu() @ units[pi, li]  # [b]
                for g, m in ((0, ~neg), (1, neg)):
                    s1[g, pi, li] += proj[m].sum()
                    s2[g, pi, li] += (proj[m] ** 2).sum()
    n = torch.tensor([n_pos, len(ids) - n_pos], dtype=torch.float64)[:, None, None]
    mean = s1 / n
    var = (s2 / n - mean ** 2).clamp(min=0)
    sep = (mean[0] - mean[1]) / torch.sqrt((var[0] + var[1]) / 2 + 1e-12)
    return sep, logits


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


def _screen(kind: Any, diffs: torch.Tensor, todo: list[Candidate], base_induce: float) -> list[Candidate]:
    """First-order induce estimate for every candidate; the `candidates` best layers (each at its best
    position) are returned for exact scoring, the others are marked as not measured."""
    subject, k = kind.subject, kind.spec.direction.candidates
    layers = sorted({c.layer for c in todo})
    grads, _ = addition_gradients(subject, kind.ids["validation"]["negative"], layers,
                                  partial(log_odds, token_ids=kind.select_ids), kind.spec.batch_size)
    row = {layer: i for i, layer in enumerate(layers)}
    best: dict[int, Candidate] = {}
    for c in todo:
        r = diffs[kind.positions.index(c.position), c.layer]
        c.induce_estimate = base_induce + float(grads[row[c.layer]] @ r)
        if c.layer not in best or c.induce_estimate > best[c.layer].induce_estimate:
            best[c.layer] = c
    measured = sorted(best.values(), key=lambda c: -c.induce_estimate)[:k]
    for c in todo:
        if c in measured:
            continue
        if best[c.layer] in measured:
            c.note = f"not measured: layer {c.layer} is measured at position {best[c.layer].position}"
        else:
            c.note = f"not measured: layer {c.layer} is not among the {k} best by induce estimate"
    return measured


def _score_logits(kind: Any, diffs: torch.Tensor, todo: list[Candidate], val_logits: torch.Tensor,
                  info: dict[str, Any]) -> list[Candidate]:
    """Exact logit scores (bypass, induce, KL) for the candidates to measure; returns them."""
    subject, d, bs = kind.subject, kind.spec.direction, kind.spec.batch_size
    val = kind.ids["validation"]
    n_vp = len(val["positive"])
    score = partial(log_odds, token_ids=kind.select_ids)
    base_neg_logits = val_logits[n_vp:]
    base_bypass, base_induce = float(score(val_logits[:n_vp]).mean()), float(score(base_neg_logits).mean())
    measured = _screen(kind, diffs, todo, base_induce) if len(todo) > d.candidates else todo
    # The residual stream of the validation negatives at the measured layers, once: each addition then
    # runs only the layers from its own.
    layers = sorted({c.layer for c in measured})
    batches = list(subject.batches(val["negative"], bs))
    cached = [subject.forward(b, [Site("resid_pre", layer) for layer in layers], (), logits=None).acts
              for b in batches]
    for c in measured:
        r = diffs[kind.positions.index(c.position), c.layer].float()
        both = subject.last_logits(val["positive"] + val["negative"], kind._ablate(r / r.norm()), bs)
        c.bypass = float(score(both[:n_vp]).mean())
        c.kl = float(_kl(base_neg_logits, both[n_vp:]).mean())
        induced = torch.empty(len(val["negative"]), dtype=torch.float64)
        add = [Add(Site("resid_pre", c.layer), positions="all", vector=r)]
        for b, acts in zip(batches, cached):
            induced[b.rows] = score(resume(subject, b, c.layer, acts[Site("resid_pre", c.layer)], add).logits.cpu())
        c.induce = float(induced.mean())
        _filter(c, d.max_kl, 0.0)
    tokens = [subject.tokenizer.convert_ids_to_tokens([i])[0] for i in kind.select_ids]
    info.update(
        mode=("exhaustive" if measured is todo else
              f"screened: all {len(todo)} candidates estimated, the best position of the {len(measured)} best "
              "layers measured"),
        score=(f"mean log-odds of the first reply token being one of {tokens} at the last prompt position "
               "(Arditi et al.'s refusal score); a candidate must reach induce > 0"
               + ("" if measured is todo else "; induce_estimate: first-order estimate from the gradient at "
                  "each layer, used only to choose which candidates to measure")),
        base_bypass=base_bypass, base_induce=base_induce, induce_floor=0.0, score_tokens=tokens)
    return measured


def _score_generation(kind: Any, diffs: torch.Tensor, todo: list[Candidate], val_logits: torch.Tensor,
                      sep: torch.Tensor, info: dict[str, Any]) -> list[Candidate]:
    """Behaviour rates on short generated replies, for graders without a token form."""
    subject, d, bs = kind.subject, kind.spec.direction, kind.spec.batch_size
    val = kind.ids["validation"]
    n_vp = len(val["positive"])
    k_new = min(d.select_new_tokens, kind.spec.behaviour.max_new_tokens)
    if len(todo) <= d.candidates:
        measured, mode = todo, "exhaustive"
    else:
        layers = sorted({c.layer for c in todo})
        grid = sorted({layers[int(round(i))] for i in np.linspace(0, len(layers) - 1, min(d.candidates, len(layers)))})
        best = {layer: kind.positions[int(torch.argmax(sep[:, layer]))] for layer in grid}
        measured = [c for c in todo if best.get(c.layer) == c.position]
        for c in todo:
            if c not in measured:
                c.note = f"not measured: outside the grid of {len(grid)} layers"
        mode = f"grid: {len(grid)} of {len(layers)} layers, each at its best-separating position"
    base_pos = kind._behave(val["positive"], (), k_new, "direction: validation base (positive)")
    base_neg = kind._behave(val["negative"], (), k_new, "direction: validation base (negative)")
    base_bypass, base_induce = float(base_pos.flags.mean()), float(base_neg.flags.mean())
    for c in measured:
        r = diffs[kind.positions.index(c.position), c.layer].float()
        u = r / r.norm()
        c.bypass = float(kind._behave(val["positive"], kind._ablate(u), k_new,
                                      f"direction: bypass L{c.layer} p{c.position}").flags.mean())
        abl = subject.last_logits(val["negative"], kind._ablate(u), bs)
        c.kl = float(_kl(val_logits[n_vp:], abl).mean())
        c.induce = float(kind._behave(val["negative"], kind._add(r, c.layer), k_new,
                                      f"direction: induce L{c.layer} p{c.position}").flags.mean())
        _filter(c, d.max_kl, base_induce)
    info.update(mode=mode, score=(
        f"behaviour rate on validation replies of {k_new} new tokens, graded by the probe's grader (bypass: "
        f"positives with the direction ablated; induce: negatives with it added; a candidate must induce more "
        f"than the base rate {base_induce:.3g}). Not a logit score: {kind.grader.no_token_form}"),
        base_bypass=base_bypass, base_induce=base_induce, induce_floor=base_induce)
    return measured


def _order(c: Candidate) -> tuple:
    return (c.bypass, -c.induce, c.kl, c.layer)


def _removed(kind: Any, cands: list[Candidate], measured: list[Candidate]) -> dict[str, int]:
    """How many candidates each filter removed (a candidate failing two filters counts in both)."""
    n_pos = len(kind.positions)
    out = {"layer": (kind.subject.n_layers - len(kind.layers)) * n_pos if kind.auto else 0,
           "zero_direction": sum(c.note == "zero direction" for c in cands),
           "not_measured": sum(c.note.startswith("not measured") for c in cands),
           "not_finite": sum("not finite" in c.note for c in measured),
           "kl": sum("KL " in c.note for c in measured),
           "induce": sum("does not induce" in c.note for c in measured)}
    out["passed"] = sum(c.kept for c in cands)
    return out


def _why(removed: dict[str, int], n_measured: int) -> str:
    """The filter counts in words: '36 past the layer cap, 6 zero; of 8 measured, KL above max_kl: 8, ...'."""
    unmeasured = [f"{removed[key]} {label}" for key, label in (
        ("layer", "past the layer cap"), ("zero_direction", "zero"), ("not_measured", "not measured (screened out)"))
        if removed[key]]
    failed = [f"{label}: {removed[key]}" for key, label in (
        ("kl", "KL above max_kl"), ("induce", "does not induce"), ("not_finite", "not finite")) if removed[key]]
    parts = [", ".join(unmeasured)] if unmeasured else []
    if failed:
        parts.append(f"of {n_measured} measured, " + ", ".join(failed))
    return "; ".join(parts) or "none measured"


def _choose(kind: Any, cands: list[Candidate], measured: list[Candidate], info: dict[str, Any]) -> Selection:
    d = kind.spec.direction
    kept = [c for c in cands if c.kept]
    removed = info["removed"] = _removed(kind, cands, measured)
    chosen = min(kept, key=_order) if kept else None
    if chosen is None:
        why = _why(removed, len(measured))
        if not kind.auto and len(kind.layers) == 1 and measured:
            chosen = min(measured, key=_order)
            info["note"] = (f"no candidate passed the filters ({why}); the probe fixes the layer, so the claims "
                            f"judge the lowest-bypass candidate at it")
        else:
            info["failed"] = f"{NO_CANDIDATE} ({len(cands)} candidates: {why})"
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
    for key in ("induce_estimate", "bypass", "induce", "kl"):
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
        c = Candidate(layer, kind.positions[pi], float(norms[pi, layer]), kept=True, note="fixed")
        sel = Selection(c, c, [c], {"mode": "fixed (one candidate: nothing to choose)", "score": None,
                                    "add": "add claims use the fixed direction"})
        sel.curves["direction_norm"] = norms[pi].tolist()
        return sel
    sep, val_logits = validation_pass(kind, diffs)
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
        measured = _score_logits(kind, diffs, todo, val_logits, info)
    else:
        measured = _score_generation(kind, diffs, todo, val_logits, sep, info)
    for c in cands:
        if c.note == "zero direction" and "base_bypass" in info:  # ablating or adding nothing: the base
            c.bypass, c.induce, c.kl = info["base_bypass"], info["base_induce"], 0.0
            if any(x.induce_estimate is not None for x in todo):
                c.induce_estimate = info["base_induce"]
    info.update(n_candidates=len(cands), n_measured=len(measured))
    sel = _choose(kind, cands, measured, info)
    _curves(kind, sel, norms, sep)
    return sel


__all__ = ["NO_CANDIDATE", "Candidate", "Selection", "select", "token_ids_for", "validation_pass"]
