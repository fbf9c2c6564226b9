"""Ablation machinery shared by the circuit kind and circuit discovery.

Units (heads, whole sublayers, neurons) of a scope; the task data (prompts, one-token answers,
reference means); a runner that evaluates many ablation sets per forward, each row resuming from a
cached residual stream at the first layer it changes; faithfulness and random circuits.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from ..errors import DataError, SiteError
from ..subject import Intervention, MeanAblate, Site, ZeroAblate, resolve_layer, resolve_sites
from ..subject.resume import can_resume, resume

if TYPE_CHECKING:
    from .circuit import CircuitComponent


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
    spec = scope["neurons"] if isinstance(scope, dict) else scope.neurons
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
