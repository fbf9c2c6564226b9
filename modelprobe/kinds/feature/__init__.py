"""feature: one unit (an MLP neuron, a residual dimension, an SAE latent or a saved direction) stands for
a concept — its activation goes with the concept (correlates), and a behaviour depends on it (causes).

The two are different claims on purpose: a unit can track a concept that many other units also carry,
so ablating it alone changes nothing (correlation without causation, the usual finding for single
neurons). `correlates` is the AUROC of the unit's activation (max or mean over each prompt's tokens)
separating the `with` prompts from the `without` prompts, with a stratified bootstrap interval.
`causes` sets the unit to zero, its mean or a clamp value on every token of the `with` prompts and
reads the drop of the log-probability (or probability) of the listed tokens at the last position,
with a paired bootstrap interval; the same intervention on k random units of the same layer / SAE
(random directions of the same site, for a direction) is the empirical null it must beat. The random
units run as rows of resumed forwards, one row per unit and prompt.

Controls: causes is held against the same intervention on `random_units` random units of the same layer or SAE
(random directions, for a direction): the empirical p-value of the unit's drop among theirs must be <= 0.05
(sequential draws). Correlates has no control to beat; the AUROC of random units of the same pool is shown
beside it.

Verdicts: pass when the interval (stratified bootstrap for the AUROC, paired bootstrap for the drop) clears
the threshold and, for causes, the random units are beaten. Inconclusive when the interval straddles the
threshold; when the metric is not finite (a probability underflowed); or when the pool holds too few other
units for the p-value to reach 0.05.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator

from ..._lazy import torch
from ...report.record import Bars, ClaimResult, ControlResult, NullHistogram, Table
from ...spec import (
    ClaimSpec,
    DataFile,
    FiniteFloat,
    OneExpectation,
    ProbeSpec,
    RateThreshold,
    Strict,
    Threshold,
)
from ...toolkit.prompts import read_rows
from ..base import Measured, Outcome, ProbeKind, judge

Component = Literal["mlp.post", "resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out"]
MIN_NULL = 19  # random units needed before an empirical p-value can reach 0.05
NULL_STEP = 8  # random units drawn at a time once the first resumed forward's are in
SelectedMax = 1 << 30  # an index larger than any model's width, so a huge number is a range error, not a crash


class UnitSpec(Strict):
    layer: int | None = Field(None, description="neuron / direction: the layer (negative counts from the end)")
    component: Component | None = Field(None, description="neuron: mlp.post (default) or a residual-width site, "
                                        "whose neuron is one dimension; direction: default resid_post")
    neuron: int | None = Field(None, ge=0, le=SelectedMax, description="index of the neuron / dimension")
    sae: str | None = Field(None, description="an SAELens folder (cfg.json + sae_weights.safetensors), relative "
                            "to the probe file; the site comes from cfg.json hook_name")
    latent: int | None = Field(None, ge=0, le=SelectedMax, description="index of the SAE latent")
    direction: str | None = Field(None, description="a safetensors file holding a 1-D tensor 'direction', "
                                  "relative to the probe file")

    @model_validator(mode="after")
    def _one_kind(self) -> UnitSpec:
        given = [k for k in ("neuron", "sae", "direction") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("name exactly one unit: {layer, component, neuron}, {sae, latent} or "
                             "{direction, layer, component}")
        if self.sae is not None:
            if self.latent is None:
                raise ValueError("an SAE unit needs 'latent'")
            if self.layer is not None or self.component is not None:
                raise ValueError("an SAE unit takes its site from cfg.json (hook_name): drop layer and component")
        elif self.latent is not None:
            raise ValueError("'latent' belongs to an SAE unit ({sae, latent})")
        elif self.layer is None:
            raise ValueError(f"a {given[0]} unit needs 'layer'")
        return self

    @property
    def what(self) -> str:
        return "sae" if self.sae is not None else "direction" if self.direction is not None else "neuron"


class InputsSpec(Strict):
    with_: DataFile = Field(alias="with", description='JSONL of {"prompt": ...} showing the concept')
    without: DataFile = Field(description='JSONL of {"prompt": ...} without it')
    rows: str | None = Field(None, description="'start:stop' (0-based) lines of each file used, e.g. the lines "
                             "`modelprobe find` did not see")
    aggregate: Literal["max", "mean"] = Field("max", description="a prompt's activation: max or mean over its tokens")
    skip_first: bool = Field(True, description="leave each prompt's first token out of the max / mean (BOS, or "
                             "an attention sink with outsized activations)")
    chat_template: bool = False


class InterventionSpec(Strict):
    zero: Literal[True] | None = Field(None, description="set the unit to 0 (an SAE latent: remove a_i W_dec[i])")
    mean: Literal[True] | None = Field(None, description="set it to its mean over every counted token of both sets")
    clamp: FiniteFloat | None = Field(None, description="set it to this value")

    @model_validator(mode="after")
    def _one(self) -> InterventionSpec:
        if sum(v is not None for v in (self.zero, self.mean, self.clamp)) != 1:
            raise ValueError("give exactly one of zero: true, mean: true or clamp: <value>")
        return self

    @property
    def name(self) -> str:
        return "zero" if self.zero else "mean" if self.mean else f"clamp {self.clamp:g}"


class MetricSpec(Strict):
    tokens: list[str] = Field(min_length=1, max_length=64, description="next tokens whose total probability is read "
                              "at the last position of each `with` prompt")
    as_: Literal["logprob", "prob"] = Field("logprob", alias="as", description="log of their total probability "
                                            "(default) or the probability")


class FeatureExpect(OneExpectation):
    auroc: RateThreshold | None = Field(None, description="correlates: AUROC of the activation, with vs without")
    metric_drop: Threshold | None = Field(None, description="causes: clean minus intervened metric, mean over the "
                                          "with prompts")


class FeatureClaim(ClaimSpec):
    expect: FeatureExpect
    intervention: InterventionSpec | None = Field(None, description="causes: zero, mean or clamp")
    metric: MetricSpec | None = Field(None, description="causes: the behaviour read at the last position")
    control: Literal["random_units", "none"] | None = Field(None, description="causes: random_units (default): the "
                                                            "same intervention on random units must be beaten")
    random_units: int = Field(50, ge=MIN_NULL, le=2000, description="random units drawn (19 at least: with fewer the "
                              "empirical p-value cannot reach 0.05)")

    @model_validator(mode="after")
    def _fits(self) -> FeatureClaim:
        if self.expect.statistic == "auroc":
            extra = [k for k in ("intervention", "metric", "control") if getattr(self, k) is not None]
            if extra:
                raise ValueError(f"an auroc claim (correlates) takes no {extra[0]}")
        elif self.intervention is None or self.metric is None:
            raise ValueError("a metric_drop claim (causes) needs 'intervention' and 'metric'")
        return self


class FeatureSpec(ProbeSpec[FeatureClaim]):
    kind: Literal["feature"]
    unit: UnitSpec
    inputs: InputsSpec


class Feature(ProbeKind[FeatureSpec]):
    Spec = FeatureSpec
    skeleton = """\
about: One MLP neuron fires for French text, and French articles depend on it.
tags: [feature]
unit: {layer: 10, component: mlp.post, neuron: 1234}  # or {sae: path/to/sae_folder, latent: 77}
                                                      # or {direction: file.safetensors, layer: 10}
inputs:
  with: data/feature_french.jsonl     # {"prompt": ...} showing the concept
  without: data/feature_english.jsonl
  aggregate: max                      # a prompt's activation: max (or mean) over its tokens
  rows: "24:"                         # lines `modelprobe find --rows 0:24` did not select the unit on
claims:
  correlates:
    expect: {auroc: {at_least: 0.8}}  # the activation separates with from without (bootstrap interval)
  causes:
    intervention: {zero: true}        # or {mean: true}, or {clamp: 3.0}
    metric: {tokens: [" le", " la", " les"]}   # log of their total probability at the last position
    expect: {metric_drop: {at_least: 0.1}}
    control: random_units             # the same intervention on random units of the layer must be beaten
    random_units: 50
"""
    skeleton_data = {
        "data/feature_french.jsonl": [{"prompt": p} for p in (
            "Tous les matins, je bois", "Elle a posé le livre sur", "Nous avons visité", "Il cherche encore")] * 7,
        "data/feature_english.jsonl": [{"prompt": p} for p in (
            "Every morning I drink", "She put the book on", "We visited", "He is still looking for")] * 7,
    }

    @classmethod
    def check_data(cls, probe) -> dict[str, Any]:
        """Rows of both sets (their `rows` slice), and the unit's files checked without a model."""
        from ...errors import DataError
        from ...subject import UnitFileError, check_latent, read_direction, read_sae
        from ...toolkit.ablation_task import parse_rows

        spec: FeatureSpec = probe.spec
        out: dict[str, Any] = {}
        for key, rel in (("with", spec.inputs.with_), ("without", spec.inputs.without)):
            rows = read_rows(probe, rel, ("inputs", key))
            try:
                used = parse_rows(spec.inputs.rows, len(rows))
            except ValueError as e:
                raise probe.error(f"{probe.path.parent / rel}: {e}", ("inputs", "rows")) from None
            if len(used) < 2:
                raise DataError(f"{probe.path.parent / rel}: {len(used)} prompt used; an AUROC and its interval "
                                "need at least 2 per set")
            out[key] = [rows[i]["prompt"] for i in used]
            out[key + "_lines"] = [i + 1 for i in used]
        unit = spec.unit
        try:
            if unit.sae is not None:
                files = read_sae(probe.data_path(unit.sae, ("unit", "sae")))
                if unit.latent >= files.d_sae:
                    raise probe.error(f"latent {unit.latent} is out of range: the SAE {unit.sae} has d_sae "
                                      f"{files.d_sae} latents (0..{files.d_sae - 1})", ("unit", "latent"))
                check_latent(files, unit.latent)
                out["sae"] = files
            elif unit.direction is not None:
                path = probe.data_path(unit.direction, ("unit", "direction"))
                out["direction"] = (path, read_direction(path))
        except UnitFileError as e:
            raise probe.error(str(e), ("unit", unit.what)) from None
        return out

    # ---- setup: the unit against the model --------------------------------------------------------
    def setup(self) -> None:
        from ...subject import Site, UnitFileError, resolve_layer, sae_site, site_width
        from ...toolkit.prompts import answer_tokens, encode_rows

        spec, subject = self.spec, self.subject
        data = self.check_data(self.probe)
        self.data = data
        unit = spec.unit
        if unit.sae is not None:
            try:
                self.site = sae_site(data["sae"], subject.sitemap)
            except UnitFileError as e:
                raise self.probe.error(f"{e} (model '{subject.info.id}')", ("unit", "sae")) from None
        else:
            layer = resolve_layer(unit.layer, subject.n_layers, ("unit", "layer"))[0]
            default = "mlp.post" if unit.neuron is not None else "resid_post"
            self.site = Site(unit.component or default, layer)
            self.site.hook_point(subject.sitemap)  # SiteError (e.g. no resid_mid) is located by ProbeKind
            width = site_width(self.site, subject.sitemap)
            if unit.neuron is not None and unit.neuron >= width:
                raise self.probe.error(f"neuron {unit.neuron} is out of range: {self.site.name} of model "
                                       f"'{subject.info.id}' has {width} (0..{width - 1})", ("unit", "neuron"))
            if unit.direction is not None and data["direction"][1] != width:
                raise self.probe.error(f"{data['direction'][0]}: the direction has {data['direction'][1]} "
                                       f"entries, but {self.site.name} of model '{subject.info.id}' is {width} wide",
                                       ("unit", "direction"))
        base = self.probe.path.parent
        self.ids = {k: encode_rows(subject, data[k], base / getattr(spec.inputs, "with_" if k == "with" else k),
                                   data[k + "_lines"], spec.inputs.chat_template) for k in ("with", "without")}
        self.tokens: dict[str, list[int]] = {}
        for name, claim in spec.claims.items():
            if claim.metric is None:
                continue
            ids = []
            for i, text in enumerate(claim.metric.tokens):
                loc = ("claims", name, "metric", "tokens", i)
                try:
                    t = answer_tokens(subject, text)
                except Exception as e:  # SiteError from the vocabulary check
                    raise self.probe.error(getattr(e, "message", str(e)), loc) from None
                if len(t) != 1:
                    raise self.probe.error(f"{text!r} is {len(t)} tokens for model '{subject.info.id}'; each metric "
                                           "token must be one (try with or without a leading space)", loc)
                if t[0] in ids:
                    raise self.probe.error(f"{text!r} is the same token as an earlier one: it would count twice", loc)
                ids.append(t[0])
            self.tokens[name] = ids

    # ---- the units: the claimed one first, then the random ones -------------------------------------
    def unit_set(self, k: int):
        """(UnitSet of the claimed unit followed by k random units of its pool, note on the pool)."""
        from ...subject import coordinate_units, direction_units, load_direction, sae_units
        from ...toolkit.controls import random_unit_directions

        unit, rng = self.spec.unit, np.random.default_rng(self.spec.seed)
        if unit.direction is not None:
            d = load_direction(self.data["direction"][0])
            rand = random_unit_directions(k, d.shape[-1], self.spec.seed)
            labels = [f"{Path(unit.direction).name} @ {self.site.name}"] + [f"random direction {i}" for i in range(k)]
            return direction_units(self.site, torch.cat([d[None], rand]), labels), "random unit directions at the site"
        if unit.sae is not None:
            n, me = self.data["sae"].d_sae, unit.latent
        else:
            from ...subject import site_width
            n, me = site_width(self.site, self.subject.sitemap), unit.neuron
        others = np.delete(np.arange(n), me)
        picked = [me, *rng.choice(others, size=min(k, len(others)), replace=False).tolist()]
        if unit.sae is not None:
            return sae_units(self.data["sae"], self.site, picked), f"other latents of the SAE ({n - 1})"
        return coordinate_units(self.site, self.subject.sitemap, picked), f"other units of {self.site.name} ({n - 1})"

    def measure(self) -> Outcome:
        from ...toolkit.features import unit_activations

        spec = self.spec
        causes = {n: c for n, c in spec.claims.items() if c.expect.statistic == "metric_drop"}
        # random units: the null of the causal claims; without one, 50 feed the AUROC histogram (report only)
        k = max([c.random_units for c in causes.values() if c.control != "none"], default=0 if causes else 50)
        units, pool = self.unit_set(k)
        opts = dict(aggregate=spec.inputs.aggregate, skip_first=spec.inputs.skip_first, batch_size=spec.batch_size)
        acts_w = unit_activations(self.subject, self.ids["with"], [units], keep_from=self.site.layer if causes
                                  else None, desc="with prompts", **opts)
        acts_o = unit_activations(self.subject, self.ids["without"], [units], desc="without prompts", **opts)
        means = (acts_w.token_sums[0] + acts_o.token_sums[0]) / max(1, acts_w.tokens + acts_o.tokens)
        claims = []
        for name, claim in spec.claims.items():
            if claim.expect.statistic == "auroc":
                claims.append(self._correlates(name, claim, acts_w.per_prompt[0], acts_o.per_prompt[0], units))
            else:
                claims.append(self._causes(name, claim, units, acts_w, means))
        settings = {
            "unit": units.labels[0], "site": self.site.name, "unit_kind": spec.unit.what,
            "aggregate": f"{spec.inputs.aggregate} over each prompt's tokens"
                         + (", first token left out" if spec.inputs.skip_first else ""),
            "n_with": len(self.ids["with"]), "n_without": len(self.ids["without"]),
            "rows": spec.inputs.rows or "all", "random_unit_pool": pool, "random_units_drawn": len(units) - 1,
            "mean_activation": float(means[0]),
        }
        if spec.unit.sae is not None:
            files = self.data["sae"]
            settings["sae"] = {"folder": spec.unit.sae, "hook_name": files.hook_name, "d_in": files.d_in,
                               "d_sae": files.d_sae, "architecture": files.architecture,
                               "apply_b_dec_to_input": files.apply_b_dec_to_input}
        return Outcome(settings, claims)

    def _correlates(self, name: str, claim: FeatureClaim, w: np.ndarray, o: np.ndarray, units) -> ClaimResult:
        from ...stats import auroc, auroc_interval

        est, lo, hi = auroc_interval(w[:, 0], o[:, 0], seed=self.spec.seed)
        null = auroc(w[:, 1:], o[:, 1:], axis=0) if w.shape[1] > 1 else np.zeros(0)
        plots = [Bars(title="unit activation per prompt set", value_label="activation",
                      labels=["mean", "median"], before=[float(o[:, 0].mean()), float(np.median(o[:, 0]))],
                      after=[float(w[:, 0].mean()), float(np.median(w[:, 0]))],
                      before_label="without", after_label="with")]
        if null.size:
            plots.append(NullHistogram(title="AUROC of random units of the same pool (report only)",
                                       x_label="AUROC", values=null.tolist(), effect=est, effect_label="this unit",
                                       threshold=claim.expect.threshold.value))
        details = {"mean_with": float(w[:, 0].mean()), "mean_without": float(o[:, 0].mean()),
                   "random_units_auroc_median": float(np.median(null)) if null.size else None,
                   "random_units_auroc_max": float(null.max()) if null.size else None}
        return judge(name, claim, Measured(est, (lo, hi), w.shape[0] + o.shape[0],
                                           "AUROC of the unit's activation, with vs without prompts",
                                           details=details, plots=plots))

    @staticmethod
    def _null_drops(claim: FeatureClaim, est: float, ci: tuple[float, float], clean: np.ndarray, head: np.ndarray,
                    metric_after: Any, planned: int) -> tuple[np.ndarray, bool]:
        """(metric drops of the random units drawn, whether the control can change the verdict): the units of
        `head` first, then more until the full count's answer is settled (toolkit.controls.null_settled)."""
        from ...toolkit.controls import alternative_for, control_decides, draw_sequentially, null_settled

        first, comparison = len(head), claim.expect.threshold.comparison
        decides = control_decides(ci, claim.expect.threshold.value, comparison)

        def draw(a: int, b: int) -> np.ndarray:
            after = head[1 + a:1 + b] if 1 + b <= first else metric_after(1 + a, 1 + b)
            return (clean[None, :] - after).mean(1)

        return draw_sequentially(draw, planned, first - 1, lambda d: not decides or null_settled(
            est, d, planned, alternative_for(comparison))), decides

    def _causes(self, name: str, claim: FeatureClaim, units, acts, means: np.ndarray) -> ClaimResult:
        from ...stats import paired_difference
        from ...subject import common_prefix
        from ...toolkit.controls import beats_control, empirical_control, sequential_detail
        from ...toolkit.features import ROWS_PER_FORWARD, metric_with_units_set, token_set_metric

        iv, what = claim.intervention, claim.metric.as_
        use = len(units) if claim.control != "none" else 1
        chosen = units.subset(list(range(use)))
        if iv.zero:
            targets = torch.zeros(use)
        elif iv.mean:
            targets = torch.tensor(means[:use], dtype=torch.float32)
        else:
            targets = torch.full((use,), float(iv.clamp))
        tokens = torch.tensor(self.tokens[name])
        n = len(self.ids["with"])
        clean = np.zeros(n)
        for batch, _, logits in acts.clean:
            clean[batch.rows] = token_set_metric(logits, tokens, what).double().numpy()
        prefix = common_prefix(self.ids["with"])

        def metric_after(lo: int, hi: int) -> np.ndarray:
            return metric_with_units_set(self.subject, acts.clean, chosen.subset(list(range(lo, hi))), targets[lo:hi],
                                         lambda lg: token_set_metric(lg, tokens, what), n, prefix)

        # The first call holds the claimed unit and at least one resumed forward's worth of random units, so
        # that the claimed unit rides in the same rows as when every unit ran at once (the same numbers).
        rows = min([len(b.rows) for b, _, _ in acts.clean], default=1)
        first = min(use, max(NULL_STEP, ROWS_PER_FORWARD // max(1, rows)))
        head = metric_after(0, first)
        if not (np.isfinite(clean).all() and np.isfinite(head).all()):
            return judge(name, claim, Measured(None, None, n, "metric drop", untestable="the metric is not finite "
                                               "(a token's probability underflowed); try as: prob"))
        est, lo, hi = paired_difference(clean, head[0], seed=self.spec.seed)
        control, beats, untestable = None, None, None
        plots: list = []
        if claim.control != "none":
            planned, comparison = use - 1, claim.expect.threshold.comparison
            drops, decides = self._null_drops(claim, est, (lo, hi), clean, head, metric_after, planned)
            if not np.isfinite(drops).all():  # a random unit's metric underflowed: as the claimed unit's would
                return judge(name, claim, Measured(None, None, n, "metric drop", untestable="the metric is not "
                                                   "finite (a token's probability underflowed); try as: prob"))
            p = empirical_control(est, drops, comparison)
            control = ControlResult(name=f"random_units: the same intervention on {len(drops)} random units"
                                         + (f" (sequential: {len(drops)} of {planned} drawn)" if len(drops) < planned
                                            else ""),
                                    effect=float(np.median(drops)), p_value=p,
                                    detail={"null_mean": float(drops.mean()), "null_max": float(drops.max()),
                                            "null_95th": float(np.quantile(drops, 0.95)), "k": len(drops),
                                            **sequential_detail(len(drops), planned, True, decides, "random units")})
            beats = beats_control(p)
            if planned < MIN_NULL:
                untestable = (f"untestable: the pool holds only {planned} other units; with fewer than {MIN_NULL} "
                              "the random-unit p-value cannot reach 0.05")
            plots.append(NullHistogram(title=f"metric drop of random units ({iv.name})", x_label="metric drop",
                                       values=drops.tolist(), effect=est, effect_label=chosen.labels[0],
                                       threshold=claim.expect.threshold.value))
        after = head
        toks = [self.subject.tokenizer.convert_ids_to_tokens([t])[0] for t in self.tokens[name]]
        plots.append(Table(title="per prompt (first 8)", columns=["line", "clean", "intervened", "drop"],
                           rows=[[line, round(float(c), 4), round(float(a), 4), round(float(c - a), 4)]
                                 for line, c, a in list(zip(self.data["with_lines"], clean, after[0]))[:8]]))
        metric = (f"drop of the {'log of the ' if what == 'logprob' else ''}total probability of {toks} at the last "
                  f"position of the with prompts, unit set by {iv.name}")
        details = {"clean_mean": float(clean.mean()), "intervened_mean": float(after[0].mean()),
                   "intervention": iv.name, "target_value": float(targets[0]), "metric_as": what}
        return judge(name, claim, Measured(est, (lo, hi), n, metric, control=control, beats_control=beats,
                                           details=details, plots=plots, untestable=untestable))
