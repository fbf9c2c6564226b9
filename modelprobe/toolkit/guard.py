"""The side-effect guard: does the model still work on neutral prompts under an intervention?

A claim that an intervention removes (or moves) a behaviour can pass because the intervention breaks
the model: a model that stops speaking stops refusing too, and random directions or random weight groups
that leave it working cannot show the difference. So every kind whose intervention could pass that way
measures, on neutral prompts of the probe (prompts the intervention should leave alone, such as the
harmless instructions of a refusal probe):

- agreement: the clean model's greedy replies are fed back (teacher forcing) to the intervened model,
  and agreement is the share of reply positions where its greedy next token is still the clean one;
- coherent: the share of the intervened model's own greedy replies that are coherent
  (toolkit.behaviour.coherent), held against the clean replies' share.

The thresholds are fixed here, before any model is run, and a probe cannot lower them (a probe that
could would turn "breaks the model" back into a pass): agreement at least MIN_AGREEMENT, and a coherent
share at least MIN_COHERENT_KEPT of the clean replies' share. A claim that fails is inconclusive with a
reason starting BREAKS, never a pass. Point estimates, not intervals: the guard refuses to judge, it
never makes a verdict, so a borderline intervention is held back rather than passed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .behaviour import COHERENT_RULE, coherent_flags

if TYPE_CHECKING:
    from ..subject import InterventionsFor, Subject

# Three quarters of the clean reply's tokens kept: the level weight_perturbation's specificity check used
# before the guard was shared (its default min_agreement), kept so that its verdicts do not move.
MIN_AGREEMENT = 0.75
# The same three quarters for coherent replies, relative to the clean model's own share, so that a model
# whose clean replies are already degenerate is not held to a standard it never met.
MIN_COHERENT_KEPT = 0.75
PROMPTS = 16  # neutral prompts per guard (the first ones of the set)
REPLY_TOKENS = 16  # clean greedy reply tokens compared
BREAKS = "the intervention breaks the model"
RULE = ("on neutral prompts: the clean model's greedy replies (past any end token) "
        "fed back to the intervened model; agreement = share of reply positions where its greedy next token is "
        f"the clean one (must be >= {MIN_AGREEMENT:g}); coherent = share of the intervened model's own greedy "
        f"replies that are coherent (must be >= {MIN_COHERENT_KEPT:g} x the clean replies' share). Fixed in code, "
        "not settable by a probe")


@dataclass
class Reference:
    """The clean model's greedy replies to the neutral prompts, which every intervention is held against."""

    ids: list[list[int]]  # the neutral prompts
    seqs: list[list[int]]  # prompt + clean reply, for teacher forcing
    texts: list[str]  # clean replies (up to the end token), for the coherent share
    where: str  # what the neutral prompts are, in words
    reply_tokens: int = REPLY_TOKENS
    agreement_clean: float = 1.0  # the clean model against itself (1 up to batching noise)

    @property
    def coherent_clean(self) -> float:
        return float(coherent_flags(self.texts).mean()) if self.texts else float("nan")


@dataclass
class GuardResult:
    agreement: np.ndarray  # [n] per neutral prompt
    coherent: np.ndarray  # [n] bool, the intervened model's own replies
    reference: Reference
    label: str  # what was applied, for the report

    @property
    def broken(self) -> list[str]:
        """The guard's failed conditions in words ([] when it holds)."""
        out = []
        agree, ref = float(self.agreement.mean()), self.reference
        if not agree >= MIN_AGREEMENT:
            out.append(f"the greedy next token matches the clean model's on only {agree:.2f} of the reply positions "
                       f"of {len(self.agreement)} {ref.where} (at least {MIN_AGREEMENT:g} needed)")
        share, clean = float(self.coherent.mean()), ref.coherent_clean
        if not share >= MIN_COHERENT_KEPT * clean:
            out.append(f"only {share:.2f} of its replies to them are coherent against {clean:.2f} clean (at least "
                       f"{MIN_COHERENT_KEPT:g} x {clean:.2f} = {MIN_COHERENT_KEPT * clean:.2f} needed)")
        return out

    @property
    def passed(self) -> bool:
        return not self.broken

    def reason(self) -> str | None:
        """The claim's inconclusive reason when the guard fails, else None."""
        return f"{BREAKS}: {self.label}: " + "; ".join(self.broken) if self.broken else None

    def summary(self) -> dict[str, Any]:
        ref = self.reference
        return {"passed": self.passed, "intervention": self.label, "prompts": ref.where, "n": len(self.agreement),
                "reply_tokens": ref.reply_tokens, "agreement": float(self.agreement.mean()),
                "agreement_min_prompt": float(self.agreement.min()) if self.agreement.size else None,
                "agreement_clean": ref.agreement_clean, "min_agreement": MIN_AGREEMENT,
                "coherent": float(self.coherent.mean()), "coherent_clean": ref.coherent_clean,
                "min_coherent": MIN_COHERENT_KEPT * ref.coherent_clean, "rule": RULE, "coherent_rule": COHERENT_RULE,
                "failed": self.broken}

    def plot(self) -> Any:
        from ..report.record import Bars
        ref = self.reference
        return Bars(title=f"side-effect guard on {ref.where} ({'holds' if self.passed else 'FAILS'})",
                    value_label="share", labels=["next-token agreement", "coherent replies"],
                    before=[ref.agreement_clean, ref.coherent_clean],
                    after=[float(self.agreement.mean()), float(self.coherent.mean())],
                    before_label="clean", after_label=self.label)


def reference(subject: Subject, ids: Sequence[Sequence[int]], where: str, batch_size: int | None = None,
              reply_tokens: int = REPLY_TOKENS, prompts: int = PROMPTS) -> Reference:
    """The clean greedy replies to (the first `prompts` of) the neutral prompts: full length, past any end
    token, so that every prompt contributes the same number of positions."""
    ids = [list(x) for x in ids[:prompts]]
    gens = subject.generate(ids, reply_tokens, batch_size=batch_size, stop_at_eos=False, desc="guard: clean replies")
    ref = Reference(ids, [p + list(g) for p, g in zip(ids, gens)], [_text(subject, g) for g in gens], where,
                    reply_tokens)
    ref.agreement_clean = float(agreement(subject, ref, (), batch_size).mean())
    return ref


def _text(subject: Subject, gen: Sequence[int]) -> str:
    eos = subject.tokenizer.eos_token_id
    cut = list(gen).index(eos) if eos is not None and eos in gen else len(gen)
    return subject.decode(list(gen)[:cut])


def agreement(subject: Subject, ref: Reference, interventions: InterventionsFor = (),
              batch_size: int | None = None) -> np.ndarray:
    """[n] per neutral prompt: share of its clean reply's positions where the model (with `interventions`, and
    whatever weights it has now) predicts the clean reply's token, given the clean prefix."""
    import torch
    out = np.zeros(len(ref.seqs))
    for fw in subject.run(ref.seqs, (), interventions, "all", batch_size, "guard: agreement"):
        for j, r in enumerate(fw.batch.rows):
            seq, p, pad = ref.seqs[r], len(ref.ids[r]), int(fw.batch.pad[j])
            pred = fw.logits[j, pad + p - 1:pad + len(seq) - 1].argmax(-1).cpu()
            out[r] = float((pred == torch.tensor(seq[p:])).double().mean())
    return out


def check(subject: Subject, ref: Reference, interventions: InterventionsFor = (), label: str = "intervened",
          batch_size: int | None = None, context: Callable[[], Any] | None = None) -> GuardResult:
    """The guard under `interventions` (hooks), or inside `context()` (edited weights, restored on exit)."""
    import contextlib
    with (context() if context is not None else contextlib.nullcontext()):
        agree = agreement(subject, ref, interventions, batch_size)
        gens = subject.generate(ref.ids, ref.reply_tokens, interventions, batch_size=batch_size, desc="guard: intervened replies")
    return GuardResult(agree, coherent_flags([_text(subject, g) for g in gens]), ref, label)


__all__ = ["BREAKS", "MIN_AGREEMENT", "MIN_COHERENT_KEPT", "GuardResult", "Reference", "agreement", "check",
           "reference"]
