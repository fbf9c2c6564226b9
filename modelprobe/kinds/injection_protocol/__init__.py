"""injection_protocol: the other three experiments of Lindsey 2025, beside `injection`.

- thoughts vs text: a concept vector injected over a sentence's tokens; asked to repeat the sentence the
  model still transcribes it, and asked which word comes to mind it names the concept (against the same
  trials uninjected and with a same-norm random vector);
- unintended outputs: the assistant turn is prefilled with a concept word and the model is asked whether
  it meant it; injecting that word's vector over the sentence before the prefill lowers the disown rate
  (paired over trials, against injecting another word's vector);
- intentional control: told to think about a word while writing a sentence vs told not to, the written
  sentence's states project more on the word's concept vector (paired over sentences, against another
  concept's vector).

Concept vectors, the per-row injected generation and the word checks are `injection`'s; the injection
covers the sentence only (subject.interventions.Span), so every reply is written uninjected. All trials
of the generated experiments share one batched generation, each reply ending where the rule grading it is
settled (a disowning phrase seen, say: no later token could change it); intentional control is one batched
forward up to the layer it reads.

Controls: names_thought is held against the same trials uninjected and with a random vector of the same norm
(Fisher's exact test, the weaker control decides); disown_drop against injecting another word's concept
(paired sign-flip test over trials); think_rise against another concept's vector on the same sentences
(paired). The transcribed share has no control (the uninjected and random-vector rates are reported beside
it).

Verdicts: pass when the interval clears the threshold and the control is beaten. Inconclusive when the
interval straddles the threshold, or for disown_drop when the model seldom disowns the prefilled word
uninjected (the base rate leaves nothing to lower).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field, field_validator

from ..._lazy import torch
from ...errors import SiteError
from ...report.record import Bars, ClaimResult, ControlResult, Table
from ...spec import ClaimSpec, DataFile, OneExpectation, ProbeSpec, Strict
from ...spec.fields import FiniteFloat, RateChangeThreshold, RateThreshold, Threshold
from ...stats import paired_difference, wilson_interval
from ...toolkit.behaviour import rate_summary, untestable_reason
from ...toolkit.controls import (
    ALPHA,
    MIN_PAIRED,
    beats_control,
    paired_control,
    random_source,
    random_unit_directions,
)
from ...toolkit.introspection import first_mention, word_forms
from ...toolkit.prompts import read_rows
from ..base import Measured, Outcome, judge
from ..injection import Injection, VectorSpec, fisher_greater
from . import protocol as ip

GENERATED = {"transcribed", "names_thought", "disown_drop"}


class FixedInjectSpec(Strict):
    layer: int | float = Field(description="an int (negative from the end) or a fraction of depth; e.g. the "
                                           "layer an `injection` probe chose on its dev concepts")
    strength: FiniteFloat = Field(gt=0, le=1000, description="multiple of the concept vector that is added")

    @field_validator("layer", mode="before")
    @classmethod
    def _layer(cls, v: object) -> object:
        # one message for one mistake (an int | float union would report each member's complaint)
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise ValueError("a layer is an int (negative from the end) or a fraction of depth in [0, 1]")
        if isinstance(v, float) and not 0 <= v <= 1:
            raise ValueError(f"a fractional layer is a fraction of depth in [0, 1], got {v:g}")
        return v


class ProtocolExpect(OneExpectation):
    transcribed: RateThreshold | None = Field(None, description="share of injected trials that repeat the "
                                              "sentence correctly")
    names_thought: RateThreshold | None = Field(None, description="share of injected trials that name the "
                                                "concept when asked which word comes to mind")
    disown_drop: RateChangeThreshold | None = Field(None, description="disown rate of a prefilled word, "
                                                    "uninjected minus with its own concept injected")
    think_rise: Threshold | None = Field(None, description="projection on the concept vector (in units of it), "
                                         "told to think about the word minus told not to")


class ProtocolClaim(ClaimSpec):
    expect: ProtocolExpect


class InjectionProtocolSpec(ProbeSpec[ProtocolClaim]):
    kind: Literal["injection_protocol"]
    concepts: DataFile = Field(description='JSONL: {"word": "Oceans", "synonyms": ["sea"]} (synonyms optional)')
    baseline_words: DataFile = Field(description='JSONL: {"word": ...}; the concept vector is minus their mean state')
    sentences: DataFile = Field(description='JSONL: {"sentence": ...} plain sentences that name no concept')
    vector: VectorSpec = Field(default_factory=VectorSpec)
    inject: FixedInjectSpec
    trials: int = Field(40, ge=2, le=1000, description="trials per experiment: sentence i (cycled) with a seeded "
                                                   "concept")
    max_new_tokens: int = Field(32, ge=4, le=256)

    @field_validator("trials")
    @classmethod
    def _beatable(cls, n: int) -> int:
        if n < MIN_PAIRED:
            raise ValueError(f"with {n} trials the paired controls' p-value is at least 2^-{n} = {2.0 ** -n:.3g} > "
                             f"{ALPHA}: no claim could beat them; use at least {MIN_PAIRED}")
        return n


class InjectionProtocol(Injection):
    Spec = InjectionProtocolSpec
    skeleton = """\
about: An injected concept is named as a thought while the text is kept; it makes a prefilled word owned.
tags: [injection]
concepts: data/injection_concepts.jsonl              # as for injection
baseline_words: data/injection_baseline_words.jsonl
sentences: data/injection_sentences.jsonl            # {"sentence": ...} that name no concept
inject: {layer: 0.35, strength: 8}                   # e.g. what an injection probe chose on its dev concepts
trials: 40
claims:
  repeats_the_sentence:
    expect: {transcribed: {at_least: 0.8}}
  names_the_thought:
    expect: {names_thought: {at_least: 0.2}}
  owns_the_prefill:
    expect: {disown_drop: {at_least: 0.1}}
  thinks_on_request:
    expect: {think_rise: {at_least: 0.0}}
"""
    skeleton_data = {**Injection.skeleton_data, "data/injection_sentences.jsonl": [
        {"sentence": s} for s in ("She folded the letter twice.", "A small cat waited by the gate.",
                                  "He forgot his keys again.", "The meeting moved upstairs.")]}

    @classmethod
    def check_data(cls, probe) -> dict[str, list[dict]]:
        spec: InjectionProtocolSpec = probe.spec
        concepts = read_rows(probe, spec.concepts, ("concepts",), ("word",))
        if len(concepts) < 2:
            raise probe.error(f"{probe.path.parent / spec.concepts}: needs at least 2 concepts (another word's "
                              "vector is the control)", ("concepts",))
        sentences = read_rows(probe, spec.sentences, ("sentences",), ("sentence",))
        path = probe.path.parent / spec.sentences
        for i, row in enumerate(sentences):
            if not isinstance(row["sentence"], str) or not ip.words(row["sentence"]):
                raise probe.error(f"{path}:{i + 1}: field 'sentence' must be text with at least one word",
                                  ("sentences",))
        # a sentence that says a concept would let "names the thought" be read off the text
        for i, row in enumerate(sentences):
            said = [c["word"] for c in concepts if first_mention(row["sentence"], word_forms(c["word"], c.get(
                "synonyms", []) if isinstance(c.get("synonyms", []), list) else [])) is not None]
            if said:
                raise probe.error(f"{path}:{i + 1}: field 'sentence' names the concept {said[0]!r}; the sentences "
                                  "must name no concept", ("sentences",))
        return {"concepts": concepts, "sentences": [r["sentence"] for r in sentences],
                "baseline": read_rows(probe, spec.baseline_words, ("baseline_words",), ("word",))}

    def setup(self) -> None:
        from ...toolkit.prompts import encode_rows

        spec = self.spec
        data = self.check_data(self.probe)
        self.concepts, self.baseline, self.sentences = data["concepts"], data["baseline"], data["sentences"]
        self.layers = self._layers()
        self.layer = self.layers[0]
        self._check_words(self.concepts, spec.concepts)
        self._check_words(self.baseline, spec.baseline_words)
        words = [r["word"] for r in self.concepts] + [r["word"] for r in self.baseline]
        self.vector_ids = encode_rows(self.subject, [spec.vector.template.format(word=w) for w in words],
                                      self.probe.path.parent / spec.concepts, None, spec.vector.chat_template)
        self.forms = [word_forms(r["word"], r.get("synonyms", [])) for r in self.concepts]
        n, nc = spec.trials, len(self.concepts)
        rng = np.random.default_rng(spec.seed)
        # each concept once before any twice, in a seeded order
        self.concept_of = [int(c) for c in np.concatenate([rng.permutation(nc) for _ in range(-(-n // nc))])[:n]]
        self.other_of = [self.concept_of[j] if self.concept_of[j] != c else (c + 1) % nc
                         for c, j in zip(self.concept_of, random_source(n, spec.seed))]
        self.sentence_of = [self.sentences[i % len(self.sentences)] for i in range(n)]
        self.grader = None

    def _layers(self) -> list[int]:
        from ...subject import resolve_layer

        return sorted(set(resolve_layer(self.spec.inject.layer, self.subject.n_layers, ("inject", "layer"))))[:1]

    def _encode(self, messages: list[dict], needle: str, generation_prompt: bool, last: bool) -> tuple:
        try:
            ids, a, b = ip.encode_span(self.subject, messages, self.spec.vector.chat_template, needle,
                                       generation_prompt, last)
        except SiteError as e:
            raise self.probe.error(e.message, ("sentences",)) from None
        limit = self.subject.max_positions
        if limit is not None and len(ids) + self.spec.max_new_tokens > limit:
            raise self.probe.error(f"a trial is {len(ids)} tokens + {self.spec.max_new_tokens} generated, more "
                                   f"than the {limit} positions model '{self.subject.info.id}' accepts",
                                   ("sentences",))
        return ids, a, b

    # ---- measurement --------------------------------------------------------------------------------
    def trial_rows(self, v: torch.Tensor) -> tuple[list[list[int]], list[int], list[int], torch.Tensor, dict]:
        """Every generated arm of thoughts-vs-text and prefill the claims need: ids, each row's sentence span
        [start, stop), its injected vector (a zero row is uninjected) and each arm's rows."""
        n, strength, d = self.spec.trials, self.spec.inject.strength, v.shape[-1]
        mine = strength * v[self.concept_of]
        rand = random_unit_directions(n, d, self.spec.seed) * mine.norm(dim=-1, keepdim=True)
        other = strength * v[self.other_of]
        zero = torch.zeros(n, d)
        words = [self.concepts[c]["word"] for c in self.concept_of]
        need = {c.expect.statistic for c in self.spec.claims.values()}
        arms: dict[str, tuple[list[list[dict]], torch.Tensor]] = {}
        if need & {"transcribed", "names_thought"}:
            thought = [ip.thought_messages(s) for s in self.sentence_of]
            repeat = [ip.repeat_messages(s) for s in self.sentence_of]
            arms |= {"thought_injected": (thought, mine), "thought_random": (thought, rand),
                     "thought_plain": (thought, zero), "repeat_injected": (repeat, mine),
                     "repeat_random": (repeat, rand), "repeat_plain": (repeat, zero)}
        if "disown_drop" in need:
            prefill = [ip.prefill_messages(s, w) for s, w in zip(self.sentence_of, words)]
            arms |= {"prefill_plain": (prefill, zero), "prefill_matched": (prefill, mine),
                     "prefill_other": (prefill, other)}
        ids, starts, stops, rows, spans = [], [], [], [], {}
        for name, (msgs, vec) in arms.items():
            spans[name] = slice(len(ids), len(ids) + n)
            for m, s in zip(msgs, self.sentence_of):
                x, a, b = self._encode(m, s, True, False)
                ids.append(x)
                starts.append(a)
                stops.append(b)
            rows.append(vec)
        return ids, starts, stops, torch.cat(rows) if rows else torch.zeros(0, d), spans

    def readers_of(self, spans: dict[str, slice]) -> list:
        """Per row, the rule that grades its reply in `measure` (named, transcribed or disowns), as a verdict
        on the reply's beginning or OPEN (Injection.generate stops the row once it is settled)."""
        out: list = [None] * max((sl.stop for sl in spans.values()), default=0)
        for name, sl in spans.items():
            for i, row in enumerate(range(sl.start, sl.stop)):
                if name.startswith("thought"):
                    out[row] = [lambda t, f=self.forms[self.concept_of[i]]: ip.named_final(t, f)]
                elif name.startswith("repeat"):
                    out[row] = [lambda t, s=self.sentence_of[i]: ip.transcribed_final(t, s)]
                else:
                    out[row] = [ip.disowns_final]
        return out

    def generated_trials(self, v: torch.Tensor) -> dict[str, list[str]]:
        """The generated arms in one batched generation, each row with its own vector over its sentence."""
        ids, starts, stops, vectors, spans = self.trial_rows(v)
        if not ids:
            return {}
        replies = self.generate(ids, starts, {self.layer: vectors}, "protocol trials", stops, self.readers_of(spans))
        return {name: replies[sl] for name, sl in spans.items()}

    def think_scores(self, v: torch.Tensor) -> dict[str, np.ndarray]:
        """Per sentence, the written sentence's mean state projected on its concept's vector and on another
        concept's, told to think about the concept and told not to (one batched forward, stopping at the
        layer read: subject.run_until)."""
        from ...subject import Site, run_until

        n = self.spec.trials
        words = [self.concepts[c]["word"] for c in self.concept_of]
        encoded = [self._encode(ip.intent_messages(s, w, think), s, False, True)
                   for think in (True, False) for s, w in zip(self.sentence_of, words)]
        site = Site("resid_pre", self.layer)
        means = torch.empty(len(encoded), v.shape[-1], dtype=torch.float64)
        for fw in run_until(self.subject, [e[0] for e in encoded], [site], batch_size=self.spec.batch_size,
                            desc="intentional control"):
            acts = fw.acts[site]
            for j, row in enumerate(fw.batch.rows):
                _, a, b = encoded[row]
                pad = int(fw.batch.pad[j])
                means[row] = acts[j, pad + a:pad + b].double().mean(0).cpu()
        out = {}
        for which, idx in (("concept", self.concept_of), ("other", self.other_of)):
            u = v[idx].double()
            proj = torch.cat([(means[:n] * u).sum(-1), (means[n:] * u).sum(-1)]) / u.pow(2).sum(-1).repeat(2)
            out[f"think_{which}"], out[f"dont_{which}"] = proj[:n].numpy(), proj[n:].numpy()
            if which == "concept":  # the paper's measure, reported beside the projection
                cos = torch.nn.functional.cosine_similarity(means, u.repeat(2, 1), dim=-1)
                out["cosine_think"], out["cosine_dont"] = cos[:n].numpy(), cos[n:].numpy()
        return out

    def measure(self) -> Outcome:
        v = self.concept_vectors()[self.layer]
        stats = {c.expect.statistic for c in self.spec.claims.values()}
        replies = self.generated_trials(v) if stats & GENERATED else {}
        scores = self.think_scores(v) if "think_rise" in stats else {}
        forms = [self.forms[c] for c in self.concept_of]
        graded: dict[str, np.ndarray] = {}
        for name, rs in replies.items():
            if name.startswith("thought"):
                graded[name] = ip.grade(rs, ip.named, forms)
            elif name.startswith("repeat"):
                graded[name] = ip.grade(rs, ip.transcribed, self.sentence_of)
            else:
                graded[name] = np.array([ip.disowns(r) for r in rs], dtype=bool)
        claims = []
        for name, claim in self.spec.claims.items():
            stat = claim.expect.statistic
            if stat == "transcribed":
                claims.append(self._transcribed(name, claim, graded, replies))
            elif stat == "names_thought":
                claims.append(self._names(name, claim, graded, replies))
            elif stat == "disown_drop":
                claims.append(self._disown(name, claim, graded, replies))
            else:
                claims.append(self._think(name, claim, scores))
        norm = float(v[self.concept_of].norm(dim=-1).mean())
        settings = {
            "concepts": self.spec.concepts, "sentences": self.spec.sentences, "trials": self.spec.trials,
            "layer": self.layer, "site": f"blocks.{self.layer}.hook_resid_pre", "strength": self.spec.inject.strength,
            "vector_norm_at_layer": norm, "strength_x_norm": self.spec.inject.strength * norm,
            "injection_over": "the sentence's tokens only; replies are generated uninjected",
            "rules": ip.RULES_SHOWN, "decoding": "greedy",
            "replies_end": "at EOS, at max_new_tokens, or where the rule grading the reply is settled (no later "
                           "token could change its verdict)",
            "prompts": {"thought": ip.THOUGHT_ASK, "repeat": ip.REPEAT_ASK, "meant": ip.MEANT_ASK,
                        "think": ip.THINK, "dont_think": ip.DONT_THINK},
            "example_replies": {k: r[:3] for k, r in replies.items()},
        }
        return Outcome(settings, claims)

    # ---- claims -------------------------------------------------------------------------------------
    def _arm_bars(self, graded: dict[str, np.ndarray]) -> Bars:
        arms = ["injected", "random", "plain"]
        return Bars(title="thoughts vs text: names the concept / repeats the sentence", value_label="share of trials",
                    labels=["concept injected", "random vector, same norm", "uninjected"],
                    before=[float(graded[f"repeat_{a}"].mean()) if f"repeat_{a}" in graded else None for a in arms],
                    after=[float(graded[f"thought_{a}"].mean()) if f"thought_{a}" in graded else None for a in arms],
                    before_label="repeats the sentence", after_label="names the concept")

    def _examples(self, replies: dict[str, list[str]], arm: str, flags: np.ndarray, label: str) -> Table:
        rows = [[self.concepts[c]["word"], s[:60], r[:120], label if ok else "-"]
                for c, s, r, ok in list(zip(self.concept_of, self.sentence_of, replies[arm], flags))[:8]]
        return Table(title=f"example replies ({arm.replace('_', ' ')})", columns=["concept", "sentence", "reply",
                                                                                     "graded"], rows=rows)

    def _rate(self, name: str, claim: ProtocolClaim, flags: np.ndarray, metric: str, **kw: object) -> ClaimResult:
        s = rate_summary(flags)
        return judge(name, claim, Measured(s["rate"], tuple(s["ci"]) if s["n"] else None, s["n"], metric, **kw))

    def _transcribed(self, name: str, claim: ProtocolClaim, graded: dict[str, np.ndarray],
                     replies: dict[str, list[str]]) -> ClaimResult:
        detail = {arm: rate_summary(graded[f"repeat_{arm}"]) for arm in ("plain", "random")}
        return self._rate(name, claim, graded["repeat_injected"], "share of injected trials that repeat the "
                          "sentence correctly", details={"uninjected": detail["plain"],
                                                         "random vector, same norm": detail["random"]},
                          plots=[self._arm_bars(graded),
                                 self._examples(replies, "repeat_injected", graded["repeat_injected"], "repeated")])

    def _names(self, name: str, claim: ProtocolClaim, graded: dict[str, np.ndarray],
               replies: dict[str, list[str]]) -> ClaimResult:
        inj = graded["thought_injected"]
        k, n = int(inj.sum()), inj.size
        detail = {}
        for arm, key in (("uninjected (names the concept by chance)", "thought_plain"),
                         ("random vector, same norm (names the concept)", "thought_random")):
            f = graded[key]
            kc, nc = int(f.sum()), f.size
            detail[arm] = {"rate": kc / nc, "ci": list(wilson_interval(kc, nc)), "k": kc, "n": nc,
                           "fisher_p": fisher_greater(k, n, kc, nc)}
        worst = max(detail, key=lambda a: detail[a]["fisher_p"])
        p = detail[worst]["fisher_p"]
        control = ControlResult(name=f"every control, weakest: {worst}", effect=detail[worst]["rate"], p_value=p,
                                detail=detail)
        return self._rate(name, claim, inj, "share of injected trials that name the concept when asked which "
                          "word comes to mind", control=control, beats_control=beats_control(p),
                          details={"k": k}, plots=[self._arm_bars(graded),
                                                   self._examples(replies, "thought_injected", inj, "named")])

    def _disown(self, name: str, claim: ProtocolClaim, graded: dict[str, np.ndarray],
                replies: dict[str, list[str]]) -> ClaimResult:
        plain, mine, other = (graded[f"prefill_{a}"].astype(float) for a in ("plain", "matched", "other"))
        effect, lo, hi = paired_difference(plain, mine, seed=self.spec.seed)
        p = paired_control(plain - mine, plain - other, claim.expect.threshold.comparison, self.spec.seed)
        control = ControlResult(name="another word's vector injected (disown rate drop)",
                                effect=float((plain - other).mean()), p_value=p,
                                detail={"disown_uninjected": float(plain.mean()), "disown_own_vector": float(mine.mean()),
                                        "disown_other_vector": float(other.mean()), "alpha": ALPHA})
        bars = Bars(title="unintended outputs: disowns the prefilled word", value_label="share of trials",
                    labels=["uninjected", "its own concept injected", "another word's concept injected"],
                    before=[float(plain.mean()), None, None], after=[None, float(mine.mean()), float(other.mean())],
                    before_label="uninjected", after_label="injected before the prefill")
        return judge(name, claim, Measured(
            effect, (lo, hi), plain.size, "disown rate of the prefilled word, uninjected minus with its own "
            "concept injected before it", control=control, beats_control=beats_control(p),
            details={"disown_uninjected": float(plain.mean()), "disown_own_vector": float(mine.mean())},
            plots=[bars, self._examples(replies, "prefill_plain", graded["prefill_plain"], "disowns"),
                   self._examples(replies, "prefill_matched", graded["prefill_matched"], "disowns")],
            untestable=untestable_reason("disown_drop", plain.astype(bool), 0.05, "the uninjected prefills")))

    def _think(self, name: str, claim: ProtocolClaim, s: dict[str, np.ndarray]) -> ClaimResult:
        mine = s["think_concept"] - s["dont_concept"]
        theirs = s["think_other"] - s["dont_other"]
        effect, lo, hi = paired_difference(s["think_concept"], s["dont_concept"], seed=self.spec.seed)
        p = paired_control(mine, theirs, claim.expect.threshold.comparison, self.spec.seed)
        control = ControlResult(name="another concept's vector (same sentences)", effect=float(theirs.mean()),
                                p_value=p, detail={"alpha": ALPHA})
        bars = Bars(title="intentional control: the written sentence's projection", value_label="<h, v> / |v|^2",
                    labels=["the named concept's vector", "another concept's vector"],
                    before=[float(s["dont_concept"].mean()), float(s["dont_other"].mean())],
                    after=[float(s["think_concept"].mean()), float(s["think_other"].mean())],
                    before_label="told not to think about it", after_label="told to think about it")
        return judge(name, claim, Measured(
            effect, (lo, hi), mine.size, "projection of the written sentence on the concept vector (units of "
            "the vector), told to think about it minus told not to", control=control,
            beats_control=beats_control(p), plots=[bars],
            details={"cosine_with_concept_vector": {"think": float(s["cosine_think"].mean()),
                                                    "dont_think": float(s["cosine_dont"].mean())}}))
