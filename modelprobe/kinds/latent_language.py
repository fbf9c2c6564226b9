"""latent_language: "the model thinks in English" (Wendler et al. 2024), read through the logit lens.

Each row translates a word between two languages that are not the pivot (French → German): per layer, the
residual at the last prompt token goes through the final norm and the unembedding, and the probability mass
(or best rank) of the target word's first tokens is set against the pivot word's (the English answer).
`pivot_leads` is the share of prompts whose pivot beats the target over a window of layers; it must beat the
same share computed with ANOTHER row's pivot word, so that "English tokens are likely in the middle" is not
read as "the English answer is". Prompts the model does not translate (no target token top-1 at the last
layer) are left out and counted.

Controls: pivot_leads is held against the same share computed with another row's pivot word (paired
permutation over the translated prompts, p <= 0.05). target_leads has no control.

Verdicts: pass when the Wilson interval of the share clears the threshold and, for pivot_leads, another row's
pivot is beaten. Inconclusive when the interval straddles the threshold, or when too few prompts are
translated by the model (fewer than `min_prompts`, or fewer than 5, below which the paired control cannot
reach p <= 0.05).
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from pydantic import Field

from .._lazy import torch
from ..errors import DataError, SiteError
from ..report.record import ClaimResult, ControlResult, LinePlot, Series
from ..spec import ChatPrompts, ClaimSpec, Count, DataFile, OneExpectation, ProbeSpec, RateThreshold
from ..spec.fields import LayerSpec
from ..stats import wilson_interval
from ..subject import Site, resolve_layer
from ..toolkit.controls import ALPHA, MIN_PAIRED, beats_control, paired_control, random_source
from ..toolkit.prompts import answer_tokens, data_error, encode_rows, read_rows
from .base import Measured, Outcome, ProbeKind, judge

WINDOW = "0.4:0.8"  # the middle of depth, where the paper sees the pivot
ROLES = ("target", "pivot", "control")


class LatentExpect(OneExpectation):
    pivot_leads: RateThreshold | None = Field(
        None, description="share of translated prompts whose pivot word beats the target over `layers` "
                          "(held against another row's pivot word)")
    target_leads: RateThreshold | None = Field(
        None, description="share of translated prompts whose target word beats the pivot over `layers`")


class LatentClaim(ClaimSpec):
    expect: LatentExpect
    layers: LayerSpec | None = Field(
        None, description=f"layers the comparison averages over (int, fraction, list, 'a:b'); default "
                          f"'{WINDOW}' for pivot_leads, the last layer for target_leads")


class LatentLanguageSpec(ProbeSpec[LatentClaim], ChatPrompts):
    kind: Literal["latent_language"]
    prompts: DataFile = Field(description='JSONL file, one {"prompt", "target", "pivot"} per line, optional '
                                     '"target_aliases" / "pivot_aliases" lists')
    component: Literal["resid_post", "resid_pre", "resid_mid"] = "resid_post"
    by: Literal["probability", "rank"] = Field(
        "probability", description="probability: summed mass of each word's first tokens; rank: best rank")
    variants: bool = Field(False, description="also score each word with / without a leading space and capitalised "
                                              "(a variant's first token may be another word: ' was' of ' Wasser')")
    min_prompts: Count = Field(20, description="fewer translated prompts than this: untestable")


def _aliases(row: dict[str, Any], role: str, path: Any, line: int) -> list[str]:
    extra = row.get(f"{role}_aliases", [])
    if not isinstance(extra, list) or not all(isinstance(a, str) and a.strip() for a in extra):
        raise DataError(f"{path}:{line}: field '{role}_aliases' must be a list of non-empty strings, got "
                        f"{str(extra)[:60]}")
    return [row[role], *extra]


def _variants(words: list[str]) -> list[str]:
    out: list[str] = []
    for w in words:
        w = w.strip()
        for v in (w, w[:1].upper() + w[1:], w.lower()):
            out += [v, " " + v]
    return list(dict.fromkeys(out))


_LATENT_ROWS = [("fleur", "Blume", "flower"), ("chien", "Hund", "dog"), ("livre", "Buch", "book"),
                ("eau", "Wasser", "water"), ("arbre", "Baum", "tree"), ("pain", "Brot", "bread")]


class LatentLanguage(ProbeKind[LatentLanguageSpec]):
    Spec = LatentLanguageSpec
    skeleton = """\
about: Translating French into German, the middle layers carry the English word before the German one wins.
tags: [latent_language]
prompts: data/latent_language_fr_de.jsonl   # {"prompt": ..., "target": "Hund", "pivot": "dog"}, optional *_aliases lists
by: probability                  # or rank: the best rank of each word's first tokens
variants: false                  # true: also each word with / without a leading space, capitalised
min_prompts: 5                   # fewer prompts the model translates (target top-1 at the end): untestable;
                                 # below 5 the paired control could never reach p <= 0.05
claims:
  english_leads_in_the_middle:   # must beat the same share with ANOTHER row's pivot word
    layers: "0.4:0.8"            # fractions of depth, ints, a list or 'a:b'
    expect: {pivot_leads: {at_least: 0.5}}
  target_leads_at_the_end:
    layers: -1
    expect: {target_leads: {at_least: 0.8}}
"""
    skeleton_data = {"data/latent_language_fr_de.jsonl": [
        {"prompt": "".join(f'Français: "{f}" - Deutsch: "{d}"\n' for f, d, _ in _LATENT_ROWS if f != src)
         + f'Français: "{src}" - Deutsch: "', "target": de, "pivot": en} for src, de, en in _LATENT_ROWS]}

    @classmethod
    def check_data(cls, probe) -> list[dict]:
        rows = read_rows(probe, probe.spec.prompts, ("prompts",), ("prompt", "target", "pivot"))
        path = probe.path.parent / probe.spec.prompts
        for i, row in enumerate(rows):
            for role in ("target", "pivot"):
                _aliases(row, role, path, i + 1)
        return rows

    def setup(self) -> None:
        spec, subject = self.spec, self.subject
        path = self.probe.path.parent / spec.prompts
        self.rows = self.check_data(self.probe)
        self.ids = encode_rows(subject, [r["prompt"] for r in self.rows], path, None, spec.chat_template,
                               spec.system)
        sets: dict[str, list[set[int]]] = {"target": [], "pivot": []}
        for i, row in enumerate(self.rows):
            for role in sets:
                words = _aliases(row, role, path, i + 1)
                try:
                    first = {answer_tokens(subject, w)[0] for w in words}
                    if spec.variants:  # a variant the tokenizer cannot spell is skipped, not an error
                        for w in _variants(words):
                            ids = subject.token_id(w)
                            # a one-letter first token ("h" of "hund") starts too many words to stand for this one
                            if ids and ids[0] != subject.tokenizer.unk_token_id and \
                                    len(subject.decode(ids[:1]).strip()) >= 2:
                                first.add(ids[0])
                except SiteError as e:
                    raise data_error(path, i + 1, role, e) from None
                sets[role].append(first)
        # A token both words start with says nothing about which language leads: it counts for neither.
        self.sets = {"target": [], "pivot": [], "control": []}
        for t, p in zip(sets["target"], sets["pivot"], strict=True):
            self.sets["target"].append(sorted(t - p))
            self.sets["pivot"].append(sorted(p - t))
        n = len(self.rows)
        other = random_source(n, spec.seed) if n >= 2 else np.zeros(n, dtype=int)
        for i in range(n):  # another row's pivot word, minus this row's own words' tokens
            own = set(self.sets["target"][i]) | set(self.sets["pivot"][i])
            cand: list[int] = []  # none: this prompt's control word has no mass, so it never leads
            for k in range(n - 1):
                j = int((other[i] + k) % n)
                cand = sorted(set(self.sets["pivot"][j]) - own) if j != i else []
                if cand:
                    break
            self.sets["control"].append(cand)
        self.claim_layers: dict[str, list[int]] = {}
        for name, claim in spec.claims.items():
            default = WINDOW if claim.expect.statistic == "pivot_leads" else -1
            layers = resolve_layer(claim.layers if claim.layers is not None else default, subject.n_layers,
                                   ("claims", name, "layers"))
            self.claim_layers[name] = sorted(set(layers))

    def _index(self, role: str) -> tuple[torch.Tensor, torch.Tensor]:
        """[n, k] token ids of each row's word (padded with 0) and the [n, k] mask of real ones."""
        sets = self.sets[role]
        k = max(1, max((len(s) for s in sets), default=1))
        idx = torch.zeros((len(sets), k), dtype=torch.long)
        mask = torch.zeros((len(sets), k), dtype=torch.bool)
        for i, s in enumerate(sets):
            idx[i, :len(s)] = torch.tensor(s, dtype=torch.long)
            mask[i, :len(s)] = True
        return idx, mask

    def lens(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """mass[role] [n, L] (summed probability of the word's tokens) and rank[role] [n, L] (its best token's
        rank; the vocabulary size when the word has no token) through the logit lens, one forward per batch."""
        subject = self.subject
        n, n_layers = len(self.ids), subject.n_layers
        sites = [Site(self.spec.component, layer) for layer in range(n_layers)]
        index = {role: self._index(role) for role in ROLES}
        mass = {role: np.zeros((n, n_layers)) for role in ROLES}
        rank = {role: np.zeros((n, n_layers), dtype=np.int64) for role in ROLES}
        for fw in subject.run(self.ids, capture=sites, logits=None, batch_size=self.spec.batch_size,
                              desc="latent language"):
            rows = fw.batch.rows
            picked = {role: (idx[rows].to(subject.device), mask[rows].to(subject.device))
                      for role, (idx, mask) in index.items()}
            for layer, site in enumerate(sites):
                logits = subject.unembed(fw.at(site))  # [b, vocab]
                probs = torch.softmax(logits, dim=-1)
                for role, (idx, mask) in picked.items():
                    mass[role][rows, layer] = (probs.gather(1, idx) * mask).sum(1).double().cpu().numpy()
                    best = logits.gather(1, idx).masked_fill(~mask, float("-inf")).amax(1)
                    above = (logits > best[:, None]).sum(1)
                    rank[role][rows, layer] = torch.where(mask.any(1), above, logits.shape[1]).cpu().numpy()
        return mass, rank

    def measure(self) -> Outcome:
        spec = self.spec
        mass, rank = self.lens()
        distinct = np.array([bool(t) and bool(p) for t, p in zip(self.sets["target"], self.sets["pivot"],
                                                                   strict=True)])
        translated = rank["target"][:, -1] == 0
        keep = distinct & translated
        settings = {
            "prompts": spec.prompts, "n_prompts": len(self.rows), "n_translated": int((translated & distinct).sum()),
            "left_out_not_translated": int((distinct & ~translated).sum()),
            "left_out_shared_first_tokens": int((~distinct).sum()),
            "component": spec.component, "site": f"blocks.*.hook_{spec.component}", "position": "last",
            "by": spec.by, "variants": spec.variants, "min_prompts": spec.min_prompts,
            "n_layers": self.subject.n_layers, "chat_template": spec.chat_template,
        }
        kept_mass = {r: m[keep] for r, m in mass.items()}
        kept_rank = {r: m[keep] for r, m in rank.items()}
        claims = [self._claim(name, claim, kept_mass, kept_rank, settings) for name, claim in spec.claims.items()]
        return Outcome(settings, claims)

    def _score(self, mass: dict[str, np.ndarray], rank: dict[str, np.ndarray], role: str,
               layers: list[int]) -> np.ndarray:
        """Per prompt, how well `role`'s word does over `layers` (higher is better)."""
        if self.spec.by == "probability":
            return mass[role][:, layers].mean(axis=1)
        return -np.log1p(rank[role][:, layers]).mean(axis=1)

    def _claim(self, name: str, claim: LatentClaim, mass: dict[str, np.ndarray], rank: dict[str, np.ndarray],
               settings: dict[str, Any]) -> ClaimResult:
        layers = self.claim_layers[name]
        n_layers = self.subject.n_layers
        n = len(mass["target"])
        stat = claim.expect.statistic
        depth = [round((a + 1) / n_layers, 3) for a in (layers[0], layers[-1])]
        details: dict[str, Any] = {"layers": layers, "depth": depth,
                                   "n_translated": n, "by": self.spec.by}
        untestable = None
        if n < self.spec.min_prompts:
            untestable = (f"only {n} of {settings['n_prompts']} prompts are translated by the model (target top-1 "
                          f"at the last layer; {settings['left_out_not_translated']} not translated, "
                          f"{settings['left_out_shared_first_tokens']} with target and pivot sharing their first "
                          f"tokens): min_prompts is {self.spec.min_prompts}")
        where = f"layers {layers[0]}–{layers[-1]}" if len(layers) > 1 else f"layer {layers[0]}"
        control, beats = None, None
        if n == 0:
            effect, ci = None, None
            metric = f"share of translated prompts where the {stat.split('_')[0]} leads over {where}"
        else:
            target = self._score(mass, rank, "target", layers)
            pivot = self._score(mass, rank, "pivot", layers)
            lead = pivot > target if stat == "pivot_leads" else target > pivot
            k = int(lead.sum())
            effect, ci = k / n, wilson_interval(k, n)
            who, over = ("pivot", "target") if stat == "pivot_leads" else ("target", "pivot")
            metric = (f"share of translated prompts where the {who} word beats the {over} word over {where} "
                      f"({self.spec.by})")
            if stat == "pivot_leads" and n < 2:
                untestable = untestable or "the paired control needs at least two translated prompts"
            elif stat == "pivot_leads" and n < MIN_PAIRED:
                untestable = untestable or (f"with {n} translated prompts the paired control's p-value is at least "
                                            f"2^-{n} = {2.0 ** -n:.3g} > {ALPHA}: no claim could beat it "
                                            f"(at least {MIN_PAIRED} needed)")
            elif stat == "pivot_leads":
                other = self._score(mass, rank, "control", layers) > target
                p = paired_control(lead.astype(float), other.astype(float), claim.expect.threshold.comparison,
                                   self.spec.seed)
                beats = beats_control(p)
                control = ControlResult(name="another row's pivot word", effect=float(other.mean()), p_value=p,
                                        detail={"test": "paired permutation over prompts"})
        curves, plots = self._curves(mass, rank, layers) if n else ({}, [])
        return judge(name, claim, Measured(effect, ci, n, metric, control=control, beats_control=beats,
                                           details=details, curves=curves, plots=plots, untestable=untestable))

    def _curves(self, mass: dict[str, np.ndarray], rank: dict[str, np.ndarray],
                layers: list[int]) -> tuple[dict[str, list[float]], list[LinePlot]]:
        n = len(mass["target"])
        curves: dict[str, list[float]] = {}
        series = []
        labels = {"target": "target word", "pivot": "pivot word (the answer)", "control": "another row's pivot word"}
        for role in ROLES:
            m = mass[role]
            mean = m.mean(axis=0)
            half = 1.96 * m.std(axis=0, ddof=1) / np.sqrt(n) if n > 1 else np.zeros_like(mean)
            curves[f"mean_{role}_prob"] = mean.tolist()
            curves[f"median_{role}_rank"] = np.median(rank[role], axis=0).tolist()
            series.append(Series(label=labels[role], y=mean.tolist(), lo=np.clip(mean - half, 0, 1).tolist(),
                                 hi=np.clip(mean + half, 0, 1).tolist()))
        lead_rate = []
        for role in ("pivot", "control"):
            share = (mass[role] > mass["target"]) if self.spec.by == "probability" else (rank[role] < rank["target"])
            k = share.sum(axis=0)
            curves[f"share_{role}_beats_target"] = (k / n).tolist()
            bounds = [wilson_interval(int(x), n) for x in k]
            lead_rate.append(Series(label=labels[role] + " beats the target", y=(k / n).tolist(),
                                    lo=[b[0] for b in bounds], hi=[b[1] for b in bounds]))
        mark = float(layers[-1])
        mark_label = f"window ends (layers {layers[0]}–{layers[-1]})" if len(layers) > 1 else f"layer {layers[0]}"
        return curves, [
            LinePlot(title=f"mean probability per layer (n={n}, 95% intervals)",
                     x_label="layer", y_label="probability", series=series, mark_x=mark, mark_label=mark_label),
            LinePlot(title=f"share of prompts where a pivot word beats the target (n={n})", x_label="layer",
                     y_label="share of prompts", series=lead_rate, mark_x=mark, mark_label=mark_label),
        ]
