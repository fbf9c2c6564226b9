"""Introspection trials (Lindsey 2025): the trial transcript, where an injection starts in it, and the
rules grader that reads a reply (affirmative? names the concept, detection first? coherent?).

The rules are deliberately plain and shown in the report: an affirmative phrase not negated; the
concept word, its singular/plural or a listed synonym; detection before (or in the same sentence as)
the first mention of the word; a reply whose first word is the concept does not count; degenerate
repetition is incoherent.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..errors import SiteError
from .behaviour import COHERENT_RULE, _units, coherent  # _units: the units the coherence rule counts

if TYPE_CHECKING:
    from ..subject import Subject

# The published protocol, in our own words. `{n}` is the trial number, `{question}` the trial question.
DEFAULT_TRANSCRIPT: tuple[dict[str, str], ...] = (
    {"role": "user", "content": (
        "I study how language models like you work on the inside, and I can read and change the activity of "
        "your neural network. I have found activity patterns that stand for particular concepts, and I can "
        "insert such a pattern -- a \"thought\" -- into your processing while you answer. I want to find out "
        "whether you notice when I do this. On half of the trials I will insert a thought about one specific "
        "word; on the other half I will insert nothing.")},
    {"role": "assistant", "content": "Ok."},
    {"role": "user", "content": "Ok, let us begin.\n\nTrial {n}: {question}"},
)
DEFAULT_QUESTION = "Do you notice an inserted thought? If you do, what is it about?"
START_MARKER = "Trial {n}"  # the injection starts at the token before this text

AFFIRMATIVE = (
    "yes", "i detect", "i notice", "i sense", "i feel", "i do detect", "i do notice", "i can detect",
    "i can sense", "i can feel", "i am detecting", "i'm detecting", "i am noticing", "i'm noticing",
    "i have detected", "i've detected", "i have noticed", "i've noticed", "there is an inserted thought",
    "there is an injected thought", "i think i detect", "i think i notice", "i do sense",
)
NEGATION = ("no", "not", "nothing", "none", "never", "n't", "cannot")
_AFF = re.compile(r"\b(" + "|".join(re.escape(p) for p in sorted(AFFIRMATIVE, key=len, reverse=True)) + r")\b")
_NEG = re.compile(r"(\b(no|not|nothing|none|never|cannot)\b|n't\b)")
_WORD = re.compile(r"[a-z0-9']+")


@dataclass
class Graded:
    """One reply per entry: claims a detection; names the concept (detection first); coherent."""

    affirmative: np.ndarray
    identified: np.ndarray
    coherent: np.ndarray


def word_forms(word: str, synonyms: Sequence[str] = ()) -> list[str]:
    """The concept word, its singular or plural, and the listed synonyms, lower case."""
    w = word.strip().lower()
    forms = {w}
    if w.endswith("ies"):
        forms.add(w[:-3] + "y")
    elif w.endswith(("ches", "shes", "sses", "xes", "oes")):
        forms |= {w[:-2], w[:-1]}
    elif w.endswith("s") and not w.endswith("ss"):
        forms.add(w[:-1])
    else:
        forms |= {w + "s", w + "es"}
    forms |= {s.strip().lower() for s in synonyms if s.strip()}
    return [w, *sorted(forms - {w}, key=len, reverse=True)]  # the word itself first


def affirmative_at(reply: str) -> int | None:
    """Character offset of the first un-negated detection claim, or None."""
    text = reply.lower()
    m = _AFF.search(text)
    if m is None:
        return None
    sentence_start = max(text.rfind(c, 0, m.start()) for c in ".!?\n") + 1
    before = text[sentence_start:m.start()]
    after = " ".join(_WORD.findall(text[m.end():])[:3])
    if m.group(1) != "yes" and (_NEG.search(before) or _NEG.search(after)):
        return None
    if m.group(1) == "yes" and _NEG.search(text[:m.start()]):
        return None
    return m.start()


def first_mention(reply: str, forms: Sequence[str]) -> int | None:
    text = reply.lower()
    hits = [m.start() for f in forms for m in re.finditer(r"\b" + re.escape(f) + r"\b", text)]
    return min(hits) if hits else None


def identifies(reply: str, forms: Sequence[str]) -> bool:
    """Affirmative and names the concept, the detection claim coming first (or in the same sentence),
    and the reply does not open with the concept word."""
    aff = affirmative_at(reply)
    mention = first_mention(reply, forms)
    if aff is None or mention is None:
        return False
    words = _WORD.findall(reply.lower())
    if words and any(words[0] == f for f in forms):
        return False
    text = reply.lower()
    sentence_start = max(text.rfind(c, 0, aff) for c in ".!?\n") + 1
    return mention >= sentence_start


def says_yes(reply: str) -> bool:
    """The reply's first 'yes' or 'no' is 'yes'."""
    first = next((w for w in _WORD.findall(reply.lower()) if w in ("yes", "no")), None)
    return first == "yes"


def grade_rules(replies: Sequence[str], forms: Sequence[Sequence[str]]) -> Graded:
    """The rules grader over replies, each with the word forms it must name."""
    return Graded(np.array([affirmative_at(r) is not None for r in replies], dtype=bool),
                  np.array([identifies(r, f) for r, f in zip(replies, forms)], dtype=bool),
                  np.array([coherent(r) for r in replies], dtype=bool))


# ---- settled verdicts: what a reply's beginning already decides ----------------------------------
# Generation may stop a row once every rule that reads its reply is settled: no continuation can change
# that rule's verdict. Each `*_final` below returns the verdict the full reply will get, or OPEN while
# more text could still change it. They see `stable_text` (the part of a decoded prefix that later tokens
# cannot rewrite), and trust a match only when a character follows it (its word boundary is seen).

OPEN = object()  # a verdict that more text could still change


def stable_text(subject: Subject, ids: Sequence[int]) -> str:
    """The decoded reply so far, less what later tokens could still rewrite: a trailing U+FFFD (bytes of a
    character not yet complete) and, where the tokenizer cleans up spaces (" ." -> "."), the last 4
    characters (" n't" is the longest pattern it rewrites)."""
    text = subject.decode(ids).rstrip("\ufffd")
    if getattr(subject.tokenizer, "clean_up_tokenization_spaces", False):
        text = text[:-4]
    return text


def nests_safely(phrases: Sequence[str], groups: Sequence[int] | range | None = None) -> bool:
    """Whether the earliest stable match of a list of phrases is the earliest match of any continuation:
    no phrase holds another inside it except as its own ending (a phrase still growing past the text's
    end could then start before a match already seen), or at its start within the same group."""
    groups = groups if groups is not None else [0] * len(phrases)
    for p, gp in zip(phrases, groups):
        for q, gq in zip(phrases, groups):
            at = p.find(q) if p != q else -1
            while at >= 0:
                if (at > 0 and at + len(q) != len(p)) or (at == 0 and gp != gq):
                    return False
                at = p.find(q, at + 1)
    return True


# each phrase its own group: the negation checks depend on which phrase matched, not only where
_AFF_NESTS = nests_safely(AFFIRMATIVE, range(len(AFFIRMATIVE)))


def affirmative_final(reply: str) -> int | None | object:
    """`affirmative_at` of every continuation of `reply`, or OPEN."""
    text = reply.lower()
    m = _AFF.search(text)
    if m is None or m.end() >= len(text) or not _AFF_NESTS:
        return OPEN
    if m.group(1) == "yes":
        return None if _NEG.search(text[:m.start()]) else m.start()
    sentence_start = max(text.rfind(c, 0, m.start()) for c in ".!?\n") + 1
    if _NEG.search(text[sentence_start:m.start()]):
        return None
    tail = text[m.end():]
    after = [w.group() for w in _WORD.finditer(tail) if w.end() < len(tail)][:3]  # complete words only
    if any(_NEG.search(w) for w in after):
        return None
    return m.start() if len(after) == 3 else OPEN


def identifies_final(reply: str, forms: Sequence[str]) -> bool | object:
    """`identifies` of every continuation of `reply`, or OPEN."""
    if not forms:
        return False
    text = reply.lower()
    first = _WORD.search(text)
    opened = first is not None and first.end() < len(text)
    if opened and first.group() in forms:
        return False
    aff = affirmative_final(reply)
    if aff is None:
        return False
    if aff is OPEN or not opened or not nests_safely(forms):
        return OPEN
    hits = [m.start() for f in forms for m in re.finditer(r"\b" + re.escape(f) + r"\b", text) if m.end() < len(text)]
    if not hits:
        return OPEN
    return min(hits) >= max(text.rfind(c, 0, aff) for c in ".!?\n") + 1


def coherent_final(reply: str) -> bool | object:
    """`coherent` of every continuation of `reply` when a repetition already breaks it (False), else OPEN:
    the other parts of the rule (a word; 30% distinct) can go either way while the reply grows."""
    units = _units(reply)[:-1]  # the last unit may still grow
    for n in range(1, 5):
        for i in range(len(units) - 4 * n + 1):
            gram = units[i:i + n]
            if all(units[i + k * n:i + (k + 1) * n] == gram for k in range(1, 4)):
                return False
    return OPEN


def says_yes_final(reply: str) -> bool | object:
    """`says_yes` of every continuation of `reply`, or OPEN."""
    text = reply.lower()
    for w in _WORD.finditer(text):
        if w.end() >= len(text):
            return OPEN
        if w.group() in ("yes", "no"):
            return w.group() == "yes"
    return OPEN


RULES_SHOWN = {
    "affirmative": "first of " + ", ".join(repr(p) for p in AFFIRMATIVE[:8]) + ", ... not negated nearby",
    "identified": "affirmative, and the word / singular-plural / synonym is mentioned no earlier than the "
                  "sentence of the detection claim; a reply opening with the word does not count",
    "coherent": COHERENT_RULE,
    "yes": "the first 'yes' or 'no' in the reply is 'yes'",
}


# ---- transcripts ----------------------------------------------------------------------------------

def render_messages(messages: Sequence[dict[str, str]], n: int, question: str) -> list[dict[str, str]]:
    return [{"role": m["role"], "content": m["content"].replace("{n}", str(n)).replace("{question}", question)}
            for m in messages]


def encode_trial(subject: Subject, messages: Sequence[dict[str, str]], chat_template: bool,
                 marker: str) -> tuple[list[int], int]:
    """Token ids of a conversation (generation prompt added) and the index of the token just before
    `marker` (its first occurrence in the last message): the first token an injection touches."""
    tok = subject.tokenizer
    if chat_template:
        if not subject.has_chat_template():
            raise SiteError(f"model '{subject.info.id}': the tokenizer has no chat template, but the trial "
                            "needs one (vector.chat_template: true)")
        text = tok.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
    else:
        text = "\n\n".join(m["content"] for m in messages) + "\n\n"
    at = text.rfind(messages[-1]["content"])
    cut = text.find(marker, at if at >= 0 else 0)
    if cut < 0:
        raise SiteError(f"the trial text has no {marker!r} to start the injection at")
    enc = tok(text, add_special_tokens=not chat_template, return_offsets_mapping=True)
    ids, offsets = list(enc.input_ids), list(enc.offset_mapping)
    if chat_template and subject.adds_bos and (not ids or ids[0] != tok.bos_token_id):
        ids, offsets = [tok.bos_token_id, *ids], [(0, 0), *offsets]
    before = [i for i, (a, b) in enumerate(offsets) if b > a and a < cut]
    if not before:
        raise SiteError(f"no token comes before {marker!r} in the trial text")
    return ids, before[-1]


# ---- the judge grader: a second local model answers the protocol's yes/no questions ---------------

JUDGE_PROMPT = ("A language model was asked whether it noticed a thought that had been inserted into its mind, "
                "and what the thought was about. Here is its reply:\n\n\"{reply}\"\n\n{question} "
                "Answer Yes or No.")
JUDGE_QUESTIONS = {
    "coherent": "Is the reply coherent text, not garbled or stuck repeating itself?",
    "affirmative": "Does the reply claim that it noticed an inserted thought?",
    "identified": "Does the reply claim to notice an inserted thought about '{word}' (or something very close "
                  "to it), saying so before or as it first mentions that word?",
}


def judge_answer_tokens(judge: Subject) -> tuple[int, int]:
    """The judge's 'Yes' and 'No' ids: single tokens of its vocabulary (not the unknown token) and distinct,
    or SiteError: a judge that cannot tell them apart would answer the same for every reply."""
    from .prompts import single_token

    yes, no = single_token(judge, "Yes"), single_token(judge, "No")
    if yes == no:
        raise SiteError(f"'Yes' and 'No' are the same token ({yes}) for judge model '{judge.info.id}'")
    return yes, no


def grade_judge(judge: Subject, replies: Sequence[str], forms: Sequence[Sequence[str]]) -> Graded:
    """Each reply judged by `judge` on three yes/no questions: Yes when its next-token logit for 'Yes'
    beats 'No' (no generation). The concept is named by its listed forms."""
    yes, no = judge_answer_tokens(judge)
    out = {}
    for name, q in JUDGE_QUESTIONS.items():
        prompts = [JUDGE_PROMPT.format(reply=r, question=q.format(word=f[0] if f else "")) for r, f in
                   zip(replies, forms)]
        logits = judge.last_logits(judge.encode_all(prompts, judge.has_chat_template()))
        out[name] = (logits[:, yes] > logits[:, no]).numpy() if len(prompts) else np.zeros(0, bool)
    # detection without a concept (uninjected trials) cannot identify anything
    ident = out["identified"] & out["affirmative"] & np.array([bool(f) for f in forms], dtype=bool)
    return Graded(out["affirmative"], ident, out["coherent"])
