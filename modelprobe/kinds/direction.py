"""direction: one residual-stream direction mediates a behaviour (refusal, sentiment, ...).

The refusal-direction protocol of Arditi et al. 2024 (papers.md §1), for any behaviour a grader can see:

1. Each prompt set (positive: triggers the behaviour; negative: does not) is split into train,
   validation and test with a fixed seed (equal-size sets paired by line stay paired).
2. Candidates r[p, l] = mean(positive) - mean(negative) of resid_pre (the input of block l) at each
   candidate position p, over train: one streaming pass whose forwards capture every layer at once,
   with float64 running sums, so memory does not grow with the number of prompts. Not normalised.
3. Unless the probe fixes one, a candidate is chosen on validation: bypass = the behaviour on
   positives with r̂ projected out everywhere, induce = the behaviour on negatives with r added at
   layer l, KL = next-token KL(base ‖ ablated) on negatives. Candidates at l >= 0.8 L (auto only),
   with KL above the limit, that do not induce, or with a zero direction are dropped; the lowest
   bypass wins. See `_select` for how the candidate list is kept small on slow machines.
4. On test, each claim compares the behaviour rate with and without its intervention (paired over
   the same prompts), and against the same intervention along random directions of the same norm.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field

from ..errors import SiteError
from ..report.record import ClaimResult, ControlResult
from ..spec import (
    ClaimName,
    FiniteFloat,
    OneExpectation,
    ProbeBase,
    RateChangeThreshold,
    RateThreshold,
    Seed,
    Strict,
    Tolerance,
)
from ..spec.fields import LayerSpec
from ..stats import bootstrap_ci, paired_difference, paired_permutation_pvalue, wilson_interval
from ..subject import AblateDirection, Add, Intervention, Site, canonical_name, resolve_layer
from ..subject.orthogonalize import check_orthogonalizable, orthogonalization_notes, orthogonalizing_deltas
from .base import Outcome, ProbeKind, judge
from .graders import Grader, GraderSpec, build_grader

SETS = ("positive", "negative")
ABLATION_COMPONENTS = ("resid_pre", "attn_out", "mlp_out")  # every block input and sublayer write
CONTROL_ALPHA = 0.05
EXAMPLES = 3  # replies shown per claim in the report


# ---- probe-file spec ----------------------------------------------------------------------------

class SplitSpec(Strict):
    train: int = Field(64, ge=1, description="prompts per set for the difference of means")
    validation: int = Field(32, ge=0, description="prompts per set for choosing layer and position")
    test: int = Field(64, ge=1, description="prompts per set for the claims")
    seed: Seed = Field(0, description="seed of the split")


class PromptSets(Strict):
    positive: str = Field(description='JSONL, one {"prompt": ...} per line: prompts that trigger the behaviour')
    negative: str = Field(description="JSONL: prompts that do not")
    chat_template: bool = False
    system: str | None = Field(None, description="system prompt, with chat_template")
    split: SplitSpec = Field(default_factory=SplitSpec)


class DirectionSearch(Strict):
    layer: LayerSpec = Field(
        "auto", description="auto (choose on validation, layer < max_layer_fraction of depth), an int, a "
                            "fraction of depth, a list or an 'a:b' range of layers to choose from")
    position: Literal["post_instruction", "last"] | int = Field(
        "post_instruction", description="post_instruction: the template tokens after the instruction are "
                                        "the candidates; last; or a token index (negative from the end)")
    candidates: int = Field(8, ge=1, description="most (layer, position) candidates scored on validation")
    max_kl: FiniteFloat = Field(0.1, gt=0, description="drop candidates whose ablation moves harmless next-token "
                                                 "distributions by more than this KL")
    max_layer_fraction: float = Field(0.8, gt=0, le=1, description="layer: auto drops l >= int(this * L)")
    select_new_tokens: int = Field(12, ge=1, description="reply length used to score candidates with a "
                                                         "text grader (capped by max_new_tokens)")


class BehaviourSpec(Strict):
    grader: GraderSpec = Field(description="refusal | sentiment | {substrings: [...]} | {regex: ...} | "
                                           "{tokens: [...]} | {lexicon: {positive: [...], negative: [...]}}")
    max_new_tokens: int = Field(48, ge=1, description="greedy reply length the grader reads")
    min_base_rate: float = Field(0.1, ge=0, lt=0.5, description="a drop needs a base rate of at least this, a "
                                                                "rise at most 1 - this; otherwise untestable")


class DirectionExpect(OneExpectation):
    rate_drop: RateChangeThreshold | None = Field(None, description="base rate - intervened rate, on the same prompts")
    rate_rise: RateChangeThreshold | None = Field(None, description="intervened rate - base rate, on the same prompts")
    rate: RateThreshold | None = Field(None, description="the behaviour rate under the intervention")


class DirectionClaim(Strict):
    intervention: Literal["ablate", "add", "weight_orthogonalize"] = Field(
        description="ablate: project the unit direction out of every block input, attention output and MLP "
                    "output, all positions, generated tokens included; add: add the raw difference of means "
                    "at the chosen layer, all positions; weight_orthogonalize: edit the residual-writing "
                    "weights so the direction cannot be written")
    on: Literal["positive", "negative"]
    scale: FiniteFloat = Field(1.0, description="add only: multiple of the direction added (-1 subtracts it)")
    expect: DirectionExpect
    tolerance: Tolerance | None = None


class DirectionSpec(ProbeBase):
    kind: Literal["direction"]
    prompts: PromptSets
    direction: DirectionSearch = Field(default_factory=DirectionSearch)
    behaviour: BehaviourSpec
    control_directions: int = Field(3, ge=1, description="random directions of the same norm per claim")
    claims: dict[ClaimName, DirectionClaim] = Field(min_length=1)


# ---- engine helpers -------------------------------------------------------------------------------

def diff_in_means(subject: Any, positive: Sequence[Sequence[int]], negative: Sequence[Sequence[int]],
                  positions: Sequence[int], batch_size: int | None = None,
                  desc: str = "direction: means") -> torch.Tensor:
    """mean(positive) - mean(negative) of resid_pre at every layer and position: [P, L, d] float64.

    One forward per batch captures all layers; sums stream, so memory is flat in the number of prompts.
    """
    n_layers, d = subject.n_layers, subject.sitemap.d_model
    sites = [Site("resid_pre", layer) for layer in range(n_layers)]
    ids = list(positive) + list(negative)
    n_pos = len(positive)
    sums = torch.zeros(2, len(positions), n_layers, d, dtype=torch.float64)
    for fw in subject.run(ids, capture=sites, logits=None, batch_size=batch_size, desc=desc):
        neg = torch.tensor(fw.batch.rows) >= n_pos
        for li, site in enumerate(sites):
            for pi, p in enumerate(positions):
                x = fw.at(site, p).double().cpu()
                sums[0, pi, li] += x[~neg].sum(0)
                sums[1, pi, li] += x[neg].sum(0)
    return sums[0] / max(1, n_pos) - sums[1] / max(1, len(ids) - n_pos)


def post_instruction_positions(subject: Any, system: str | None = None) -> list[int]:
    """Negative indices of the chat template's tokens after the instruction (Arditi's candidates).

    Rendered with a placeholder instruction: the text after it is tokenized alone, and the candidates
    are the tokens it shares with the end of the fully encoded prompt (any template, any tokenizer).
    """
    marker = "Placeholder instruction"
    text = subject.render(marker, True, system)
    suffix = text[text.rfind(marker) + len(marker):]
    tail = subject.tokenizer(suffix, add_special_tokens=False).input_ids if suffix else []
    full = subject.encode(marker, True, system)
    k = 0
    while k < min(len(tail), len(full) - 1) and tail[-1 - k] == full[-1 - k]:
        k += 1
    return list(range(-k, 0)) if k else [-1]


def ablation(n_layers: int, direction: torch.Tensor) -> list[Intervention]:
    """Project the unit direction out of every block input, attention output and MLP output."""
    return [AblateDirection(Site(c, layer), positions="all", direction=direction)
            for layer in range(n_layers) for c in ABLATION_COMPONENTS]


def _kl(base: torch.Tensor, other: torch.Tensor) -> np.ndarray:
    """Per-row KL(base ‖ other) of next-token distributions, in nats."""
    lp, lq = torch.log_softmax(base.double(), -1), torch.log_softmax(other.double(), -1)
    return (lp.exp() * (lp - lq)).sum(-1).clamp(min=0).numpy()


def _rate(flags: np.ndarray) -> dict[str, Any]:
    k, n = int(flags.sum()), int(flags.size)
    lo, hi = wilson_interval(k, n)
    return {"rate": k / n if n else None, "ci": [lo, hi], "k": k, "n": n}


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
class Behaviour:
    flags: np.ndarray  # [n] bool: the reply shows the behaviour
    texts: list[str] | None = None  # replies (text graders)
    scores: np.ndarray | None = None  # log-odds (tokens grader)
    logits: torch.Tensor | None = None  # next-token logits at the last prompt position (tokens grader)


# ---- the kind -----------------------------------------------------------------------------------

class Direction(ProbeKind):
    name = "direction"
    Spec = DirectionSpec

    @classmethod
    def data_files(cls, spec: DirectionSpec) -> list[tuple[str, tuple]]:
        return [(spec.prompts.positive, ("prompts", "positive")), (spec.prompts.negative, ("prompts", "negative"))]

    def setup(self) -> None:
        spec, subject, probe = self.spec, self.subject, self.probe
        ps = spec.prompts
        split = ps.split
        need = split.train + split.validation + split.test
        self.rows = {}
        for which in SETS:
            rel = getattr(ps, which)
            rows = probe.rows(rel, ("prompts", which), ("prompt",))
            if len(rows) < need:
                raise probe.error(
                    f"the {which} set '{rel}' holds {len(rows)} prompts, but the split asks for {split.train} "
                    f"train + {split.validation} validation + {split.test} test = {need} from each set",
                    ("prompts", "split"))
            self.rows[which] = rows
        if ps.chat_template and not subject.has_chat_template():
            raise probe.error(f"model '{subject.info.id}' has no chat template in its tokenizer; set "
                              "chat_template: false (and position: last or an index)", ("prompts", "chat_template"))

        self.grader: Grader = build_grader(spec.behaviour.grader)
        if self.grader.kind == "tokens":
            ids = []
            for i, text in enumerate(self.grader.token_texts):
                toks = subject.token_id(text)
                if len(toks) != 1:
                    raise probe.error(f"grader token {text!r} is {len(toks)} tokens for model '{subject.info.id}';"
                                      " give single tokens (e.g. with or without a leading space)",
                                      ("behaviour", "grader", "tokens", i))
                ids.append(toks[0])
            self.grader.token_ids = tuple(ids)

        # Split indices: one permutation per set from the same seed, so paired sets stay paired.
        self.prompts: dict[str, dict[str, list[str]]] = {"train": {}, "validation": {}, "test": {}}
        self.ids: dict[str, dict[str, list[list[int]]]] = {"train": {}, "validation": {}, "test": {}}
        bounds = {"train": (0, split.train), "validation": (split.train, split.train + split.validation),
                  "test": (split.train + split.validation, need)}
        for which in SETS:
            perm = np.random.default_rng(split.seed).permutation(len(self.rows[which]))
            for part, (a, b) in bounds.items():
                prompts = [str(self.rows[which][i]["prompt"]) for i in perm[a:b]]
                self.prompts[part][which] = prompts
                self.ids[part][which] = subject.encode_all(prompts, ps.chat_template, ps.system)

        d = spec.direction
        if d.position == "post_instruction":
            if not ps.chat_template:
                raise probe.error("position: post_instruction means the chat template's tokens after the "
                                  "instruction; it needs chat_template: true (or use last / an index)",
                                  ("direction", "position"))
            self.positions = post_instruction_positions(subject, ps.system)
        elif d.position == "last":
            self.positions = [-1]
        else:
            shortest = min(len(x) for part in self.ids.values() for s in part.values() for x in s)
            if not (-shortest <= d.position < shortest):
                raise probe.error(f"position {d.position} is outside the shortest prompt ({shortest} tokens)",
                                  ("direction", "position"))
            self.positions = [d.position]
        self.auto = d.layer == "auto"
        n_layers = subject.n_layers
        layers = list(range(n_layers)) if self.auto else resolve_layer(d.layer, n_layers, ("direction", "layer"))
        if self.auto:
            cut = int(d.max_layer_fraction * n_layers)
            layers = [layer for layer in layers if layer < cut] or [0]
        self.layers = sorted(set(layers))
        if len(self.layers) * len(self.positions) > 1 and split.validation == 0:
            raise probe.error("choosing among several layers or positions needs validation prompts "
                              "(split.validation > 0), or fix direction.layer and direction.position",
                              ("prompts", "split", "validation"))

        for name, claim in spec.claims.items():
            if claim.intervention == "weight_orthogonalize":
                try:
                    check_orthogonalizable(subject.sitemap)
                except SiteError as e:
                    raise SiteError(e.message, ("claims", name, "intervention")) from None
            if claim.scale != 1.0 and claim.intervention != "add":
                raise probe.error("scale applies to intervention: add only", ("claims", name, "scale"))

    # ---- behaviour under an intervention ----------------------------------------------------------
    def _behave(self, ids: Sequence[Sequence[int]], interventions: Any = (), new_tokens: int | None = None,
                desc: str = "direction") -> Behaviour:
        subject, bs = self.subject, self.spec.batch_size
        if not self.grader.needs_generation:
            logits = subject.last_logits(ids, interventions, bs)
            scores = self.grader.scores(logits).numpy()
            return Behaviour(scores > 0, scores=scores, logits=logits)
        n = new_tokens or self.spec.behaviour.max_new_tokens
        gens = subject.generate(ids, n, interventions, batch_size=bs, desc=desc)
        texts = [subject.decode(g) for g in gens]
        return Behaviour(np.array(self.grader.grade_all(texts), dtype=bool), texts=texts)

    def _ablate(self, u: torch.Tensor) -> list[Intervention]:
        return ablation(self.subject.n_layers, u)

    def _add(self, r: torch.Tensor, layer: int, scale: float = 1.0) -> list[Intervention]:
        return [Add(Site("resid_pre", layer), positions="all", vector=r, scale=scale)]

    def _interventions(self, claim: DirectionClaim, r: torch.Tensor, layer: int) -> list:
        u = r / r.norm()
        if claim.intervention == "ablate":
            return self._ablate(u)
        if claim.intervention == "add":
            return self._add(r, layer, claim.scale)
        key = ("orth",)
        if key not in self._memo:
            self._memo[key] = orthogonalizing_deltas(self.subject.sitemap, u)
        return self._memo[key]

    # ---- step 2: candidates ---------------------------------------------------------------------
    def _means(self) -> torch.Tensor:
        tr = self.ids["train"]
        digest = hashlib.sha256(repr((tr["positive"], tr["negative"], self.positions)).encode()).hexdigest()
        key = ("direction.diff_in_means", digest)
        if key not in self.subject.cache:  # probes sharing prompt sets share the pass
            self.subject.cache[key] = diff_in_means(self.subject, tr["positive"], tr["negative"], self.positions,
                                                    self.spec.batch_size)
        return self.subject.cache[key]

    def _validation_pass(self, diffs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Held-out separation of each candidate ([P, L], Cohen's d of the projections on validation)
        and the base next-token logits of the validation prompts (positives first), from one pass."""
        subject = self.subject
        val = self.ids["validation"]
        ids = val["positive"] + val["negative"]
        n_pos = len(val["positive"])
        units = diffs / diffs.norm(dim=-1, keepdim=True).clamp(min=1e-30)  # [P, L, d]
        sites = [Site("resid_pre", layer) for layer in range(subject.n_layers)]
        s1 = torch.zeros(2, *units.shape[:2], dtype=torch.float64)
        s2 = torch.zeros_like(s1)
        logits = torch.empty(len(ids), 0)
        for fw in subject.run(ids, capture=sites, logits="last", batch_size=self.spec.batch_size,
                              desc="direction: validation"):
            rows = torch.tensor(fw.batch.rows)
            neg = rows >= n_pos
            if logits.shape[1] == 0:
                logits = torch.empty(len(ids), fw.logits.shape[-1])
            logits[rows] = fw.logits.cpu()
            for li, site in enumerate(sites):
                for pi, p in enumerate(self.positions):
                    proj = fw.at(site, p).double().cpu() @ units[pi, li]  # [b]
                    for g, m in ((0, ~neg), (1, neg)):
                        s1[g, pi, li] += proj[m].sum()
                        s2[g, pi, li] += (proj[m] ** 2).sum()
        n = torch.tensor([n_pos, len(ids) - n_pos], dtype=torch.float64)[:, None, None]
        mean = s1 / n
        var = (s2 / n - mean ** 2).clamp(min=0)
        sep = (mean[0] - mean[1]) / torch.sqrt((var[0] + var[1]) / 2 + 1e-12)
        return sep, logits

    def _select(self, diffs: torch.Tensor) -> tuple[Candidate, list[Candidate], dict[str, Any], dict[str, list]]:
        """Choose (layer, position) on validation; return it, the scored candidates, settings and curves.

        Cost control: every candidate costs three validation runs (two of them short generations for a
        text grader). When layers x positions exceed `candidates`, the layers are a grid evenly spaced
        over the allowed range, each at the position whose direction best separates the validation
        sets (held-out Cohen's d of the projections), instead of the full grid."""
        d = self.spec.direction
        norms = diffs.norm(dim=-1)  # [P, L]
        pairs = [(layer, pi) for layer in self.layers for pi in range(len(self.positions))]
        info: dict[str, Any] = {"score": None}
        curves: dict[str, list] = {}
        if len(pairs) == 1:
            layer, pi = pairs[0]
            c = Candidate(layer, self.positions[pi], float(norms[pi, layer]), kept=True, note="fixed")
            info.update(mode="fixed (one candidate: nothing to choose)")
            curves["direction_norm"] = norms[pi].tolist()
            return c, [c], info, curves
        sep, val_logits = self._validation_pass(diffs)
        nonzero = [(layer, pi) for layer, pi in pairs if norms[pi, layer] > 1e-9 * float(norms.max())]
        if len(pairs) <= d.candidates:
            chosen_pairs, mode = pairs, "exhaustive"
        else:
            layers_nz = sorted({layer for layer, _ in nonzero}) or self.layers
            k = min(d.candidates, len(layers_nz))
            grid = sorted({layers_nz[int(round(i))] for i in np.linspace(0, len(layers_nz) - 1, k)})
            chosen_pairs = [(layer, int(torch.argmax(sep[:, layer]))) for layer in grid]
            mode = f"grid: {len(grid)} of {len(self.layers)} layers, each at its best-separating position"
        val = self.ids["validation"]
        n_vp = len(val["positive"])
        base_neg_logits = val_logits[n_vp:]
        text = self.grader.needs_generation
        k_new = min(d.select_new_tokens, self.spec.behaviour.max_new_tokens)
        if text:
            base_pos = self._behave(val["positive"], (), k_new, "direction: validation base (positive)")
            base_neg = self._behave(val["negative"], (), k_new, "direction: validation base (negative)")
            base_bypass, base_induce = float(base_pos.flags.mean()), float(base_neg.flags.mean())
        else:
            base_bypass = float(self.grader.scores(val_logits[:n_vp]).mean())
            base_induce = float(self.grader.scores(base_neg_logits).mean())
        induce_floor = base_induce if text else 0.0
        cands = []
        for layer, pi in chosen_pairs:
            c = Candidate(layer, self.positions[pi], float(norms[pi, layer]), separation=float(sep[pi, layer]))
            if (layer, pi) not in nonzero:
                # A zero difference of means: ablating or adding it changes nothing.
                c.bypass, c.induce, c.kl, c.note = base_bypass, base_induce, 0.0, "zero direction"
            else:
                r = diffs[pi, layer].float()
                u = r / r.norm()
                if text:
                    c.bypass = float(self._behave(val["positive"], self._ablate(u), k_new,
                                                  f"direction: bypass L{layer} p{c.position}").flags.mean())
                    abl = self.subject.last_logits(val["negative"], self._ablate(u), self.spec.batch_size)
                    c.induce = float(self._behave(val["negative"], self._add(r, layer), k_new,
                                                  f"direction: induce L{layer} p{c.position}").flags.mean())
                else:  # one ablated run serves bypass (positives) and KL (negatives)
                    both = self.subject.last_logits(val["positive"] + val["negative"], self._ablate(u),
                                                    self.spec.batch_size)
                    c.bypass = float(self.grader.scores(both[:n_vp]).mean())
                    abl = both[n_vp:]
                    c.induce = float(self._behave(val["negative"], self._add(r, layer)).scores.mean())
                c.kl = float(_kl(base_neg_logits, abl).mean())
                reasons = []
                if not math.isfinite(c.bypass + c.induce + c.kl):
                    reasons.append("not finite")
                if c.kl > d.max_kl:
                    reasons.append(f"KL {c.kl:.3g} > {d.max_kl:g}")
                if not c.induce > induce_floor:
                    reasons.append("does not induce")
                c.kept = not reasons
                c.note = "; ".join(reasons)
            cands.append(c)

        def order(c: Candidate) -> tuple:
            return (c.bypass, -c.induce, c.kl, c.layer)

        kept = [c for c in cands if c.kept]
        pool = kept or [c for c in cands if c.note != "zero direction"] or cands
        best = min(pool, key=order)
        if not kept:
            info["note"] = ("no candidate passed the filters; chose the lowest bypass among all scored "
                            "candidates (the claims below judge it anyway)")
        if text:
            score = (f"behaviour rate on validation replies of {k_new} new tokens, graded by the probe's grader "
                     f"(bypass: positives with the direction ablated; induce: negatives with it added; a "
                     f"candidate must induce more than the base rate {base_induce:.3g})")
        else:
            score = ("mean log-odds of the grader's tokens at the last prompt position (Arditi et al.'s "
                     "refusal score; a candidate must reach induce > 0)")
        info.update(mode=mode, score=score, filters={
            "layer": f"< int({d.max_layer_fraction} * L) = {self.layers[-1] + 1}" if self.auto else "as given",
            "max_kl": d.max_kl, "induce": "> base" if text else "> 0"},
            base_bypass=base_bypass, base_induce=base_induce, n_scored=len(cands))
        bpi = self.positions.index(best.position)
        curves["direction_norm"] = norms[bpi].tolist()
        curves["separation"] = sep[bpi].tolist()
        at_pos = {c.layer: c for c in cands if c.position == best.position}
        if self.layers == list(range(len(self.layers))) and all(layer in at_pos for layer in self.layers):
            for key in ("bypass", "induce", "kl"):
                curves[key] = [float(getattr(at_pos[layer], key)) for layer in self.layers]
        return best, cands, info, curves

    # ---- step 4: claims on test -------------------------------------------------------------------
    def _random_directions(self, n: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(10_007 + self.spec.seed)
        v = torch.randn(n, self.subject.sitemap.d_model, generator=g, dtype=torch.float64)
        return (v / v.norm(dim=-1, keepdim=True)).float()

    def _controls(self, claim: DirectionClaim, r: torch.Tensor, layer: int, ids: list[list[int]]) -> np.ndarray:
        """[seeds, n] behaviour under the same intervention along random directions of the same norm."""
        seeds = self.spec.control_directions
        dirs = self._random_directions(seeds)
        n = len(ids)
        if claim.intervention == "weight_orthogonalize":  # one set of weights per forward: one seed at a time
            return np.stack([self._behave(ids, orthogonalizing_deltas(self.subject.sitemap, dirs[s]),
                                          desc=f"direction: control {s}").flags for s in range(seeds)])
        norm = float(r.norm())
        n_layers = self.subject.n_layers
        site = Site("resid_pre", layer)

        def per_batch(rows: list[int]) -> list[Intervention]:
            # Seeds ride in the batch dimension: row k is prompt k % n under random direction k // n.
            d = dirs[[row // n for row in rows]]
            if claim.intervention == "ablate":
                return [AblateDirection(Site(c, li), positions="all", direction=d)
                        for li in range(n_layers) for c in ABLATION_COMPONENTS]
            return [Add(site, positions="all", vector=d * norm, scale=claim.scale)]

        flags = self._behave([x for _ in range(seeds) for x in ids], per_batch, desc="direction: controls").flags
        return flags.reshape(seeds, n)

    def _base(self, which: str) -> Behaviour:
        key = ("base", which)
        if key not in self._memo:
            self._memo[key] = self._behave(self.ids["test"][which], (), desc=f"direction: base ({which})")
        return self._memo[key]

    def _collateral(self, interventions: list, label: str) -> dict[str, Any]:
        """KL(base ‖ intervened) of the next-token distribution at the last prompt position, test negatives."""
        ids = self.ids["test"]["negative"]
        key = ("base_logits",)
        if key not in self._memo:
            base = self._base("negative") if not self.grader.needs_generation else None
            self._memo[key] = base.logits if base is not None else self.subject.last_logits(
                ids, (), self.spec.batch_size)
        after = self.subject.last_logits(ids, interventions, self.spec.batch_size)
        kl = _kl(self._memo[key], after)
        est, lo, hi = bootstrap_ci(kl, seed=self.spec.seed)
        return {"mean": est, "ci": [lo, hi], "median": float(np.median(kl)), "max": float(kl.max()),
                "n": len(kl), "on": "negative (test)", "intervention": label}

    def _claim(self, name: str, claim: DirectionClaim, r: torch.Tensor, layer: int, position: int,
               collateral: dict[str, Any]) -> ClaimResult:
        spec = self.spec
        ids = self.ids["test"][claim.on]
        base = self._base(claim.on)
        key = ("after", claim.intervention, claim.on, claim.scale)
        if key not in self._memo:
            self._memo[key] = self._behave(ids, self._interventions(claim, r, layer),
                                           desc=f"direction: {claim.intervention} ({claim.on})")
        after: Behaviour = self._memo[key]
        b, a = base.flags.astype(float), after.flags.astype(float)
        n = len(ids)
        stat = claim.expect.statistic
        th = claim.expect.threshold
        min_rate = spec.behaviour.min_base_rate
        base_rate = float(b.mean())
        untestable = None
        if stat == "rate_drop" and base_rate < min_rate:
            untestable = (f"untestable: the base rate on the {claim.on} test prompts is {base_rate:.3g} "
                          f"({int(b.sum())}/{n}), below {min_rate:g}: there is nothing to suppress")
        if stat == "rate_rise" and base_rate > 1 - min_rate:
            untestable = (f"untestable: the base rate on the {claim.on} test prompts is {base_rate:.3g} "
                          f"({int(b.sum())}/{n}), above {1 - min_rate:g}: there is nothing to induce")

        def per_prompt(x: np.ndarray) -> np.ndarray:  # x: intervened flags (or their mean over seeds)
            return b - x if stat == "rate_drop" else x - b if stat == "rate_rise" else x

        if stat == "rate":
            effect, ci = float(a.mean()), wilson_interval(int(a.sum()), n)
        else:
            effect, lo, hi = paired_difference(b, a, seed=spec.seed) if stat == "rate_drop" else \
                paired_difference(a, b, seed=spec.seed)
            ci = (lo, hi)
        what = {"ablate": "the direction ablated at every layer and position",
                "add": f"{'' if claim.scale == 1 else f'{claim.scale:g} x '}the direction added at layer {layer}",
                "weight_orthogonalize": "the weights orthogonalised to the direction"}[claim.intervention]
        label = self.grader.name if self.grader.name != "custom" else "behaviour"
        metric = {"rate_drop": f"{label} rate drop (base - intervened) on {claim.on} test prompts with {what}",
                  "rate_rise": f"{label} rate rise (intervened - base) on {claim.on} test prompts with {what}",
                  "rate": f"{label} rate on {claim.on} test prompts with {what}"}[stat]
        details: dict[str, Any] = {
            "intervention": claim.intervention, "on": claim.on, "layer": layer, "position": position,
            "site": canonical_name("resid_pre", layer), "direction_norm": float(r.norm()),
            "base_rate": _rate(base.flags), "intervened_rate": _rate(after.flags),
            "collateral_kl": collateral, "grader": self.grader.name,
        }
        if claim.intervention == "add":
            details["scale"] = claim.scale
        if claim.intervention == "weight_orthogonalize" and orthogonalization_notes(self.subject.sitemap):
            details["notes"] = orthogonalization_notes(self.subject.sitemap)
        if base.texts is not None:
            details["examples"] = [{"prompt": self.prompts["test"][claim.on][i][:160], "base": base.texts[i][:160],
                                    "intervened": after.texts[i][:160]} for i in range(min(EXAMPLES, n))]
        else:
            details["mean_score"] = {"base": float(base.scores.mean()), "intervened": float(after.scores.mean())}
        control = beats = None
        if untestable:
            details["controls"] = "skipped: the claim cannot be tested on this model"
        else:
            c = self._controls(claim, r, layer, ids)  # [seeds, n]
            mine, theirs = per_prompt(a), per_prompt(c.mean(axis=0))
            alternative = "greater" if th.comparison == "at_least" else "less"
            p = paired_permutation_pvalue(mine, theirs, alternative=alternative, seed=spec.seed)
            beats = p < CONTROL_ALPHA
            seed_effects = [float(per_prompt(c[s]).mean()) for s in range(len(c))]
            control = ControlResult(
                name=f"random direction, same norm ({len(c)} seeds)", effect=float(theirs.mean()), p_value=p,
                detail={"rates": [float(x) for x in c.mean(axis=1)], "effects": seed_effects,
                        "test": f"paired permutation over prompts, one-sided ({alternative}), alpha {CONTROL_ALPHA}"})
            details["null_distribution"] = seed_effects
        return judge(name, claim.expect, effect, ci, n, metric, control=control, beats_control=beats,
                     details=details, tolerance=claim.tolerance, untestable=untestable)

    def measure(self) -> Outcome:
        spec, subject = self.spec, self.subject
        self._memo: dict[Any, Any] = {}
        diffs = self._means()
        best, cands, selection, curves = self._select(diffs)
        pi = self.positions.index(best.position)
        layer = best.layer
        r = diffs[pi, layer].float()
        if not float(r.norm()) > 0:
            raise self.probe.error(f"the difference of means at layer {layer}, position {best.position} is zero: "
                                   "the two prompt sets look identical there", ("direction",))
        u = r / r.norm()
        collateral = self._collateral(self._ablate(u), "ablate")
        claims = []
        for name, claim in spec.claims.items():
            extra = collateral
            if claim.intervention == "weight_orthogonalize":
                extra = {"ablate": collateral,
                         "weight_orthogonalize": self._collateral(self._interventions(claim, r, layer),
                                                                  "weight_orthogonalize")}
            result = self._claim(name, claim, r, layer, best.position, extra)
            result.curves = curves
            claims.append(result)
        example = self.ids["test"]["negative"][0]
        token = {p: self.subject.tokenizer.convert_ids_to_tokens([example[p]])[0] for p in self.positions}
        ps = spec.prompts
        settings = {
            "layer": layer, "position": best.position, "position_token": token[best.position],
            "site": canonical_name("resid_pre", layer), "direction_norm": float(r.norm()),
            "candidate_positions": {str(p): t for p, t in token.items()},
            "candidate_layers": "auto" if self.auto else self.layers,
            "selection": selection, "candidates": [c.row() for c in cands],
            "grader": self.grader.describe(), "max_new_tokens": spec.behaviour.max_new_tokens,
            "base_rates": {w: _rate(self._base(w).flags) for w in SETS if ("base", w) in self._memo},
            "collateral_kl": collateral,
            "prompts": {"positive": ps.positive, "negative": ps.negative, "chat_template": ps.chat_template,
                        "system": ps.system},
            "split": ps.split.model_dump(), "n_layers": subject.n_layers,
            "controls": f"{spec.control_directions} random directions of the same norm, test split, paired "
                        "permutation test over prompts",
            "ablation_sites": "resid_pre, attn_out, mlp_out of every layer; all positions incl. generated",
        }
        notes = orthogonalization_notes(subject.sitemap)
        if notes and any(c.intervention == "weight_orthogonalize" for c in spec.claims.values()):
            settings["orthogonalization_notes"] = notes
        return Outcome(settings, claims)


__all__ = ["Direction", "DirectionSpec", "ablation", "diff_in_means", "post_instruction_positions"]
