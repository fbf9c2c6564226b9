"""circuit: named components are necessary and sufficient for a task, and beat random circuits.

Per prompt the metric m is read at the last position (logit difference answer − wrong, the answer's
log-probability, or top-1 accuracy). m(M) is the full model, m(∅) the model with every component
in `scope` ablated, m(C) the model with everything in scope except the circuit ablated
(sufficiency) or only the circuit ablated (necessity). Faithfulness f = (m(C) − m(∅)) / (m(M) − m(∅))
with a paired-bootstrap interval over prompts; random circuits of the same size (same layers where
possible) give the null the circuit must beat.

How the work is organised (the expensive part is many ablated forwards):
- every ablation set is a boolean vector over the scope's units (heads, whole MLPs or neurons);
  many sets run in one batch, each row with its own unit mask (prompts repeated across rows);
- two residual streams are cached per prompt, the clean model and the model with the whole scope
  ablated; a row equals the first below its first ablated unit and the second below its first kept
  unit, and resumes (`subject.resumable`) from whichever it follows longer, so the layers below the
  first one it changes are never recomputed;
- from there rows run layer by layer, each layer once per distinct (prompt, units ablated up to it): random
  circuits with the same head in the circuit's lowest layer share every layer up to the next one, across
  sequential null steps too (`AblationRunner.prime` announces them);
- prompts are batched by token length (and `group_by` value), so a batch has no padding and one
  set of per-position means.

Controls: sufficiency and necessity are held against random circuits of the same size and kinds, drawn
outside the claimed circuit (same layers where enough others exist): the empirical p-value of the circuit's
faithfulness among theirs must be <= 0.05 (sequential draws; `random_circuits: 0` turns the control off).
Minimality has no control: it asks that removing any one component lowers sufficiency.

Verdicts: pass when the paired-bootstrap interval of the faithfulness (or of the smallest drop, for
minimality) clears the threshold and the circuit beats the random ones; fail when it misses or random circuits
do as well. Inconclusive when the interval straddles the threshold; when m(M) = m(∅), so faithfulness is
undefined; or when no random circuit of that size exists outside the circuit.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import Field, field_validator, model_validator

from ...errors import SiteError
from ...report.record import Bars, ClaimResult, ControlResult, NullHistogram
from ...spec import ClaimSpec, DataFile, OneExpectation, ProbeSpec, Strict, Threshold
from ...spec.fields import LayerSpec
from ...stats import empirical_pvalue, paired_bootstrap
from ...subject import resolve_sites
from ...toolkit.ablation_task import parse_rows, prepare_task
from ...toolkit.controls import (
    ALPHA,
    MIN_EMPIRICAL_NULL,
    beats_control,
    null_settled,
    random_circuits,
    sequential_detail,
)
from ...toolkit.metrics import faithfulness
from ...toolkit.prompts import read_rows
from ..base import Measured, Outcome, ProbeKind, judge

if TYPE_CHECKING:
    from ...subject import AblationScope as Scope
    from ...subject import AblationUnit as Unit

Metric = Literal["logit_diff", "logprob", "accuracy"]
Ablation = Literal["mean", "mean_all_positions", "zero", "resample"]


# ---- the probe file ---------------------------------------------------------------------------

# Random circuits per sequential step: small enough to stop early, large enough to fill a forward.
NULL_STEP = 8

class CircuitComponent(Strict):
    """One entry of the circuit: attention heads, a whole sublayer, or MLP neurons of one layer."""

    layer: int = Field(description="decoder layer (negative counts from the end)")
    component: Literal["attn.z", "attn_out", "mlp_out", "mlp.post"] = Field(
        "attn.z", description="attn.z with `head` (no head: every head of the layer); attn_out: the whole "
        "attention sublayer; mlp_out: the whole MLP; mlp.post with `neuron`: MLP neurons")
    head: int | list[int] | None = Field(None, description="attention head(s), for attn.z")
    neuron: int | list[int] | None = Field(None, description="MLP neuron(s), for mlp.post")


class NeuronScope(Strict):
    neurons: LayerSpec = Field(description="the MLP neurons of these layers are the scope")


class CircuitExpect(OneExpectation):
    faithfulness: Threshold | None = Field(
        None, description="(m(C) − m(∅)) / (m(M) − m(∅)); for sufficiency and necessity")
    min_drop: Threshold | None = Field(
        None, description="for minimality: the smallest loss of sufficiency faithfulness when one component "
        "is removed from the circuit")


class CircuitClaim(ClaimSpec):
    test: Literal["sufficiency", "necessity", "minimality"] = Field(
        description="sufficiency: ablate everything in scope except the circuit; necessity: ablate only the "
        "circuit; minimality: every component matters (removing it lowers sufficiency)")
    expect: CircuitExpect

    @model_validator(mode="after")
    def _statistic_fits_test(self) -> CircuitClaim:
        wanted = "min_drop" if self.test == "minimality" else "faithfulness"
        if self.expect.statistic != wanted:
            raise ValueError(f"test '{self.test}' is judged on '{wanted}', not '{self.expect.statistic}'")
        return self


class CircuitControls(Strict):
    random_circuits: int = Field(100, ge=0, description="random circuits of the same size, same layers "
                                 "where possible; 0 turns the control off")
    sequential: bool = Field(True, description="draw the random circuits 8 at a time and stop once the "
                             "undrawn ones cannot change whether p <= alpha (the verdict equals the full "
                             "count's; the number drawn is reported); false draws all random_circuits")
    prompts: int | None = Field(None, ge=2, description="measure the random circuits (and, for the "
                                "comparison, the circuit) on a seeded sample of this many prompts")

    @field_validator("random_circuits")
    @classmethod
    def _beatable(cls, n: int) -> int:
        if 0 < n < MIN_EMPIRICAL_NULL:
            raise ValueError(f"with {n} random circuits the empirical p-value is at least 1/{n + 1} = "
                             f"{1 / (n + 1):.3g} > {ALPHA}: no circuit could beat the control; use at least "
                             f"{MIN_EMPIRICAL_NULL} (or 0 to turn the control off)")
        return n


class CircuitSpec(ProbeSpec[CircuitClaim]):
    kind: Literal["circuit"]
    prompts: DataFile = Field(description='JSONL file: {"prompt": ..., "answer": " Mary", "wrong": " John"}')
    reference: DataFile | None = Field(None, description="JSONL file whose activations replace ablated components "
                                  "(means, or resampled prompts); not needed for zero ablation")
    rows: str | None = Field(None, description="use only these lines of the prompt file, a 0-based slice "
                             "'start:stop' (e.g. the held-out part of a file used for discovery)")
    metric: Metric = Field("logit_diff", description="logit_diff: logit(answer) − logit(wrong); logprob: "
                           "log-probability of the answer; accuracy: top-1 == answer")
    ablation: Ablation = Field(
        "mean", description="mean: per-position means of the reference prompts with the same token length "
        "(and group_by value); mean_all_positions: one mean over all reference tokens; zero; resample: the "
        "activations of one reference prompt of the same length (the partner line when the files pair up)")
    group_by: str | None = Field(None, description="a field of both files (e.g. template): per-position means "
                                 "are taken within reference prompts with the same value")
    scope: Literal["attention_heads", "heads_and_mlps"] | NeuronScope = Field(
        "attention_heads", description="what 'everything else' means: every attention head; every head and "
        "every whole MLP; or {neurons: layers}, the MLP neurons of those layers")
    circuit: list[CircuitComponent] = Field(min_length=1)
    controls: CircuitControls = Field(default_factory=CircuitControls)

    @model_validator(mode="after")
    def _reference_when_needed(self) -> CircuitSpec:
        if self.ablation != "zero" and self.reference is None:
            raise ValueError(f"ablation '{self.ablation}' needs a 'reference' file")
        if self.group_by is not None and self.ablation not in ("mean", "resample"):
            raise ValueError("group_by applies to per-position ablations (mean, resample) only")
        return self


# ---- the circuit's units ----------------------------------------------------------------------

def circuit_units(entries: Sequence[CircuitComponent], scope: Scope, sitemap: Any,
                  loc: tuple = ("circuit",)) -> list[Unit]:
    """Expand the circuit's entries into scope units; SiteError (located) for anything off-model."""
    from ...subject import AblationUnit as Unit

    kinds = {u.kind for u in scope.units}
    units: list[Unit] = []
    for i, e in enumerate(entries):
        here = (*loc, i)
        site_spec = {"layer": e.layer, "component": "mlp.post" if e.component == "mlp_out" else e.component,
                     "head": e.head, "neuron": e.neuron}
        if e.component == "attn_out":
            site_spec["component"] = "attn.z"
        if e.head is not None and e.component != "attn.z":
            raise SiteError("'head' only applies to component attn.z", (*here, "head"))
        if e.neuron is not None and e.component != "mlp.post":
            raise SiteError("'neuron' only applies to component mlp.post", (*here, "neuron"))
        site = resolve_sites(site_spec, sitemap, here)[0]
        if site.component == "attn.z":
            new = [Unit(site.layer, "head", h) for h in (site.heads or range(sitemap.n_heads))]
        elif not kinds & {"mlp", "neuron"}:
            raise SiteError(f"an MLP is not in the scope ({scope.description}); use scope: heads_and_mlps, "
                            "or scope: {neurons: <layers>} for neurons", (*here, "component"))
        elif "mlp" in kinds:
            if site.neurons is not None:
                raise SiteError("scope heads_and_mlps ablates whole MLPs; name single neurons with "
                                "scope: {neurons: <layers>}", (*here, "neuron"))
            new = [Unit(site.layer, "mlp")]
        else:
            new = [Unit(site.layer, "neuron", n) for n in (site.neurons or range(sitemap.d_mlp))]
        for u in new:
            if u not in scope.index:
                raise SiteError(f"{u.name} is not in the scope ({scope.description}); widen 'scope' or drop it",
                                (*here, "component"))
            if u in units:
                raise SiteError(f"{u.name} is listed twice in the circuit", here)
            units.append(u)
    return units



# ---- the kind -------------------------------------------------------------------------------

class Circuit(ProbeKind[CircuitSpec]):
    Spec = CircuitSpec
    skeleton = """\
about: These attention heads carry indirect-object identification.
tags: [circuit]
prompts: data/ioi.jsonl          # {"prompt": ..., "answer": " Mary", "wrong": " John"}: one-token answers
reference: data/ioi_abc.jsonl    # whose means replace ablated components (same token lengths as the prompts)
metric: logit_diff               # or logprob (answer only), accuracy (top-1 == answer)
ablation: mean                   # mean (per position), mean_all_positions, zero, resample
scope: attention_heads           # what "everything else" means: attention_heads, heads_and_mlps, {neurons: [layers]}
circuit:                         # `modelprobe discover circuit` proposes one and writes this file
  - {layer: 20, component: attn.z, head: 0}
  - {layer: 23, component: attn.z, head: [3]}
claims:
  sufficient:
    test: sufficiency            # ablate everything in scope except the circuit
    expect: {faithfulness: {at_least: 0.8}}
  necessary:
    test: necessity              # ablate only the circuit
    expect: {faithfulness: {at_most: 0.2}}
controls:
  random_circuits: 100           # same size, same layers where possible
"""
    skeleton_data = {
        "data/ioi.jsonl": [{"prompt": "When Mary and John went to the store, John gave a drink to",
                            "answer": " Mary", "wrong": " John"}],
        "data/ioi_abc.jsonl": [{"prompt": "When Mary and John went to the store, Tom gave a drink to",
                                "answer": " Mary", "wrong": " John"}],
    }

    @classmethod
    def check_data(cls, probe: Any) -> tuple[list[dict], list[dict] | None]:
        spec = probe.spec
        required = ("prompt", "answer") + (("wrong",) if spec.metric == "logit_diff" else ())
        prompt_rows = read_rows(probe, spec.prompts, ("prompts",), required, optional_text=("wrong",))
        ref_rows = read_rows(probe, spec.reference, ("reference",)) if spec.reference else None
        return prompt_rows, ref_rows

    def setup(self) -> None:
        from ...subject import AblationRunner, build_scope  # the engine: torch, at setup only

        spec, subject, probe = self.spec, self.subject, self.probe
        prompt_rows, ref_rows = self.check_data(probe)
        base = probe.path.parent
        self.ref_path = base / spec.reference if spec.reference else None
        try:
            parse_rows(spec.rows, len(prompt_rows))
        except ValueError as e:
            raise probe.error(str(e), ("rows",)) from None
        self.task = prepare_task(subject, prompt_rows, base / spec.prompts, ref_rows, self.ref_path,
                                 spec.metric, spec.ablation, spec.group_by, spec.rows, spec.seed)
        self.scope = build_scope(spec.scope, subject.sitemap)
        self.circuit = circuit_units(spec.circuit, self.scope, subject.sitemap)
        if len(self.circuit) == len(self.scope):
            raise probe.error("the circuit is the whole scope: there is nothing else to ablate", ("circuit",))
        n = len(self.task.prompt_ids)
        if spec.controls.prompts is not None and spec.controls.prompts > n:
            raise probe.error(f"controls.prompts is {spec.controls.prompts}, but only {n} prompts are used",
                              ("controls", "prompts"))
        self.runner = AblationRunner(subject, self.task, self.scope, self.task.row_metric(spec.metric),
                                     spec.ablation, spec.group_by, spec.batch_size)

    def measure(self) -> Outcome:
        spec, scope, runner = self.spec, self.scope, self.runner
        tests = {c.test for c in spec.claims.values()}
        circ = scope.vector(self.circuit)
        everything = np.ones(len(scope), dtype=bool)
        configs = {"empty": everything, "circuit_only": everything & ~circ, "circuit_ablated": circ}
        for u in self.circuit:
            configs[("alone", u)] = scope.vector([u])
            if "minimality" in tests:
                configs[("without", u)] = everything & ~(circ & ~scope.vector([u]))
        names = list(configs)
        main = np.stack([configs[k] for k in names])
        n = len(self.task.prompt_ids)
        control_rows = (np.sort(np.random.default_rng(spec.seed).choice(n, spec.controls.prompts, replace=False))
                        if spec.controls.prompts else np.arange(n))
        null, matched = random_circuits(self.circuit, scope, spec.controls.random_circuits, spec.seed)
        wanted = [t for t in ("sufficiency", "necessity") if t in tests] if len(null) else []
        null_configs = np.concatenate([everything & ~null if t == "sufficiency" else null for t in wanted]) \
            if wanted else np.zeros((0, len(scope)), dtype=bool)
        runner.prime(main, null_configs)
        got = dict(zip(names, runner.run(main, desc="circuit ablations")))
        m_full = runner.full_model()
        null_f = self._null(runner, null, everything, wanted, got, m_full, control_rows)
        common = self._common(got, m_full)
        settings = {
            **self.task.settings, **runner.describe(), "metric": spec.metric, "position": "last",
            "reference": spec.reference, "group_by": spec.group_by, "scope": scope.description,
            "scope_units": len(scope), "circuit": [u.name for u in self.circuit], "circuit_size": len(self.circuit),
            "random_circuits": max([len(v) for v in null_f.values()], default=int(len(null))),
            "random_circuits_planned": int(len(null)), "random_circuits_layer_matched": matched,
            "control_prompts": int(len(control_rows)), "seed": spec.seed,
            "forward_rows": runner.rows_run, "layer_rows_computed": runner.layers_run,
        }
        if any(c.component == "attn_out" for c in spec.circuit):
            settings["attn_out"] = ("every head of attn.z at that layer: the attention output before its output "
                                    "projection (a bias of the projection, if the model has one, is not ablated)")
        claims = []
        for name, claim in spec.claims.items():
            if claim.test == "minimality":
                claims.append(self._minimality(name, claim, got, m_full, common))
            else:
                key = "circuit_only" if claim.test == "sufficiency" else "circuit_ablated"
                claims.append(self._faithfulness(name, claim, got[key], got["empty"], m_full, common,
                                                 null_f.get(claim.test, np.zeros(0)), control_rows, matched))
        return Outcome(settings, claims)

    def _common(self, got: dict, m_full: np.ndarray) -> dict[str, Any]:
        """Numbers every claim of the probe reports: m(M), m(∅) and each component ablated alone."""
        denom = float(m_full.mean() - got["empty"].mean())
        per_component = []
        for u in self.circuit:
            alone = got[("alone", u)]
            per_component.append({
                "component": u.name, "metric_when_ablated_alone": float(alone.mean()),
                "normalized_effect": float((m_full.mean() - alone.mean()) / denom) if denom else None})
        return {
            "m_full": float(m_full.mean()), "m_empty": float(got["empty"].mean()),
            "full_model_share_metric_positive": float((m_full > 0).mean()) if self.spec.metric != "accuracy" else None,
            "per_component": per_component,
        }

    def _component_bars(self, common: dict[str, Any]) -> Bars:
        comps = common["per_component"]
        return Bars(title=f"{self.spec.metric} with one component ablated",
                    value_label=f"mean {self.spec.metric}", labels=[c["component"] for c in comps],
                    before=[common["m_full"]] * len(comps), after=[c["metric_when_ablated_alone"] for c in comps],
                    before_label="full model", after_label="ablated alone")

    def _null(self, runner: Any, null: np.ndarray, everything: np.ndarray, wanted: list[str], got: dict,
              m_full: np.ndarray, control_rows: np.ndarray) -> dict[str, np.ndarray]:
        """Random-circuit faithfulness per test, drawn NULL_STEP circuits at a time until every test's
        answer equals the full count's (toolkit.controls.null_settled; a settled test draws no more), or all
        at once with `sequential: false`."""
        if not wanted:
            return {}
        e, m = got["empty"][control_rows], m_full[control_rows]
        observed = {t: float(faithfulness(got["circuit_only" if t == "sufficiency" else "circuit_ablated"][control_rows],
                                          e, m)) for t in wanted}
        step = NULL_STEP if self.spec.controls.sequential else len(null)
        out: dict[str, list[np.ndarray]] = {t: [] for t in wanted}
        open_ = list(wanted)  # the tests whose answer more random circuits could still change
        for start in range(0, len(null), max(1, step)):
            chunk = null[start:start + step]
            configs = np.concatenate([everything & ~chunk if t == "sufficiency" else chunk for t in open_])
            vals = runner.run(configs, control_rows, desc="random circuits")
            for j, t in enumerate(open_):
                out[t].append(faithfulness(vals[j * len(chunk):(j + 1) * len(chunk)], e[None, :], m[None, :], axis=1))
            if self.spec.controls.sequential:
                open_ = [t for t in open_ if not self._settled(observed[t], np.concatenate(out[t]), len(null), t)]
            if not open_:
                break
        return {t: np.concatenate(v) for t, v in out.items()}

    @staticmethod
    def _settled(observed: float, drawn: np.ndarray, planned: int, test: str) -> bool:
        # a non-finite faithfulness (m(M) = m(∅) on the control prompts) is so for every circuit: the claim
        # is untestable, and more draws cannot change that
        return (not np.all(np.isfinite(drawn)) or not np.isfinite(observed)
                or null_settled(observed, drawn, planned, "greater" if test == "sufficiency" else "less"))

    def _faithfulness(self, name: str, claim: CircuitClaim, mc: np.ndarray, me: np.ndarray, mm: np.ndarray,
                      common: dict, null: np.ndarray | None, control_rows: np.ndarray,
                      matched: bool) -> ClaimResult:
        test = claim.test
        untestable = _undefined(mm, me)
        effect, ci = None, None
        if not untestable:
            effect, lo, hi = paired_bootstrap([mc, me, mm], faithfulness, seed=self.spec.seed)
            ci = (lo, hi)
        details = {**common, "m_circuit": float(mc.mean()), "test": test,
                   "ablated": "everything in scope except the circuit" if test == "sufficiency"
                   else "only the circuit"}
        metric = (f"faithfulness (m(C) − m(∅)) / (m(M) − m(∅)) of {self.spec.metric}, "
                  + ("everything in scope but the circuit ablated" if test == "sufficiency"
                     else "only the circuit ablated") + f" ({self.spec.ablation} ablation)")
        m = Measured(effect, ci, len(mm), metric, details=details, untestable=untestable,
                     plots=[self._component_bars(common)])
        # A control that was asked for and could not be run leaves the claim unjudged, never passed.
        if null is not None and len(null) == 0 and self.spec.controls.random_circuits == 0:
            details["control_note"] = "random-circuit control turned off (controls.random_circuits: 0)"
        elif null is not None and len(null) == 0:
            m.untestable = m.untestable or ("no random circuit of this size exists outside the circuit in the "
                                            "scope: the random-circuit control cannot be run")
        elif null is not None and not np.all(np.isfinite(null)):
            m.untestable = m.untestable or ("m(M) = m(∅) on the control prompts: random-circuit faithfulness "
                                            "is undefined")
        elif null is not None and not untestable:
            self._random_circuit_control(m, claim, mc, me, mm, null, control_rows, matched)
        return judge(name, claim, m)

    def _random_circuit_control(self, m: Measured, claim: CircuitClaim, mc: np.ndarray, me: np.ndarray,
                                mm: np.ndarray, null: np.ndarray, control_rows: np.ndarray, matched: bool) -> None:
        test = claim.test
        observed = float(faithfulness(mc[control_rows], me[control_rows], mm[control_rows]))
        alternative = "greater" if test == "sufficiency" else "less"
        p = empirical_pvalue(observed, null, alternative)
        q = 95 if test == "sufficiency" else 5
        m.details.update({
            "null_mean": float(null.mean()), f"null_p{q}": float(np.percentile(null, q)),
            "circuit_percentile_in_null": float((null < observed).mean() * 100),
            "circuit_faithfulness_on_control_prompts": observed,
        })
        planned = self.spec.controls.random_circuits
        name = f"{len(null)} random circuits of the same size" + (", same layers" if matched else "") + (
            f" (sequential: {len(null)} of {planned} drawn)" if len(null) < planned else "")
        m.control = ControlResult(
            name=name, effect=float(null.mean()), p_value=p,
            detail={"alternative": alternative, "alpha": ALPHA, f"p{q}": float(np.percentile(null, q)),
                    **sequential_detail(len(null), planned, self.spec.controls.sequential, what="circuits"),
                    "prompts": int(len(control_rows))})
        m.beats_control = beats_control(p)
        m.plots.append(NullHistogram(title=f"{test}: {name}", x_label="faithfulness",
                                     values=[float(x) for x in null], effect=observed,
                                     effect_label=f"circuit on the {len(control_rows)} control prompts",
                                     threshold=claim.expect.threshold.value))

    def _minimality(self, name: str, claim: CircuitClaim, got: dict, mm: np.ndarray, common: dict) -> ClaimResult:
        me, mc = got["empty"], got["circuit_only"]
        without = [got[("without", u)] for u in self.circuit]
        untestable = _undefined(mm, me)

        def min_drop(c, e, m, *ws, axis=None):
            base = faithfulness(c, e, m, axis=axis)
            return np.min(np.stack([base - faithfulness(w, e, m, axis=axis) for w in ws]), axis=0)

        effect, ci = None, None
        if not untestable:
            effect, lo, hi = paired_bootstrap([mc, me, mm, *without], min_drop, seed=self.spec.seed)
            ci = (lo, hi)
        f_c = faithfulness(mc, me, mm)
        drops = [{"component": u.name, "faithfulness_without": float(faithfulness(w, me, mm)),
                  "drop": float(f_c - faithfulness(w, me, mm))} for u, w in zip(self.circuit, without)]
        details = {**common, "m_circuit": float(mc.mean()), "test": "minimality", "drops": drops}
        metric = "smallest drop of sufficiency faithfulness when one component is removed from the circuit"
        bars = Bars(title="sufficiency faithfulness without each component", value_label="faithfulness",
                    labels=[d["component"] for d in drops], before=[float(f_c)] * len(drops),
                    after=[d["faithfulness_without"] for d in drops], before_label="whole circuit",
                    after_label="without it")
        return judge(name, claim, Measured(effect, ci, len(mm), metric, details=details, untestable=untestable,
                                           plots=[bars]))


def _undefined(mm: np.ndarray, me: np.ndarray) -> str | None:
    gap = float(mm.mean() - me.mean())
    scale = max(float(np.abs(mm).mean()), float(np.abs(me).mean()), 1e-12)
    if abs(gap) <= 1e-6 * scale:
        return (f"the full model and the fully ablated model score the same (m(M) = {mm.mean():.4g}, "
                f"m(∅) = {me.mean():.4g}): faithfulness is undefined")
    return None
