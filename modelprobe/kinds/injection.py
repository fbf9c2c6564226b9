"""injection: the model notices a concept vector injected into its residual stream, and names it.

Lindsey 2025 ("Emergent Introspective Awareness in LLMs"). A concept vector is the residual state at the last
token of "Tell me about {word}" minus its mean over baseline words, at the injection layer. strength * vector
is added from the token before "Trial n" on, generated tokens included, while the model is asked whether it
notices an inserted thought. Layer and strength are chosen on dev concepts, then frozen; the test concepts are
held against uninjected trials, a random vector of the same norm, the word written in the prompt and permuted
labels. Each step (dev grid; test trials with their controls) is one batched generation with one injected
vector per row. A reply ends where every rule grading it is settled (the first "yes"/"no" of a no-question,
say): no later token could change a verdict, so the kept reply stops there.

Controls: on test trials, detection is held against every control at once: the same trials uninjected, a
random vector of the same norm, and permuted concept labels (Fisher's exact test each, the weakest decides);
the rate with the concept word written in the prompt is reported beside them. The control-trial rate and the
coherence share have no control; the yes-rate rise on no-questions measures a generic shift toward "yes".

Verdicts: pass when the Wilson interval clears the threshold and every control is beaten. Inconclusive when
the interval straddles the threshold, or for the yes-rate rise when the uninjected no-questions leave no room
to rise (or there are none).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import numpy as np
from pydantic import Field, field_validator, model_validator

from .._lazy import torch
from ..errors import SiteError
from ..report.record import Bars, ClaimResult, ControlResult, HeatMap, Table
from ..spec import (
    ClaimSpec,
    DataFile,
    OneExpectation,
    ProbeSpec,
    RateChangeThreshold,
    RateThreshold,
    SplitBase,
    Strict,
)
from ..spec.load import parse_jsonl
from ..stats import paired_difference, wilson_interval
from ..toolkit import introspection as intro
from ..toolkit.behaviour import rate_summary, untestable_reason
from ..toolkit.controls import beats_control, random_unit_directions
from ..toolkit.prompts import encode_rows, read_rows, split_indices
from .base import Measured, Outcome, ProbeKind, judge

AUTO_LAYERS = (0.35, 0.5, 0.66, 0.8)  # fractions of depth tried by `layer: auto`


class VectorSpec(Strict):
    template: str = Field("Tell me about {word}", description="prompt whose last-token state defines the concept")
    position: Literal["last"] = Field("last", description="the token whose state is read")
    chat_template: bool = Field(True, description="render the vector prompt and the trial in the chat template")

    @field_validator("template")
    @classmethod
    def _has_word(cls, v: str) -> str:
        if "{word}" not in v:
            raise ValueError("the vector template must contain {word}")
        try:
            v.format(word="x")
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"only {{word}} may appear in braces (use {{{{ }}}} for a brace): {e!r}") from None
        return v


class InjectSpec(Strict):
    layer: Literal["auto"] | int | float = Field(
        "auto", description=f"auto: chosen on dev concepts among fractions {list(AUTO_LAYERS)} of depth "
                            "(or `candidates`); an int (negative from the end) or a fraction of depth")
    candidates: list[int | float] | None = Field(None, min_length=1, description="layers tried by layer: auto")
    strengths: list[float] = Field([1.0, 2.0, 4.0, 8.0], min_length=1,
                                   description="multiples of the concept vector tried on dev concepts")
    from_: Literal["trial_start"] = Field("trial_start", alias="from",
                                          description="the token before 'Trial n', through every generated token")

    @field_validator("strengths")
    @classmethod
    def _positive(cls, v: list[float]) -> list[float]:
        bad = [s for s in v if not s > 0 or s != s or s == float("inf")]
        if bad:
            raise ValueError(f"strengths must be positive and finite, got {bad[0]}")
        return v


class JudgeSpec(Strict):
    judge: str = Field(description="a second local model (path, GGUF or alias, loaded like --model) that grades")


class SplitSpec(SplitBase):
    dev: int = Field(10, ge=1, description="concepts used to choose layer and strength")
    test: int = Field(40, ge=2, description="held-out concepts the claims are measured on")


class InjectionExpect(OneExpectation):
    rate: RateThreshold | None = Field(None, description="test trials: share that detect and name the concept first; "
                                   "control_trials: share claiming a detection with nothing injected")
    coherence: RateThreshold | None = Field(None, description="share of injected test replies that are coherent")
    yes_rate_rise: RateChangeThreshold | None = Field(None, description="'yes' rate on no-questions, injected minus not")


class InjectionClaim(ClaimSpec):
    expect: InjectionExpect
    on: Literal["test_trials", "control_trials", "no_questions"] = Field(
        "test_trials", description="which trials the statistic is read on")

    @model_validator(mode="after")
    def _fits(self) -> InjectionClaim:
        stat = self.expect.statistic
        if stat == "yes_rate_rise" and self.on != "no_questions":
            raise ValueError("yes_rate_rise is read on: no_questions")
        if stat != "yes_rate_rise" and self.on == "no_questions":
            raise ValueError("on: no_questions takes expect: yes_rate_rise")
        if stat == "coherence" and self.on != "test_trials":
            raise ValueError("coherence is read on the injected test trials (on: test_trials)")
        return self


class InjectionSpec(ProbeSpec[InjectionClaim]):
    kind: Literal["injection"]
    concepts: DataFile = Field(description='JSONL: {"word": "Oceans", "synonyms": ["sea"]} (synonyms optional)')
    baseline_words: DataFile = Field(description='JSONL: {"word": ...}; the concept vector is minus their mean state')
    no_questions: DataFile | None = Field(None, description='JSONL: {"question": ...} whose honest answer is no')
    vector: VectorSpec = Field(default_factory=VectorSpec)
    inject: InjectSpec = Field(default_factory=InjectSpec)
    trial: Literal["default"] | DataFile = Field("default", description="default (the published protocol in our words) or a JSONL of "
                       "{role, content} messages; the last holds 'Trial {n}' and '{question}'")
    question: str = Field(intro.DEFAULT_QUESTION, min_length=1, description="the trial question")
    grader: Literal["rules"] | JudgeSpec = "rules"
    split: SplitSpec = Field(default_factory=SplitSpec)
    control_trials: int = Field(80, ge=1, le=1000, description="uninjected trials (trial numbers 1..n)")
    max_new_tokens: int = Field(40, ge=4, le=256)

    @model_validator(mode="after")
    def _needs_questions(self) -> InjectionSpec:
        if self.no_questions is None and any(c.on == "no_questions" for c in self.claims.values()):
            raise ValueError("a claim reads on: no_questions, but the probe names no no_questions file")
        return self


def judge_location(probe, judge: str, loc: tuple) -> str:
    """What to load as the judge. It obeys the data-path rule like any data file: text that leads outside is
    refused before anything is looked at; a path present inside is loaded from there; anything else is an
    alias or a cached hub id."""
    path, _ = probe.allowed_path(judge, loc)
    return str(probe.data_path(judge, loc)) if path.exists() else judge


_CONCEPTS = ("oceans", "bread", "music", "mountains", "fire", "snow", "gold", "coffee", "dogs", "rockets",
             "books", "rain", "cities", "gardens", "clocks", "bridges", "forests", "islands", "trains", "stars",
             "honey", "castles", "volcanoes", "rivers", "mirrors", "candles", "deserts", "robots", "violins",
             "apples", "storms", "glass", "silver", "ships", "tigers", "salt", "paper", "kites", "lanterns",
             "pianos", "caves", "feathers", "wheels", "maps", "shells", "clouds", "lemons", "ladders", "bells",
             "diamonds")


class Injection(ProbeKind[InjectionSpec]):
    Spec = InjectionSpec
    skeleton = """\
about: The model reports an injected concept and names it before saying it.
tags: [injection]
concepts: data/injection_concepts.jsonl              # {"word": "Oceans", "synonyms": ["sea"]}; split into dev / test
baseline_words: data/injection_baseline_words.jsonl  # {"word": ...}; the concept vector is minus their mean state
no_questions: data/injection_no_questions.jsonl      # {"question": ...} whose honest answer is "no"
vector: {template: "Tell me about {word}", position: last, chat_template: true}
inject:
  layer: auto            # chosen on dev concepts with strength, then frozen; or an int / fraction of depth
  strengths: [1, 2, 4, 8]
  from: trial_start      # the token before "Trial n", through every generated token
trial: default           # the published protocol in our words; or a JSONL of {role, content} messages
grader: rules            # or {judge: <model path or alias>}
split: {dev: 10, test: 40, seed: 0}
control_trials: 80       # uninjected trials; 0 of 80 is the fewest that can clear at_most 0.05
claims:
  detects_and_names:
    expect: {rate: {at_least: 0.05}}      # affirmative + correct identification, detection first
  no_false_alarms:
    on: control_trials
    expect: {rate: {at_most: 0.05}}
  stays_coherent:
    expect: {coherence: {at_least: 0.8}}
  not_a_yes_bias:
    on: no_questions
    expect: {yes_rate_rise: {at_most: 0.05}}
"""
    # 10 dev + 40 test concepts, a mean over baseline words, and "no" questions: a shape to replace.
    skeleton_data = {
        "data/injection_concepts.jsonl": [{"word": w.capitalize()} for w in _CONCEPTS],
        "data/injection_baseline_words.jsonl": [{"word": w} for w in ("table", "chair", "window", "door", "floor",
                                                                      "wall", "shoe", "spoon", "cup", "pen")],
        "data/injection_no_questions.jsonl": [{"question": q} for q in (
            "Can humans breathe under water without equipment?", "Is the sun cold?",
            "Do fish have fur?", "Is ice hotter than boiling water?")],
    }

    @classmethod
    def check_data(cls, probe) -> dict[str, list[dict]]:
        spec: InjectionSpec = probe.spec
        path = probe.path.parent / spec.concepts
        concepts = read_rows(probe, spec.concepts, ("concepts",), ("word",))
        for i, row in enumerate(concepts):
            syn = row.get("synonyms", [])
            if not isinstance(syn, list) or not all(isinstance(s, str) and s.strip() for s in syn):
                raise probe.error(f"{path}:{i + 1}: field 'synonyms' must be a list of non-empty strings",
                                  ("concepts",))
        need = spec.split.dev + spec.split.test
        if len(concepts) < need:
            raise probe.error(f"the split asks for {need} concepts (dev {spec.split.dev} + test "
                              f"{spec.split.test}) but {path} holds {len(concepts)}", ("split",))
        out = {"concepts": concepts,
               "baseline": read_rows(probe, spec.baseline_words, ("baseline_words",), ("word",))}
        if spec.no_questions:
            out["questions"] = read_rows(probe, spec.no_questions, ("no_questions",), ("question",))
        out["transcript"] = cls._transcript(probe)
        if isinstance(spec.grader, JudgeSpec):
            out["judge"] = judge_location(probe, spec.grader.judge, ("grader", "judge"))
        return out

    @staticmethod
    def _transcript(probe) -> list[dict]:
        spec: InjectionSpec = probe.spec
        if spec.trial == "default":
            return [dict(m) for m in intro.DEFAULT_TRANSCRIPT]
        path = probe.data_path(spec.trial, ("trial",))
        if not path.is_file():
            raise probe.error(f"trial transcript '{path}' is not a file", ("trial",))
        msgs = parse_jsonl(path, ("role", "content"))
        if not msgs:
            raise probe.error(f"trial transcript '{path}' holds no messages", ("trial",))
        for i, m in enumerate(msgs):
            if m["role"] not in ("system", "user", "assistant") or not isinstance(m["content"], str):
                raise probe.error(f"{path}:{i + 1}: a message is {{role: system|user|assistant, content: text}}",
                                  ("trial",))
        last = msgs[-1]
        if last["role"] != "user" or intro.START_MARKER not in last["content"] or "{question}" not in last["content"]:
            raise probe.error(f"{path}:{len(msgs)}: the last message must be the user's and hold "
                              f"'{intro.START_MARKER}' and '{{question}}'", ("trial",))
        return msgs

    # ---- setup: everything that needs the model's tokenizer and depth -------------------------------
    def setup(self) -> None:
        spec, subject = self.spec, self.subject
        data = self.check_data(self.probe)
        self.concepts, self.baseline = data["concepts"], data["baseline"]
        self.questions = data.get("questions", [])
        self.transcript = data["transcript"]
        parts = split_indices(len(self.concepts), {"dev": spec.split.dev, "test": spec.split.test}, spec.split.seed)
        self.dev, self.test = parts["dev"], parts["test"]
        self.layers = self._layers()
        self._check_words(self.concepts, spec.concepts)
        self._check_words(self.baseline, spec.baseline_words)
        words = [r["word"] for r in self.concepts] + [r["word"] for r in self.baseline]
        self.vector_ids = encode_rows(subject, [spec.vector.template.format(word=w) for w in words],
                                      self.probe.path.parent / spec.concepts, None, spec.vector.chat_template)
        self.forms = [intro.word_forms(r["word"], r.get("synonyms", [])) for r in self.concepts]
        self.grader = self._grader()

    def _layers(self) -> list[int]:
        from ..subject import resolve_layer

        inj, n = self.spec.inject, self.subject.n_layers
        if inj.layer == "auto":
            cands, loc = (inj.candidates or list(AUTO_LAYERS)), ("inject", "candidates")
        else:
            cands, loc = [inj.layer], ("inject", "layer")
        out: list[int] = []
        for i, c in enumerate(cands):
            for layer in resolve_layer(c, n, (*loc, i) if inj.layer == "auto" else loc):
                if layer not in out:
                    out.append(layer)
        return sorted(out)

    def _check_words(self, rows: list[dict], rel: str) -> None:
        """Every word must reach the model as real tokens (not the unknown token) inside the template."""
        from ..toolkit.prompts import answer_tokens, data_error

        path = self.probe.path.parent / rel
        template = self.spec.vector.template
        for i, row in enumerate(rows):
            try:
                answer_tokens(self.subject, template.format(word=row["word"]))
            except SiteError as e:
                raise data_error(path, i + 1, "word", SiteError(
                    f"{row['word']!r} cannot be placed in the template {template!r}: {e.message}")) from None

    def _grader(self):
        if isinstance(self.spec.grader, JudgeSpec):
            from ..errors import ModelLoadError
            from ..subject import load_subject

            loc = ("grader", "judge")
            try:
                judge = load_subject(judge_location(self.probe, self.spec.grader.judge, loc), progress=False)
            except ModelLoadError as e:
                raise self.probe.error(f"the judge model does not load: {e}", loc) from None
            try:
                intro.judge_answer_tokens(judge)
            except SiteError as e:
                raise self.probe.error(f"the judge cannot grade: {e.message}", loc) from None
            return judge
        return None

    def trial_ids(self, questions: list[str], numbers: list[int]) -> tuple[list[list[int]], list[int]]:
        """Encoded trials and, per trial, the index of the token the injection starts at."""
        ids, starts = [], []
        marker = intro.START_MARKER
        for q, n in zip(questions, numbers):
            msgs = intro.render_messages(self.transcript, n, q)
            try:
                x, s = intro.encode_trial(self.subject, msgs, self.spec.vector.chat_template,
                                          marker.replace("{n}", str(n)))
            except SiteError as e:
                raise self.probe.error(e.message, ("trial",)) from None
            limit = self.subject.max_positions
            if limit is not None and len(x) + self.spec.max_new_tokens > limit:
                raise self.probe.error(f"a trial is {len(x)} tokens + {self.spec.max_new_tokens} generated, more "
                                       f"than the {limit} positions model '{self.subject.info.id}' accepts",
                                       ("trial",))
            ids.append(x)
            starts.append(s)
        return ids, starts

    # ---- measurement --------------------------------------------------------------------------------
    def concept_vectors(self) -> dict[int, torch.Tensor]:
        """{layer: [n_concepts, d]} each concept's state at the vector prompt's last token minus the
        baseline words' mean state, at the input of every candidate layer (one forward for all)."""
        from ..subject import Site

        sites = [Site("resid_pre", layer) for layer in self.layers]
        states = self.vector_states(sites)
        n = len(self.concepts)
        return {s.layer: states[s][:n] - states[s][n:].double().mean(0).float() for s in sites}

    def vector_states(self, sites: list) -> dict:
        """{site: [n_words, d]} the vector prompts' last-token states, one forward per batch stopping at the
        highest site (toolkit.activations.states_at). With a fixed batch size they are kept per model, prompts
        and site in subject.cache: injection and injection_protocol read the same prompts, and the same
        batches give the same numbers whichever other sites a pass captured."""
        from ..toolkit.activations import states_at

        def run(want: list) -> dict:
            return states_at(self.subject, self.vector_ids, want, -1, batch_size=self.spec.batch_size,
                             desc="concept vectors")

        if self.spec.batch_size is None:  # the auto batch size may cut the batches differently next time
            return run(sites)
        import hashlib

        model = self.subject.model
        digest = hashlib.sha256(repr((self.vector_ids, self.spec.batch_size)).encode()).hexdigest()
        info = self.subject.info
        stamp = (info.id, info.hash, info.dtype, str(self.subject.device), digest,
                 sum(p._version for p in model.parameters()))  # an in-place weight edit bumps a version
        store = self.subject.cache.setdefault("injection.vector_states", {})
        missing = [site for site in sites if (stamp, site) not in store]
        if missing:
            got = run(missing)
            for site in missing:
                store[(stamp, site)] = got[site]
        return {site: store[(stamp, site)] for site in sites}

    def generate(self, ids: list[list[int]], starts: list[int], vectors: dict[int, torch.Tensor],
                 desc: str, stops: list[int] | None = None,
                 readers: list[list[Callable[[str], object]] | None] | None = None) -> list[str]:
        """Greedy replies, one batched generation; row i gets vectors[layer][i] added at each layer from
        its start token on (a zero row is no injection), up to its stop token when `stops` is given (the
        reply itself then runs uninjected). The transcript before the earliest start is shared by every
        trial, so it runs once (subject.generate_shared).

        `readers[i]`: every rule that reads row i's reply, each giving its verdict on a reply's beginning
        or intro.OPEN (e.g. intro.affirmative_final); row i stops as soon as none is OPEN, as no later
        token could change a verdict (its kept reply ends there). None: the row runs to EOS or the limit.
        """
        from ..subject import From, Span, common_prefix, generate_shared
        from ..toolkit.steering import add_at_layer

        cut = min(common_prefix(ids), min(starts))
        start = torch.tensor(starts) - cut
        stop = None if stops is None else torch.tensor(stops) - cut

        def edits(rows: list[int]) -> list:
            r = torch.as_tensor(rows)
            out = []
            for layer, v in vectors.items():
                if bool(v[r].any()):  # a layer with no injected row in this batch needs no hook
                    out += add_at_layer(layer, v[r], 1.0, From(start[r]) if stop is None else Span(start[r], stop[r]))
            return out

        def settled(row: int, reply: list[int]) -> bool:
            rules = readers[row]
            if not rules:
                return False
            text = intro.stable_text(self.subject, reply)
            return all(rule(text) is not intro.OPEN for rule in rules)

        if cut > 0:
            gens = generate_shared(self.subject, ids[0][:cut], [x[cut:] for x in ids], self.spec.max_new_tokens,
                                   edits, self.spec.batch_size, desc, settled if readers is not None else None)
        else:
            gens = self.subject.generate(ids, self.spec.max_new_tokens, edits, batch_size=self.spec.batch_size,
                                         desc=desc)
        return [self.subject.decode(g) for g in gens]

    def readers(self, forms: list[list[str]], coherence: bool = False,
                also: list[list[str]] | None = None) -> list[list[Callable[[str], object]] | None]:
        """Per row, the rules grader's reads of its reply: affirmative, identifies (with `forms`, and with
        `also` where permuted labels grade the same reply) and, with `coherence`, coherent. None per row
        with a judge: it reads the whole reply."""
        if self.grader is not None:
            return [None] * len(forms)
        out: list[list[Callable[[str], object]] | None] = []
        for i, f in enumerate(forms):
            rules = [intro.affirmative_final, lambda t, f=f: intro.identifies_final(t, f)]
            if also is not None:
                rules.append(lambda t, f=also[i]: intro.identifies_final(t, f))
            if coherence:
                rules.append(intro.coherent_final)
            out.append(rules)
        return out

    def grade(self, replies: list[str], forms: list[list[str]]) -> intro.Graded:
        if self.grader is None:
            return intro.grade_rules(replies, forms)
        return intro.grade_judge(self.grader, replies, forms)

    def dev_grid(self, vecs: dict[int, torch.Tensor]) -> dict:
        """Every dev concept x candidate layer x strength in one generation; the frozen choice."""
        strengths = self.spec.inject.strengths
        cells = [(layer, s) for layer in self.layers for s in strengths]
        rows = [(c, k) for k in range(len(cells)) for c in range(len(self.dev))]
        base_ids, base_starts = self.trial_ids([self.spec.question] * len(self.dev), list(range(1, len(self.dev) + 1)))
        d = next(iter(vecs.values())).shape[-1]
        vectors = {layer: torch.zeros(len(rows), d) for layer in self.layers}
        for i, (c, k) in enumerate(rows):
            layer, s = cells[k]
            vectors[layer][i] = s * vecs[layer][self.dev[c]]
        forms = [self.forms[self.dev[c]] for c, _ in rows]
        replies = self.generate([base_ids[c] for c, _ in rows], [base_starts[c] for c, _ in rows], vectors, "dev grid",
                                readers=self.readers(forms, coherence=True))
        g = self.grade(replies, forms)
        shape = (len(self.layers), len(strengths), len(self.dev))
        grid = {name: getattr(g, name).reshape(shape).mean(-1) for name in ("identified", "affirmative", "coherent")}
        n_layers = self.subject.n_layers

        def key(k: int) -> tuple:
            li, si = divmod(k, len(strengths))
            layer, s = cells[k]
            # most detect-and-name, then coherence; ties go to ~2/3 depth and strength ~2 (the paper's best)
            return (grid["identified"][li, si], grid["coherent"][li, si], -abs((layer + 1) / n_layers - 0.66),
                    -abs(np.log2(s) - 1))

        best = max(range(len(cells)), key=key)
        return {"grid": grid, "cells": cells, "best": best, "layer": cells[best][0], "strength": cells[best][1],
                "examples": replies[:: max(1, len(replies) // 6)][:6]}

    def test_step(self, vecs: dict[int, torch.Tensor], layer: int, strength: float) -> dict:
        """Test trials and their controls, with the frozen layer and strength, in one generation."""
        test, n_t, q = list(self.test), len(self.test), self.spec.question
        v = vecs[layer][test] * strength
        rand = random_unit_directions(n_t, v.shape[-1], self.spec.seed) * v.norm(dim=-1, keepdim=True)
        nums = list(range(1, n_t + 1))
        words = [self.concepts[c]["word"] for c in test]
        n_ctl = self.spec.control_trials
        nq = len(self.questions)
        groups = {  # name: (questions, trial numbers, injected vectors or None)
            "injected": ([q] * n_t, nums, v),
            "random": ([q] * n_t, nums, rand),
            "word": ([f"Here is a word: {w}. {q}" for w in words], nums, None),
            "control": ([q] * n_ctl, list(range(1, n_ctl + 1)), None),
            "noq_injected": ([r["question"] for r in self.questions], list(range(1, nq + 1)),
                             vecs[layer][[test[i % n_t] for i in range(nq)]] * strength if nq else None),
            "noq_plain": ([r["question"] for r in self.questions], list(range(1, nq + 1)), None),
        }
        ids, starts, rows, spans = [], [], [], {}
        for name, (qs, ns, vec) in groups.items():
            x, s = self.trial_ids(qs, ns)
            spans[name] = slice(len(ids), len(ids) + len(x))
            ids += x
            starts += s
            rows.append(vec if vec is not None and len(x) else torch.zeros(len(x), v.shape[-1]))
        forms = [self.forms[c] for c in test]
        other = random_source_forms(forms, self.spec.seed)
        yes: list[Callable[[str], object]] = [intro.says_yes_final]
        reads = {"injected": self.readers(forms, coherence=True, also=other), "random": self.readers(forms),
                 "word": self.readers(forms), "control": self.readers([[]] * n_ctl),
                 "noq_injected": [yes] * nq, "noq_plain": [yes] * nq}  # what grades each group below
        replies = self.generate(ids, starts, {layer: torch.cat(rows)}, "test trials",
                                readers=[r for name in groups for r in reads[name]])
        out = {name: replies[sl] for name, sl in spans.items()}
        g = {"injected": self.grade(out["injected"], forms), "random": self.grade(out["random"], forms),
             "word": self.grade(out["word"], forms), "permuted": self.grade(out["injected"], other),
             "control": self.grade(out["control"], [[]] * n_ctl)}
        yes = {k: np.array([intro.says_yes(r) for r in out[k]], dtype=bool) for k in ("noq_injected", "noq_plain")}
        return {"graded": g, "yes": yes, "replies": out, "norms": vecs[layer][test].norm(dim=-1)}

    def measure(self) -> Outcome:
        vecs = self.concept_vectors()
        dev = self.dev_grid(vecs)
        layer, strength = dev["layer"], dev["strength"]
        t = self.test_step(vecs, layer, strength)
        norms = {la: float(v.norm(dim=-1).mean()) for la, v in vecs.items()}
        shared = [self._grid_plot(dev, "identified", "dev: detects and names"),
                  self._grid_plot(dev, "affirmative", "dev: claims a detection"),
                  self._grid_plot(dev, "coherent", "dev: coherent replies"), self._norm_table(norms)]
        claims = []
        for name, claim in self.spec.claims.items():
            stat, on = claim.expect.statistic, claim.on
            if stat == "yes_rate_rise":
                claims.append(self._yes_claim(name, claim, t))
            elif stat == "coherence":
                claims.append(self._rate_claim(name, claim, t["graded"]["injected"].coherent,
                                               "share of injected test replies that are coherent", None,
                                               [shared[2]]))
            elif on == "control_trials":
                claims.append(self._rate_claim(name, claim, t["graded"]["control"].affirmative,
                                               "share of uninjected trials claiming a detection (false alarms)",
                                               None, [self._bars(t["graded"])]))
            else:
                claims.append(self._detect_claim(name, claim, t, shared))
        settings = {
            "concepts": self.spec.concepts, "n_dev": len(self.dev), "n_test": len(self.test),
            "candidate_layers": self.layers, "strengths": list(self.spec.inject.strengths),
            "layer": layer, "strength": strength, "site": f"blocks.{layer}.hook_resid_pre",
            "vector_norm_at_layer": norms[layer], "strength_x_norm": strength * norms[layer],
            "injection_from": "the token before 'Trial n', through every generated token",
            "grader": "rules" if self.grader is None else {"judge": self.spec.grader.judge,
                                                           "hash": self.grader.info.hash},
            "rules": intro.RULES_SHOWN, "decoding": "greedy; uninjected trials differ only by their trial number",
            "control_trials": self.spec.control_trials, "n_no_questions": len(self.questions),
            "replies_end": "at EOS, at max_new_tokens, or where every rule grading the reply is settled (no later "
                           "token could change its verdict; the judge settles nothing but the yes rule)",
            "example_replies": {k: v[:3] for k, v in t["replies"].items()}, "dev_examples": dev["examples"],
        }
        return Outcome(settings, claims)

    def _grid_plot(self, dev: dict, what: str, title: str) -> HeatMap:
        grid = dev["grid"][what]
        li, si = divmod(dev["best"], len(self.spec.inject.strengths))
        return HeatMap(title=title, x_label="strength", y_label="layer", value_label="share of dev trials",
                       values=grid.tolist(), x_ticks=[f"{s:g}" for s in self.spec.inject.strengths],
                       y_ticks=[str(la) for la in self.layers], mark=(li, si))

    def _norm_table(self, norms: dict[int, float]) -> Table:
        strengths = self.spec.inject.strengths
        return Table(title="strength x mean concept-vector norm (the norm grows with depth)",
                     columns=["layer", "mean |v|", *[f"x{s:g}" for s in strengths]],
                     rows=[[la, round(nm, 3), *[round(s * nm, 2) for s in strengths]] for la, nm in norms.items()])

    def _rate_claim(self, name: str, claim: InjectionClaim, flags: np.ndarray, metric: str,
                    control: ControlResult | None, plots: list) -> ClaimResult:
        s = rate_summary(flags)
        return judge(name, claim, Measured(s["rate"], tuple(s["ci"]) if s["n"] else None, s["n"], metric,
                                           control=control, details={"k": s["k"]}, plots=plots))

    def _detect_claim(self, name: str, claim: InjectionClaim, t: dict, shared: list) -> ClaimResult:
        g = t["graded"]
        det = g["injected"].identified
        k, n = int(det.sum()), det.size
        arms = {"uninjected trials (claims a detection)": g["control"].affirmative,
                "random vector, same norm (names the concept)": g["random"].identified,
                "permuted concept labels (names another concept)": g["permuted"].identified}
        detail = {}
        for arm, flags in arms.items():
            kc, nc = int(flags.sum()), flags.size
            detail[arm] = {"rate": kc / nc, "ci": list(wilson_interval(kc, nc)), "k": kc, "n": nc,
                           "fisher_p": fisher_greater(k, n, kc, nc)}
        worst = max(detail, key=lambda a: detail[a]["fisher_p"])
        wk = g["word"].identified
        detail["word written in the prompt (report only)"] = {"rate": float(wk.mean()), "k": int(wk.sum()), "n": wk.size}
        p = detail[worst]["fisher_p"]
        control = ControlResult(name=f"every control, weakest: {worst}", effect=detail[worst]["rate"], p_value=p,
                                detail=detail)
        examples = Table(title="example replies (injected test trials)", columns=["concept", "reply", "graded"],
                         rows=[[self.concepts[c]["word"], r[:160], "named" if ok else "-"]
                               for c, r, ok in list(zip(self.test, t["replies"]["injected"], det))[:8]])
        lo, hi = wilson_interval(k, n)
        return judge(name, claim, Measured(k / n, (lo, hi), n, "share of injected test trials that detect and name "
                                           "the concept, detection first", control=control,
                                           beats_control=beats_control(p), details={"k": k},
                                           plots=[self._bars(g), *shared, examples]))

    @staticmethod
    def _bars(g: dict) -> Bars:
        labels = ["injected", "random vector", "word in prompt", "uninjected", "permuted labels"]
        parts = [g["injected"], g["random"], g["word"], g["control"], g["permuted"]]
        return Bars(title="test trials: claims a detection vs detects and names", value_label="share of trials",
                    labels=labels, before=[float(x.affirmative.mean()) for x in parts],
                    after=[float(x.identified.mean()) for x in parts],
                    before_label="claims a detection", after_label="detects and names")

    def _yes_claim(self, name: str, claim: InjectionClaim, t: dict) -> ClaimResult:
        inj, plain = t["yes"]["noq_injected"].astype(float), t["yes"]["noq_plain"].astype(float)
        if inj.size == 0:
            return judge(name, claim, Measured(None, None, 0, "yes-rate rise", untestable="no no-questions"))
        effect, lo, hi = paired_difference(inj, plain, seed=self.spec.seed)
        bars = Bars(title="'yes' on questions whose answer is no", value_label="share answering yes",
                    labels=["no-questions"], before=[float(plain.mean())], after=[float(inj.mean())],
                    before_label="not injected", after_label="injected")
        return judge(name, claim, Measured(
            effect, (lo, hi), inj.size, "'yes' rate on no-questions, injected minus not injected",
            details={"yes_injected": float(inj.mean()), "yes_plain": float(plain.mean())}, plots=[bars],
            untestable=untestable_reason("yes_rate_rise", plain.astype(bool), 0.05, "the uninjected no-questions")))


def random_source_forms(forms: list[list[str]], seed: int) -> list[list[str]]:
    """Each trial graded against another concept's words (permuted labels: chance identification)."""
    from ..toolkit.controls import random_source

    return [forms[j] for j in random_source(len(forms), seed)]


def fisher_greater(k: int, n: int, kc: int, nc: int) -> float:
    """One-sided Fisher exact p: is k/n above kc/nc?"""
    from scipy.stats import fisher_exact

    return float(fisher_exact([[k, n - k], [kc, nc - kc]], alternative="greater").pvalue)
