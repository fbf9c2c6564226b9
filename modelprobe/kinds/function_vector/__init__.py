"""function_vector: a vector taken from in-context prompts performs the task zero-shot (Todd et al. 2023).

Procedure (Todd et al. 2023): few-shot prompts give each head's mean output at the last token; each
head's indirect effect is the gain in the answer's probability when that mean replaces the head's
output on shuffled-label prompts (all heads batched, one row per head, resumed at the head's layer);
the function vector (FV) is the sum of the top heads' mean outputs through the output projection. It
is added to the residual stream entering one layer (`auto`: the best layer on a dev split) at the
last token of zero-shot prompts, and answers are scored by their first token (top-1).

Claims: zero_shot_gain (accuracy with the FV minus without, on held-out items the model answers with
`shots` examples); beats_controls (the gain over the strongest of a random vector of the same norm,
another task's FV and the layer's mean state); composes (FVs of named tasks added and subtracted,
applied on another task's zero-shot prompts). A task the model cannot do in context (few-shot accuracy
below `min_fewshot_accuracy`) makes its claims inconclusive (untestable), never a failure of the vector.

Controls: zero_shot_gain is paired against the same zero-shot prompts without the vector; beats_controls
against the strongest of three: a random vector of the same norm, another task's vector and the layer's mean
state; composes against a random vector of the sum's norm.

Verdicts: pass when the paired-bootstrap interval of the accuracy gain clears the threshold (and, where a
claim has one to beat, its control is beaten). Inconclusive when
the interval straddles the threshold, or when the model cannot do the task in context (few-shot accuracy below
`min_fewshot_accuracy`, or too few held-out items answered with examples): a task the model cannot do says
nothing about the vector.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import AfterValidator, Field, model_validator

from ...errors import SiteError
from ...report.record import ControlResult, HeatMap, LinePlot, Series, Table
from ...spec import ClaimSpec, DataFile, IclFormat, OneExpectation, ProbeSpec
from ...spec.fields import Rate, RateChangeThreshold, Strict
from ...stats import paired_bootstrap
from ...toolkit.controls import beats_control, paired_control, same_norm_vectors
from ...toolkit.prompts import answer_tokens, data_error, read_rows, split_indices
from ..base import Measured, Outcome, ProbeKind, judge

MIN_SCORED = 5  # held-out items answered with examples, below which no gain is measured


def _task_name(name: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_\-]+", name):
        raise ValueError(f"task name {name!r} may hold only letters, digits, '_' and '-'")
    return name


TaskName = Annotated[str, AfterValidator(_task_name)]


class HeadSelection(Strict):
    top: int = Field(10, ge=1, le=4096, description="heads whose mean outputs are summed into the vector")
    select_on: Literal["shuffled_labels", "zero_shot"] = Field(
        "shuffled_labels", description="prompts the indirect effect is measured on: shuffled-label few-shot "
                                       "prompts (Todd et al.) or the same queries with no examples")


class Algebra(Strict):
    plus: list[TaskName] = Field(min_length=1, max_length=16, description="task names whose vectors are added")
    minus: list[TaskName] = Field(default_factory=list, max_length=16,
                                  description="task names whose vectors are subtracted")


class FvExpect(OneExpectation):
    accuracy_gain: RateChangeThreshold | None = Field(
        None, description="top-1 accuracy with the vector minus without it, on held-out zero-shot prompts")
    accuracy_gain_over_control: RateChangeThreshold | None = Field(
        None, description="accuracy with the vector minus with the strongest control vector")


class FvClaim(ClaimSpec):
    expect: FvExpect
    algebra: Algebra | None = Field(None, description="composes: named tasks' vectors added and subtracted")
    task: DataFile | None = Field(None, description="composes: JSONL task file whose zero-shot prompts get the sum")

    @model_validator(mode="after")
    def _fits(self) -> FvClaim:
        if (self.algebra is None) != (self.task is None):
            raise ValueError("composes needs both 'algebra' and 'task' (the task the sum should perform)")
        if self.algebra is not None and self.expect.statistic != "accuracy_gain":
            raise ValueError("composes (algebra) tests accuracy_gain")
        return self

    @property
    def role(self) -> str:
        if self.algebra is not None:
            return "composes"
        return "beats_controls" if self.expect.statistic == "accuracy_gain_over_control" else "zero_shot_gain"


class FunctionVectorSpec(ProbeSpec[FvClaim]):
    kind: Literal["function_vector"]
    task: DataFile = Field(description='JSONL task file, one {"input": ..., "output": ...} per line')
    format: IclFormat
    shots: int = Field(10, ge=1, le=64, description="examples per few-shot prompt")
    prompts: int = Field(20, ge=2, le=1024, description="few-shot prompts for the mean head outputs (and their "
                                                         "shuffled-label twins for the indirect effects)")
    heads: HeadSelection = Field(default_factory=HeadSelection)
    layer: Literal["auto"] | int | float = Field(
        "auto", description="where the vector is added (residual stream entering the layer): auto (best on the "
                            "dev split), an int (negative from the end) or a fraction of depth")
    dev: int = Field(15, ge=2, le=4096, description="held-out queries that choose the layer (layer: auto)")
    test: int = Field(40, ge=5, le=4096, description="held-out queries the claims are measured on")
    min_fewshot_accuracy: Rate = Field(0.5, description="a task answered less often than this with `shots` "
                                                        "examples is untestable (no function to extract)")
    control_task: DataFile | None = Field(None, description="another task's JSONL file, whose vector is a control "
                                                       "(default: the first task an algebra names)")
    tasks: dict[TaskName, str] = Field(default_factory=dict, description="algebra task names -> JSONL files "
                                       "(default: a name N means data/icl_N.jsonl next to the probe)")


def task_file(spec: FunctionVectorSpec, name: str) -> str:
    """The data file an algebra task name stands for."""
    return spec.tasks.get(name, f"data/icl_{name}.jsonl")


def _named(spec: FunctionVectorSpec) -> list[tuple[str, tuple]]:
    """(task name, its YAML loc) of every algebra entry, in file order."""
    out = []
    for cname, claim in spec.claims.items():
        if claim.algebra is not None:
            for sign in ("plus", "minus"):
                out += [(n, ("claims", cname, "algebra", sign, i)) for i, n in enumerate(getattr(claim.algebra, sign))]
    return out


def _lists(items: tuple[str, ...], pick: Any, n: int = 60) -> list[dict]:
    """n example rows over 3-item lists of `items` (every ordered triple in turn), answered by `pick`."""
    import itertools
    triples = itertools.islice(itertools.permutations(items, 3), 0, None, 7)
    return [{"input": ", ".join(t), "output": " " + pick(t)} for t in itertools.islice(triples, n)]


_WORDS = ("apple", "river", "chair", "tiger", "candle", "window", "garden", "pencil", "rocket", "violin")
_CAPITALS = {"France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Spain": "Madrid", "Egypt": "Cairo",
             "Kenya": "Nairobi", "Peru": "Lima", "Greece": "Athens", "Norway": "Oslo", "Cuba": "Havana"}


class FunctionVector(ProbeKind[FunctionVectorSpec]):
    Spec = FunctionVectorSpec
    skeleton = """\
about: A function vector for "copy the last item", added to zero-shot prompts, makes the model do it.
tags: [function_vector]
task: data/icl_copy_last.jsonl           # JSONL {"input": "apple, river, chair", "output": " chair"}
format: {example: "Q: {input}\\nA:{output}\\n", query: "Q: {input}\\nA:"}
shots: 8                                 # examples per few-shot prompt (the task needs dev + test + shots + 1 rows)
prompts: 16                              # few-shot prompts: mean head outputs (and their shuffled-label twins)
heads: {top: 10, select_on: shuffled_labels}   # or zero_shot: the indirect effect on the bare queries
layer: auto                              # best layer on the dev split; or an int / fraction of depth
dev: 10
test: 40
min_fewshot_accuracy: 0.5                # a task done less often with `shots` examples is untestable
control_task: data/icl_copy_first.jsonl  # another task's vector, one of the controls
tasks: {capital_of_first: data/icl_first_country_capital.jsonl}   # algebra names -> files
claims:                                  # (a name N without an entry means data/icl_N.jsonl)
  zero_shot_gain:
    expect: {accuracy_gain: {at_least: 0.2}}
  beats_controls:                        # random vector of the same norm, another task's vector, mean state
    expect: {accuracy_gain_over_control: {at_least: 0.1}}
  composes:                              # the named tasks' vectors added / subtracted, on another task
    algebra: {plus: [capital_of_first, copy_last], minus: [copy_first]}
    task: data/icl_last_country_capital.jsonl
    expect: {accuracy_gain: {at_least: 0.1}}
"""
    skeleton_data = {
        "data/icl_copy_last.jsonl": _lists(_WORDS, lambda t: t[-1]),
        "data/icl_copy_first.jsonl": _lists(_WORDS, lambda t: t[0]),
        "data/icl_first_country_capital.jsonl": _lists(tuple(_CAPITALS), lambda t: _CAPITALS[t[0]]),
        "data/icl_last_country_capital.jsonl": _lists(tuple(_CAPITALS), lambda t: _CAPITALS[t[-1]]),
    }

    @classmethod
    def check_data(cls, probe) -> dict[str, list[dict]]:
        spec: FunctionVectorSpec = probe.spec
        rows = {spec.task: _rows(probe, spec.task, ("task",))}
        need = spec.dev + spec.test + spec.shots + 1
        if len(rows[spec.task]) < need:
            raise probe.error(f"the task has {len(rows[spec.task])} items; dev {spec.dev} + test {spec.test} + "
                              f"shots {spec.shots} + 1 = {need} are needed (held-out queries, examples and a "
                              "query)", ("task",))
        for cname, claim in spec.claims.items():
            if claim.task:
                rows[claim.task] = got = _rows(probe, claim.task, ("claims", cname, "task"))
                if len(got) < spec.test + spec.shots + 1:
                    raise probe.error(f"the task has {len(got)} items; test {spec.test} + shots {spec.shots} + 1 "
                                      f"= {spec.test + spec.shots + 1} are needed", ("claims", cname, "task"))
        for name, loc in _named(spec):
            rel = task_file(spec, name)
            probe.allowed_path(rel, loc)  # before looking at the file: a path outside must reveal nothing
            if not (probe.path.parent / rel).is_file():
                how = "its file under 'tasks:'" if name not in spec.tasks else "an existing file"
                raise probe.error(f"task '{name}' has no data: '{probe.path.parent / rel}' not found (give {how})",
                                  loc)
            rows[rel] = _rows(probe, rel, loc, spec.shots + 1)
        if spec.control_task:
            rows[spec.control_task] = _rows(probe, spec.control_task, ("control_task",), spec.shots + 1)
        elif any(c.role == "beats_controls" for c in spec.claims.values()) and not _named(spec):
            name = next(n for n, c in spec.claims.items() if c.role == "beats_controls")
            raise probe.error("beats_controls needs another task's vector: give 'control_task' (a JSONL file)",
                              ("claims", name))
        return rows

    def setup(self) -> None:
        from ...subject import resolve_layer

        spec, subject = self.spec, self.subject
        self.rows = self.check_data(self.probe)
        self.layer = None if spec.layer == "auto" else resolve_layer(spec.layer, subject.n_layers, ("layer",))[0]
        n_heads = subject.n_layers * subject.sitemap.n_heads
        if spec.heads.top > n_heads:
            raise self.probe.error(f"heads.top {spec.heads.top} exceeds the model's {n_heads} heads", ("heads", "top"))
        self.first = {rel: _first_tokens(subject, rows, self.probe.path.parent / rel) for rel, rows in self.rows.items()}

    def measure(self) -> Outcome:
        run = _Run(self)
        main = run.main()
        layer, sweep = run.choose_layer(main)
        settings = {"task": self.spec.task, "shots": self.spec.shots, "prompts": self.spec.prompts,
                    "layer": layer, "layer_chosen": "auto (dev split)" if self.layer is None else "given",
                    "added_at": f"resid_pre of layer {layer} (the residual stream entering it), last token",
                    "heads": [list(h) for h in main["heads"]], "heads_selected_on": self.spec.heads.select_on, "fv_norm": float(main["fv"].norm()),
                    "fewshot_accuracy": main["fewshot_acc"], "head_effect_prompts": self.spec.prompts,
                    "answers_scored_by_first_token": True, **run.counts}
        claims = []
        for name, claim in self.spec.claims.items():
            if claim.role == "zero_shot_gain":
                m = run.zero_shot_gain(main, layer, sweep)
            elif claim.role == "beats_controls":
                m = run.beats_controls(main, layer)
            else:
                m = run.composes(main, layer, claim)
            claims.append(judge(name, claim, m))
        return Outcome(settings, claims)


def _rows(probe, rel: str, loc: tuple, at_least: int = 0) -> list[dict]:
    rows = read_rows(probe, rel, loc, ("input", "output"))
    if len(rows) < at_least:
        raise probe.error(f"the task has {len(rows)} items; shots + 1 = {at_least} are needed", loc)
    return rows


def _first_tokens(subject, rows: list[dict], path: Path) -> list[int]:
    out = []
    for i, row in enumerate(rows):
        try:
            out.append(answer_tokens(subject, row["output"])[0])
        except SiteError as e:
            raise data_error(path, i + 1, "output", e) from None
    return out


def _gain(with_fv: np.ndarray, other: np.ndarray, seed: int) -> tuple[float, tuple[float, float]]:
    est, lo, hi = paired_bootstrap([with_fv.astype(float), other.astype(float)],
                                   lambda a, b, axis=None: np.mean(a - b, axis=axis), seed=seed)
    return est, (lo, hi)


class _Run:
    """The measurements one probe needs, each made once."""

    def __init__(self, kind: FunctionVector):
        self.kind, self.spec, self.subject = kind, kind.spec, kind.subject
        self.counts: dict[str, int] = {}
        self._tasks: dict[str, Any] = {}

    def prompts(self, rel: str, held: dict[str, int]):
        """(TaskPrompts, FewShot) of a task: `held` sizes of held-out parts, the rest is the pool."""
        from . import heads as fv

        key = (rel, tuple(sorted(held.items())))
        if key not in self._tasks:
            rows, spec = self.kind.rows[rel], self.spec
            split = split_indices(len(rows), {**held, "pool": len(rows) - sum(held.values())}, spec.seed)
            p = fv.build_prompts(self.subject, spec.format, rows, self.kind.first[rel], split["pool"],
                                 {k: split[k].tolist() for k in held}, spec.prompts, spec.shots, spec.seed,
                                 self.kind.probe.path.parent / rel)
            few = fv.few_shot_pass(self.subject, p.few_shot, p.answers, spec.batch_size)
            self.counts["few_shot_prompts"] = self.counts.get("few_shot_prompts", 0) + len(p.few_shot)
            self._tasks[key] = (p, few)
        return self._tasks[key]

    def fewshot_correct(self, p, part: str) -> np.ndarray:
        from . import heads as fv
        return fv.correct_with(self.subject, p.held_few_shot[part], p.held_answers[part], None, None,
                               self.spec.batch_size)

    def main(self) -> dict[str, Any]:
        from . import heads as fv

        spec = self.spec
        p, few = self.prompts(spec.task, {"dev": spec.dev, "test": spec.test})
        on = p.shuffled if spec.heads.select_on == "shuffled_labels" else p.query_alone
        effects = fv.head_effects(self.subject, on, p.answers, few.head_means)
        self.counts["head_effect_rows"] = effects.size
        # Where the selection prompts are answered anyway (a task named by its outputs alone survives
        # shuffled labels), every effect is ~0 and the top heads are arbitrary: reported, not hidden.
        base = fv.correct_with(self.subject, on, p.answers, None, None, spec.batch_size)
        self.counts["selection_prompt_accuracy"] = float(base.mean())
        self.counts["largest_mean_head_effect"] = float(effects.mean(0).max())
        heads = fv.top_heads(effects, spec.heads.top)
        solved = self.fewshot_correct(p, "test")
        return {"p": p, "few": few, "effects": effects, "heads": heads, "solved": solved,
                "fewshot_acc": float(solved.mean()), "fv": fv.head_vector(self.subject, few.head_means, heads)}

    def vector_of(self, rel: str, heads) -> Any:
        from . import heads as fv
        _, few = self.prompts(rel, {})
        return fv.head_vector(self.subject, few.head_means, heads)

    def choose_layer(self, main: dict) -> tuple[int, dict | None]:
        from . import heads as fv

        p = main["p"]
        if self.kind.layer is not None:
            return self.kind.layer, None
        ids, ans = p.zero_shot["dev"], p.held_answers["dev"]
        base = float(fv.correct_with(self.subject, ids, ans, None, None, self.spec.batch_size).mean())
        acc = [float(fv.correct_with(self.subject, ids, ans, layer, main["fv"], self.spec.batch_size).mean())
               for layer in range(self.subject.n_layers)]
        return int(np.argmax(acc)), {"dev_accuracy": acc, "dev_baseline": base}

    def untestable(self, acc: float, scored: int, what: str) -> str | None:
        floor = self.spec.min_fewshot_accuracy
        if acc < floor:
            return (f"untestable: the model answers {acc:.2f} of {what}'s held-out items with {self.spec.shots} "
                    f"examples (floor {floor:g}): it cannot do the task in context, so there is no function to "
                    "extract")
        if scored < MIN_SCORED:
            return f"untestable: only {scored} held-out items of {what} are answered with examples (need {MIN_SCORED})"
        return None

    def scored(self, p, solved: np.ndarray, layer: int, vector) -> tuple[np.ndarray, np.ndarray, list]:
        from . import heads as fv
        keep = np.flatnonzero(solved)
        ids = [p.zero_shot["test"][i] for i in keep]
        ans = [p.held_answers["test"][i] for i in keep]
        none = fv.correct_with(self.subject, ids, ans, None, None, self.spec.batch_size)
        with_fv = fv.correct_with(self.subject, ids, ans, layer, vector, self.spec.batch_size)
        return none, with_fv, [ids, ans]

    def zero_shot_gain(self, main: dict, layer: int, sweep: dict | None) -> Measured:
        metric = f"zero-shot top-1 accuracy with the function vector added at layer {layer} minus without"
        why = self.untestable(main["fewshot_acc"], int(main["solved"].sum()), self.spec.task)
        plots = [_heat_map(main, self.spec.heads.select_on)] + ([_sweep_plot(sweep, layer)] if sweep else [])
        if why:
            return Measured(None, None, 0, metric, untestable=why, plots=plots,
                            details={"fewshot_accuracy": main["fewshot_acc"]})
        none, with_fv, _ = self.scored(main["p"], main["solved"], layer, main["fv"])
        est, ci = _gain(with_fv, none, self.spec.seed)
        return Measured(est, ci, len(none), metric,
                        control=ControlResult(name="zero-shot, no vector (paired)", effect=float(none.mean())),
                        details={"accuracy_with": float(with_fv.mean()), "accuracy_without": float(none.mean()),
                                 "fewshot_accuracy": main["fewshot_acc"], "layer": layer,
                                 "heads": [list(h) for h in main["heads"]]},
                        curves={k: v for k, v in (sweep or {}).items() if isinstance(v, list)}, plots=plots)

    def beats_controls(self, main: dict, layer: int) -> Measured:
        spec = self.spec
        metric = f"zero-shot accuracy with the function vector minus with the strongest control (layer {layer})"
        why = self.untestable(main["fewshot_acc"], int(main["solved"].sum()), spec.task)
        if why:
            return Measured(None, None, 0, metric, untestable=why)
        none, with_fv, (ids, ans) = self.scored(main["p"], main["solved"], layer, main["fv"])
        other = spec.control_task or task_file(spec, _named(spec)[0][0])
        vectors = {"random vector, same norm": same_norm_vectors(len(ids), main["fv"], spec.seed).double(),
                   f"another task's vector ({other})": self.vector_of(other, main["heads"]),
                   f"mean state of layer {layer}": main["few"].resid_means[layer]}
        from . import heads as fv
        got = {k: fv.correct_with(self.subject, ids, ans, layer, v, spec.batch_size) for k, v in vectors.items()}
        strongest = max(got, key=lambda k: got[k].mean())
        est, ci = _gain(with_fv, got[strongest], spec.seed)
        p = paired_control(with_fv.astype(float), got[strongest].astype(float), "at_least", spec.seed)
        rows = [["function vector", float(with_fv.mean()), None, float(main["fv"].norm())],
                ["no vector", float(none.mean()), float((with_fv.astype(float) - none).mean()), 0.0]]
        rows += [[k, float(v.mean()), float((with_fv.astype(float) - v).mean()),
                  float(vectors[k].norm(dim=-1).mean())] for k, v in got.items()]
        table = Table(title=f"controls at layer {layer} ({len(ids)} held-out zero-shot prompts)",
                      columns=["vector", "accuracy", "FV gain over it", "norm"], rows=rows)
        return Measured(est, ci, len(ids), metric,
                        control=ControlResult(name=f"strongest control: {strongest}", effect=float(got[strongest].mean()),
                                              p_value=p, detail={k: float(v.mean()) for k, v in got.items()}),
                        beats_control=beats_control(p),
                        details={"accuracy_with": float(with_fv.mean()), "accuracy_without": float(none.mean()),
                                 **{f"accuracy {k}": float(v.mean()) for k, v in got.items()}},
                        plots=[table])

    def composes(self, main: dict, layer: int, claim: FvClaim) -> Measured:
        spec, alg = self.spec, claim.algebra
        metric = (f"zero-shot accuracy on {claim.task} with sum({', '.join(alg.plus)}) - sum({', '.join(alg.minus)}) "
                  f"added at layer {layer}, minus without")
        p, few = self.prompts(claim.task, {"test": spec.test})
        solved = self.fewshot_correct(p, "test")
        why = self.untestable(float(solved.mean()), int(solved.sum()), claim.task)
        if why:
            return Measured(None, None, 0, metric, untestable=why, details={"fewshot_accuracy": float(solved.mean())})
        total = sum(self.vector_of(task_file(spec, n), main["heads"]) for n in alg.plus)
        total = total - sum((self.vector_of(task_file(spec, n), main["heads"]) for n in alg.minus), 0 * total)
        none, with_fv, (ids, ans) = self.scored(p, solved, layer, total)
        from . import heads as fv
        rand = fv.correct_with(self.subject, ids, ans, layer, same_norm_vectors(len(ids), total, spec.seed).double(),
                               spec.batch_size)
        own = fv.correct_with(self.subject, ids, ans, layer, fv.head_vector(self.subject, few.head_means, main["heads"]),
                              spec.batch_size)
        est, ci = _gain(with_fv, none, spec.seed)
        pval = paired_control(with_fv.astype(float), rand.astype(float), "at_least", spec.seed)
        return Measured(est, ci, len(ids), metric,
                        control=ControlResult(name="random vector of the sum's norm", effect=float(rand.mean()),
                                              p_value=pval),
                        beats_control=beats_control(pval),
                        details={"accuracy_with": float(with_fv.mean()), "accuracy_without": float(none.mean()),
                                 "accuracy_own_task_vector": float(own.mean()), "fewshot_accuracy": float(solved.mean()),
                                 "sum_norm": float(total.norm())})


def _heat_map(main: dict, select_on: str) -> HeatMap:
    mean = main["effects"].mean(0)
    top = main["heads"][0]
    on = "shuffled-label prompts" if select_on == "shuffled_labels" else "zero-shot prompts"
    return HeatMap(title=f"indirect effect of each head's mean output on {on} ({main['effects'].shape[0]} prompts)", x_label="head", y_label="layer",
                   value_label="gain in P(answer)", values=mean.tolist(),
                   x_ticks=[str(h) for h in range(mean.shape[1])], y_ticks=[str(x) for x in range(mean.shape[0])],
                   mark=(top[0], top[1]))


def _sweep_plot(sweep: dict, layer: int) -> LinePlot:
    acc = sweep["dev_accuracy"]
    return LinePlot(title="dev accuracy with the function vector added, per layer", x_label="layer",
                    y_label="zero-shot top-1 accuracy",
                    series=[Series(label="with the vector", y=acc),
                            Series(label="without", y=[sweep["dev_baseline"]] * len(acc))],
                    mark_x=layer, mark_label="chosen layer")
