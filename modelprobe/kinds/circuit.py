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
  unit, and resumes (`subject.resume`) from whichever it follows longer, so the layers below the
  first one it changes are never recomputed;
- prompts are batched by token length (and `group_by` value), so a batch has no padding and one
  set of per-position means.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from ..errors import DataError, SiteError
from ..report.record import ClaimResult, ControlResult
from ..spec import OneExpectation, ProbeBase, Strict, Threshold, Tolerance
from ..spec.fields import LayerSpec
from ..stats import empirical_pvalue, paired_bootstrap
from ..subject import Intervention, MeanAblate, Site, ZeroAblate, resolve_layer, resolve_sites
from ..subject.resume import can_resume, resume
from .base import Outcome, ProbeKind, judge

ALPHA = 0.05  # the circuit beats its control when the empirical p-value is at most this
Metric = Literal["logit_diff", "logprob", "accuracy"]
Ablation = Literal["mean", "mean_all_positions", "zero", "resample"]


# ---- the probe file ---------------------------------------------------------------------------

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


class CircuitClaim(Strict):
    test: Literal["sufficiency", "necessity", "minimality"] = Field(
        description="sufficiency: ablate everything in scope except the circuit; necessity: ablate only the "
        "circuit; minimality: every component matters (removing it lowers sufficiency)")
    expect: CircuitExpect
    tolerance: Tolerance | None = None

    @model_validator(mode="after")
    def _statistic_fits_test(self) -> CircuitClaim:
        wanted = "min_drop" if self.test == "minimality" else "faithfulness"
        if self.expect.statistic != wanted:
            raise ValueError(f"test '{self.test}' is judged on '{wanted}', not '{self.expect.statistic}'")
        return self


class CircuitControls(Strict):
    random_circuits: int = Field(100, ge=0, description="random circuits of the same size, same layers "
                                 "where possible; 0 turns the control off")
    prompts: int | None = Field(None, ge=2, description="measure the random circuits (and, for the "
                                "comparison, the circuit) on a seeded sample of this many prompts")


class CircuitSpec(ProbeBase):
    kind: Literal["circuit"]
    prompts: str = Field(description='JSONL file: {"prompt": ..., "answer": " Mary", "wrong": " John"}')
    reference: str | None = Field(None, description="JSONL file whose activations replace ablated components "
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
    claims: dict[str, CircuitClaim] = Field(min_length=1)
    controls: CircuitControls = Field(default_factory=CircuitControls)

    @model_validator(mode="after")
    def _reference_when_needed(self) -> CircuitSpec:
        if self.ablation != "zero" and self.reference is None:
            raise ValueError(f"ablation '{self.ablation}' needs a 'reference' file")
        if self.group_by is not None and self.ablation not in ("mean", "resample"):
            raise ValueError("group_by applies to per-position ablations (mean, resample) only")
        return self


# ---- units: what can be ablated -------------------------------------------------------------

@dataclass(frozen=True)
class Unit:
    """One ablatable component: a head, a whole MLP, or one MLP neuron."""

    layer: int
    kind: Literal["head", "mlp", "neuron"]
    index: int = 0

    @property
    def name(self) -> str:
        if self.kind == "head":
            return Site("attn.z", self.layer, heads=(self.index,)).name
        if self.kind == "neuron":
            return Site("mlp.post", self.layer, neurons=(self.index,)).name
        return Site("mlp_out", self.layer).name

    def to_yaml(self) -> dict[str, Any]:
        if self.kind == "head":
            return {"layer": self.layer, "component": "attn.z", "head": self.index}
        if self.kind == "neuron":
            return {"layer": self.layer, "component": "mlp.post", "neuron": self.index}
        return {"layer": self.layer, "component": "mlp_out"}


class Scope:
    """The units that 'everything' ablates, and how a set of them becomes per-site unit masks."""

    def __init__(self, units: list[Unit], n_heads: int, d_mlp: int, description: str):
        self.units = units
        self.description = description
        self.index = {u: i for i, u in enumerate(units)}
        self.n_heads, self.d_mlp = n_heads, d_mlp
        # (component, layer) -> (columns of the config vector, how they map onto the site's units)
        self.sites: dict[tuple[str, int], tuple[str, np.ndarray]] = {}
        by_layer: dict[tuple[str, int], list[int]] = defaultdict(list)
        for i, u in enumerate(units):
            by_layer[("attn.z" if u.kind == "head" else "mlp.post", u.layer)].append(i)
        for (comp, layer), cols in sorted(by_layer.items(), key=lambda kv: (kv[0][1], kv[0][0])):
            kinds = {units[c].kind for c in cols}
            if kinds == {"mlp"}:
                self.sites[(comp, layer)] = ("whole", np.array(cols))
            else:
                width = n_heads if comp == "attn.z" else d_mlp
                full = np.full(width, -1)
                for c in cols:
                    full[units[c].index] = c
                self.sites[(comp, layer)] = ("units", full)
        self.unit_layer = np.array([u.layer for u in units])

    def __len__(self) -> int:
        return len(self.units)

    def vector(self, units: Sequence[Unit]) -> np.ndarray:
        v = np.zeros(len(self.units), dtype=bool)
        v[[self.index[u] for u in units]] = True
        return v

    def start_layer(self, config: np.ndarray) -> int | None:
        """The first layer a config ablates (None: it ablates nothing)."""
        layers = self.unit_layer[config]
        return int(layers.min()) if layers.size else None

    def site_masks(self, configs: np.ndarray) -> list[tuple[Site, torch.Tensor]]:
        """[rows, units] masks per site for a batch of configs; sites no row touches are left out."""
        out = []
        for (comp, layer), (how, cols) in self.sites.items():
            if how == "whole":
                rows = configs[:, cols[0]]
                if not rows.any():
                    continue
                mask = np.repeat(rows[:, None], self.d_mlp, axis=1)
            else:
                mask = np.zeros((configs.shape[0], cols.shape[0]), dtype=bool)
                have = cols >= 0
                mask[:, have] = configs[:, cols[have]]
                if not mask.any():
                    continue
            out.append((Site(comp, layer), torch.from_numpy(mask)))
        return out


def build_scope(scope: Any, sitemap: Any, loc: tuple = ("scope",)) -> Scope:
    """The scope's units for one model. Raises SiteError for layers the model does not have."""
    n_heads, d_mlp, n_layers = sitemap.n_heads, sitemap.d_mlp, sitemap.n_layers
    heads = [Unit(layer, "head", h) for layer in range(n_layers) for h in range(n_heads)]
    if scope == "attention_heads":
        return Scope(heads, n_heads, d_mlp, f"every attention head ({len(heads)})")
    if scope == "heads_and_mlps":
        units = [u for layer in range(n_layers) for u in
                 [*(Unit(layer, "head", h) for h in range(n_heads)), Unit(layer, "mlp")]]
        return Scope(units, n_heads, d_mlp, f"every attention head and every MLP ({len(units)} units)")
    spec = scope.neurons if isinstance(scope, NeuronScope) else scope["neurons"]
    layers = sorted(set(resolve_layer(spec, n_layers, (*loc, "neurons"))))
    units = [Unit(layer, "neuron", n) for layer in layers for n in range(d_mlp)]
    return Scope(units, n_heads, d_mlp, f"the MLP neurons of layers {layers} ({len(units)})")


def circuit_units(entries: Sequence[CircuitComponent], scope: Scope, sitemap: Any,
                  loc: tuple = ("circuit",)) -> list[Unit]:
    """Expand the circuit's entries into scope units; SiteError (located) for anything off-model."""
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


# ---- the task data --------------------------------------------------------------------------

@dataclass
class Task:
    """Tokenized prompts and targets, the reference prompts, and how the two line up."""

    prompt_ids: list[list[int]]
    answers: torch.Tensor  # [n]
    wrongs: torch.Tensor | None  # [n] (logit_diff only)
    keys: list[tuple]  # batching / mean group of each prompt
    ref_ids: list[list[int]]
    ref_keys: list[tuple]
    ref_source: list[int] | None  # resample: reference row of each prompt
    paired: bool  # the reference file pairs line by line with the prompt file
    settings: dict[str, Any]


def parse_rows(text: str | None, n: int) -> list[int]:
    """Indices selected by a 0-based 'start:stop' slice (None: all); ValueError with the reason."""
    if text is None:
        return list(range(n))
    a, sep, b = str(text).partition(":")
    try:
        if not sep:
            raise ValueError
        start = int(a) if a.strip() else 0
        stop = int(b) if b.strip() else n
    except ValueError:
        raise ValueError(f"rows '{text}' is not a slice 'start:stop'") from None
    picked = list(range(n))[start:stop]
    if not picked:
        raise ValueError(f"rows '{text}' selects no line of a file with {n} lines")
    return picked


def prepare_task(subject: Any, prompt_rows: list[dict], prompt_path: Path, ref_rows: list[dict] | None,
                 ref_path: Path | None, metric: str, ablation: str, group_by: str | None, rows: str | None,
                 seed: int = 0) -> Task:
    """Tokenize and check the data; one located DataError per problem (`file:line: message`)."""
    try:
        used = parse_rows(rows, len(prompt_rows))
    except ValueError as e:
        raise DataError(f"{prompt_path}: {e}") from None
    model = subject.info.id

    def one_token(text: Any, field: str, line: int) -> int:
        toks = subject.token_id(text) if isinstance(text, str) else []
        if len(toks) != 1:
            raise DataError(f"{prompt_path}:{line}: {field} {text!r} is {len(toks)} tokens for model '{model}'; "
                            "the circuit metric needs exactly one")
        return toks[0]

    ids, answers, wrongs = [], [], []
    for i in used:
        row, line = prompt_rows[i], i + 1
        answers.append(one_token(row.get("answer"), "answer", line))
        if metric == "logit_diff":
            if "wrong" not in row:
                raise DataError(f"{prompt_path}:{line}: missing field 'wrong' (metric logit_diff needs it)")
            wrongs.append(one_token(row["wrong"], "wrong", line))
            if wrongs[-1] == answers[-1]:
                raise DataError(f"{prompt_path}:{line}: answer and wrong are the same token")
        ids.append(subject.encode(row["prompt"]))
    per_position = ablation in ("mean", "resample")

    def group_value(row: dict, path: Path, line: int) -> tuple:
        if group_by is None:
            return ()
        if group_by not in row:
            raise DataError(f"{path}:{line}: missing field '{group_by}' (group_by needs it in both files)")
        return (row[group_by],)

    keys = [(len(x), *group_value(prompt_rows[i], prompt_path, i + 1)) if per_position else (len(x),)
            for i, x in zip(used, ids)]
    ref_ids = [subject.encode(r["prompt"]) for r in ref_rows] if ref_rows else []
    ref_keys = [(len(x), *group_value(r, ref_path, j + 1)) if per_position else (len(x),)
                for j, (x, r) in enumerate(zip(ref_ids, ref_rows or []))]
    paired = bool(ref_rows) and len(ref_rows) == len(prompt_rows)
    if per_position:
        # Files of equal length pair up line by line (IOI and its ABC partner): each partner must have
        # the same token positions. Otherwise every prompt needs reference prompts of its own length.
        available = set(ref_keys)
        why = (f"ablation '{ablation}' replaces token index t by reference values at index t, so the "
               "positions must align (or use ablation: mean_all_positions)")
        for i, key in zip(used, keys):
            what = f"{key[0]} tokens" + (f" and {group_by} {key[1]!r}" if group_by else "")
            if paired and ref_keys[i] != key:
                mine = f"{ref_keys[i][0]} tokens" + (f" and {group_by} {ref_keys[i][1]!r}" if group_by else "")
                raise DataError(f"{ref_path}:{i + 1}: reference prompt has {mine}, but its partner "
                                f"{prompt_path}:{i + 1} has {what}; {why}")
            if key not in available:
                raise DataError(f"{prompt_path}:{i + 1}: prompt has {what}, and no reference prompt in "
                                f"{ref_path} does; {why}")
    ref_source = None
    pairing = None
    if ablation == "resample":
        rng = np.random.default_rng(seed)
        by_key: dict[tuple, list[int]] = defaultdict(list)
        for j, k in enumerate(ref_keys):
            by_key[k].append(j)
        ref_source = []
        all_partners = paired and all(ref_keys[i] == k for i, k in zip(used, keys))
        for i, k in zip(used, keys):
            ref_source.append(i if all_partners else int(rng.choice(by_key[k])))
        pairing = ("the partner line of the reference file" if all_partners
                   else "a seeded random reference prompt of the same token length" + (
                       f" and {group_by}" if group_by else ""))
    settings = {
        "prompts_used": len(used), "rows": rows or "all", "reference_prompts": len(ref_ids),
        "reference_pairs_with_prompts": paired,
        "prompt_lengths": sorted({len(x) for x in ids}),
    }
    if pairing:
        settings["resample_source"] = pairing
    return Task(ids, torch.tensor(answers), torch.tensor(wrongs) if wrongs else None, keys, ref_ids,
                ref_keys, ref_source, paired, settings)


# ---- running ablations ----------------------------------------------------------------------

@dataclass
class _RowValues(Intervention):
    """Resample ablation: each row's chosen units take that row's own replacement values.

    `values` is [rows, seq, units, ...] for a batch without padding (rows of one token length).
    """

    values: torch.Tensor = None
    unit_mask: torch.Tensor = None

    def edit(self, x, mask, state):
        full = mask[:, :, None] & self.unit_mask.to(x.device)[:, None, :]
        full = full.reshape(*full.shape, *([1] * (x.dim() - 3)))
        return torch.where(full, self.values.to(x.dtype).to(x.device), x)


def metric_values(logits: torch.Tensor, metric: str, answers: torch.Tensor,
                  wrongs: torch.Tensor | None) -> torch.Tensor:
    """Per-row metric from last-position logits [b, vocab]."""
    a = answers.to(logits.device)[:, None]
    if metric == "logit_diff":
        return (logits.gather(1, a) - logits.gather(1, wrongs.to(logits.device)[:, None]))[:, 0]
    if metric == "logprob":
        return logits.log_softmax(-1).gather(1, a)[:, 0]
    return (logits.argmax(-1) == a[:, 0]).float()


def _reference_key(task: Task) -> str:
    """Identifies the reference set exactly: its token ids and mean groups, not just its file name."""
    return hashlib.sha256(json.dumps([task.ref_ids, task.ref_keys], default=str).encode()).hexdigest()[:16]


class AblationRunner:
    """Runs many ablation sets (boolean vectors over a scope's units) over prompts, batched and resumed."""

    def __init__(self, subject: Any, task: Task, scope: Scope, metric: str, ablation: str,
                 ref_path: Path | None = None, group_by: str | None = None, batch_size: int | None = None):
        self.subject, self.task, self.scope = subject, task, scope
        self.metric, self.ablation, self.group_by = metric, ablation, group_by
        self.ref_key = _reference_key(task)
        self.batch_size = batch_size or subject.batch_size
        self.resumes = can_resume(subject)
        self.groups: dict[tuple, list[int]] = defaultdict(list)
        for i, k in enumerate(task.keys):
            self.groups[k].append(i)
        self.resid: dict[tuple[str, tuple, int], torch.Tensor] = {}  # (stream, group, layer) -> [n_g, T, d]
        self.full: np.ndarray | None = None  # m(M) per prompt
        self.empty: np.ndarray | None = None  # m(∅) per prompt
        self.values: dict[Site, Any] = {}
        self.layers_run = 0  # token-rows x layers actually computed, for the report
        self.rows_run = 0

    # -- replacement values ------------------------------------------------------------------
    def _sites(self) -> list[Site]:
        return [Site(comp, layer) for comp, layer in self.scope.sites]

    def prepare_values(self) -> None:
        """Reference means (cached per model, reference set and site in subject.cache) or activations."""
        if self.ablation == "zero" or self.values:
            return
        cache = self.subject.cache
        todo = []
        for site in self._sites():
            key = ("circuit.means", self.subject.info.id, self.ref_key, self.ablation, site)
            if self.ablation != "resample" and key in cache:
                self.values[site] = cache[key]
            else:
                todo.append((site, key))
        if not todo:
            return
        sites = [s for s, _ in todo]
        task = self.task
        per_position = self.ablation in ("mean", "resample")
        sums: dict[Site, dict[tuple, torch.Tensor]] = {s: {} for s in sites}
        counts: dict[tuple, int] = defaultdict(int)
        acts: dict[Site, dict[int, torch.Tensor]] = {s: {} for s in sites}
        # resample keeps whole activations, so only the reference prompts some prompt draws from
        wanted = sorted(set(task.ref_source)) if self.ablation == "resample" else list(range(len(task.ref_ids)))
        for fw in self.subject.run([task.ref_ids[j] for j in wanted], capture=sites, logits=None,
                                   batch_size=self.batch_size, desc="reference activations"):
            for r, row in enumerate(wanted[i] for i in fw.batch.rows):
                pad = int(fw.batch.pad[r])
                key = task.ref_keys[row] if per_position else ()
                counts[key] += 1 if per_position else len(task.ref_ids[row])  # prompts, or tokens
                for s in sites:
                    x = fw.acts[s][r, pad:].double().cpu()  # [T, units, ...]
                    if self.ablation == "resample":
                        acts[s][row] = x.to(fw.acts[s].dtype)
                        continue
                    x = x if per_position else x.sum(0)
                    sums[s][key] = sums[s][key] + x if key in sums[s] else x
        dtype = next(self.subject.model.parameters()).dtype
        for site, key in todo:
            if self.ablation == "resample":
                self.values[site] = acts[site]
                continue
            if per_position:
                value = {k: (v / counts[k]).to(dtype) for k, v in sums[site].items()}
            else:
                value = (sums[site][()] / counts[()]).to(dtype)
            cache[key] = self.values[site] = value

    # -- cached residual streams ---------------------------------------------------------------
    # Two runs are cached per prompt: the clean model ("clean") and the model with every scope unit
    # ablated ("empty"). A config equals the clean run below its first ablated unit and the empty run
    # below its first kept unit; it resumes from whichever of the two it follows longer.
    def plan(self, config: np.ndarray) -> tuple[str, int]:
        """(stream, first layer to run) for one config; start == n_layers: the stream's own result."""
        n_layers = self.subject.n_layers
        first_ablated = self.scope.start_layer(config)
        if first_ablated is None:
            return "clean", n_layers
        first_kept = self.scope.start_layer(~config)
        first_kept = n_layers if first_kept is None else first_kept
        if not self.resumes:
            return ("empty", n_layers) if first_kept == n_layers else ("clean", 0)
        return ("empty", first_kept) if first_kept > first_ablated else ("clean", first_ablated)

    def prime(self, *configs: np.ndarray) -> None:
        """Run the clean and empty passes once, caching every start layer these configs will need."""
        need: dict[str, set[int]] = {"clean": set(), "empty": set()}
        for block in configs:
            for c in np.asarray(block, dtype=bool).reshape(-1, len(self.scope)):
                stream, start = self.plan(c)
                need[stream].add(start)
        self._ensure_streams(need)

    def _ensure_streams(self, need: dict[str, set[int]]) -> None:
        n_layers = self.subject.n_layers
        first = next(iter(self.groups))
        missing = {stream: sorted(x for x in layers if x < n_layers and (stream, first, x) not in self.resid)
                   for stream, layers in need.items()} if self.resumes else {"clean": [], "empty": []}
        if self.full is None or missing["clean"]:
            self.full = self._pass("clean", missing["clean"], self.full)
        if need["empty"] and (self.empty is None or missing["empty"]):
            self.empty = self._pass("empty", missing["empty"], self.empty)

    def _pass(self, stream: str, layers: list[int], known: np.ndarray | None) -> np.ndarray:
        """One pass over every prompt (clean, or all scope units ablated), capturing resid_pre at `layers`."""
        metric = np.zeros(len(self.task.prompt_ids)) if known is None else known
        capture = [Site("resid_pre", layer) for layer in layers]
        everything = np.ones(len(self.scope), dtype=bool)
        start = self.scope.start_layer(everything) if stream == "empty" else 0
        if stream == "empty":
            self.prepare_values()
            self._ensure_streams({"clean": {start}, "empty": set()})
        for key, members in self.groups.items():
            parts: dict[int, list[torch.Tensor]] = defaultdict(list)
            for pos in _chunks(list(range(len(members))), self._rows_per_batch(key)):
                chunk = [members[p] for p in pos]
                batch = self.subject.make_batch([self.task.prompt_ids[i] for i in chunk], list(range(len(chunk))))
                if stream == "clean":
                    fw = self.subject.forward(batch, capture=capture, logits="last")
                    start = 0
                else:
                    resid = self.resid[("clean", key, start)][torch.as_tensor(pos)] if self.resumes else None
                    ivs = self._interventions(key, np.repeat(everything[None], len(chunk), axis=0), chunk)
                    fw = resume(self.subject, batch, start if self.resumes else 0, resid, ivs, capture=capture)
                self._count(len(chunk), start if self.resumes else 0)
                metric[chunk] = self._metric(fw.logits, chunk).cpu().numpy()
                for layer, site in zip(layers, capture):
                    parts[layer].append(fw.acts[site])
            for layer in layers:
                self.resid[(stream, key, layer)] = torch.cat(parts[layer])
        return metric

    def _count(self, rows: int, start: int) -> None:
        self.rows_run += rows
        self.layers_run += rows * (self.subject.n_layers - start)

    def full_model(self) -> np.ndarray:
        """m(M) per prompt."""
        self._ensure_streams({"clean": set(), "empty": set()})
        return self.full

    def _metric(self, logits: torch.Tensor, prompts: Sequence[int]) -> torch.Tensor:
        idx = torch.as_tensor(list(prompts))
        wrongs = self.task.wrongs[idx] if self.task.wrongs is not None else None
        return metric_values(logits, self.metric, self.task.answers[idx], wrongs)

    def _rows_per_batch(self, key: tuple) -> int:
        # Short prompts: more rows per batch; about batch_size x 128 tokens per forward.
        return max(self.batch_size, self.batch_size * 128 // max(1, key[0]))

    # -- ablated runs ----------------------------------------------------------------------------
    def run(self, configs: np.ndarray, prompts: Sequence[int] | None = None, desc: str = "ablations") -> np.ndarray:
        """Metric [n_configs, n_prompts] with each config's units ablated (all others intact)."""
        from ..progress import bar

        configs = np.asarray(configs, dtype=bool).reshape(-1, len(self.scope))
        prompts = list(range(len(self.task.prompt_ids))) if prompts is None else list(prompts)
        col = {p: j for j, p in enumerate(prompts)}
        plans = [self.plan(c) for c in configs]
        self.prepare_values()
        self.prime(configs)
        n_layers = self.subject.n_layers
        out = np.empty((len(configs), len(prompts)))
        by_start: dict[tuple[str, int], list[int]] = defaultdict(list)
        for k, (stream, start) in enumerate(plans):
            if start == n_layers:  # nothing differs from a cached run: its result is the answer
                out[k] = (self.full if stream == "clean" else self.empty)[prompts]
            else:
                by_start[(stream, start)].append(k)
        jobs = []
        wanted = set(prompts)
        for key, members in self.groups.items():
            mine = [(pos, i) for pos, i in enumerate(members) if i in wanted]
            for (stream, start), ks in sorted(by_start.items(), key=lambda kv: kv[0][1]):
                rows = [(k, pos, i) for k in ks for pos, i in mine]
                jobs.extend((key, stream, start, chunk) for chunk in _chunks(rows, self._rows_per_batch(key)))
        for key, stream, start, chunk in bar(jobs, desc, total=len(jobs), enabled=self.subject.progress):
            ks = [k for k, _, _ in chunk]
            members = [i for _, _, i in chunk]
            batch = self.subject.make_batch([self.task.prompt_ids[i] for i in members], list(range(len(chunk))))
            resid = None
            if self.resumes:
                resid = self.resid[(stream, key, start)][torch.as_tensor([pos for _, pos, _ in chunk])]
            fw = resume(self.subject, batch, start, resid, self._interventions(key, configs[ks], members, start))
            vals = self._metric(fw.logits, members).cpu().numpy()
            for (k, _, i), v in zip(chunk, vals):
                out[k, col[i]] = v
            self._count(len(chunk), start)
        return out

    def _interventions(self, key: tuple, configs: np.ndarray, members: list[int],
                       start: int = 0) -> list[Intervention]:
        """The batch's ablations at layers >= start (below it the cached stream already holds them)."""
        ivs: list[Intervention] = []
        for site, mask in self.scope.site_masks(configs):
            if site.layer < start:
                continue
            if self.ablation == "zero":
                ivs.append(ZeroAblate(site, unit_mask=mask))
            elif self.ablation == "mean":
                ivs.append(MeanAblate(site, means=self.values[site][key], per_position=True, unit_mask=mask))
            elif self.ablation == "mean_all_positions":
                ivs.append(MeanAblate(site, means=self.values[site], per_position=False, unit_mask=mask))
            else:
                src = [self.task.ref_source[i] for i in members]
                values = torch.stack([self.values[site][j] for j in src])
                ivs.append(_RowValues(site, values=values, unit_mask=mask))
        return ivs

    def describe(self) -> dict[str, Any]:
        how = {
            "mean": "per position: token index t is replaced by the mean at index t over reference prompts "
                    "with the same token length" + (f" and the same '{self.group_by}'" if self.group_by else ""),
            "mean_all_positions": "one mean over every token of every reference prompt",
            "zero": "replaced by zeros",
            "resample": "replaced by a reference prompt's own activation at the same token index",
        }[self.ablation]
        return {
            "ablation": self.ablation, "replacement": how, "positions": "all",
            "reference_groups": len(set(self.task.ref_keys)) if self.ablation == "mean" else None,
            "sites": "attn.z (per-head outputs before o_proj) and mlp.post (down_proj input; a whole MLP is "
                     "all its neurons)",
            "resumed_from_cached_residual_stream": self.resumes,
        }


def _chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


# ---- faithfulness and random circuits --------------------------------------------------------

def faithfulness(c: np.ndarray, e: np.ndarray, m: np.ndarray, axis: int | None = None) -> Any:
    """(mean m(C) − mean m(∅)) / (mean m(M) − mean m(∅)); vectorised over bootstrap resamples."""
    ce, ee, me = c.mean(axis=axis), e.mean(axis=axis), m.mean(axis=axis)
    with np.errstate(divide="ignore", invalid="ignore"):
        return (ce - ee) / (me - ee)


def random_circuits(circuit: list[Unit], scope: Scope, n: int, seed: int) -> tuple[np.ndarray, bool]:
    """n random unit sets of the circuit's size and kinds, in the circuit's layers where that leaves any
    choice; never the circuit itself. Returns (configs [n, units], layer_matched)."""
    rng = np.random.default_rng(seed)
    circ = scope.vector(circuit)

    def pools(match_layer: bool) -> list[tuple[np.ndarray, int]]:
        need: dict[tuple, int] = defaultdict(int)
        for u in circuit:
            need[(u.layer if match_layer else None, u.kind)] += 1
        out = []
        for (layer, kind), count in need.items():
            idx = np.array([i for i, u in enumerate(scope.units)
                            if u.kind == kind and (layer is None or u.layer == layer)])
            out.append((idx, count))
        return out

    matched = True
    groups = pools(True)
    if all(len(idx) == count for idx, count in groups):  # no other circuit in these layers
        matched = False
        groups = pools(False)
        if all(len(idx) == count for idx, count in groups):
            return np.zeros((0, len(scope)), dtype=bool), matched
    out = np.zeros((n, len(scope)), dtype=bool)
    for r in range(n):
        while True:
            v = np.zeros(len(scope), dtype=bool)
            for idx, count in groups:
                v[rng.choice(idx, size=count, replace=False)] = True
            if not np.array_equal(v, circ):
                break
        out[r] = v
    return out, matched


# ---- the kind -------------------------------------------------------------------------------

class Circuit(ProbeKind):
    name = "circuit"
    Spec = CircuitSpec

    def setup(self) -> None:
        spec, subject, probe = self.spec, self.subject, self.probe
        required = ("prompt", "answer") + (("wrong",) if spec.metric == "logit_diff" else ())
        prompt_rows = probe.rows(spec.prompts, ("prompts",), required)
        ref_rows = probe.rows(spec.reference, ("reference",)) if spec.reference else None
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
        self.runner = AblationRunner(subject, self.task, self.scope, spec.metric, spec.ablation, self.ref_path,
                                     spec.group_by, spec.batch_size)

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
        null_f: dict[str, np.ndarray] = {}
        if wanted:
            vals = runner.run(null_configs, control_rows, desc="random circuits")
            e, m = got["empty"][control_rows], m_full[control_rows]
            for j, t in enumerate(wanted):
                block = vals[j * len(null):(j + 1) * len(null)]
                null_f[t] = faithfulness(block, e[None, :], m[None, :], axis=1)
        denom = float(m_full.mean() - got["empty"].mean())
        per_component = []
        for u in self.circuit:
            alone = got[("alone", u)]
            per_component.append({
                "component": u.name, "metric_when_ablated_alone": float(alone.mean()),
                "normalized_effect": float((m_full.mean() - alone.mean()) / denom) if denom else None})
        common = {
            "m_full": float(m_full.mean()), "m_empty": float(got["empty"].mean()),
            "full_model_share_metric_positive": float((m_full > 0).mean()) if spec.metric != "accuracy" else None,
            "per_component": per_component,
        }
        settings = {
            **self.task.settings, **runner.describe(), "metric": spec.metric, "position": "last",
            "reference": spec.reference, "group_by": spec.group_by, "scope": scope.description,
            "scope_units": len(scope), "circuit": [u.name for u in self.circuit], "circuit_size": len(self.circuit),
            "random_circuits": int(len(null)), "random_circuits_layer_matched": matched,
            "control_prompts": int(len(control_rows)), "seed": spec.seed,
            "forward_rows": runner.rows_run, "layer_rows_computed": runner.layers_run,
        }
        claims = []
        for name, claim in spec.claims.items():
            if claim.test == "minimality":
                claims.append(self._minimality(name, claim, got, m_full, common))
            else:
                key = "circuit_only" if claim.test == "sufficiency" else "circuit_ablated"
                claims.append(self._faithfulness(name, claim, got[key], got["empty"], m_full, common,
                                                 null_f.get(claim.test), control_rows, matched))
        return Outcome(settings, claims)

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
        control, beats = None, None
        if null is not None and len(null) == 0:
            details["control_note"] = "no other circuit of this size exists in the scope: no random-circuit control"
        elif null is not None and not np.all(np.isfinite(null)):
            details["control_note"] = "m(M) = m(∅) on the control prompts: random-circuit faithfulness is undefined"
            null = None
        if null is not None and len(null) and not untestable:
            observed = float(faithfulness(mc[control_rows], me[control_rows], mm[control_rows]))
            alternative = "greater" if test == "sufficiency" else "less"
            p = empirical_pvalue(observed, null, alternative)
            beats = p <= ALPHA
            q = 95 if test == "sufficiency" else 5
            details.update({
                "null_distribution": [float(x) for x in null],
                "null_mean": float(null.mean()), f"null_p{q}": float(np.percentile(null, q)),
                "circuit_percentile_in_null": float((null < observed).mean() * 100),
                "circuit_faithfulness_on_control_prompts": observed,
            })
            control = ControlResult(
                name=f"{len(null)} random circuits of the same size" + (", same layers" if matched else ""),
                effect=float(null.mean()), p_value=p,
                detail={"alternative": alternative, "alpha": ALPHA, f"p{q}": float(np.percentile(null, q)),
                        "prompts": int(len(control_rows))})
        metric = (f"faithfulness (m(C) − m(∅)) / (m(M) − m(∅)) of {self.spec.metric}, "
                  + ("everything in scope but the circuit ablated" if test == "sufficiency"
                     else "only the circuit ablated") + f" ({self.spec.ablation} ablation)")
        return judge(name, claim.expect, effect, ci, len(mm), metric, control=control, beats_control=beats,
                     details=details, tolerance=claim.tolerance, untestable=untestable)

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
        return judge(name, claim.expect, effect, ci, len(mm), metric, details=details, tolerance=claim.tolerance,
                     untestable=untestable)


def _undefined(mm: np.ndarray, me: np.ndarray) -> str | None:
    gap = float(mm.mean() - me.mean())
    scale = max(float(np.abs(mm).mean()), float(np.abs(me).mean()), 1e-12)
    if abs(gap) <= 1e-6 * scale:
        return (f"the full model and the fully ablated model score the same (m(M) = {mm.mean():.4g}, "
                f"m(∅) = {me.mean():.4g}): faithfulness is undefined")
    return None
