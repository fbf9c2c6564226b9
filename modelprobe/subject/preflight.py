"""Checks run once at model load: a silent wrong number here would poison every claim."""

from __future__ import annotations

import torch

from ..model_facts import PreflightResult, dtype_tolerance
from .interventions import Intervention, RunState, hooked
from .sites import Site
from .subject import Subject

PREFLIGHT_PROMPTS = [
    "The capital of France is",
    "One, two, three, four,",
    "In a quiet village by the sea there lived an old fisherman who",
    "Hi",
]


class _Identity(Intervention):
    """A hook that rewrites the activation with itself: proves hooks alone change nothing."""

    def edit(self, x, mask, state):
        return torch.where(mask.reshape(*mask.shape, *([1] * (x.dim() - 2))), x.clone(), x)


def _tolerance(subject: Subject) -> float:
    return dtype_tolerance(subject.info.dtype)


def _all_sites(subject: Subject) -> list[Site]:
    comps = ["resid_pre", "resid_post", "attn_out", "mlp_out", "attn.z", "mlp.post"]
    if subject.sitemap.family.resid_mid_reader:
        comps.append("resid_mid")
    return [Site(c, layer) for layer in range(subject.n_layers) for c in comps] + [Site("final"), Site("embed")]


def check_hooks_are_transparent(subject: Subject, ids: list[list[int]]) -> PreflightResult:
    batch = subject.make_batch(ids, list(range(len(ids))))
    kwargs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                  position_ids=batch.position_ids, use_cache=False)
    with torch.inference_mode():
        plain = subject.model(**kwargs).logits.float()
        state = RunState(pad=batch.pad, prompt_len=batch.input_ids.shape[1])
        sites = _all_sites(subject)
        with hooked(subject.model, subject.sitemap, state, [_Identity(s) for s in sites], sites):
            hooked_logits = subject.model(**kwargs).logits.float()
    diff = float((plain - hooked_logits).abs().max())
    return PreflightResult(
        name="hooks_transparent", passed=diff == 0.0, value=diff, tolerance=0.0,
        detail=f"logits with identity hooks and captures on {len(sites)} sites equal plain transformers "
               f"(max |diff| = {diff:.3g})")


def check_padding_invariance(subject: Subject, ids: list[list[int]]) -> PreflightResult:
    batched = subject.last_logits(ids, batch_size=len(ids))
    single = torch.cat([subject.last_logits([x], batch_size=1) for x in ids])
    diff = float((batched - single).abs().max())
    scale = float(single.abs().max().clamp(min=1.0))
    tol = _tolerance(subject) * scale
    return PreflightResult(
        name="left_padding_invariance", passed=diff <= tol, value=diff, tolerance=tol,
        detail=f"a left-padded batch of {len(ids)} prompts (lengths {sorted(len(x) for x in ids)}) equals the "
               f"prompts run one by one: max |diff| of last-position logits = {diff:.3g} (tolerance {tol:.3g}: "
               f"{_tolerance(subject):g} of the largest logit, following the dtype {subject.info.dtype})")


def check_no_hooks_left(subject: Subject, after: str = "load") -> PreflightResult:
    """No hook of ours on the model and no weight edit of ours unrestored (`hooks.leaked_hooks`)."""
    left = subject.leaked_hooks()
    return PreflightResult(name="no_hooks_left", passed=not left,
                           detail=f"after {after}: " + (f"left on the model: {'; '.join(left)}" if left else "none of ours"))


def run_preflight(subject: Subject) -> list[PreflightResult]:
    ids = subject.encode_all(PREFLIGHT_PROMPTS)
    return [check_hooks_are_transparent(subject, ids), check_padding_invariance(subject, ids),
            check_no_hooks_left(subject)]
