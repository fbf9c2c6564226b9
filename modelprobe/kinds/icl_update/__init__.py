"""icl_update: in-context learning acts as a rank-1 update of the MLP input weights (Dherin et al. 2025).

For the query token, a context's effect on a block equals W -> W + a bᵀ on every matrix that reads the
MLP input, plus a residual bias where the skip connection carries the context. Rank 1 is a tautology,
so three claims are tested:

- identity (machinery check, not a finding): updates built layer by layer on the already-updated
  no-context run reproduce the with-context logits;
- converges: adding the examples one by one, the steps ‖ΔW_i − ΔW_{i−1}‖ shrink (Spearman ρ against
  i per prompt, i >= 2), more clearly than with shuffled-label contexts;
- transfers: the update from one context, applied to another query without context, recovers part
  of the context's gain in the answer's log-probability, more than another task's update does.

Controls: converges is held against the same contexts with shuffled labels (each example given another's
output): its Spearman rho must be lower (paired permutation) and the shuffled contexts must not meet the
threshold themselves. Transfers is held against another task's update (or a random rank-1 update of the same
norm). The identity is a check of the machinery and has no control.

Verdicts: pass when the interval clears the threshold and the control is beaten. Inconclusive when the
interval straddles the threshold; when the block does not fit the theorem (parallel attention and MLP, mixture
of experts: "not applicable"); when the identity's error is within the rounding of the run's dtype; or, for
transfers, when the context does not raise the answer's log-probability at all.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ...spec import ClaimSpec, DataFile, IclFormat, OneExpectation, ProbeSpec, Threshold
from ...spec.fields import CorrelationThreshold, LayerSpec
from ...subject import resolve_layer
from ...toolkit.prompts import read_rows
from ..base import Measured, Outcome, ProbeKind, judge

Control = Literal["shuffled_labels", "other_task", "random_rank1"]
CONTROLS = {"spearman_rho": ("shuffled_labels",), "gain_recovered": ("other_task", "random_rank1"),
            "max_rel_error": ()}


class IclExpect(OneExpectation):
    max_rel_error: Threshold | None = Field(None, description="identity: largest relative error of the "
                                            "updated no-context run against the with-context run")
    spearman_rho: CorrelationThreshold | None = Field(None, description="converges: mean Spearman rho of the update "
                                           "steps ‖ΔW_i − ΔW_{i−1}‖ against i (negative: they shrink)")
    gain_recovered: Threshold | None = Field(None, description="transfers: share of the context's gain in "
                                             "answer log-probability recovered by another query's update")

    @model_validator(mode="after")
    def _ranges(self) -> IclExpect:
        th = self.threshold
        if self.statistic == "spearman_rho" and not -1 <= th.value <= 1:
            raise ValueError(f"spearman_rho threshold {th.value} must lie in [-1, 1]")
        if self.statistic == "max_rel_error" and not 0 < th.value < 1:
            raise ValueError(f"max_rel_error threshold {th.value} must lie in (0, 1)")
        if self.statistic == "gain_recovered" and not -10 <= th.value <= 10:
            raise ValueError(f"gain_recovered threshold {th.value} must lie in [-10, 10]")
        return self


class IclClaim(ClaimSpec):
    expect: IclExpect
    layers: LayerSpec | None = Field(None, description="identity: layers whose residual error counts "
                                     "(default all; the logits always count)")
    layer: LayerSpec | None = Field(None, description="converges: one layer; transfers: one or more "
                                    "(int, negative, fraction of depth, list, 'a:b'); default 0.5")
    control: Control | None = Field(None, description="converges: shuffled_labels; transfers: other_task "
                                    "(default) or random_rank1")

    @model_validator(mode="after")
    def _fits(self) -> IclClaim:
        stat = self.expect.statistic
        if stat == "max_rel_error" and self.layer is not None:
            raise ValueError("identity (max_rel_error) takes 'layers', not 'layer'")
        if stat != "max_rel_error" and self.layers is not None:
            raise ValueError(f"{stat} takes 'layer', not 'layers'")
        if self.control is not None and self.control not in CONTROLS[stat]:
            allowed = ", ".join(CONTROLS[stat]) or "none"
            raise ValueError(f"control '{self.control}' does not fit {stat} (allowed: {allowed})")
        return self


class IclUpdateSpec(ProbeSpec[IclClaim]):
    kind: Literal["icl_update"]
    task: DataFile = Field(description='JSONL task file, one {"input": ..., "output": ...} per line')
    control_task: DataFile | None = Field(None, description="another task's JSONL file, for control: other_task")
    format: IclFormat
    shots: int = Field(8, ge=3, le=64, description="context examples per prompt")
    prompts: int = Field(64, ge=8, le=4096, description="(context, query) pairs drawn with the seed")


def _control(claim: IclClaim) -> str | None:
    return claim.control or (CONTROLS[claim.expect.statistic] or (None,))[0]


class IclUpdate(ProbeKind[IclUpdateSpec]):
    Spec = IclUpdateSpec
    skeleton = """\
about: In-context examples act on the query token as converging rank-1 updates of the MLP weights.
tags: [icl_update]
task: data/icl_antonyms.jsonl            # JSONL, one {"input": "hot", "output": " cold"} per line
control_task: data/icl_past_tense.jsonl  # another task (for control: other_task)
format: {example: "Q: {input}\\nA:{output}\\n", query: "Q: {input}\\nA:"}
shots: 8                                 # context examples per prompt (the task needs shots + 2 rows)
prompts: 32                              # (context, query) pairs drawn with the seed
claims:
  identity:                              # a check of the hooks (exact by construction), not a finding
    layers: all
    expect: {max_rel_error: {at_most: 1.0e-4}}
  converges:                             # rho(i, ||dW_i - dW_(i-1)||), i >= 2, per prompt; mean + bootstrap CI
    layer: 0.5                           # one layer: int, negative from the end, or a fraction of depth
    expect: {spearman_rho: {at_most: -0.5}}
    control: shuffled_labels
  transfers:                             # another query, no context, with this context's updates
    layer: 0.5                           # one or more layers
    expect: {gain_recovered: {at_least: 0.3}}
    control: other_task                  # or random_rank1
"""
    # The skeleton draws 8 shots + 2 queries per prompt: each task file needs 10 rows.
    skeleton_data = {
        "data/icl_antonyms.jsonl": [{"input": a, "output": " " + b} for a, b in (
            ("hot", "cold"), ("big", "small"), ("up", "down"), ("fast", "slow"), ("light", "dark"),
            ("old", "new"), ("wet", "dry"), ("rich", "poor"), ("early", "late"), ("open", "closed"))],
        "data/icl_past_tense.jsonl": [{"input": a, "output": " " + b} for a, b in (
            ("walk", "walked"), ("jump", "jumped"), ("play", "played"), ("talk", "talked"), ("look", "looked"),
            ("call", "called"), ("ask", "asked"), ("work", "worked"), ("help", "helped"), ("move", "moved"))],
    }

    @classmethod
    def check_data(cls, probe) -> dict[str, list[dict]]:
        spec = probe.spec
        rows = {"task": read_rows(probe, spec.task, ("task",), ("input", "output"))}
        transfers = any(c.expect.statistic == "gain_recovered" for c in spec.claims.values())
        need = spec.shots + (2 if transfers else 1)
        if len(rows["task"]) < need:
            why = "shots + 2: the examples, a query and an unseen query" if transfers else "shots + 1"
            raise probe.error(f"the task has {len(rows['task'])} items; {spec.shots} shots need at least {need} "
                              f"({why})", ("task",))
        for name, claim in spec.claims.items():
            if _control(claim) == "other_task" and not spec.control_task:
                raise probe.error("control other_task needs 'control_task' (another task's JSONL file)",
                                  ("claims", name, "control"))
        if spec.control_task:
            rows["control"] = read_rows(probe, spec.control_task, ("control_task",), ("input", "output"))
            if len(rows["control"]) < spec.shots + 1:
                raise probe.error(f"the control task has {len(rows['control'])} items; it needs at least "
                                  f"shots + 1 = {spec.shots + 1}", ("control_task",))
        return rows

    def setup(self) -> None:
        from ...subject import rank1_not_applicable as not_applicable
        from .measure import Prepared

        spec, subject = self.spec, self.subject
        self.rows = self.check_data(self.probe)
        self.layers: dict[str, list[int]] = {}
        for name, claim in spec.claims.items():
            stat = claim.expect.statistic
            key, default = ("layers", "all") if stat == "max_rel_error" else ("layer", 0.5)
            given = getattr(claim, key)
            layers = resolve_layer(default if given is None else given, subject.n_layers, ("claims", name, key))
            if stat == "spearman_rho" and len(layers) != 1:
                raise self.probe.error(f"converges reads one layer, got {len(layers)}", ("claims", name, key))
            self.layers[name] = layers
        self.reason = not_applicable(subject.sitemap)
        self.prepared = Prepared.build(subject, spec, self.rows, self.probe.path.parent / spec.task)

    def measure(self) -> Outcome:
        from . import measure as m

        spec, prep = self.spec, self.prepared
        settings = {"task": spec.task, "control_task": spec.control_task, "shots": spec.shots,
                    "prompts": spec.prompts, "position": "last (the query token)", **prep.settings()}
        if self.reason:
            claims = [judge(name, c, Measured(None, None, 0, c.expect.statistic, untestable=self.reason))
                      for name, c in spec.claims.items()]
            return Outcome({**settings, "not_applicable": self.reason}, claims)
        runs = m.Runs(self.subject, prep, spec, self.layers)
        claims = []
        for name, claim in spec.claims.items():
            stat = claim.expect.statistic
            if stat == "max_rel_error":
                measured = m.identity_claim(runs, self.layers[name], claim.expect.threshold)
            elif stat == "spearman_rho":
                measured = m.converges_claim(runs, self.layers[name][0], claim.expect.threshold, spec.seed)
            else:
                measured = m.transfers_claim(runs, self.layers[name], _control(claim), spec.seed,
                                              claim.expect.threshold.comparison)
            claims.append(judge(name, claim, Measured(**measured)))
        return Outcome({**settings, **runs.counts}, claims)
