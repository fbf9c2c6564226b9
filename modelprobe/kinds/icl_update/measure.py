"""The icl_update measurements: prompts encoded once, one shared pass, and the three claims' numbers.

Each claim function returns the keyword arguments of a kind's `Measured` (toolkit knows no kinds).
Converges and transfers use direct factors, as Dherin et al. 2025 warn: from the second block on, the
query's own residual already depends on the context, so u is the MLP input at the query token taken from
the plain with-context run and the plain no-context run. The identity builds its factors layer by layer
on the updated run instead (that is what makes it exact).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import stats as sps

from ..._lazy import torch
from ...errors import SiteError
from ...model_facts import dtype_tolerance
from ...report.record import Bars, ControlResult, LinePlot, Series
from ...stats import bootstrap_ci, paired_bootstrap
from ...toolkit.controls import alternative_for, beats_control, paired_control, random_unit_directions
from ...toolkit.icl import Draw, draw_prompts, identity, last_states, query_inputs, render, shuffled
from ...toolkit.metrics import faithfulness
from ...toolkit.prompts import answer_tokens, data_error, encode_rows

if TYPE_CHECKING:
    from ...subject import Subject


@dataclass
class Prepared:
    """Token ids of every sequence the claims may need, by part, and the answer token of each."""

    ids: dict[str, list[list[int]]]
    answers: dict[str, list[int]]
    draw: Draw
    multi_token: int
    shots: int

    @classmethod
    def build(cls, subject: Subject, spec: Any, rows: dict[str, list[dict]], path: Path) -> Prepared:
        task = rows["task"]
        first, multi = _first_tokens(subject, task, path)
        d = draw_prompts(len(task), spec.prompts, spec.shots, spec.seed)
        fmt, n, s = spec.format, spec.prompts, spec.shots
        text: dict[str, list[str]] = {
            "plain": [render(fmt, task, [], d.query[j]) for j in range(n)],
            "prefix": [render(fmt, task, d.context[j][:i], d.query[j]) for j in range(n) for i in range(1, s + 1)],
            "shuffled": [render(fmt, task, d.context[j][:i], d.query[j], shuffled(d.context[j])[:i])
                         for j in range(n) for i in range(1, s + 1)],
            "t_plain": [render(fmt, task, [], d.transfer[j]) for j in range(n)],
            "t_ctx": [render(fmt, task, d.context[j], d.transfer[j]) for j in range(n)],
        }
        answers = {"plain": [first[q] for q in d.query], "t_plain": [first[t] for t in d.transfer]}
        answers["prefix"] = answers["shuffled"] = [a for a in answers["plain"] for _ in range(s)]
        answers["t_ctx"] = answers["t_plain"]
        if "control" in rows:
            other = rows["control"]
            od = draw_prompts(len(other), n, s, spec.seed + 1)
            text["o_plain"] = [render(fmt, other, [], od.query[j]) for j in range(n)]
            text["o_ctx"] = [render(fmt, other, od.context[j], od.query[j]) for j in range(n)]
            answers["o_plain"] = answers["o_ctx"] = answers["plain"]  # not scored
        ids = {k: encode_rows(subject, v, path) for k, v in text.items()}
        return cls(ids, answers, d, multi, s)

    def settings(self) -> dict[str, Any]:
        return {"answers_scored_by_first_token": self.multi_token,
                "mean_context_tokens": float(np.mean([len(x) for x in self.ids["t_ctx"]]))}


def _first_tokens(subject: Subject, rows: list[dict], path: Path) -> tuple[list[int], int]:
    """Each row's answer token (the first, when the output is several tokens) and how many had several."""
    out, multi = [], 0
    for i, row in enumerate(rows):
        try:
            toks = answer_tokens(subject, row["output"])
        except SiteError as e:
            raise data_error(path, i + 1, "output", e) from None
        multi += len(toks) > 1
        out.append(toks[0])
    return out, multi


@dataclass
class Runs:
    """The shared pass over every needed sequence, run once on first use, and the identity check."""

    subject: Subject
    prep: Prepared
    spec: Any
    layers: dict[str, list[int]]
    counts: dict[str, int] = field(default_factory=dict)
    _base: dict[str, Any] | None = None
    _identity: tuple | None = None

    def parts(self) -> tuple[list[str], list[str]]:
        """Parts read at the MLP input (their passes stop at the highest layer needed) and parts scored by
        the answer's log-probability (full passes)."""
        stats = {c.expect.statistic for c in self.spec.claims.values()}
        states = ["plain", "prefix"] if stats & {"spearman_rho", "gain_recovered"} else []
        states += ["shuffled"] if "spearman_rho" in stats else []
        scored = []
        if "gain_recovered" in stats:
            states += ["o_plain", "o_ctx"] if "o_plain" in self.prep.ids else []
            scored = ["t_plain", "t_ctx"]
        return states, scored

    def base(self) -> dict[str, Any]:
        """{part: u per layer [k, d]} and {part: answer log-probability [k]}, each from one batched pass."""
        if self._base is None:
            layers = sorted({x for name, ls in self.layers.items() for x in ls
                             if self.spec.claims[name].expect.statistic != "max_rel_error"})
            states, scored = self.parts()
            self._base = {}
            if states:
                ids = [x for p in states for x in self.prep.ids[p]]
                u = query_inputs(self.subject, ids, layers, self.spec.batch_size)
                self._base.update(_split(states, self.prep.ids, lambda a, b: {x: u[x][a:b] for x in layers}))
                self.counts["state_pass_sequences"] = len(ids)
            if scored:
                ids = [x for p in scored for x in self.prep.ids[p]]
                answers = [a for p in scored for a in self.prep.answers[p]]
                lp = last_states(self.subject, ids, (), answers, batch_size=self.spec.batch_size).logprob.numpy()
                self._base.update(_split(scored, self.prep.ids, lambda a, b: lp[a:b]))
                self.counts["scored_pass_sequences"] = len(ids)
        return self._base

    def u(self, part: str, layer: int) -> torch.Tensor:
        return self.base()[part][layer]

    def logprob(self, part: str) -> np.ndarray:
        return self.base()[part]

    def identity(self) -> tuple:
        if self._identity is None:
            s, n = self.prep.shots, len(self.prep.ids["plain"])
            ctx = [self.prep.ids["prefix"][j * s + s - 1] for j in range(n)]
            self._identity = identity(self.subject, ctx, self.prep.ids["plain"], self.spec.batch_size)
            self.counts["identity_sequences"] = 3 * n  # with context; plain, updating online; plain, checked
        return self._identity


def _split(parts: list[str], ids: dict[str, list], take) -> dict[str, Any]:
    """Cut one pass's rows back into its parts, in order."""
    out, start = {}, 0
    for p in parts:
        out[p] = take(start, start + len(ids[p]))
        start += len(ids[p])
    return out


# ---- claims ---------------------------------------------------------------------------------------

def identity_claim(runs: Runs, layers: Sequence[int], threshold: Any) -> dict[str, Any]:
    per_layer, logits, _ = runs.identity()
    worst_layer = per_layer.max(axis=0)
    effect = float(max(per_layer[:, list(layers)].max(), logits.max()))
    dtype = runs.subject.info.dtype
    rounding = dtype_tolerance(dtype)
    untestable = None
    # The identity is exact but for rounding: an error the dtype alone can give says nothing about the hooks.
    if threshold.value < effect <= rounding:
        untestable = (f"the identity's relative error {effect:.3g} is within what {dtype} rounding alone gives "
                      f"({rounding:g}), above the claimed {threshold.value:g}: run with --probe-dtype=float32 "
                      f"or claim at_most {rounding:g}")
    plot = LinePlot(title="identity: relative error of the updated no-context run, per layer (worst prompt)",
                    x_label="layer", y_label="relative error",
                    series=[Series(label="residual after the layer", y=worst_layer.tolist(), axis="right")])
    return dict(effect=effect, ci=(effect, effect), n=len(logits),
                metric="largest relative error of the query token's residual (counted layers) and logits, "
                       "no context + rank-1 updates vs with context (a check of the hooks, exact by "
                       "construction: not a finding)",
                details={"logits_max_rel_error": float(logits.max()), "logits_mean_rel_error": float(logits.mean()),
                         "layers_counted": list(layers), "dtype": dtype, "dtype_rounding_tolerance": rounding},
                untestable=untestable,
                curves={"max_rel_error_per_layer": worst_layer.tolist()}, plots=[plot])


def _steps(runs: Runs, part: str, layer: int) -> tuple[np.ndarray, np.ndarray]:
    """‖ΔW_i‖ [n, S] and ‖ΔW_i − ΔW_{i−1}‖ [n, S] (ΔW_0 = 0) for each prompt's growing context."""
    from ...subject import Rank1, frobenius, frobenius_diff
    from ...subject import rank1_factors as factors
    s = runs.prep.shots
    u0 = runs.u("plain", layer)
    ui = runs.u(part, layer).reshape(len(u0), s, -1)
    f = factors(runs.subject.sitemap, layer, u0[:, None].expand_as(ui), ui)
    norms = frobenius(f)
    diffs = frobenius_diff(Rank1(f.a[:, 1:], f.b[:, 1:]), Rank1(f.a[:, :-1], f.b[:, :-1]))
    return norms.numpy(), torch.cat([norms[:, :1], diffs], dim=1).numpy()


def _rho(steps: np.ndarray) -> tuple[np.ndarray, int]:
    """Spearman rho of steps i = 2..S against i, per prompt; a constant row counts as 0."""
    i = np.arange(2, steps.shape[1] + 1)
    rho = np.array([sps.spearmanr(i, row).statistic if np.ptp(row) > 0 else np.nan for row in steps[:, 1:]])
    flat = int(np.isnan(rho).sum())
    return np.nan_to_num(rho, nan=0.0), flat


def converges_claim(runs: Runs, layer: int, threshold: Any, seed: int) -> dict[str, Any]:
    """`threshold` is the claim's Threshold (value and comparison)."""
    norms, steps = _steps(runs, "prefix", layer)
    _, ctrl_steps = _steps(runs, "shuffled", layer)
    rho, flat = _rho(steps)
    ctrl_rho, _ = _rho(ctrl_steps)
    effect, lo, hi = bootstrap_ci(rho, seed=seed)
    p = paired_control(rho, ctrl_rho, threshold.comparison, seed)
    # Averaging over a longer context shrinks the steps whatever the labels say (a random-init model
    # "converges" too), so the control must be clearly weaker: beaten by the paired test AND not itself
    # meeting the threshold (its interval does not clear it).
    _, ctrl_lo, ctrl_hi = bootstrap_ci(ctrl_rho, seed=seed)
    ctrl_converges = bool(ctrl_hi <= threshold.value if threshold.comparison == "at_most" else ctrl_lo >= threshold.value)
    x = list(range(1, runs.prep.shots + 1))
    q = np.quantile(steps, [0.25, 0.5, 0.75], axis=0)
    plot = LinePlot(title=f"converges: update steps as examples are added (layer {layer}, {len(rho)} prompts)",
                    x_label="examples in context (i)", y_label="‖ΔW_i − ΔW_{i−1}‖", x=x,
                    series=[Series(label="median step", y=q[1].tolist()),
                            Series(label="25th percentile", y=q[0].tolist()),
                            Series(label="75th percentile", y=q[2].tolist()),
                            Series(label="median step, shuffled labels", y=np.median(ctrl_steps, 0).tolist()),
                            Series(label="median ‖ΔW_i‖", y=np.median(norms, 0).tolist(), axis="right")],
                    mark_x=2, mark_label="rho counts i >= 2")
    return dict(effect=effect, ci=(lo, hi), n=len(rho),
                metric=f"mean over prompts of Spearman rho(i, ‖ΔW_i − ΔW_(i−1)‖), i = 2..{runs.prep.shots}, "
                       f"layer {layer} (the step from no context, i = 1, also changes the format: not ranked)",
                control=ControlResult(name="shuffled-label contexts (each example given another's output)",
                                      effect=float(ctrl_rho.mean()), p_value=p,
                                      detail={"control_rho_ci": [ctrl_lo, ctrl_hi], "control_meets_threshold": ctrl_converges}),
                beats_control=beats_control(p) and not ctrl_converges,
                details={"layer": layer, "flat_prompts": flat,
                         "median_norm_last_over_half": float(np.median(norms[:, -1] / norms[:, len(x) // 2 - 1])),
                         "control_mean_rho": float(ctrl_rho.mean())},
                curves={"median_step": q[1].tolist(), "median_step_shuffled": np.median(ctrl_steps, 0).tolist(),
                        "median_norm": np.median(norms, 0).tolist()},
                plots=[plot])


def _updates(runs: Runs, layers: Sequence[int], plain: str, ctx: str, seed: int | None = None) -> dict:
    """Per layer, the direct factors of each prompt's full context (random output side when seeded)."""
    from ...subject import Rank1
    from ...subject import rank1_factors as factors
    s, out = runs.prep.shots, {}
    for layer in layers:
        u_ctx = runs.u(ctx, layer)
        if ctx == "prefix":
            u_ctx = u_ctx[s - 1::s]
        f = factors(runs.subject.sitemap, layer, runs.u(plain, layer), u_ctx)
        if seed is not None:
            r = random_unit_directions(len(f.a), f.a.shape[-1], seed + layer).double()
            f = Rank1(r * f.a.norm(dim=-1, keepdim=True), f.b)
        out[layer] = f
    return out


def transfers_claim(runs: Runs, layers: Sequence[int], control: str, seed: int, comparison: str) -> dict[str, Any]:
    ids, answers = runs.prep.ids["t_plain"], runs.prep.answers["t_plain"]
    zero, ctx = runs.logprob("t_plain"), runs.logprob("t_ctx")

    def applied(updates: dict) -> np.ndarray:
        return last_states(runs.subject, ids, (), answers, updates=updates,
                           batch_size=runs.spec.batch_size).logprob.numpy()

    own = applied(_updates(runs, layers, "plain", "prefix"))
    ctrl = {"random_rank1": applied(_updates(runs, layers, "plain", "prefix", seed))}
    if "o_plain" in runs.prep.ids:
        ctrl["other_task"] = applied(_updates(runs, layers, "o_plain", "o_ctx"))
    runs.counts["transfer_sequences"] = len(ids) * (1 + len(ctrl))
    gain = ctx - zero
    effect, lo, hi = paired_bootstrap([own, zero, ctx], faithfulness, seed=seed)
    p = paired_control(own - zero, ctrl[control] - zero, comparison, seed)
    names = {"other_task": "another task's update", "random_rank1": "random rank-1 update of the same norm"}
    bars = Bars(title=f"transfers: answer log-probability of an unseen query (layers {list(layers)})",
                value_label="mean log-probability", before_label="no context",
                labels=["with the context", "own context's update"] + [names[k] for k in ctrl],
                before=[float(zero.mean())] * (2 + len(ctrl)),
                after=[float(ctx.mean()), float(own.mean())] + [float(v.mean()) for v in ctrl.values()])
    untestable = None
    if gain.mean() <= 0:
        untestable = f"the context does not raise the answer's log-probability (mean gain {gain.mean():.3g})"
    return dict(effect=effect, ci=(lo, hi), n=len(own),
                metric="share of the context's mean gain in the unseen query's answer log-probability recovered "
                       "by the rank-1 updates of the MLP input matrices (no bias) from another query's context",
                control=ControlResult(name=names[control], effect=float(faithfulness(ctrl[control], zero, ctx)),
                                      p_value=p, detail={"test": "paired permutation over queries, one-sided "
                                                                 f"({alternative_for(comparison)})"}),
                beats_control=beats_control(p), untestable=untestable,
                details={"layers": list(layers), "mean_context_gain": float(gain.mean()),
                         **{f"{k}_recovered": float(faithfulness(v, zero, ctx)) for k, v in ctrl.items()}},
                plots=[bars])


__all__ = ["Prepared", "Runs", "converges_claim", "identity_claim", "transfers_claim"]
