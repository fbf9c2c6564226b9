"""linear_relation: factual recall decodes the object from the subject's state through an affine map.

Hernandez et al. 2023 ("Linearity of Relation Decoding in Transformer Language Models"). For a relation
(country -> capital) and a prompt template ("The capital of {subject} is"), s is the residual stream after
layer l (resid_post) at the subject's last token and o the residual stream after the last decoder layer at the
prompt's last token: the final norm's INPUT, so the model's own logits are unembed(final_norm(o)). On `train`
examples, W = mean_i do/ds (the Jacobian at example i) and b = mean_i (o_i - J_i s_i); the linear relational
embedding is LRE(s) = beta W s + b.

- `faithfulness`: on held-out subjects, the share whose argmax of unembed(final_norm(LRE(s))) equals the
  model's own first answer token (its greedy next token). Held against three controls on the same
  subjects, all of which it must beat (paired permutation): the identity map (o = s), the bias alone
  (W = 0: the relation's most typical answer), and the map (W', b') estimated on another relation.
- `edit_success` (causality): the subject state is moved by ds = pinv_r(beta W) (o' - o), the low-rank
  pseudo-inverse of the map applied to the LRE outputs of another subject and of this one; success when
  the model's answer becomes the other subject's answer. Control: a random ds of the same norm.

Controls: faithfulness must beat all three of the identity map, the bias alone and another relation's map
(paired permutation over the held-out subjects; the hardest is reported); edit_success must beat a random edit
of the same norm.

Verdicts: pass when the Wilson interval of the share clears the threshold and the controls are beaten.
Inconclusive when the interval straddles the threshold; when the model gives the same first token for every
held-out subject (nothing to decode); or, for edits, when fewer than two subjects have another answer to edit
to.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator

from ..errors import DataError, SiteError
from ..report.record import ClaimResult, ControlResult, Table
from ..spec import ClaimName, ClaimSpec, DataFile, OneExpectation, ProbeSpec, RateThreshold
from ..spec.fields import Count, FiniteFloat, LayerSpec, Strict
from ..stats import wilson_interval
from ..subject import resolve_layer
from ..toolkit.controls import beats_control, paired_control, random_source, same_norm_vectors
from ..toolkit.prompts import answer_tokens, data_error, encode_rows, read_rows, split_indices
from .base import Measured, Outcome, ProbeKind, judge

SUBJECT = "{subject}"


class Relation(Strict):
    data: DataFile = Field(description='JSONL file, one {"subject": "France", "object": " Paris"} per line '
                                  '(an optional "prompt" replaces the template for that row)')
    template: str = Field(description='the prompt, with {subject} once: "The capital of {subject} is"')

    @field_validator("template")
    @classmethod
    def _one_subject(cls, v: str) -> str:
        if v.count(SUBJECT) != 1:
            raise ValueError(f"the template must hold {SUBJECT} exactly once, found {v.count(SUBJECT)}")
        if not v.replace(SUBJECT, "").strip():
            raise ValueError("the template holds nothing but {subject}: there is no relation to read")
        return v


class LinearRelationExpect(OneExpectation):
    faithfulness: RateThreshold | None = Field(
        None, description="share of held-out subjects whose LRE decodes to the model's own first answer token")
    edit_success: RateThreshold | None = Field(
        None, description="share of subject-state edits along the LRE's pseudo-inverse that change the answer "
                          "to the target subject's answer")


class LinearRelationClaim(ClaimSpec):
    expect: LinearRelationExpect
    relation: str = Field(description="the relation (a key of `relations`) the claim is about")
    against: str | None = Field(None, description="the other relation whose map is the control (default: the "
                                                  "first other relation)")
    rank: Count = Field(64, description="edit_success: rank of the pseudo-inverse (<= the model width)")


class LinearRelationSpec(ProbeSpec[LinearRelationClaim]):
    kind: Literal["linear_relation"]
    relations: dict[ClaimName, Relation] = Field(min_length=2, description="at least two relations: each is "
                                                 "the other's control")
    layer: LayerSpec = Field(description="the subject layer l (resid_post): int, negative, or fraction of depth; "
                                         "below the last layer")
    train: int = Field(8, ge=1, le=256, description="examples per relation that estimate W and b")
    beta: FiniteFloat = Field(1.0, gt=0, le=100, description="scale of W in LRE(s) = beta W s + b")
    max_test: Count = Field(200, description="at most this many held-out subjects per relation")


_LRE_ROWS = [("France", "Paris", "French"), ("Germany", "Berlin", "German"), ("Italy", "Rome", "Italian"),
             ("Spain", "Madrid", "Spanish"), ("Japan", "Tokyo", "Japanese"), ("Russia", "Moscow", "Russian"),
             ("Greece", "Athens", "Greek"), ("Poland", "Warsaw", "Polish"), ("Sweden", "Stockholm", "Swedish"),
             ("Turkey", "Ankara", "Turkish"), ("Egypt", "Cairo", "Arabic"), ("Peru", "Lima", "Spanish")]


class LinearRelation(ProbeKind[LinearRelationSpec]):
    Spec = LinearRelationSpec
    skeleton = """\
about: Factual recall decodes the object from the subject's state through one affine map per relation.
tags: [linear_relation]
relations:                       # at least two: each relation's map is the other's control
  country_capital: {data: data/lre_country_capital.jsonl, template: "The capital of {subject} is"}
  country_language: {data: data/lre_country_language.jsonl, template: "The official language of {subject} is"}
layer: 0.3                       # the subject state: resid_post of this layer (int, negative, fraction), below the last
train: 8                         # examples per relation whose Jacobians estimate W and b; the rest are held out
beta: 1.0                        # LRE(s) = beta W s + b
claims:
  capital_faithful:              # LRE decodes the model's own first answer token; beats identity, bias, other map
    relation: country_capital
    against: country_language
    expect: {faithfulness: {at_least: 0.5}}
  capital_edit_is_causal:        # s + pinv_rank(beta W)(LRE(s') - LRE(s)) makes the model give s' 's answer
    relation: country_capital
    rank: 64
    expect: {edit_success: {at_least: 0.3}}
"""
    skeleton_data = {
        "data/lre_country_capital.jsonl": [{"subject": c, "object": " " + cap} for c, cap, _ in _LRE_ROWS],
        "data/lre_country_language.jsonl": [{"subject": c, "object": " " + lang} for c, _, lang in _LRE_ROWS],
    }

    @classmethod
    def check_data(cls, probe) -> dict[str, list[dict]]:
        spec = probe.spec
        rows = {}
        for name, rel in spec.relations.items():
            rows[name] = read_rows(probe, rel.data, ("relations", name, "data"), ("subject", "object"), ("prompt",))
            path = probe.path.parent / rel.data
            if len(rows[name]) < spec.train + 2:
                raise DataError(f"{path}: {len(rows[name])} rows; train: {spec.train} needs at least "
                                f"{spec.train + 2} (two held out)")
            for i, row in enumerate(rows[name]):
                if "prompt" in row and row["subject"] not in row["prompt"]:
                    raise DataError(f"{path}:{i + 1}: field 'subject': {row['subject']!r} does not occur in "
                                    "field 'prompt'")
        for cname, claim in spec.claims.items():
            for key in ("relation", "against"):
                value = getattr(claim, key)
                if value is not None and value not in spec.relations:
                    raise probe.error(f"no relation named {value!r} (relations: {', '.join(spec.relations)})",
                                      ("claims", cname, key))
            if claim.against == claim.relation:
                raise probe.error("the control relation must differ from the claim's relation",
                                  ("claims", cname, "against"))
        return rows

    def setup(self) -> None:
        spec, subject = self.spec, self.subject
        self.rows = self.check_data(self.probe)
        layer = resolve_layer(spec.layer, subject.n_layers, ("layer",))
        if len(layer) != 1:
            raise self.probe.error("name one layer", ("layer",))
        if layer[0] >= subject.n_layers - 1:
            raise self.probe.error(f"layer {layer[0]} is the last layer of {subject.n_layers}: the subject state "
                                   "must sit below it (o is the last layer's output)", ("layer",))
        self.layer = layer[0]
        d = subject.sitemap.d_model
        for cname, claim in spec.claims.items():
            if claim.expect.statistic == "edit_success" and claim.rank > d:
                raise self.probe.error(f"rank {claim.rank} exceeds the model width {d}", ("claims", cname, "rank"))
        self.prompts = {name: self._encode(name) for name in spec.relations}

    def _encode(self, name: str) -> dict[str, Any]:
        """Token ids, the subject's last token per row, the seeded train / test split."""
        spec, rel, rows = self.spec, self.spec.relations[name], self.rows[name]
        path = self.probe.path.parent / rel.data
        texts = [r.get("prompt") or rel.template.replace(SUBJECT, r["subject"]) for r in rows]
        ids = encode_rows(self.subject, texts, path)
        # Where the subject ends: after the template's {subject}, or its first occurrence in a row's own prompt.
        ends = [(texts[i].find(r["subject"]) if "prompt" in r else rel.template.index(SUBJECT)) + len(r["subject"])
                for i, r in enumerate(rows)]
        pos = [self._subject_last(path, i, texts[i], rows[i]["subject"], ends[i], ids[i]) for i in range(len(rows))]
        for i, row in enumerate(rows):
            try:
                answer_tokens(self.subject, row["object"])
            except SiteError as e:
                raise data_error(path, i + 1, "object", e) from None
        n_test = min(len(rows) - spec.train, spec.max_test)
        split = split_indices(len(rows), {"train": spec.train, "test": n_test}, spec.seed)
        return {"ids": ids, "pos": pos, "texts": texts, "train": split["train"].tolist(),
                "test": split["test"].tolist()}

    def _subject_last(self, path, i: int, text: str, subj: str, end: int, ids: list[int]) -> int:
        head = self.subject.encode(text[:end])
        if ids[:len(head)] != head:
            raise DataError(f"{path}:{i + 1}: field 'subject': the tokenizer does not end a token where "
                            f"{subj!r} ends in {text!r}")
        return len(head) - 1

    # ---- measurement ----------------------------------------------------------------------------

    def _fit(self, name: str) -> dict[str, Any]:
        """W, b of a relation from its training rows (Hernandez et al. eqs. 4-5)."""
        from .._lazy import torch
        from ..subject import jacobians

        p = self.prompts[name]
        tr = p["train"]
        jac, st = jacobians(self.subject, [p["ids"][i] for i in tr], self.layer, [p["pos"][i] for i in tr],
                            batch_size=self.spec.batch_size)
        w = jac.double().mean(0)
        b = (st.o.double() - torch.einsum("nij,nj->ni", jac.double(), st.s.double())).mean(0)
        return {"W": w.float(), "b": b.float(), "jacobian_spread": float(
            (jac.double() - w).norm(dim=(1, 2)).mean() / max(float(w.norm()), 1e-12))}

    def _test_states(self, name: str):
        from ..subject import jacobian_states as states

        p = self.prompts[name]
        te = p["test"]
        return states(self.subject, [p["ids"][i] for i in te], self.layer, [p["pos"][i] for i in te],
                      self.spec.batch_size)

    def _decode(self, o) -> np.ndarray:
        return self.subject.unembed(o).argmax(-1).cpu().numpy()

    def measure(self) -> Outcome:
        spec = self.spec
        names = list(spec.relations)
        against = {c: claim.against or next(n for n in names if n != claim.relation)
                   for c, claim in spec.claims.items()}
        needed = sorted({claim.relation for claim in spec.claims.values()} | set(against.values()))
        fits = {n: self._fit(n) for n in needed}
        tests = {n: self._test_states(n) for n in {claim.relation for claim in spec.claims.values()}}
        claims = []
        for cname, claim in spec.claims.items():
            if claim.expect.statistic == "faithfulness":
                claims.append(self._faithful(cname, claim, fits, tests[claim.relation], against[cname]))
            else:
                claims.append(self._causal(cname, claim, fits[claim.relation], tests[claim.relation]))
        settings = {"layer": self.layer, "subject_state": f"resid_post of layer {self.layer} at the subject's last token",
                    "object_state": "the last decoder layer's output at the last token (the final norm's input)",
                    "beta": spec.beta, "train_per_relation": spec.train,
                    "held_out": {n: len(self.prompts[n]["test"]) for n in tests},
                    "jacobian_spread": {n: f["jacobian_spread"] for n, f in fits.items()}}
        return Outcome(settings, claims)

    def _faithful(self, cname: str, claim: LinearRelationClaim, fits: dict, st, other: str) -> ClaimResult:
        from .._lazy import torch

        beta, own, alt = self.spec.beta, fits[claim.relation], fits[other]
        answer = st.logits.argmax(-1).numpy()
        preds = {"LRE": self._decode(beta * st.s @ own["W"].T + own["b"]),
                 "identity map (o = s)": self._decode(st.s),
                 "bias alone (W = 0)": self._decode(own["b"].expand_as(st.s)),
                 f"map of relation '{other}'": self._decode(beta * st.s @ alt["W"].T + alt["b"])}
        hits = {k: (v == answer).astype(float) for k, v in preds.items()}
        mine = hits.pop("LRE")
        ps = {k: paired_control(mine, v, "at_least", self.spec.seed) for k, v in hits.items()}
        worst = max(ps, key=lambda k: (ps[k], hits[k].mean()))
        n = len(mine)
        distinct = len(set(answer.tolist()))
        untestable = (f"untestable: the model gives the same first token on all {n} held-out subjects, so a map "
                      "cannot be told from a constant" if distinct < 2 else None)
        control = ControlResult(name=f"{worst} (the hardest of {len(ps)} controls)", effect=float(hits[worst].mean()),
                                p_value=ps[worst], detail={k: {"faithfulness": float(v.mean()), "p_value": ps[k]}
                                                          for k, v in hits.items()})
        bars = Table(title=f"faithfulness on {n} held-out subjects ({claim.relation}, layer {self.layer})",
                     columns=["map", "faithfulness", "p (LRE beats it)"],
                     rows=[["LRE (beta W s + b)", round(float(mine.mean()), 4), "—"]]
                     + [[k, round(float(v.mean()), 4), round(ps[k], 4)] for k, v in hits.items()])
        rows = self._examples(claim.relation, answer, preds["LRE"])
        objects = self._object_hits(claim.relation, answer)
        m = Measured(float(mine.mean()), wilson_interval(int(mine.sum()), n), n,
                     "share of held-out subjects whose LRE(s) = beta W s + b decodes (final norm, unembedding) to "
                     "the model's own first answer token", control=control,
                     beats_control=all(beats_control(p) for p in ps.values()), untestable=untestable,
                     details={"relation": claim.relation, "control_relation": other, "distinct_answers": distinct,
                              "model_answer_is_object": objects, "W_norm": float(torch.linalg.norm(own["W"]))},
                     plots=[bars, rows])
        return judge(cname, claim, m)

    def _examples(self, name: str, answer: np.ndarray, pred: np.ndarray) -> Table:
        p, dec = self.prompts[name], self.subject.decode
        return Table(title="examples (held out)", columns=["prompt", "model's answer", "LRE decodes"],
                     rows=[[p["texts"][i], dec([int(answer[k])]), dec([int(pred[k])])]
                           for k, i in enumerate(p["test"][:8])])

    def _object_hits(self, name: str, answer: np.ndarray) -> float:
        """Share of held-out rows whose model answer is the data's object (its first token): shown only."""
        rows, p = self.rows[name], self.prompts[name]
        firsts = [self.subject.token_id(rows[i]["object"])[0] for i in p["test"]]
        return float(np.mean([a == f for a, f in zip(answer.tolist(), firsts)]))

    def _causal(self, cname: str, claim: LinearRelationClaim, fit: dict, st) -> ClaimResult:
        from .._lazy import torch
        from ..subject import edited_logits

        p, beta = self.prompts[claim.relation], self.spec.beta
        answer = st.logits.argmax(-1).numpy()
        n = len(answer)
        target = self._targets(answer)
        keep = np.array([t >= 0 for t in target])
        u, sv, vh = torch.linalg.svd(beta * fit["W"].double())
        r = min(claim.rank, int((sv > sv[0] * 1e-6).sum()))
        pinv = vh[:r].T @ torch.diag(1 / sv[:r]) @ u[:, :r].T
        src = torch.as_tensor(np.where(keep, target, 0))
        lre = beta * st.s.double() @ fit["W"].double().T + fit["b"].double()
        delta = ((lre[src] - lre) @ pinv.T).float()
        rand = torch.stack([same_norm_vectors(1, delta[i], self.spec.seed + i)[0] for i in range(n)])
        te = p["test"]
        ids, pos = [p["ids"][i] for i in te], [p["pos"][i] for i in te]
        both = edited_logits(self.subject, ids + ids, self.layer, pos + pos, torch.cat([delta, rand]),
                             self.spec.batch_size).argmax(-1).numpy()
        want = answer[src.numpy()]
        mine = (both[:n] == want)[keep].astype(float)
        theirs = (both[n:] == want)[keep].astype(float)
        k = len(mine)
        untestable = None if k >= 2 else "untestable: fewer than two held-out subjects have another answer to edit to"
        pv = paired_control(mine, theirs, "at_least", self.spec.seed) if k >= 2 else 1.0
        m = Measured(float(mine.mean()) if k else None, wilson_interval(int(mine.sum()), k) if k else None, k,
                     f"share of edits s + pinv_{r}(beta W)(LRE(s') - LRE(s)) at layer {self.layer} that make the "
                     "model give the other subject's answer",
                     control=ControlResult(name="a random edit of the same norm", effect=float(theirs.mean()) if k else None,
                                           p_value=pv),
                     beats_control=beats_control(pv), untestable=untestable,
                     details={"relation": claim.relation, "rank": r, "mean_edit_norm": float(delta.norm(dim=-1).mean())})
        return judge(cname, claim, m)

    def _targets(self, answer: np.ndarray) -> list[int]:
        """For each held-out subject, another one with a different model answer (-1 when none exists)."""
        n = len(answer)
        if n < 2:
            return [-1] * n
        first = random_source(n, self.spec.seed)
        out = []
        for i in range(n):
            j = next((int((first[i] + k) % n) for k in range(n)
                      if (first[i] + k) % n != i and answer[(first[i] + k) % n] != answer[i]), -1)
            out.append(j)
        return out
