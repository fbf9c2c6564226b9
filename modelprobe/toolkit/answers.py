"""Free-text answers: does a greedy continuation give the answer (or one of its aliases)?

The rule is strict on purpose (lenient alias matching inflates multi-hop fix rates): the continuation,
stripped of leading whitespace and case-folded, must START with an alias, followed by the end of the
text or a character that is not a letter or digit (" Paris." matches "Paris", " Parisian" does not).
"""

from __future__ import annotations

from collections.abc import Sequence


def _norm(text: str) -> str:
    return text.lstrip().casefold()


def gives_answer(text: str, aliases: Sequence[str]) -> bool:
    """Whether the continuation `text` starts with one of `aliases` at a word boundary."""
    t = _norm(text)
    for alias in aliases:
        a = _norm(alias).strip()
        if a and t.startswith(a) and (len(t) == len(a) or not t[len(a)].isalnum()):
            return True
    return False


def could_give_answer(prefix: str, aliases: Sequence[str]) -> bool:
    """Whether some continuation of `prefix` could still give an alias (used to skip generating the
    rest of continuations whose first token already rules every alias out)."""
    p = _norm(prefix)
    if not p:
        return True
    return any(_norm(a).strip().startswith(p) or gives_answer(prefix, [a]) for a in aliases)
