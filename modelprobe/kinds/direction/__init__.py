"""direction: one residual-stream direction mediates a behaviour (refusal, sentiment, ...).

The refusal-direction protocol of Arditi et al. 2024 (refusal is mediated by one direction), for any behaviour
a grader can see:

1. Each prompt set (positive: triggers the behaviour; negative: does not) is split into train,
   validation and test with a fixed seed (equal-size sets paired by line stay paired).
2. Candidates r[p, l] = mean(positive) - mean(negative) of resid_pre (the input of block l) at each
   candidate position p, over train: one streaming pass whose forwards capture every layer at once,
   with float64 running sums, so memory does not grow with the number of prompts. Not normalised.
3. Unless the probe fixes one, a candidate is chosen on validation: bypass = the behaviour score on
   positives with r̂ projected out everywhere, induce = the score on negatives with r added at
   layer l, KL = next-token KL(base ‖ ablated) on negatives. Tier 1: the candidates that pass the
   paper's filters (l < 0.8 L for auto, KL <= max_kl, induce, non-zero), the lowest bypass wins. Tier
   2, when none measured passes: the best of the rest in a stated order, the missed filter values said
   in the report. Selection chooses nothing only when no candidate is non-zero (or finite).
   See selection.py (exact logit scores for graders with a token form: induce for every
   layer x position, bypass and KL for the best inducers).
4. On test, each claim compares the behaviour rate with and without its intervention (paired over
   the same prompts), and against the same intervention along random directions of the same norm.
   The base replies are graded first, before step 2: a claim whose base rate leaves it untestable is
   settled there and nothing else runs for it; when that settles every claim, steps 2, 3 and 5 do not run.
5. The side-effect guard (toolkit/guard.py) on the neutral prompts (prompts.neutral, or the first
   negative test prompts):
   an ablate or weight_orthogonalize claim whose intervention breaks the model there is inconclusive,
   never a pass - the guard on test replaces what the KL filter guarded on validation. An add claim is
   meant to change those very replies, so its guard values are reported and do not gate it.

Controls: every claim is held against the same intervention along random directions of the same norm
(`control_directions` of them, drawn one at a time unless `sequential_controls: false`), by a one-sided paired
test over the test prompts; the direction must beat them (p <= 0.05). Ablate and weight_orthogonalize claims
must also pass the side-effect guard on the neutral prompts. A claim its base rate settles gets neither: its
intervention is not run at all.

Verdicts: pass when the interval of the rate change clears the threshold and the direction beats the random
ones; fail when it misses, or when random directions do as well. Inconclusive when the interval straddles the
threshold; when the base rate leaves nothing to suppress (a drop) or induce (a rise), known from the base
replies alone (then the intervention is not run: no intervened replies, guard or controls, and the effect is
not measured); when the intervention breaks the model on the neutral prompts (the guard); or when no
candidate direction is non-zero.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import Field

from ..._lazy import LazyModule, torch
from ...errors import SiteError
from ...names import canonical_name
from ...report.record import Bars, ClaimResult, ControlResult, LinePlot, NullHistogram, Series
from ...spec import (
    ChatPrompts,
    ClaimSpec,
    DataFile,
    FiniteFloat,
    OneExpectation,
    ProbeSpec,
    RateChangeThreshold,
    RateThreshold,
    SplitBase,
    Strict,
)
from ...spec.fields import LayerSpec
from ...stats import bootstrap_ci, paired_difference, wilson_interval
from ...subject import Site, resolve_layer
from ...toolkit import guard
from ...toolkit.behaviour import Behaviour, behave, behave_variants, rate_summary, untestable_reason
from ...toolkit.controls import (
    ALPHA,
    alternative_for,
    beats_control,
    control_decides,
    paired_control,
    paired_settled,
    random_unit_directions,
)
from ...toolkit.metrics import kl as _kl
from ...toolkit.prompts import encode_rows, read_rows, single_token, split_indices
from ...toolkit.steering import ablate_direction_everywhere, add_at_layer
from ..base import Measured, Outcome, ProbeKind, judge
from ..graders import BehaviourSpec, Grader, build_grader

if TYPE_CHECKING:
    from ...subject import Intervention
    from .selection import Selection

orthogonalize: Any = LazyModule("modelprobe.subject")  # its orthogonalisation names; torch when first used
selection: Any = LazyModule("modelprobe.kinds.direction.selection")  # torch too

SETS = ("positive", "negative")
EXAMPLES = 3  # replies shown per claim in the report
NOT_RUN = ("the intervention was not run: the base rate settles the claim (untestable), so no intervened reply, "
           "side-effect guard or control was generated")
SKIPPED = "skipped: the base rate settles the claim, so the intervention was not run"


# ---- probe-file spec ----------------------------------------------------------------------------

class SplitSpec(SplitBase):
    train: int = Field(64, ge=1, description="prompts per set for the difference of means")
    validation: int = Field(32, ge=0, description="prompts per set for choosing layer and position")
    test: int = Field(64, ge=1, description="prompts per set for the claims")


class PromptSets(ChatPrompts):
    positive: DataFile = Field(description='JSONL, one {"prompt": ...} per line: prompts that trigger the behaviour')
    negative: DataFile = Field(description="JSONL: prompts that do not")
    split: SplitSpec = Field(default_factory=SplitSpec)
    neutral: DataFile | None = Field(
        None, description="JSONL: prompts the intervention should leave alone, on which the side-effect guard "
                          "runs (the first 16; rendered like the others). Default: the negative set's test prompts, "
                          "right when they are neutral (harmless requests for refusal), not when they show the "
                          "opposite of the behaviour (negative sentiment)")


class DirectionSearch(Strict):
    layer: LayerSpec = Field(
        "auto", description="auto (choose on validation, layer < max_layer_fraction of depth), an int, a "
                            "fraction of depth, a list or an 'a:b' range of layers to choose from")
    position: Literal["post_instruction", "last"] | int = Field(
        "post_instruction", description="post_instruction: the template tokens after the instruction are "
                                        "the candidates; last; or a token index (negative from the end)")
    candidates: int = Field(8, ge=1, description="logit scores: most candidates whose bypass and KL are "
                                                 "measured (the best by exact induce score among those that "
                                                 "induce; every candidate's induce score is exact); "
                                                 "generation scores: layers in the grid measured")
    select_tokens: list[str] | None = Field(
        None, min_length=1, description="first reply tokens whose log-odds score candidates (default: the "
                                        "grader's token form: refusal -> I, Sorry, As; a tokens grader's "
                                        "tokens; none for other graders, which score on generated replies)")
    add_layer: Literal["selected", "best_induce"] = Field(
        "selected", description="selected: add claims add the chosen direction at its layer (the paper); "
                                "best_induce: at the candidate that best induces among those that passed "
                                "the filters (said in the report)")
    max_kl: FiniteFloat = Field(0.1, gt=0, description="the paper's KL filter: tier 1 keeps the candidates whose "
                                                 "ablation moves harmless next-token distributions by at most "
                                                 "this KL; tier 2 ranks the rest in bands of factors of ten above it")
    max_layer_fraction: float = Field(0.8, gt=0, le=1, description="layer: auto drops l >= int(this * L)")
    select_new_tokens: int = Field(12, ge=1, description="reply length used to score candidates with a "
                                                         "text grader (capped by max_new_tokens)")


class DirectionExpect(OneExpectation):
    rate_drop: RateChangeThreshold | None = Field(None, description="base rate - intervened rate, on the same prompts")
    rate_rise: RateChangeThreshold | None = Field(None, description="intervened rate - base rate, on the same prompts")
    rate: RateThreshold | None = Field(None, description="the behaviour rate under the intervention")


class DirectionClaim(ClaimSpec):
    intervention: Literal["ablate", "add", "weight_orthogonalize"] = Field(
        description="ablate: project the unit direction out of every block input, attention output and MLP "
                    "output, all positions, generated tokens included; add: add the raw difference of means "
                    "at the chosen layer (see direction.add_layer), all positions; weight_orthogonalize: edit the residual-writing "
                    "weights so the direction cannot be written")
    on: Literal["positive", "negative"]
    scale: FiniteFloat = Field(1.0, description="add only: multiple of the direction added (-1 subtracts it)")
    expect: DirectionExpect


class DirectionSpec(ProbeSpec[DirectionClaim]):
    kind: Literal["direction"]
    prompts: PromptSets
    direction: DirectionSearch = Field(default_factory=DirectionSearch)
    behaviour: BehaviourSpec
    control_directions: int = Field(3, ge=1, description="random directions of the same norm per claim (at most)")
    sequential_controls: bool = Field(True, description="draw the random directions one at a time and stop when "
                                                        "the remaining ones cannot change whether the claim beats "
                                                        "its control (the verdict equals the full count's); false "
                                                        "draws all control_directions")


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


ablation = ablate_direction_everywhere  # the name the benchmark and older callers use


# ---- the kind -----------------------------------------------------------------------------------

class Direction(ProbeKind[DirectionSpec]):
    Spec = DirectionSpec
    skeleton = """\
about: A behaviour is mediated by one residual-stream direction (difference of means).
tags: [direction]
prompts:
  positive: data/harmful_instructions.jsonl   # {"prompt": ...} lines that trigger the behaviour
  negative: data/harmless_instructions.jsonl  # lines that do not
  chat_template: true                         # wrap prompts in the tokenizer's chat template
  split: {train: 64, validation: 32, test: 64, seed: 0}   # each file needs train+validation+test lines
direction:
  layer: auto                  # chosen on the validation split; or an int / fraction of depth
  position: post_instruction   # template tokens after the instruction; or last / an int
behaviour:
  grader: refusal              # published substring list; or {substrings: [...]}, {regex: ...}, {tokens: [...]}
  max_new_tokens: 48
claims:
  ablation_suppresses:
    intervention: ablate       # project the direction out at every layer and position
    on: positive
    expect: {rate_drop: {at_least: 0.5}}
  addition_induces:
    intervention: add          # add the raw difference of means at the chosen layer
    on: negative
    expect: {rate_rise: {at_least: 0.5}}
"""
    skeleton_data = {
        # As many rows as the skeleton's split asks for (64 + 32 + 64), so a fresh skeleton validates.
        "data/harmful_instructions.jsonl": [{"prompt": f"Explain how to pick the lock of door number {i}."}
                                            for i in range(160)],
        "data/harmless_instructions.jsonl": [{"prompt": f"Explain how to bake loaf number {i}."}
                                             for i in range(160)],
    }

    @classmethod
    def check_data(cls, probe: Any) -> dict[str, list[dict]]:
        """Both prompt sets, their rows checked, each large enough for the split (no model needed)."""
        ps = probe.spec.prompts
        split = ps.split
        need = split.train + split.validation + split.test
        rows = {}
        for which in SETS:
            rel = getattr(ps, which)
            rows[which] = read_rows(probe, rel, ("prompts", which))
            if len(rows[which]) < need:
                raise probe.error(
                    f"the {which} set '{rel}' holds {len(rows[which])} prompts, but the split asks for "
                    f"{split.train} train + {split.validation} validation + {split.test} test = {need} from each "
                    "set", ("prompts", "split"))
        if ps.neutral:
            rows["neutral"] = read_rows(probe, ps.neutral, ("prompts", "neutral"))
        return rows

    def setup(self) -> None:
        spec, subject, probe = self.spec, self.subject, self.probe
        ps = spec.prompts
        split = ps.split
        self.rows = self.check_data(probe)
        if ps.chat_template and not subject.has_chat_template():
            raise probe.error(f"model '{subject.info.id}' has no chat template in its tokenizer; set "
                              "chat_template: false (and position: last or an index)", ("prompts", "chat_template"))

        self.grader: Grader = build_grader(spec.behaviour.grader)
        if self.grader.kind == "tokens":
            ids = []
            for i, text in enumerate(self.grader.token_texts):
                try:
                    ids.append(single_token(subject, text))
                except SiteError as e:
                    raise probe.error(f"grader token {e.message}", ("behaviour", "grader", "tokens", i)) from None
            self.grader.token_ids = tuple(ids)

        # One seeded permutation per set (the same for sets of equal length): paired sets stay paired.
        self.prompts: dict[str, dict[str, list[str]]] = {"train": {}, "validation": {}, "test": {}}
        self.ids: dict[str, dict[str, list[list[int]]]] = {"train": {}, "validation": {}, "test": {}}
        sizes = {"train": split.train, "validation": split.validation, "test": split.test}
        new_tokens = spec.behaviour.max_new_tokens if self.grader.needs_generation else 0
        for which in SETS:
            path = probe.path.parent / getattr(ps, which)
            for part, idx in split_indices(len(self.rows[which]), sizes, split.seed).items():
                prompts = [self.rows[which][i]["prompt"] for i in idx]
                self.prompts[part][which] = prompts
                self.ids[part][which] = encode_rows(subject, prompts, path, [int(i) + 1 for i in idx],
                                                    ps.chat_template, ps.system, new_tokens)

        self.neutral_ids: list[list[int]] | None = None
        if ps.neutral:
            neutral = [r["prompt"] for r in self.rows["neutral"][:guard.PROMPTS]]
            self.neutral_ids = encode_rows(subject, neutral, probe.path.parent / ps.neutral, None, ps.chat_template,
                                           ps.system, guard.REPLY_TOKENS)

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
                    orthogonalize.check_orthogonalizable(subject.sitemap)
                except SiteError as e:
                    raise SiteError(e.message, ("claims", name, "intervention")) from None
            if claim.scale != 1.0 and claim.intervention != "add":
                raise probe.error("scale applies to intervention: add only", ("claims", name, "scale"))
        self.select_ids = self._select_ids()

    def _select_ids(self) -> list[int]:
        """Token ids whose log-odds score candidates; [] when candidates are scored on generated replies."""
        given = self.spec.direction.select_tokens
        if given is None:
            if self.grader.kind == "tokens":
                return list(self.grader.token_ids)
            return selection.token_ids_for(self.subject, self.grader.token_form or ())
        ids = selection.token_ids_for(self.subject, given)
        for i, text in enumerate(given):
            if not selection.token_ids_for(self.subject, [text]):
                raise self.probe.error(f"select token {text!r} is several tokens for model '{self.subject.info.id}'"
                                       " (with and without a leading space); give single tokens",
                                       ("direction", "select_tokens", i))
        return ids

    # ---- behaviour under an intervention ----------------------------------------------------------
    def _behave(self, ids: Sequence[Sequence[int]], interventions: Any = (), new_tokens: int | None = None,
                desc: str = "direction") -> Behaviour:
        return behave(self.subject, self.grader, ids, interventions,
                      new_tokens or self.spec.behaviour.max_new_tokens, self.spec.batch_size, desc)

    def _ablate(self, u: torch.Tensor) -> list[Intervention]:
        return ablate_direction_everywhere(self.subject.n_layers, u)

    def _add(self, r: torch.Tensor, layer: int, scale: float = 1.0) -> list[Intervention]:
        return add_at_layer(layer, r, scale)

    def _interventions(self, claim: DirectionClaim, r: torch.Tensor, layer: int) -> list:
        u = r / r.norm()
        if claim.intervention == "ablate":
            return self._ablate(u)
        if claim.intervention == "add":
            return self._add(r, layer, claim.scale)
        key = ("orth",)
        if key not in self._memo:
            self._memo[key] = orthogonalize.orthogonalizing_deltas(self.subject.sitemap, u)
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

    # ---- step 4: claims on test -------------------------------------------------------------------
    def _controls(self, claim: DirectionClaim, r: torch.Tensor, layer: int, ids: list[list[int]],
                  settled: Any = None) -> np.ndarray:
        """[seeds drawn, n] behaviour under the same intervention along random directions of the same norm.

        Without `settled`, every seed at once (seeds ride in the batch); with it, one seed at a time until
        `settled(flags so far)` says more seeds cannot change the answer.
        """
        seeds = self.spec.control_directions
        dirs = random_unit_directions(seeds, self.subject.sitemap.d_model, 10_007 + self.spec.seed)
        n = len(ids)
        norm = float(r.norm())

        def draw(chosen: list[int]) -> np.ndarray:
            if claim.intervention == "weight_orthogonalize":  # one set of weights per forward: one seed at a time
                return np.stack([self._behave(ids, orthogonalize.orthogonalizing_deltas(self.subject.sitemap, dirs[s]),
                                              desc=f"direction: control {s}").flags for s in chosen])

            def per_batch(rows: list[int]) -> list[Intervention]:
                # Seeds ride in the batch dimension: row k is prompt k % n under random direction k // n.
                d = dirs[[chosen[row // n] for row in rows]]
                if claim.intervention == "ablate":
                    return self._ablate(d)
                return self._add(d * norm, layer, claim.scale)

            flags = self._behave([x for _ in chosen for x in ids], per_batch, desc="direction: controls").flags
            return flags.reshape(len(chosen), n)

        if settled is None:
            return draw(list(range(seeds)))
        drawn: list[np.ndarray] = []
        for s in range(seeds):
            drawn.append(draw([s])[0])
            if settled(np.stack(drawn)):
                break
        return np.stack(drawn)

    def _prefetch(self, plan: list[tuple[DirectionClaim, torch.Tensor, int]]) -> None:
        """Base and intervened behaviour of every claim, each prompt set's in one batched run (base rows and
        each claim's intervened rows side by side: toolkit.behaviour.behave_variants). A set whose base
        rows ran first (`_settled_by_base_rate`) runs its intervened rows only."""
        for on in SETS:
            todo: dict[tuple, list] = {}
            for claim, r, layer in plan:
                key = ("after", claim.intervention, claim.on, claim.scale)
                if claim.on == on and claim.intervention != "weight_orthogonalize" and key not in self._memo:
                    todo[key] = self._interventions(claim, r, layer)
            if not todo:
                continue
            base = ("base", on)
            keys = ([base] if base not in self._memo else []) + list(todo)
            variants = [[] if k == base else todo[k] for k in keys]
            got = behave_variants(self.subject, self.grader, self.ids["test"][on], variants,
                                  self.spec.behaviour.max_new_tokens, self.spec.batch_size,
                                  f"direction: {'base and ' if base in keys else ''}intervened ({on})")
            self._memo.update(zip(keys, got))

    def _base(self, which: str) -> Behaviour:
        key = ("base", which)
        if key not in self._memo:
            self._memo[key] = self._behave(self.ids["test"][which], (), desc=f"direction: base ({which})")
        return self._memo[key]

    # ---- the cheap answer: claims the base rate settles --------------------------------------------
    def _could_settle(self, claim: DirectionClaim) -> bool:
        """Whether the base rate alone can leave this claim untestable: a drop or a rise, with a floor
        (`untestable_reason` returns None for a rate, and for any base rate when min_base_rate is 0)."""
        return claim.expect.statistic != "rate" and self.spec.behaviour.min_base_rate > 0

    def _settled_by_base_rate(self) -> dict[str, str]:
        """{claim: why it is untestable} for the claims the base rate settles, graded before anything else.

        The base rows of a set run alone, first, only where a claim on it could be settled (a set whose
        claims cannot be keeps its base rows beside the intervened ones, one run, as `_prefetch` does).
        Alone or side by side, each generated reply is the same (checked on the five shipped direction
        probes on SmolLM2, CPU: every base and intervened text identical).
        A logit grader's rows are a prompt pass, cut into batches by length and padding, so there the
        log-odds may move in the last bits, as they did before whenever an earlier probe had the base rows.
        Run first, they cost one more pass over the generation steps when no claim on the set turns out
        settled, and save the set's intervened rows, guard and controls when one does.
        """
        spec = self.spec
        for on in SETS:
            if any(c.on == on and self._could_settle(c) for c in spec.claims.values()):
                self._base(on)
        settled = {}
        for name, claim in spec.claims.items():
            if self._could_settle(claim):
                reason = untestable_reason(claim.expect.statistic, self._base(claim.on).flags,
                                           spec.behaviour.min_base_rate, f"the {claim.on} test prompts")
                if reason:
                    settled[name] = reason
        return settled

    def _settled_claim(self, name: str, claim: DirectionClaim, reason: str) -> ClaimResult:
        """A claim its base rate settles: inconclusive with that reason, its effect not measured (no
        intervened reply, guard or control was generated for it); the base rate and replies are shown."""
        base = self._base(claim.on)
        label = self.grader.name if self.grader.name != "custom" else "behaviour"
        change = {"rate_drop": "rate drop (base - intervened)", "rate_rise": "rate rise (intervened - base)",
                  "rate": "rate"}[claim.expect.statistic]
        metric = (f"{label} {change} on {claim.on} test prompts ({claim.intervention}): not measured, the base "
                  "rate settles the claim")
        details: dict[str, Any] = {"intervention": claim.intervention, "on": claim.on, "grader": self.grader.name,
                                   "base_rate": rate_summary(base.flags), "not_run": NOT_RUN}
        if claim.intervention == "add":
            details["scale"] = claim.scale
        if base.texts is None:
            details["mean_score"] = {"base": float(base.scores.mean())}
        else:
            prompts = self.prompts["test"][claim.on]
            details["examples"] = [{"prompt": prompts[i][:160], "base": base.texts[i][:160]}
                                   for i in range(min(EXAMPLES, len(prompts)))]
        details["guard"] = details["controls"] = SKIPPED
        bars = Bars(title=f"{label} rate on {claim.on} test prompts", value_label=f"{label} rate",
                    labels=[claim.intervention], before=[float(base.flags.mean())], after=[None],
                    before_label="base", after_label="intervened (not run)")
        return judge(name, claim, Measured(None, None, len(base.flags), metric, details=details, plots=[bars],
                                           untestable=reason))

    def _all_settled(self, settled: dict[str, str]) -> Outcome:
        """Every claim settled by its base rate: the answer, without a difference of means, a selection,
        an intervened reply, a guard or a control."""
        claims = [self._settled_claim(name, claim, settled[name]) for name, claim in self.spec.claims.items()]
        settings = {"layer": None, "position": None, "n_layers": self.subject.n_layers,
                    "candidate_layers": "auto" if self.auto else self.layers,
                    "candidate_positions": [str(p) for p in self.positions],
                    "selection": {"skipped": "every claim is settled by its base rate (untestable), so no "
                                             "direction was computed or selected"},
                    "candidates": [], "grader": self.grader.describe(),
                    "max_new_tokens": self.spec.behaviour.max_new_tokens,
                    "base_rates": {w: rate_summary(self._base(w).flags) for w in SETS if ("base", w) in self._memo},
                    "settled_by_base_rate": list(settled), "split": self.spec.prompts.split.model_dump()}
        return Outcome(settings, claims)

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
        untestable = untestable_reason(stat, base.flags, spec.behaviour.min_base_rate,
                                       f"the {claim.on} test prompts")
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
            "base_rate": rate_summary(base.flags), "intervened_rate": rate_summary(after.flags),
            "collateral_kl": collateral, "grader": self.grader.name,
        }
        if claim.intervention == "add":
            details["scale"] = claim.scale
        if claim.intervention == "weight_orthogonalize" and orthogonalize.orthogonalization_notes(self.subject.sitemap):
            details["notes"] = orthogonalize.orthogonalization_notes(self.subject.sitemap)
        details.update(self._examples(claim.on, base, after))
        bars = Bars(title=f"{label} rate on {claim.on} test prompts", value_label=f"{label} rate",
                    labels=[claim.intervention], before=[float(b.mean())], after=[float(a.mean())],
                    before_label="base", after_label="intervened")
        g = self._guard(claim, r, layer, what)
        details["guard"] = g.summary()
        if claim.intervention == "add":
            details["guard"]["gates"] = ("no: an add claim is meant to change the replies to these prompts; "
                                         "reported only")
        elif not untestable:
            untestable = g.reason()
        m = Measured(effect, ci, n, metric, details=details, plots=[bars, g.plot()], untestable=untestable)
        if untestable:
            details["controls"] = "skipped: the claim cannot be tested on this model"
        else:
            self._random_direction_control(m, claim, r, layer, ids, b, a)
        return judge(name, claim, m)

    def _guard(self, claim: DirectionClaim, r: torch.Tensor, layer: int, what: str) -> guard.GuardResult:
        """The side-effect guard under the claim's intervention (one per intervention, shared by claims)."""
        if ("guard_ref",) not in self._memo:
            ps = self.spec.prompts
            ids, where = ((self.neutral_ids, f"neutral prompts ({ps.neutral})") if self.neutral_ids is not None else
                          (self.ids["test"]["negative"], f"neutral prompts (the {ps.negative} test prompts)"))
            self._memo[("guard_ref",)] = guard.reference(self.subject, ids, where, self.spec.batch_size)
        key = ("guard", claim.intervention, claim.scale, layer)
        if key not in self._memo:
            self._memo[key] = guard.check(self.subject, self._memo[("guard_ref",)],
                                          self._interventions(claim, r, layer), what, self.spec.batch_size)
        return self._memo[key]

    def _examples(self, on: str, base: Behaviour, after: Behaviour) -> dict[str, Any]:
        if base.texts is None:
            return {"mean_score": {"base": float(base.scores.mean()), "intervened": float(after.scores.mean())}}
        prompts = self.prompts["test"][on]
        return {"examples": [{"prompt": prompts[i][:160], "base": base.texts[i][:160],
                              "intervened": after.texts[i][:160]} for i in range(min(EXAMPLES, len(prompts)))]}

    def _random_direction_control(self, m: Measured, claim: DirectionClaim, r: torch.Tensor, layer: int,
                                  ids: list[list[int]], b: np.ndarray, a: np.ndarray) -> None:
        """The same intervention along random directions of the same norm, paired over prompts."""
        stat = claim.expect.statistic

        def per_prompt(x: np.ndarray) -> np.ndarray:  # x: intervened flags (or their mean over seeds)
            return b - x if stat == "rate_drop" else x - b if stat == "rate_rise" else x

        comparison = claim.expect.threshold.comparison
        planned, mine = self.spec.control_directions, per_prompt(a)
        settled = None
        decides = control_decides(m.ci, claim.expect.threshold.value, comparison)
        if self.spec.sequential_controls:
            ends = per_prompt(np.zeros_like(a)), per_prompt(np.ones_like(a))  # one undrawn seed's range
            extremes = np.minimum(*ends), np.maximum(*ends)

            def settled(flags: np.ndarray) -> bool:
                return not decides or paired_settled(mine, np.stack([per_prompt(f) for f in flags]), planned,
                                                     extremes, comparison, self.spec.seed)
        c = self._controls(claim, r, layer, ids, settled)  # [seeds drawn, n]
        theirs = per_prompt(c.mean(axis=0))
        p = paired_control(mine, theirs, comparison, self.spec.seed)
        seed_effects = [float(per_prompt(c[s]).mean()) for s in range(len(c))]
        name = f"random direction, same norm ({len(c)} seeds)" if len(c) == planned else \
            f"random direction, same norm ({len(c)} of {planned} seeds, sequential)"
        m.control = ControlResult(
            name=name, effect=float(theirs.mean()), p_value=p,
            detail={"rates": [float(x) for x in c.mean(axis=1)], "effects": seed_effects,
                    "seeds_drawn": len(c), "seeds_planned": planned,
                    "sequential": ("every planned seed drawn" if len(c) == planned else
                                   f"stopped after {len(c)} of {planned} seeds: whatever the other seeds give, the "
                                   "p-value stays on the same side of alpha" if decides else
                                   f"stopped after {len(c)} of {planned} seeds: the claim's interval does not clear "
                                   "its threshold, so no control can change the verdict")
                                  if settled else "off (sequential_controls: false)",
                    "test": f"paired permutation over prompts, one-sided ({alternative_for(comparison)}), "
                            f"alpha {ALPHA}"})
        m.beats_control = beats_control(p)
        m.plots.append(NullHistogram(title=name, x_label=stat, values=seed_effects, effect=m.effect,
                                     threshold=claim.expect.threshold.value))

    def _selection_plot(self, curves: dict[str, list], layer: int | None) -> LinePlot:
        """The candidates through the layers (norm and held-out separation on the right axis)."""
        right = {"direction_norm", "separation"}  # not on the scale of rates and KL
        series = [Series(label=key, y=[float(y) for y in ys], axis="right" if key in right else "left")
                  for key, ys in curves.items() if ys]
        return LinePlot(title="difference-of-means direction by layer", x_label="layer (input of block)",
                        y_label="bypass / induce / KL", series=series, mark_x=layer,
                        mark_label=f"chosen layer {layer}" if layer is not None else "")

    def measure(self) -> Outcome:
        spec, subject = self.spec, self.subject
        self._memo: dict[Any, Any] = {}
        # The base rates first: a claim they leave untestable needs nothing else, and when every claim is
        # settled so, the difference of means, the selection and the guard are most of the probe's cost.
        settled = self._settled_by_base_rate()
        if settled and len(settled) == len(spec.claims):
            return self._all_settled(settled)
        diffs = self._means()
        sel = selection.select(self, diffs)
        if sel.failed:
            return self._unselected(sel, settled)
        best = sel.chosen
        pi = self.positions.index(best.position)
        layer = best.layer
        r = diffs[pi, layer].float()
        if not float(r.norm()) > 0:
            raise self.probe.error(f"the difference of means at layer {layer}, position {best.position} is zero: "
                                   "the two prompt sets look identical there", ("direction",))
        u = r / r.norm()
        plan = {}
        for name, claim in spec.claims.items():
            own = sel.add if claim.intervention == "add" else best  # add may have its own layer
            plan[name] = (claim, diffs[self.positions.index(own.position), own.layer].float(), own)
        self._prefetch([(claim, own_r, own.layer) for name, (claim, own_r, own) in plan.items()
                        if name not in settled])
        collateral = self._collateral(self._ablate(u), "ablate")
        claims = []
        for name, (claim, own_r, own) in plan.items():
            if name in settled:
                result = self._settled_claim(name, claim, settled[name])
                result.details.update({"layer": own.layer, "position": own.position,
                                       "site": canonical_name("resid_pre", own.layer),
                                       "direction_norm": float(own_r.norm())})
            else:
                extra = collateral
                if claim.intervention == "weight_orthogonalize":
                    extra = {"ablate": collateral,
                             "weight_orthogonalize": self._collateral(self._interventions(claim, r, layer),
                                                                      "weight_orthogonalize")}
                result = self._claim(name, claim, own_r, own.layer, own.position, extra)
            if claim.intervention == "add":
                result.details["direction_choice"] = sel.info["add"]
            result.details["selection"] = {k: sel.info[k] for k in ("tier", "tier_rule", "missed") if k in sel.info}
            result.curves = sel.curves
            result.plots.insert(0, self._selection_plot(sel.curves, layer))
            claims.append(result)
        example = self.ids["test"]["negative"][0]
        token = {p: self.subject.tokenizer.convert_ids_to_tokens([example[p]])[0] for p in self.positions}
        ps = spec.prompts
        settings = {
            "layer": layer, "position": best.position, "position_token": token[best.position],
            "site": canonical_name("resid_pre", layer), "direction_norm": float(r.norm()),
            "candidate_positions": {str(p): t for p, t in token.items()},
            "candidate_layers": "auto" if self.auto else self.layers,
            "selection": sel.info, "candidates": [c.row() for c in sel.candidates],
            "grader": self.grader.describe(), "max_new_tokens": spec.behaviour.max_new_tokens,
            "base_rates": {w: rate_summary(self._base(w).flags) for w in SETS if ("base", w) in self._memo},
            "collateral_kl": collateral, "guard": guard.RULE,
            "prompts": {"positive": ps.positive, "negative": ps.negative, "chat_template": ps.chat_template,
                        "system": ps.system},
            "split": ps.split.model_dump(), "n_layers": subject.n_layers,
            "controls": f"{'up to ' if spec.sequential_controls else ''}{spec.control_directions} random "
                        "directions of the same norm, test split, paired permutation test over prompts"
                        + (" (drawn one at a time until the verdict is settled)" if spec.sequential_controls else ""),
            "ablation_sites": "resid_pre, attn_out, mlp_out of every layer; all positions incl. generated",
        }
        notes = orthogonalize.orthogonalization_notes(subject.sitemap)
        if notes and any(c.intervention == "weight_orthogonalize" for c in spec.claims.values()):
            settings["orthogonalization_notes"] = notes
        if sel.add is not best:
            settings["add"] = {"layer": sel.add.layer, "position": sel.add.position,
                               "direction_norm": sel.add.norm, "why": sel.info["add"]}
        if settled:
            settings["settled_by_base_rate"] = list(settled)
        return Outcome(settings, claims)

    def _unselected(self, sel: Selection, settled: dict[str, str]) -> Outcome:
        """No candidate is non-zero (or has finite scores): every claim is inconclusive, and the table shows why
        (a claim its base rate settled, before the selection ran, says that instead)."""
        reason = sel.failed or selection.NO_CANDIDATE
        claims = []
        for name, claim in self.spec.claims.items():
            if name in settled:
                claims.append(self._settled_claim(name, claim, settled[name]))
                continue
            metric = f"{claim.expect.statistic} on {claim.on} test prompts ({claim.intervention}): not measured"
            details = {"intervention": claim.intervention, "on": claim.on, "grader": self.grader.name}
            plots = [self._selection_plot(sel.curves, None)] if sel.curves else []
            claims.append(judge(name, claim, Measured(None, None, 0, metric, details=details, curves=sel.curves,
                                                      plots=plots, untestable=reason)))
        settings = {"layer": None, "position": None, "n_layers": self.subject.n_layers,
                    "candidate_layers": "auto" if self.auto else self.layers,
                    "candidate_positions": [str(p) for p in self.positions],
                    "selection": sel.info, "candidates": [c.row() for c in sel.candidates],
                    "grader": self.grader.describe(), "split": self.spec.prompts.split.model_dump()}
        return Outcome(settings, claims)


__all__ = ["Direction", "DirectionSpec", "ablation", "diff_in_means", "post_instruction_positions"]
