"""icv: an in-context vector, read from demonstration pairs, restyles zero-shot replies.

Liu et al. 2023 ("In-context Vectors"). For each demo pair (source x, target y), H is the
last-token residual stream after every layer (resid_post), concatenated over layers; dH = H(y) - H(x).
The vector is the mean of {dH} plus their first principal component (centered; its sign turned toward
the mean), as in the authors' repository (shengliu66/ICV). At inference, with no demos in the prompt,
each layer's MLP output at every token (prompt and generated) is turned toward that layer's slice v:
x <- |x| normalize(x/|x| + strength (1 + max(0, cos(x, -v))) v/|v|), which keeps its norm.

Claim `rate_rise`: the share of replies the grader counts (e.g. positive sentiment) rises from the
unshifted replies to the shifted ones, paired over prompts, and beats the same shift along a random
vector of the same norm (paired permutation). A base rate with no room to rise is untestable.

A reply counts only when it is graded AND coherent (toolkit.behaviour.coherent: no word n-gram repeated
4 times in a row, >= 30% distinct words): a shift strong enough to break the model yields degenerate
text ("smelam.smelam", emoji runs) that a lexicon can still count, and that must not pass. The guard is
on the graded replies themselves rather than a KL on unrelated prompts, because an in-context vector is
meant to change every reply (it acts at every token of every prompt): a large KL is its intended
effect, not a sign of damage, while degenerate replies are exactly the false positive. With a logit
grader, replies are generated anyway for the coherence check.

Controls: the same norm-preserving shift along a random vector of the same norm, paired over the queries
(paired permutation).

Verdicts: pass when the interval of the rise in graded-and-coherent replies clears the threshold and the
random vector is beaten. Inconclusive when the interval straddles the threshold, or when the unshifted base
rate leaves no room to rise.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from pydantic import Field

from ..errors import DataError, SiteError
from ..report.record import Bars, ControlResult, Table
from ..spec import ClaimSpec, DataFile, OneExpectation, ProbeSpec, RateChangeThreshold
from ..spec.fields import Count, NewTokens, Strict
from ..stats import bootstrap_ci
from ..toolkit.behaviour import (
    COHERENT_RULE,
    Behaviour,
    behave,
    coherent_flags,
    rate_summary,
    untestable_reason,
)
from ..toolkit.controls import beats_control, paired_control, same_norm_vectors
from ..toolkit.prompts import encode_rows, read_rows, single_token
from .base import Measured, Outcome, ProbeKind, judge
from .graders import BehaviourSpec, Grader, build_grader


class IcvDemos(Strict):
    pairs: DataFile = Field(description='JSONL file, one {"source": ..., "target": ...} demo pair per line')
    chat_template: bool = Field(False, description="render each demo text as a user turn of the chat template")


class IcvQueries(Strict):
    prompts: DataFile = Field(description='JSONL file, one {"prompt": ...} per line: the queries to restyle')
    chat_template: bool = True
    max_prompts: Count = Field(200, description="use at most this many queries (the first ones)")


class IcvBehaviour(BehaviourSpec):
    max_new_tokens: NewTokens = 32


class IcvExpect(OneExpectation):
    rate_rise: RateChangeThreshold | None = Field(
        None, description="shifted minus unshifted share of replies the grader counts, paired over queries")


class IcvClaim(ClaimSpec):
    expect: IcvExpect


class IcvSpec(ProbeSpec[IcvClaim]):
    kind: Literal["icv"]
    demos: IcvDemos
    queries: IcvQueries
    strength: float = Field(0.1, gt=0, le=2, allow_inf_nan=False, description="lambda of the norm-preserving shift")
    behaviour: IcvBehaviour
    random_seeds: Count = Field(1, le=16, description="random vectors of the same norm in the control")


class Icv(ProbeKind[IcvSpec]):
    Spec = IcvSpec
    skeleton = """\
about: An in-context vector from negative -> positive pairs makes replies positive, with no demos in the prompt.
tags: [icv]
demos: {pairs: data/icv_sentiment_pairs.jsonl, chat_template: false}   # {"source": ..., "target": ...}
queries: {prompts: data/sentiment_negative.jsonl, chat_template: true, max_prompts: 32}   # {"prompt": ...}
strength: 0.1                    # lambda of the norm-preserving shift of every layer's MLP output
behaviour:
  grader: sentiment              # any direction-kind grader: preset or {substrings | regex | tokens | lexicon}
  max_new_tokens: 32
random_seeds: 1                  # random vectors of the same norm in the control
claims:
  shift_makes_replies_positive:
    expect: {rate_rise: {at_least: 0.3}}
"""
    skeleton_data = {
        "data/icv_sentiment_pairs.jsonl": [
            {"source": "The morning was gray and miserable.", "target": "The morning was bright and wonderful."},
            {"source": "I hated that boring film.", "target": "I loved that exciting film."},
            {"source": "The soup tasted awful.", "target": "The soup tasted delightful."}],
        "data/sentiment_negative.jsonl": [{"prompt": f"Write one sentence about how miserable rainy day {i} was."}
                                          for i in range(8)],
    }

    @classmethod
    def check_data(cls, probe) -> dict[str, list[dict]]:
        spec = probe.spec
        pairs = read_rows(probe, spec.demos.pairs, ("demos", "pairs"), ("source", "target"))
        path = probe.path.parent / spec.demos.pairs
        if len(pairs) < 2:
            raise DataError(f"{path}: {len(pairs)} demo pair; a principal component needs at least 2")
        for i, row in enumerate(pairs):
            if row["source"] == row["target"]:
                raise DataError(f"{path}:{i + 1}: source and target are the same text: the pair shows no change")
        queries = read_rows(probe, spec.queries.prompts, ("queries", "prompts"), ("prompt",))
        return {"pairs": pairs, "queries": queries[:spec.queries.max_prompts]}

    def setup(self) -> None:
        spec, subject = self.spec, self.subject
        rows = self.check_data(self.probe)
        self.pairs, self.queries = rows["pairs"], rows["queries"]
        self.grader: Grader = build_grader(spec.behaviour.grader)
        if not self.grader.needs_generation:
            ids = []
            for i, text in enumerate(self.grader.token_texts):
                try:
                    ids.append(single_token(subject, text))
                except SiteError as e:
                    raise self.probe.error(f"grader token {e.message}", ("behaviour", "grader", "tokens", i)) from None
            self.grader.token_ids = tuple(ids)
        base = self.probe.path.parent
        texts = [r[k] for r in self.pairs for k in ("source", "target")]
        self.demo_ids = encode_rows(subject, texts, base / spec.demos.pairs, [i // 2 + 1 for i in range(len(texts))],
                                    spec.demos.chat_template)
        for i in range(len(self.pairs)):
            if self.demo_ids[2 * i] == self.demo_ids[2 * i + 1]:  # a zero difference: the vector shows nothing
                raise DataError(f"{base / spec.demos.pairs}:{i + 1}: source and target are the same tokens for "
                                f"model '{subject.info.id}': the pair shows no change")
        self.ids = encode_rows(subject, [r["prompt"] for r in self.queries], base / spec.queries.prompts, None,
                               spec.queries.chat_template, new_tokens=spec.behaviour.max_new_tokens)

    def vector(self) -> Any:
        """[n_layers, d] the in-context vector, sliced per layer."""
        from .._lazy import torch
        from ..subject import Site
        from ..toolkit.activations import states_at

        n = self.subject.n_layers
        sites = [Site("resid_post", layer) for layer in range(n)]
        got = states_at(self.subject, self.demo_ids, sites, batch_size=self.spec.batch_size, desc="icv demos")
        h = torch.cat([got[s] for s in sites], dim=-1).double()  # [2 * pairs, n * d]
        diff = h[1::2] - h[0::2]
        mean = diff.mean(0)
        _, _, vh = torch.linalg.svd(diff - mean, full_matrices=False)
        pc = vh[0] if float(vh[0] @ mean) >= 0 else -vh[0]
        return (mean + pc).float().reshape(n, -1)

    def _shift(self, v: Any) -> list:
        from ..subject import NormShift, Site

        return [NormShift(Site("mlp_out", layer), positions="all", vector=v[..., layer, :], strength=self.spec.strength)
                for layer in range(self.subject.n_layers)]

    def _behave(self, ids: list, interventions: Any, desc: str) -> tuple[Behaviour, np.ndarray]:
        """Graded replies and which of them are coherent (generated for the check if the grader reads logits)."""
        spec = self.spec
        new = spec.behaviour.max_new_tokens
        got = behave(self.subject, self.grader, ids, interventions, new, spec.batch_size, desc=desc)
        texts = got.texts
        if texts is None:
            gens = self.subject.generate(ids, new, interventions, spec.batch_size, desc=f"{desc} (coherence)")
            texts = [self.subject.decode(g) for g in gens]
            got.texts = texts
        return got, coherent_flags(texts)

    def measure(self) -> Outcome:
        from .._lazy import torch

        spec, n_q = self.spec, len(self.ids)
        v = self.vector()
        base, base_ok = self._behave(self.ids, (), "icv: no shift")
        shifted, shifted_ok = self._behave(self.ids, self._shift(v), "icv: shift")
        flat = v.reshape(-1)
        rand = same_norm_vectors(spec.random_seeds, flat, spec.seed).reshape(spec.random_seeds, *v.shape)

        def per_row(rows: list[int]) -> list:
            return self._shift(rand[[r // n_q for r in rows]])

        ctrl, ctrl_ok = self._behave([x for _ in range(spec.random_seeds) for x in self.ids], per_row,
                                     "icv: random vectors")
        runs = {"no shift": (base.flags, base_ok), "in-context vector": (shifted.flags, shifted_ok),
                "random vector": (ctrl.flags, ctrl_ok)}
        coherence = {k: {"graded": rate_summary(g), "coherent": rate_summary(ok), "graded_and_coherent":
                         rate_summary(g & ok), "graded_but_incoherent": int((g & ~ok).sum())}
                     for k, (g, ok) in runs.items()}
        ctrl_flags = (ctrl.flags & ctrl_ok).reshape(spec.random_seeds, n_q).mean(0)
        claims = [self._claim(name, claim, base, shifted, base.flags & base_ok, shifted.flags & shifted_ok,
                              ctrl_flags, coherence) for name, claim in spec.claims.items()]
        settings = {"demo_pairs": len(self.pairs), "queries": n_q, "strength": spec.strength,
                    "vector": "mean demo difference + first principal component, resid_post of every layer at the "
                              "last token, concatenated", "applied_to": "mlp_out of every layer, every token",
                    "vector_norm_per_layer": torch.linalg.norm(v, dim=-1).tolist(), "grader": self.grader.describe(),
                    "counts": "a reply counts when the grader counts it AND it is coherent",
                    "coherent_rule": COHERENT_RULE, "coherence": coherence,
                    "max_new_tokens": spec.behaviour.max_new_tokens, "random_seeds": spec.random_seeds}
        return Outcome(settings, claims)

    def _claim(self, name: str, claim: IcvClaim, base: Behaviour, shifted: Behaviour, base_flags: np.ndarray,
               shifted_flags: np.ndarray, ctrl_flags: np.ndarray, coherence: dict):
        seed = self.spec.seed
        b, s = base_flags.astype(float), shifted_flags.astype(float)
        effect, lo, hi = bootstrap_ci(s - b, seed=seed)
        p = paired_control(s, ctrl_flags, claim.expect.threshold.comparison, seed)
        label = self.grader.name if self.grader.name != "custom" else "behaviour"
        bars = Bars(title=f"{label} and coherent, rate on {len(b)} queries", value_label="share of replies",
                    labels=["in-context vector", "random vector, same norm"], before=[float(b.mean())] * 2,
                    after=[float(s.mean()), float(ctrl_flags.mean())], before_label="no shift", after_label="shifted")
        share = Table(title="graded and coherent replies", columns=["replies", f"graded '{label}'", "coherent",
                                                                    "both (counted)", "graded but incoherent"],
                      rows=[[k, c["graded"]["rate"], c["coherent"]["rate"], c["graded_and_coherent"]["rate"],
                             c["graded_but_incoherent"]] for k, c in coherence.items()])
        plots: list[Any] = [bars, share]
        if base.texts is not None and shifted.texts is not None:
            plots.append(Table(title="examples", columns=["query", "no shift", "in-context vector"],
                               rows=[[self.queries[i]["prompt"], base.texts[i], shifted.texts[i]]
                                     for i in range(min(6, len(b)))]))
        m = Measured(effect, (lo, hi), len(b), f"share of replies graded '{label}' and coherent with the shift "
                     "minus without, paired over queries", control=ControlResult(
                         name="a random vector of the same norm, same shift", effect=float(ctrl_flags.mean() - b.mean()),
                         p_value=p), beats_control=beats_control(p),
                     untestable=untestable_reason("rate_rise", base_flags, self.spec.behaviour.min_base_rate,
                                                  "the unshifted queries"),
                     details={"base": rate_summary(base_flags), "shifted": rate_summary(shifted_flags),
                              "coherence": coherence, "coherent_rule": COHERENT_RULE},
                     plots=plots)
        return judge(name, claim, m)
