"""logit_lens: where in depth a target token emerges in the residual stream.

Per prompt, every layer's residual at the last prompt token goes through the final norm and the
unembedding; the target's rank and probability per layer give the first layer at which it is top-k.

Controls: none. The lens reads the model's own states, and a claim is a statement about where in depth the
target appears, not an effect to be set against a baseline intervention.

Verdicts: a pass means the whole Wilson interval of the share (or the bootstrap interval of the median first
layer) clears the threshold. Inconclusive when the interval straddles it, or when no prompt is left to measure
(`only_correct` with no prompt answered right at the last layer).
"""

from __future__ import annotations

from typing import Annotated, Literal

import numpy as np
from pydantic import Field

from .._lazy import torch
from ..errors import SiteError
from ..report.record import ClaimResult, LinePlot, Series
from ..spec import (
    ChatPrompts,
    ClaimSpec,
    Count,
    DataFile,
    OneExpectation,
    ProbeSpec,
    RateThreshold,
    Rows,
    Threshold,
)
from ..spec.fields import LayerSpec
from ..stats import bootstrap_ci, wilson_interval
from ..subject import Site, resolve_layer
from ..toolkit import metrics
from ..toolkit.prompts import answer_tokens, data_error, encode_rows
from .base import Measured, Outcome, ProbeKind, judge

NEVER = 2.0  # first-layer fraction recorded for a target that never reaches top-k (beyond the last layer)


class LensExpect(OneExpectation):
    final_accuracy: RateThreshold | None = Field(None, description="share of prompts whose target is top-k at the last layer")
    share_by_layer: RateThreshold | None = Field(None, description="share of prompts whose target is top-k at or before `layer`")
    median_first_layer: Threshold | None = Field(
        None, description="median first layer (fraction of depth, (l+1)/L) at which the target is top-k")


class LensClaim(ClaimSpec):
    expect: LensExpect
    layer: LayerSpec | None = Field(None, description="for share_by_layer: int, negative, or fraction of depth")
    top_k: Count = Field(1)
    only_correct: bool = Field(False, description="measure only prompts whose target is top-1 at the last layer")


class LogitLensSpec(ProbeSpec[LensClaim], ChatPrompts):
    kind: Literal["logit_lens"]
    prompts: Annotated[DataFile, Rows("prompt", "answer")] = Field(
        description='JSONL file, one {"prompt": ..., "answer": ...} per line')
    target: Literal["first_token", "single_token"] = Field(
        "first_token", description="first_token: the answer's first token; single_token: answers must be one token")
    component: Literal["resid_post", "resid_pre", "resid_mid"] = "resid_post"


class LogitLens(ProbeKind[LogitLensSpec]):
    Spec = LogitLensSpec
    skeleton = """\
about: The answer's first token emerges in the residual stream before the last layer.
tags: [logit_lens]
prompts: data/capitals.jsonl     # JSONL, one {"prompt": ..., "answer": " Paris"} per line (answer keeps its space)
chat_template: false             # true: wrap each prompt in the tokenizer's chat template
target: first_token              # or single_token: every answer must be one token (an error otherwise)
component: resid_post            # which residual to decode: resid_post, resid_pre or resid_mid
claims:
  answers_correctly:             # each claim is one pytest item: probes/NAME.probe.yaml::answers_correctly
    expect: {final_accuracy: {at_least: 0.5}}
  emerges_by_two_thirds:
    only_correct: true           # only prompts the model answers right at the last layer
    layer: 0.66                  # int, negative from the end, or a fraction of depth
    top_k: 1
    expect: {share_by_layer: {at_least: 0.5}}
    tolerance: {abs: 0.1}        # allowed move against a baseline (--probe-compare)
"""
    skeleton_data = {"data/capitals.jsonl": [
        {"prompt": "The capital of France is", "answer": " Paris"},
        {"prompt": "The capital of Germany is", "answer": " Berlin"},
        {"prompt": "The capital of Italy is", "answer": " Rome"},
    ]}

    def setup(self) -> None:
        spec, subject = self.spec, self.subject
        path = self.probe.path.parent / spec.prompts
        self.rows = self.data_rows(spec.prompts)
        self.ids = encode_rows(subject, [r["prompt"] for r in self.rows], path, None, spec.chat_template,
                               spec.system)
        self.targets = []
        self.multi_token = 0
        for i, row in enumerate(self.rows):
            try:
                toks = answer_tokens(subject, row["answer"])
            except SiteError as e:
                raise data_error(path, i + 1, "answer", e) from None
            if len(toks) > 1:
                if spec.target == "single_token":
                    raise data_error(path, i + 1, "answer", SiteError(
                        f"{row['answer']!r} is {len(toks)} tokens for model '{subject.info.id}'; "
                        "target: single_token needs one"))
                self.multi_token += 1
            self.targets.append(toks[0])
        self.claim_layers = {}
        for name, claim in spec.claims.items():
            if claim.expect.statistic == "share_by_layer":
                if claim.layer is None:
                    raise self.probe.error("share_by_layer needs a 'layer'", ("claims", name))
                layers = resolve_layer(claim.layer, subject.n_layers, ("claims", name, "layer"))
                self.claim_layers[name] = max(layers)

    def _lens(self) -> tuple[np.ndarray, np.ndarray]:
        """rank[n, L] and prob[n, L] of each prompt's target, decoding every layer's residual."""
        subject = self.subject
        n_layers = subject.n_layers
        sites = [Site(self.spec.component, layer) for layer in range(n_layers)]
        targets = torch.tensor(self.targets)
        rank = np.zeros((len(self.ids), n_layers), dtype=np.int64)
        prob = np.zeros((len(self.ids), n_layers), dtype=np.float64)
        for fw in subject.run(self.ids, capture=sites, logits=None, batch_size=self.spec.batch_size,
                              desc="logit lens"):
            tgt = targets[fw.batch.rows].to(subject.device)
            for layer, site in enumerate(sites):
                logits = subject.unembed(fw.at(site))  # [b, vocab]
                rank[fw.batch.rows, layer] = metrics.rank(logits, tgt).cpu().numpy()
                prob[fw.batch.rows, layer] = metrics.prob(logits, tgt).double().cpu().numpy()
        return rank, prob

    def measure(self) -> Outcome:
        spec = self.spec
        n_layers = self.subject.n_layers
        rank, prob = self._lens()
        correct = rank[:, -1] == 0
        settings = {
            "prompts": spec.prompts, "n_prompts": len(self.rows), "n_correct_at_last_layer": int(correct.sum()),
            "component": spec.component,
            "site": f"blocks.*.hook_{spec.component}", "position": "last", "target": spec.target,
            "answers_with_several_tokens": self.multi_token, "chat_template": spec.chat_template,
            "n_layers": n_layers,
        }
        claims = []
        for name, claim in spec.claims.items():
            keep = correct if claim.only_correct else np.ones(len(rank), dtype=bool)
            claims.append(self._claim(name, claim, rank[keep], prob[keep], int(keep.sum())))
        return Outcome(settings, claims)

    def _claim(self, name: str, claim: LensClaim, rank: np.ndarray, prob: np.ndarray, n: int) -> ClaimResult:
        n_layers = rank.shape[1] if rank.size else self.subject.n_layers
        topk = rank < claim.top_k
        reached = topk.any(axis=1)
        first = np.where(reached, topk.argmax(axis=1), -1)
        first_frac = np.where(reached, (first + 1) / n_layers, NEVER)
        curves = {
            f"share_top{claim.top_k}": topk.mean(axis=0).tolist() if n else [],
            "mean_target_prob": prob.mean(axis=0).tolist() if n else [],
            "median_target_rank": np.median(rank, axis=0).tolist() if n else [],
        }
        details = {"top_k": claim.top_k, "never_reached": int((~reached).sum()), "only_correct": claim.only_correct,
                   "final_layer_accuracy": float(topk[:, -1].mean()) if n else None}
        stat = claim.expect.statistic
        untestable = "no prompts left to measure" if n == 0 else None
        mark = None
        if stat == "final_accuracy":
            k = int(topk[:, -1].sum())
            effect, ci = (k / n if n else None), wilson_interval(k, n)
            metric = f"share of prompts with the target top-{claim.top_k} at the last layer"
            mark = n_layers - 1
        elif stat == "share_by_layer":
            layer = self.claim_layers[name]
            k = int((reached & (first <= layer)).sum())
            effect, ci = (k / n if n else None), wilson_interval(k, n)
            metric = f"share of prompts with the target top-{claim.top_k} by layer {layer} ({(layer + 1) / n_layers:.2f} of depth)"
            details["layer"] = mark = layer
        else:
            effect, lo, hi = bootstrap_ci(first_frac, np.median, seed=self.spec.seed) if n else (None, 0, 1)
            ci = (lo, hi)
            metric = (f"median first layer (fraction of depth) with the target top-{claim.top_k}; "
                      f"never = {NEVER}")
            if n and effect is not None and effect <= 1:
                mark = effect * n_layers - 1
        plot = LinePlot(title=f"{name}: the target through the layers ({n} prompts)", x_label="layer",
                        y_label="share / probability",
                        series=[Series(label=f"share top-{claim.top_k}", y=curves[f"share_top{claim.top_k}"]),
                                Series(label="mean target probability", y=curves["mean_target_prob"]),
                                Series(label="median target rank", y=curves["median_target_rank"], axis="right")],
                        mark_x=mark, mark_label="" if mark is None else f"layer {mark:g}")
        return judge(name, claim, Measured(effect, ci if n else None, n, metric, details=details, curves=curves,
                                           plots=[plot] if n else [], untestable=untestable))
