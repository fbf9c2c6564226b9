"""Batched, resuming ablation runs: many sets of ablated units per forward.

Units (heads, whole MLPs, neurons) of a scope; a runner that evaluates many ablation sets (boolean
vectors over the scope's units) on many prompts, each row with its own unit mask, each resuming from
a cached residual stream at the first layer it changes. Used by the circuit kind, circuit discovery
and the benchmark; what is measured per row is the caller's `metric`.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np
import torch

from ..progress import bar
from .interventions import Intervention, MeanAblate, Patch, RunState, ZeroAblate
from .prefix import can_resume
from .resumable import _masks, resume, run_layers
from .sites import Site, resolve_layer
from .subject import Subject

# metric(last-position logits [b, vocab], prompt indices of the rows) -> [b] values
RowMetric = Callable[[torch.Tensor, list[int]], torch.Tensor]
# Rows (in forwards' worth) run layer by layer together: prefixes are shared within such a group.
SHARED_GROUP = 8
# At most this much memory holds prefix states kept across `run` calls (a cap costs speed, never numbers).
BRANCH_BYTES = 512 * 2**20


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


# ---- running ablations ----------------------------------------------------------------------

class AblationData(Protocol):
    """Tokenized prompts and reference prompts, and how they line up (what the runner needs to know).

    `keys[i]` groups prompt i for batching and per-position means (its token length, and a group
    value); `ref_source[i]` is the reference prompt whose activations replace prompt i's (resample).
    """

    prompt_ids: list[list[int]]
    keys: list[tuple]
    ref_ids: list[list[int]]
    ref_keys: list[tuple]
    ref_source: list[int] | None


def _reference_key(task: AblationData) -> str:
    """Identifies the reference set exactly: its token ids and mean groups, not just its file name."""
    return hashlib.sha256(json.dumps([task.ref_ids, task.ref_keys], default=str).encode()).hexdigest()[:16]


class AblationRunner:
    """Runs many ablation sets (boolean vectors over a scope's units) over prompts, batched and resumed."""

    def __init__(self, subject: Subject, task: AblationData, scope: Scope, metric: RowMetric, ablation: str,
                 group_by: str | None = None, batch_size: int | None = None):
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
        # Units in layer order: config[:cut[l]] is everything a config ablates at layers <= l, and the state
        # entering layer l + 1 depends on the prompt and that prefix alone (cut[-1] = 0: the embeddings).
        order = scope.unit_layer
        self.layer_sorted = bool(np.all(np.diff(order) >= 0)) if len(order) else True
        self.cut = {layer: int(np.searchsorted(order, layer, side="right")) for layer in range(-1, subject.n_layers)}
        # Branch states kept across `run` calls: (prompt, layer, prefix) -> resid entering that layer, for
        # prefixes that configs announced by `prime` and not yet run still share (sequential null steps).
        self.branch: dict[tuple[int, int, bytes], torch.Tensor] = {}
        self.pending: dict[tuple[int, bytes], int] = {}
        self.branch_bytes = 0

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
        """Run the clean and empty passes once, caching every start layer these configs will need; and
        note where these configs (to be run later, in any number of `run` calls) share a prefix, so that
        a state two of them share is computed once (`run` keeps it until the last one has run)."""
        blocks = [np.asarray(b, dtype=bool).reshape(-1, len(self.scope)) for b in configs]
        self._prime_streams(*blocks)
        if self.resumes and self.layer_sorted:
            self._note_branches(np.concatenate(blocks) if blocks else np.zeros((0, len(self.scope)), bool))

    def _prime_streams(self, *configs: np.ndarray) -> None:
        need: dict[str, set[int]] = {"clean": set(), "empty": set()}
        for block in configs:
            for c in np.asarray(block, dtype=bool).reshape(-1, len(self.scope)):
                stream, start = self.plan(c)
                need[stream].add(start)
        self._ensure_streams(need)

    def _note_branches(self, configs: np.ndarray) -> None:
        """Count, per (layer, prefix), the announced configs that pass through a branch point there: a prefix
        (what is ablated below the layer) that two of them share and after which they part."""
        n_layers = self.subject.n_layers
        for layer in range(1, n_layers):
            lo, hi = self.cut[layer - 1], self.cut[layer]
            if hi == lo:
                continue
            groups: dict[bytes, set[bytes]] = defaultdict(set)
            members: dict[bytes, int] = defaultdict(int)
            for c in configs:
                if not c[:lo].any() or c[:lo].all():  # the clean or the empty stream: cached anyway
                    continue
                p = c[:lo].tobytes()
                groups[p].add(c[lo:hi].tobytes())
                members[p] += 1
            for p, after in groups.items():
                if len(after) > 1:
                    self.pending[(layer, p)] = self.pending.get((layer, p), 0) + members[p]

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
        return self.metric(logits, list(prompts))

    def _rows_per_batch(self, key: tuple) -> int:
        # Short prompts: more rows per batch; about batch_size x 128 tokens per forward.
        return max(self.batch_size, self.batch_size * 128 // max(1, key[0]))

    # -- ablated runs ----------------------------------------------------------------------------
    def run(self, configs: np.ndarray, prompts: Sequence[int] | None = None, desc: str = "ablations") -> np.ndarray:
        """Metric [n_configs, n_prompts] with each config's units ablated (all others intact)."""
        configs = np.asarray(configs, dtype=bool).reshape(-1, len(self.scope))
        prompts = list(range(len(self.task.prompt_ids))) if prompts is None else list(prompts)
        col = {p: j for j, p in enumerate(prompts)}
        plans = [self.plan(c) for c in configs]
        self.prepare_values()
        self._prime_streams(configs)
        n_layers = self.subject.n_layers
        out = np.empty((len(configs), len(prompts)))
        by_layer: dict[int, list[int]] = defaultdict(list)  # resume layer -> configs (from either stream)
        for k, (stream, start) in enumerate(plans):
            if start == n_layers:  # nothing differs from a cached run: its result is the answer
                out[k] = (self.full if stream == "clean" else self.empty)[prompts]
            else:
                by_layer[start].append(k)
        # Prompts of one token length share a forward whatever their mean group (each row then gets its own
        # group's means), and so do configs resuming at one layer from either cached stream: on IOI's 40
        # control prompts in 13 (length, template) groups a step of 16 configs takes 7 forwards instead of 26.
        by_length: dict[int, list[tuple[tuple, int, int]]] = defaultdict(list)
        wanted = set(prompts)
        for key, members in self.groups.items():
            by_length[key[0]].extend((key, pos, i) for pos, i in enumerate(members) if i in wanted)
        if self.resumes and self.layer_sorted:
            self._run_shared(configs, plans, by_layer, by_length, out, col, desc)
            return out
        jobs = []
        for length, mine in by_length.items():
            for start, ks in sorted(by_layer.items()):
                rows = [(k, key, pos, i) for k in sorted(ks) for key, pos, i in mine]
                jobs.extend((start, chunk) for chunk in _chunks(rows, self._rows_per_batch((length,))))
        for start, chunk in bar(jobs, desc, total=len(jobs), enabled=self.subject.progress):
            ks = [k for k, _, _, _ in chunk]
            keys = [key for _, key, _, _ in chunk]
            members = [i for _, _, _, i in chunk]
            batch = self.subject.make_batch([self.task.prompt_ids[i] for i in members], list(range(len(chunk))))
            resid = None
            if self.resumes:
                resid = torch.stack([self.resid[(plans[k][0], key, start)][pos] for k, key, pos, _ in chunk])
            fw = resume(self.subject, batch, start, resid, self._interventions(keys, configs[ks], members, start))
            vals = self._metric(fw.logits, members).cpu().numpy()
            for (k, _, _, i), v in zip(chunk, vals):
                out[k, col[i]] = v
            self._count(len(chunk), start)
        return out

    # -- shared prefixes ---------------------------------------------------------------------------
    # The state entering layer l + 1 depends only on the prompt and on what a config ablates at layers <= l
    # (its prefix). Rows are run layer by layer, each layer once per distinct (prompt, prefix): configs that
    # agree below a layer (random circuits with the same head in the circuit's lowest layer) share the
    # layers up to it. Rows are independent in every kernel, so each row's numbers are those of its own
    # resumed forward. Prefix states that configs announced by `prime` still need are kept across calls.
    def _run_shared(self, configs: np.ndarray, plans: list[tuple[str, int]], by_layer: dict[int, list[int]],
                    by_length: dict[int, list[tuple[tuple, int, int]]], out: np.ndarray, col: dict[int, int],
                    desc: str) -> None:
        todo = sorted(k for ks in by_layer.values() for k in ks)
        if not todo:
            return
        for k in todo:  # these configs are run now: the prefixes they announced are needed once less
            self._consume(configs[k])
        groups = []
        for length, mine in by_length.items():
            # Rows sorted by config in layer order (prompt last), so rows that share prefixes sit together.
            rows = sorted(((k, key, pos, i) for k in todo for key, pos, i in mine),
                          key=lambda r: (configs[r[0]].tobytes(), r[3]))
            size = self._rows_per_batch((length,)) * SHARED_GROUP
            groups.extend(_chunks(rows, size))
        for chunk in bar(groups, desc, total=len(groups), enabled=self.subject.progress):
            vals = self._shared_group(configs, plans, chunk)
            for (k, _, _, i), v in zip(chunk, vals):
                out[k, col[i]] = v
        self._drop_spent()

    def _consume(self, config: np.ndarray) -> None:
        for layer in range(1, self.subject.n_layers):
            key = (layer, config[:self.cut[layer - 1]].tobytes())
            if key in self.pending:
                self.pending[key] -= 1

    def _drop_spent(self) -> None:
        spent = {key for key, n in self.pending.items() if n <= 0}
        for key in spent:
            del self.pending[key]
        for key in [b for b in self.branch if (b[1], b[2]) in spent]:
            self.branch_bytes -= self.branch[key].numel() * self.branch[key].element_size()
            del self.branch[key]

    def _shared_group(self, configs: np.ndarray, plans: list[tuple[str, int]],
                      rows: list[tuple[int, tuple, int, int]]) -> np.ndarray:
        """Metric per row (config k, mean group, position in the group, prompt) of rows of one token length."""
        n_layers, cut = self.subject.n_layers, self.cut
        # Where each row starts: its cached stream, or a deeper prefix state kept from an earlier call.
        start, state = [], {}
        for k, key, pos, i in rows:
            stream, s = plans[k]
            c = configs[k]
            for layer in range(n_layers - 1, s, -1):
                kept = self.branch.get((i, layer, c[:cut[layer - 1]].tobytes()))
                if kept is not None:
                    s = layer
                    state.setdefault((layer, i, c[:cut[layer - 1]].tobytes()), kept)
                    break
            else:
                state.setdefault((s, i, c[:cut[s - 1]].tobytes()), self.resid[(stream, key, s)][pos])
            start.append(s)
        n = len(rows)
        width = len(self.task.prompt_ids[rows[0][3]])
        last: dict[tuple[int, int, bytes], int] = {}
        logits_rows = np.full(n, -1)
        final: list[torch.Tensor] = []
        for layer in range(min(start), n_layers):
            lo, hi = cut[layer - 1], cut[layer]
            # The distinct (prompt, prefix through this layer) among rows that have started; each one's parent.
            # (States are keyed by the layer they enter: a layer without units leaves the prefix as it was.)
            classes: dict[tuple[int, int, bytes], tuple[tuple[int, int, bytes], int]] = {}
            for r, (k, _, _, i) in enumerate(rows):
                if start[r] > layer:
                    continue
                c = configs[k]
                child = (layer + 1, i, c[:hi].tobytes())
                if child not in classes:
                    classes[child] = ((layer, i, c[:lo].tobytes()), r)
            items = list(classes.items())
            new: dict[tuple[int, int, bytes], torch.Tensor] = {}
            keep_new = layer + 1 < n_layers
            for part in _chunks(items, self._rows_per_batch((width,))):
                reps = [r for _, (_, r) in part]
                hidden = torch.stack([state[parent] for _, (parent, _) in part])
                members = [rows[r][3] for r in reps]
                batch = self.subject.make_batch([self.task.prompt_ids[i] for i in members], list(range(len(reps))))
                ivs = self._interventions([rows[r][1] for r in reps], configs[[rows[r][0] for r in reps]], members,
                                          layer, layer + 1)
                st = RunState(phase="prompt", pad=batch.pad, prompt_len=batch.input_ids.shape[1])
                hidden = hidden.to(self.subject.device).to(next(self.subject.model.parameters()).dtype)
                res, _, _ = run_layers(self.subject, hidden, layer, layer + 1, batch.position_ids,
                                       _masks(self.subject, batch, hidden), None, st, ivs,
                                       logits=None if keep_new else "last")
                self.layers_run += len(reps)
                if keep_new:
                    for j, (child, _) in enumerate(part):
                        new[child] = res[j]
                else:
                    for j, (child, _) in enumerate(part):
                        last[child] = len(final) + j
                    final.extend(res)
            if keep_new:
                for child, h in new.items():
                    self._keep_branch(child, h)
                state = {**{c: h for c, h in state.items() if c[0] > layer}, **new}
        for r, (k, _, _, i) in enumerate(rows):
            logits_rows[r] = last[(n_layers, i, configs[k].tobytes())]
        self.rows_run += n
        vals = np.empty(n)
        members = [i for _, _, _, i in rows]
        for part in _chunks(list(range(n)), self._rows_per_batch((width,))):
            lg = torch.stack([final[int(logits_rows[r])] for r in part])
            vals[part] = self._metric(lg, [members[r] for r in part]).cpu().numpy()
        return vals

    def _keep_branch(self, cls: tuple[int, int, bytes], hidden: torch.Tensor) -> None:
        """Keep a state entering a layer when configs still to run share its prefix (and memory allows)."""
        layer, i, prefix = cls
        if self.pending.get((layer, prefix), 0) <= 0 or (i, layer, prefix) in self.branch:
            return
        size = hidden.numel() * hidden.element_size()
        if self.branch_bytes + size > BRANCH_BYTES:
            return
        self.branch[(i, layer, prefix)] = hidden.clone()  # not a view that would keep its whole batch
        self.branch_bytes += size

    def _interventions(self, key: tuple | list[tuple], configs: np.ndarray, members: list[int],
                       start: int = 0, stop: int | None = None) -> list[Intervention]:
        """The batch's ablations at layers start..stop-1 (below start the cached stream already holds them).
        `key`: the batch's mean group, or each row's (rows of one token length from several groups)."""
        ivs: list[Intervention] = []
        keys = key if isinstance(key, list) else [key] * len(members)
        one = keys[0] if len(set(keys)) == 1 else None
        for site, mask in self.scope.site_masks(configs):
            if site.layer < start or (stop is not None and site.layer >= stop):
                continue
            if self.ablation == "zero":
                ivs.append(ZeroAblate(site, unit_mask=mask))
            elif self.ablation == "mean" and one is not None:
                ivs.append(MeanAblate(site, means=self.values[site][one], per_position=True, unit_mask=mask))
            elif self.ablation == "mean":  # each row its own group's per-position means (unpadded: one length)
                values = torch.stack([self.values[site][k] for k in keys])
                ivs.append(Patch(site, values=values, per_position=True, unit_mask=mask))
            elif self.ablation == "mean_all_positions":
                ivs.append(MeanAblate(site, means=self.values[site], per_position=False, unit_mask=mask))
            else:
                src = [self.task.ref_source[i] for i in members]
                values = torch.stack([self.values[site][j] for j in src])
                ivs.append(Patch(site, values=values, per_position=True, unit_mask=mask))
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
