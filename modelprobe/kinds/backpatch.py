"""backpatch: a later layer's state, patched into an earlier layer, fixes two-hop answers.

Biran et al. 2024 ("Hopping Too Late"). On a two-hop query the last token's block output
(resid_post) at source layer s is written into the same token at target layer t < s, in the prompt pass
only, and the model continues greedily. Queries are first filtered (both single hops answered, no
shortcut answers), then split into the composition-right and -wrong sets:

- oracle: a wrong query is fixed when ANY searched (s, t) pair with s > t gives the answer; held against
  the same grid with the state taken from a different query (random source), searched the same way;
- best pair: the one (s, t) with the highest fix rate on dev wrong queries, applied to test wrong queries
  (no oracle), and to the right ones (how many it breaks);
- s = t rows are the identity check: the patch writes the state already there.

Every (s, t) row of a query runs in one batch, resumed at the last token from the clean run
(`toolkit.prompt_writes`).

Controls: the oracle and the dev-chosen pair are held against the same patches with the state of a query
that has another answer (random source), searched the same way: a one-sided paired permutation test over the
wrong queries. The break rate has no control.

Verdicts: pass when the Wilson interval of the fix rate (or the bootstrap interval of the fix rate over the
random source's) clears the threshold and the random source is beaten. Inconclusive when the interval
straddles the threshold, or when too few queries are left after filtering (`min_queries` wrong ones; no
dev/test split; no right query for the break rate).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import Field

from ..errors import DataError, SiteError
from ..report.record import Bars, ClaimResult, ControlResult, HeatMap, Plot, Table
from ..spec import (
    ClaimSpec,
    DataFile,
    OneExpectation,
    ProbeSpec,
    RateChangeThreshold,
    RateThreshold,
    SplitBase,
)
from ..spec.fields import LayerSpec, Strict
from ..stats import paired_difference, wilson_interval
from ..subject import resolve_layer
from ..toolkit.answers import could_give_answer, gives_answer
from ..toolkit.controls import beats_control, paired_control, random_source
from ..toolkit.examples import two_hop_examples
from ..toolkit.prompts import encode_rows, read_rows, split_indices, text_token_index
from .base import Measured, Outcome, ProbeKind, judge


class BackpatchFilter(Strict):
    hops_known: bool = Field(True, description="keep queries whose first and second hop the model answers")
    no_shortcut: bool = Field(True, description="drop queries the model answers from a shortcut prompt "
                                                "(rows then need 'shortcuts')")


class LayerGrid(Strict):
    source: LayerSpec = Field("all", description="source layers s: int, fraction, list, 'a:b' or 'all'")
    target: LayerSpec = Field("all", description="target layers t; only s > t pairs count, s = t is the identity")
    stride: int = Field(1, ge=1, le=64, description="keep every stride-th layer of each list (a coarser grid)")


class Split(SplitBase):
    dev: float = Field(0.3, gt=0, lt=1, description="share of the wrong queries that choose the best pair")


class BackpatchExpect(OneExpectation):
    fix_rate_over_null: RateChangeThreshold | None = Field(
        None, description="oracle fix rate on the wrong queries minus the random-source oracle's")
    oracle_fix_rate: RateThreshold | None = Field(None, description="share of wrong queries some s > t pair fixes")
    fix_rate: RateThreshold | None = Field(None, description="share of test wrong queries the dev-chosen pair fixes")
    break_rate: RateThreshold | None = Field(None, description="share of right queries the dev-chosen pair breaks")


class BackpatchClaim(ClaimSpec):
    expect: BackpatchExpect


class BackpatchSpec(ProbeSpec[BackpatchClaim]):
    kind: Literal["backpatch"]
    queries: DataFile = Field(description='JSONL: {"query", "answer", "aliases", "entity", "hop1", "hop1_answer", '
                                     '"hop1_aliases", "hop2", "shortcuts"}')
    filter: BackpatchFilter = BackpatchFilter()
    source_position: Literal["last", "bridge_entity_last"] = Field(
        "last", description="where the source state is read: the last token, or the last token of 'entity'")
    layers: LayerGrid = LayerGrid()
    split: Split = Split()
    max_new_tokens: int = Field(4, ge=1, le=32, description="greedy tokens generated to read an answer")
    min_queries: int = Field(10, ge=2, description="fewer initially wrong queries than this: untestable")
    patch_source: Literal["own", "other_query"] = Field(
        "own", description="other_query: a negative-control run, every patch takes another query's state")


LISTS = ("aliases", "hop1_aliases", "shortcuts")


@dataclass
class Grid:
    """Which rows fix which query: fixed[q, p] over the wrong queries and the searched pairs."""

    pairs: list[tuple[int, int]]
    fixed: np.ndarray  # [n_wrong, n_pairs] own state
    null: np.ndarray  # [n_wrong, n_pairs] another query's state
    texts: list[list[str]]  # per wrong query, per pair: the patched continuation
    identity_changed: int  # s = t rows whose first new token differs from the clean run's
    identity_fixed: int  # s = t rows that give the answer (the queries are wrong ones: should be 0)
    identity_rows: int


class Backpatch(ProbeKind[BackpatchSpec]):
    Spec = BackpatchSpec
    skeleton = """\
about: Back-patching a later layer's state into an earlier layer fixes two-hop queries the model gets wrong.
tags: [backpatch]
queries: data/two_hop.jsonl      # {"query", "answer", "aliases", "entity", "hop1", "hop1_answer", "hop1_aliases",
                                 #  "hop2", "shortcuts"} per line; answers match the start of a greedy continuation
filter: {hops_known: true, no_shortcut: true}   # keep queries whose single hops are answered, no shortcut answers
source_position: last            # or bridge_entity_last: the last token of "entity" in the query
layers: {source: all, target: all, stride: 1}   # only s > t pairs count; s = t is the identity check
split: {dev: 0.3, seed: 0}       # the best pair is chosen on dev wrong queries, applied on test
max_new_tokens: 4
claims:
  oracle_fixes:                  # any (s, t) pair fixes a wrong query, minus the random-source oracle
    expect: {fix_rate_over_null: {at_least: 0.2}}
  best_pair_fixes:               # the dev-chosen pair on test wrong queries
    expect: {fix_rate: {at_least: 0.1}}
  few_breaks:                    # the same pair on the right queries
    expect: {break_rate: {at_most: 0.1}}
"""
    skeleton_data = {"data/two_hop.jsonl": two_hop_examples()}

    @classmethod
    def check_data(cls, probe) -> list[dict]:
        spec = probe.spec
        rows = read_rows(probe, spec.queries, ("queries",), ("query", "answer", "hop1", "hop1_answer", "hop2"),
                         ("entity",))
        path = probe.path.parent / spec.queries
        for i, row in enumerate(rows):
            for name in LISTS:
                value = row.get(name, [])
                if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
                    raise DataError(f"{path}:{i + 1}: field '{name}' must be a list of non-empty strings")
            if spec.source_position == "bridge_entity_last" and "entity" not in row:
                raise DataError(f"{path}:{i + 1}: missing field 'entity' (source_position: bridge_entity_last)")
            if spec.filter.no_shortcut and not row.get("shortcuts"):
                raise DataError(f"{path}:{i + 1}: missing field 'shortcuts' (filter.no_shortcut: true)")
        return rows

    def setup(self) -> None:
        spec, subject = self.spec, self.subject
        self.rows = self.check_data(self.probe)
        self.path = self.probe.path.parent / spec.queries
        grid = {}
        for which in ("source", "target"):
            layers = resolve_layer(getattr(spec.layers, which), subject.n_layers, ("layers", which))
            grid[which] = sorted(set(layers))[::spec.layers.stride]
        self.sources, self.targets = grid["source"], grid["target"]
        self.pairs = [(s, t) for s in self.sources for t in self.targets if s > t]
        if not self.pairs:
            raise SiteError("no source layer lies above a target layer: no s > t pair to patch", ("layers",))
        self.identity = [(s, s) for s in self.sources if s in self.targets]
        self.ids = encode_rows(subject, [r["query"] for r in self.rows], self.path, new_tokens=spec.max_new_tokens)
        self.src_pos = [len(x) - 1 for x in self.ids]
        if spec.source_position == "bridge_entity_last":
            self.src_pos = [self._entity_last(i) for i in range(len(self.rows))]

    def _entity_last(self, i: int) -> int:
        """Token index of the last token of the row's entity in its query (DataError when absent)."""
        try:  # the entity's first occurrence: where the query names it
            return text_token_index(self.subject, self.rows[i]["query"], self.ids[i], self.rows[i]["entity"], 0)
        except SiteError as e:
            raise DataError(f"{self.path}:{i + 1}: field 'entity': {e.message} (source_position)") from None

    # ---- filtering ------------------------------------------------------------------------------
    def _answers(self, i: int) -> list[str]:
        return [self.rows[i]["answer"], *self.rows[i].get("aliases", [])]

    def _filter(self) -> tuple[dict[str, np.ndarray], list[str]]:
        """Greedy answers to the composition, both hops and the shortcuts; the masks of each outcome."""
        rows, spec = self.rows, self.spec
        prompts = [r["query"] for r in rows] + [r["hop1"] for r in rows] + [r["hop2"] for r in rows]
        owner = []
        for i, r in enumerate(rows):
            prompts += r.get("shortcuts", [])
            owner += [i] * len(r.get("shortcuts", []))
        # Hop-2 and relation-only prompts repeat across rows (one per bridge entity): generate each once.
        distinct = list(dict.fromkeys(prompts))
        ids = encode_rows(self.subject, distinct, self.path, new_tokens=spec.max_new_tokens)
        gens = self.subject.generate(ids, spec.max_new_tokens, batch_size=spec.batch_size, desc="filter")
        said = {p: self.subject.decode(g) for p, g in zip(distinct, gens)}
        texts = [said[p] for p in prompts]
        n = len(rows)
        comp = np.array([gives_answer(texts[i], self._answers(i)) for i in range(n)])
        hop1 = np.array([gives_answer(texts[n + i], [r["hop1_answer"], *r.get("hop1_aliases", [])])
                         for i, r in enumerate(rows)])
        hop2 = np.array([gives_answer(texts[2 * n + i], self._answers(i)) for i in range(n)])
        shortcut = np.zeros(n, dtype=bool)
        for k, i in enumerate(owner):
            shortcut[i] |= gives_answer(texts[3 * n + k], self._answers(i))
        keep = np.ones(n, dtype=bool)
        if spec.filter.hops_known:
            keep &= hop1 & hop2
        if spec.filter.no_shortcut:
            keep &= ~shortcut
        masks = {"composition_right": comp, "hop1_known": hop1, "hop2_known": hop2, "shortcut": shortcut,
                 "kept": keep, "wrong": keep & ~comp, "right": keep & comp}
        return masks, texts[:n]

    # ---- patching -------------------------------------------------------------------------------
    def _run_query(self, q: int, cleans: dict, pairs: list[tuple[int, int]],
                   sources: list[int]) -> list[list[int]]:
        """Continuation ids of query q, one per pair; pair k takes its state from query sources[k]."""
        from .._lazy import torch
        from ..toolkit.prompt_writes import patch_last_and_generate

        values = torch.stack([cleans[j].resid[s, self.src_pos[j]] for (s, _), j in zip(pairs, sources)])
        aliases = self._answers(q)
        worth = {}

        def worth_continuing(row: int, tok: int) -> bool:
            if tok not in worth:
                worth[tok] = could_give_answer(self.subject.decode([tok]), aliases)
            return worth[tok]

        return patch_last_and_generate(self.subject, cleans[q], [t for _, t in pairs], values,
                                       self.spec.max_new_tokens, worth_continuing)

    def _grid(self, wrong: np.ndarray, clean_texts: list[str]) -> Grid:
        from ..progress import bar
        from ..subject import clean_pass

        n_p, n_id = len(self.pairs), len(self.identity)
        other, decoy = self._other_answer(wrong, self.spec.seed), self._other_answer(wrong, self.spec.seed + 1)
        cleans = {int(q): clean_pass(self.subject, self.ids[q]) for q in wrong}
        fixed = np.zeros((len(wrong), n_p), dtype=bool)
        null = np.zeros_like(fixed)
        texts, changed, id_fixed = [], 0, 0
        for k, q in enumerate(bar(wrong, "backpatch", total=len(wrong), enabled=self.subject.progress)):
            q = int(q)
            own = int(wrong[other[k]]) if self.spec.patch_source == "other_query" else q
            rand = int(wrong[decoy[k]] if self.spec.patch_source == "other_query" else wrong[other[k]])
            pairs = self.pairs + self.pairs + self.identity
            srcs = [own] * n_p + [rand] * n_p + [q] * n_id
            gens = self._run_query(q, cleans, pairs, srcs)
            out = [self.subject.decode(g) for g in gens]
            fixed[k] = [gives_answer(x, self._answers(q)) for x in out[:n_p]]
            null[k] = [gives_answer(x, self._answers(q)) for x in out[n_p:2 * n_p]]
            texts.append(out[:n_p])
            first = int(cleans[q].logits.argmax())
            changed += sum((g[:1] or [None])[0] != first for g in gens[2 * n_p:])
            id_fixed += sum(gives_answer(x, self._answers(q)) for x in out[2 * n_p:])
        return Grid(self.pairs, fixed, null, texts, changed, id_fixed, n_id * len(wrong))

    def _other_answer(self, wrong: np.ndarray, seed: int) -> np.ndarray:
        """For each wrong query, another one (by position in `wrong`) whose answer differs where any does:
        a state from a query with the same answer (two cities of one country) would fix it for free."""
        if len(wrong) < 2:
            return np.zeros(len(wrong), dtype=int)
        pick = random_source(len(wrong), seed)
        answer = [self.rows[int(q)]["answer"].strip().casefold() for q in wrong]
        for k in range(len(wrong)):
            for step in range(len(wrong)):
                j = (int(pick[k]) + step) % len(wrong)
                if j != k and answer[j] != answer[k]:
                    pick[k] = j
                    break
        return pick

    def _best_on(self, queries: np.ndarray, pair: tuple[int, int]) -> np.ndarray:
        """Whether the pair's patch leaves each (initially right) query answered."""
        from ..subject import clean_pass

        out = []
        for q in queries:
            q = int(q)
            cleans = {q: clean_pass(self.subject, self.ids[q])}
            text = self.subject.decode(self._run_query(q, cleans, [pair], [q])[0])
            out.append(gives_answer(text, self._answers(q)))
        return np.array(out, dtype=bool)

    def measure(self) -> Outcome:
        spec = self.spec
        masks, clean_texts = self._filter()
        wrong, right = np.flatnonzero(masks["wrong"]), np.flatnonzero(masks["right"])
        n_dev = int(round(spec.split.dev * len(wrong)))
        parts = split_indices(len(wrong), {"dev": n_dev, "test": len(wrong) - n_dev}, spec.split.seed)
        grid = self._grid(wrong, clean_texts)
        best = None
        if len(parts["dev"]) and len(parts["test"]):
            best = int(np.argmax(grid.fixed[parts["dev"]].mean(axis=0)))
        kept_right = self._best_on(right, self.pairs[best]) if best is not None else np.zeros(0, dtype=bool)
        settings = {
            "queries": spec.queries, "n_queries": len(self.rows), "source_position": spec.source_position,
            "patch": "resid_post (block output) of the last prompt token, prompt pass only",
            "sources": self.sources, "targets": self.targets, "pairs_searched": len(self.pairs),
            "patch_source": spec.patch_source, "max_new_tokens": spec.max_new_tokens,
            "match": "continuation starts with the answer or an alias (case-insensitive, word boundary)",
            "filter_counts": {k: int(v.sum()) for k, v in masks.items()},
            "split": {"dev": len(parts["dev"]), "test": len(parts["test"])},
            "identity_rows": grid.identity_rows, "identity_first_token_changed": grid.identity_changed,
            "identity_fixed": grid.identity_fixed,
        }
        plots = self._plots(grid, wrong, parts, best, masks, clean_texts)
        claims = [self._claim(name, claim, grid, parts, best, kept_right, plots)
                  for name, claim in spec.claims.items()]
        return Outcome(settings, claims)

    # ---- verdicts and plots -----------------------------------------------------------------
    def _claim(self, name: str, claim: BackpatchClaim, grid: Grid, parts: dict, best: int | None,
               kept_right: np.ndarray, plots: list[Plot]) -> ClaimResult:
        spec, stat = self.spec, claim.expect.statistic
        comparison = claim.expect.threshold.comparison
        n_wrong = len(grid.fixed)
        untestable = None
        if n_wrong < spec.min_queries:
            untestable = (f"only {n_wrong} queries are answered wrong with both hops known and no shortcut "
                          f"(min_queries: {spec.min_queries})")
        details = {"pairs_searched": len(grid.pairs), "n_wrong": n_wrong, "n_right": len(kept_right)}
        if best is not None:
            details["best_pair"] = {"source": grid.pairs[best][0], "target": grid.pairs[best][1],
                                    "dev_fix_rate": float(grid.fixed[parts["dev"], best].mean())}
        if stat in ("oracle_fix_rate", "fix_rate_over_null"):
            mine, theirs = grid.fixed.any(axis=1), grid.null.any(axis=1)
            what = f"any of {len(grid.pairs)} (s, t) pairs fixes a wrong query"
        elif stat == "fix_rate":
            test = parts["test"] if best is not None else np.zeros(0, dtype=int)
            mine = grid.fixed[test, best] if len(test) else np.zeros(0, bool)
            theirs = grid.null[test, best] if len(test) else np.zeros(0, bool)
            what = "the pair chosen on dev fixes a test wrong query"
            untestable = untestable or (None if len(test) else "no dev/test split of the wrong queries")
        else:
            mine, theirs = ~kept_right, None
            what = "the pair chosen on dev breaks a right query"
            untestable = untestable or (None if len(mine) else "no query is answered right after filtering")
        n = len(mine)
        if n == 0:
            return judge(name, claim, Measured(None, None, 0, what, details=details, plots=plots,
                                               untestable=untestable or "no queries to measure"))
        if stat == "fix_rate_over_null":
            effect, lo, hi = paired_difference(mine.astype(float), theirs.astype(float), seed=spec.seed)
            ci, metric = (lo, hi), f"share of wrong queries fixed minus the random-source share ({what})"
        else:
            effect, ci, metric = float(mine.mean()), wilson_interval(int(mine.sum()), n), f"share: {what}"
        control, beats = None, None
        if theirs is not None:
            p = paired_control(mine.astype(float), theirs.astype(float), comparison, spec.seed)
            control = ControlResult(name="random source: the same patches with the state of a query with "
                                         "another answer",
                                    effect=float(theirs.mean()), p_value=p,
                                    detail={"pairs_searched": len(grid.pairs)})
            beats = beats_control(p)
        return judge(name, claim, Measured(effect, ci, n, metric, control=control, beats_control=beats,
                                           details=details, plots=plots, untestable=untestable))

    def _plots(self, grid: Grid, wrong: np.ndarray, parts: dict, best: int | None, masks: dict,
               clean_texts: list[str]) -> list[Plot]:
        srcs, tgts = self.sources[::-1], self.targets
        index = {p: k for k, p in enumerate(grid.pairs)}
        n = max(1, len(grid.fixed))
        # One colour scale for the own-state and random-source maps, so they compare by eye.
        top = max([float(v[:, index[p]].sum() / n) for v in (grid.fixed, grid.null) for p in grid.pairs] + [0.0])
        scale = (0.0, top if top > 0 else 1.0)

        def heat(values: np.ndarray, title: str) -> HeatMap:
            cells = [[float(values[:, index[(s, t)]].sum() / n) if (s, t) in index else None for t in tgts]
                     for s in srcs]
            mark = (srcs.index(grid.pairs[best][0]), tgts.index(grid.pairs[best][1])) if best is not None else None
            return HeatMap(title=title, x_label="target layer t", y_label="source layer s",
                           value_label="share of wrong queries fixed", values=cells,
                           x_ticks=[str(t) for t in tgts], y_ticks=[str(s) for s in srcs], mark=mark,
                           value_range=scale)

        plots: list[Plot] = [heat(grid.fixed, f"fix rate per (s, t), own state ({len(grid.fixed)} wrong queries)"),
                             heat(grid.null, "fix rate per (s, t), random source (another query's state)")]
        if len(grid.fixed):
            labels, before, after = [f"oracle over {len(grid.pairs)} pairs"], [grid.null.any(1).mean()], \
                [grid.fixed.any(1).mean()]
            if best is not None and len(parts["test"]):
                s, t = grid.pairs[best]
                labels.append(f"best dev pair s={s}, t={t} (test)")
                before.append(grid.null[parts["test"], best].mean())
                after.append(grid.fixed[parts["test"], best].mean())
            plots.append(Bars(title="fix rate: own state vs random source", value_label="share fixed",
                              labels=labels, before=[float(x) for x in before], after=[float(x) for x in after],
                              before_label="random source", after_label="own state"))
        plots.append(Table(title="query filter", columns=["outcome", "queries"],
                           rows=[[k.replace("_", " "), int(v.sum())] for k, v in masks.items()]))
        plots.append(self._examples(grid, wrong, clean_texts))
        return plots

    def _examples(self, grid: Grid, wrong: np.ndarray, clean_texts: list[str], limit: int = 8) -> Table:
        rows = []
        for k, q in enumerate(wrong):
            hits = np.flatnonzero(grid.fixed[k])
            if len(rows) >= limit:
                break
            s, t = grid.pairs[hits[0]] if len(hits) else (None, None)
            rows.append([self.rows[q]["query"], self.rows[q]["answer"], clean_texts[q],
                         f"{s} -> {t}" if len(hits) else "none", grid.texts[k][hits[0]] if len(hits) else "",
                         int(len(hits))])
        return Table(title="wrong queries (examples)", columns=["query", "answer", "unpatched", "first fixing pair",
                                                                "patched", "pairs that fix"], rows=rows)
