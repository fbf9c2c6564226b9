"""patchscope: what a hidden state holds, read by patching it into a target prompt and letting the model speak.

Ghandeharioun et al. 2024 ("Patchscopes"). The residual stream (resid_post) of a source prompt
at (layer l, position) is written into a fixed target prompt (e.g. an identity few-shot "Syria: Syria;
leaf: leaf; x:") at a position of the shared vocabulary (`last`, an int, `{token: " x", occurrence: -1}`:
the placeholder) and layer l ("same") or a fixed layer, in the prompt pass only; the greedy continuation
is read. A state "decodes" when the continuation starts with the row's expected field (or an alias).
Reported per layer as a curve; a claim takes the best layer of its range, held against the same patch
from another prompt (random source) at that layer.

All (prompt, layer) rows run batched against the target's clean run, resumed at each row's target layer
from the patched token on, with a per-row Patch (`toolkit.prompt_writes`).

Controls: the same patch at the same layer with another prompt's state (random source), by a one-sided
paired permutation test over the prompts; the best layer of the claim's range is chosen for both alike.

Verdicts: pass when the Wilson interval of the decode rate at the best layer clears the threshold and the
random source is beaten; fail when it misses or another prompt's state decodes as often. Inconclusive when the
interval straddles the threshold.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from ..errors import DataError, SiteError
from ..report.record import ClaimResult, ControlResult, LinePlot, Series, Table
from ..spec import ClaimSpec, DataFile, OneExpectation, ProbeSpec, RateThreshold
from ..spec.fields import LayerSpec, Strict, TokenSpec
from ..stats import wilson_interval
from ..subject import resolve_layer
from ..toolkit.answers import could_give_answer, gives_answer
from ..toolkit.controls import beats_control, paired_control, random_source
from ..toolkit.examples import two_hop_examples
from ..toolkit.prompts import encode_rows, read_rows, text_token_index, token_index
from .base import Measured, Outcome, ProbeKind, judge


class PatchscopeSource(Strict):
    prompts: DataFile = Field(description="JSONL file of source rows")
    field: str = Field("query", description="the row field holding the source prompt")
    position: Literal["bridge_entity_last"] | TokenSpec = Field(  # type: ignore[valid-type]
        "last", description="'last', an int, {token, occurrence}, or bridge_entity_last: the last token of "
                            "the row's 'entity' in the prompt")
    layers: LayerSpec = Field("all", description="source layers: int, fraction, list, 'a:b' or 'all'")
    stride: int = Field(1, ge=1, le=64, description="keep every stride-th source layer")
    sample: int | None = Field(None, ge=2, le=1_000_000, description="a seeded sample of this many rows (kept in "
                                                                     "file order); all rows when absent")


class PatchscopeTarget(Strict):
    prompt: str = Field(min_length=1, description="the target prompt; the token at `position` receives the state")
    position: TokenSpec = Field("last", description="'last', an int (negative from the end) or {token: ' x', "
                                                    "occurrence: -1}: the placeholder")
    layer: Literal["same"] | int = Field("same", description="'same' as the source layer, or a fixed layer")


class PatchscopeRead(Strict):
    max_new_tokens: int = Field(6, ge=1, le=32)
    expect_field: str = Field(description="the row field the continuation should start with")
    aliases_field: str | None = Field(None, description="a row field with a list of accepted aliases")


class PatchscopeExpect(OneExpectation):
    decode_rate: RateThreshold | None = Field(None, description="share of prompts decoded at the best layer of the range")


class PatchscopeClaim(ClaimSpec):
    expect: PatchscopeExpect
    layers: LayerSpec = Field("all", description="the layers the best one is taken from ('0.25:0.75': depth fractions)")


class PatchscopeSpec(ProbeSpec[PatchscopeClaim]):
    kind: Literal["patchscope"]
    source: PatchscopeSource
    target: PatchscopeTarget
    read: PatchscopeRead


class Patchscope(ProbeKind[PatchscopeSpec]):
    Spec = PatchscopeSpec
    skeleton = """\
about: The bridge entity is decodable from the first entity's last token at middle layers.
tags: [patchscope]
source: {prompts: data/two_hop.jsonl, field: query, position: bridge_entity_last, layers: all, stride: 1}
# The state goes into the placeholder " x" (last, an int, or {token, occurrence} name a token); layer: same or an int
target: {prompt: "Syria: Syria; leaf: leaf; Paris: Paris; x:", position: {token: " x", occurrence: -1}, layer: same}
read: {max_new_tokens: 6, expect_field: hop1_answer, aliases_field: hop1_aliases}
claims:
  bridge_decodable_mid_depth:
    layers: "0.25:0.75"          # fractions of depth; the best layer of this range is tested (the count searched is reported)
    expect: {decode_rate: {at_least: 0.3}}
"""
    skeleton_data = {"data/two_hop.jsonl": two_hop_examples()}  # the control needs several rows

    @classmethod
    def check_data(cls, probe) -> list[dict]:
        spec = probe.spec
        need = (spec.source.field, spec.read.expect_field)
        rows = read_rows(probe, spec.source.prompts, ("source", "prompts"), need,
                         ("entity",) if spec.source.position == "bridge_entity_last" else ())
        path = probe.path.parent / spec.source.prompts
        if len(rows) < 2:  # the random-source control patches another prompt's state
            raise probe.error(f"'{path}' holds {len(rows)} row; the random-source control needs at least 2",
                              ("source", "prompts"))
        for i, row in enumerate(rows):
            if spec.source.position == "bridge_entity_last" and "entity" not in row:
                raise DataError(f"{path}:{i + 1}: missing field 'entity' (source.position: bridge_entity_last)")
            al = row.get(spec.read.aliases_field, []) if spec.read.aliases_field else []
            if not isinstance(al, list) or not all(isinstance(a, str) for a in al):
                raise DataError(f"{path}:{i + 1}: field '{spec.read.aliases_field}' must be a list of strings")
        return rows

    def setup(self) -> None:
        spec, subject = self.spec, self.subject
        rows = self.check_data(self.probe)
        keep = list(range(len(rows)))
        if spec.source.sample is not None and spec.source.sample < len(rows):
            keep = sorted(np.random.default_rng(spec.seed).choice(len(rows), spec.source.sample, replace=False))
        self.rows, self.lines = [rows[i] for i in keep], [int(i) + 1 for i in keep]
        self.path = self.probe.path.parent / spec.source.prompts
        layers = resolve_layer(spec.source.layers, subject.n_layers, ("source", "layers"))
        self.layers = sorted(set(layers))[::spec.source.stride]
        if spec.target.layer != "same":
            self.target_layer = resolve_layer(spec.target.layer, subject.n_layers, ("target", "layer"))[0]
        self.ids = encode_rows(subject, [r[spec.source.field] for r in self.rows], self.path, self.lines)
        self.target_ids = subject.encode(spec.target.prompt)
        self.claim_layers = {name: set(resolve_layer(c.layers, subject.n_layers, ("claims", name, "layers")))
                             & set(self.layers) for name, c in spec.claims.items()}
        for name, chosen in self.claim_layers.items():
            if not chosen:
                raise self.probe.error("none of these layers is among the source layers measured",
                                       ("claims", name, "layers"))
        self.pos = [self._source_position(i) for i in range(len(self.rows))]
        try:
            self.target_pos = token_index(subject, spec.target.prompt, self.target_ids, spec.target.position)
        except SiteError as e:
            raise SiteError(e.message, ("target", "position")) from None

    def _source_position(self, i: int) -> int:
        """Token index of the source state in row i; a DataError at the row when it cannot be found."""
        text, ids, where = self.rows[i][self.spec.source.field], self.ids[i], self.spec.source.position
        try:
            if where == "bridge_entity_last":  # the entity's first occurrence: where the query names it
                return text_token_index(self.subject, text, ids, self.rows[i]["entity"], 0)
            return token_index(self.subject, text, ids, where)
        except SiteError as e:
            field = "entity" if where == "bridge_entity_last" else self.spec.source.field
            raise DataError(f"{self.path}:{self.lines[i]}: field '{field}': {e.message} (source.position)") from None

    @staticmethod
    def _shown(position) -> str | int:
        return position if isinstance(position, str | int) else position.model_dump()

    def _expected(self, i: int) -> list[str]:
        row, read = self.rows[i], self.spec.read
        return [row[read.expect_field], *(row.get(read.aliases_field, []) if read.aliases_field else [])]

    def _decode(self) -> tuple[np.ndarray, np.ndarray, list[list[str]]]:
        """decoded[i, k] (own state) and null[i, k] (another prompt's state) per prompt and layer."""
        from .._lazy import torch
        from ..progress import bar
        from ..subject import clean_pass
        from ..toolkit.prompt_writes import patch_at_and_generate

        n, k = len(self.rows), len(self.layers)
        states = torch.stack([clean_pass(self.subject, self.ids[i]).resid[self.layers, self.pos[i]]
                              for i in bar(range(n), "patchscope sources", total=n, enabled=self.subject.progress)])
        other = random_source(n, self.spec.seed)
        owner = [i for i in range(n) for _ in range(k)] * 2
        values = torch.cat([states.reshape(n * k, -1), states[other].reshape(n * k, -1)])
        same = self.spec.target.layer == "same"
        targets = [layer if same else self.target_layer for layer in self.layers] * (2 * n)
        answers = [self._expected(i) for i in range(n)]
        memo: dict[tuple[int, int], bool] = {}

        def worth(row: int, tok: int) -> bool:
            key = (owner[row], tok)
            if key not in memo:
                memo[key] = could_give_answer(self.subject.decode([tok]), answers[owner[row]])
            return memo[key]

        clean = clean_pass(self.subject, self.target_ids, resid_pre=True)
        gens = patch_at_and_generate(self.subject, clean, self.target_pos, targets, values,
                                     self.spec.read.max_new_tokens, worth)
        texts = [self.subject.decode(g) for g in gens]
        hit = np.array([gives_answer(t, answers[owner[r]]) for r, t in enumerate(texts)])
        return hit[:n * k].reshape(n, k), hit[n * k:].reshape(n, k), [texts[i * k:(i + 1) * k] for i in range(n)]

    def measure(self) -> Outcome:
        decoded, null, texts = self._decode()
        curve, null_curve = decoded.mean(0).tolist(), null.mean(0).tolist()
        plot = LinePlot(title="decode rate per source layer", x_label="source layer", y_label="share decoded",
                        x=[float(x) for x in self.layers],
                        series=[Series(label="own state", y=curve), Series(label="another prompt's state", y=null_curve)])
        claims = [self._claim(name, claim, decoded, null, texts, plot) for name, claim in self.spec.claims.items()]
        settings = {"source": self.spec.source.prompts, "n_prompts": len(self.rows),
                    "source_position": self._shown(self.spec.source.position), "layers": self.layers,
                    "target_prompt": self.spec.target.prompt, "target_layer": self.spec.target.layer,
                    "target_position": self._shown(self.spec.target.position), "target_index": self.target_pos,
                    "target_token": self.subject.decode([self.target_ids[self.target_pos]]),
                    "patch": "resid_post of the source token into the target token, prompt pass only",
                    "match": "continuation starts with the expected field or an alias (case-insensitive)"}
        return Outcome(settings, claims)

    def _claim(self, name: str, claim: PatchscopeClaim, decoded: np.ndarray, null: np.ndarray,
               texts: list[list[str]], plot: LinePlot) -> ClaimResult:
        cols = [k for k, layer in enumerate(self.layers) if layer in self.claim_layers[name]]
        best = max(cols, key=lambda k: decoded[:, k].mean())
        mine, theirs = decoded[:, best], null[:, best]
        n = len(mine)
        p = paired_control(mine.astype(float), theirs.astype(float), claim.expect.threshold.comparison, self.spec.seed)
        control = ControlResult(name="random source: another prompt's state, same layer", effect=float(theirs.mean()),
                                p_value=p, detail={"layers_searched": len(cols)})
        examples = Table(title=f"examples at layer {self.layers[best]}",
                         columns=["prompt", "expected", "read (cut once the answer is ruled out)"],
                         rows=[[self.rows[i][self.spec.source.field], self._expected(i)[0], texts[i][best]]
                               for i in range(min(8, n))])
        m = Measured(float(mine.mean()), wilson_interval(int(mine.sum()), n), n,
                     f"share of prompts whose state decodes to the expected field at the best of {len(cols)} layers",
                     control=control, beats_control=beats_control(p),
                     details={"best_layer": self.layers[best], "layers_searched": len(cols)},
                     curves={"decode_rate": decoded.mean(0).tolist()},
                     plots=[plot.model_copy(update={"mark_x": float(self.layers[best]),
                                                    "mark_label": f"best layer {self.layers[best]}"}), examples])
        return judge(name, claim, m)
