"""Prompt sets: data rows checked field by field, seeded splits, chat-template encoding with a
context-length check, and token checks against the model's vocabulary.

Every problem is one located line: `data/x.jsonl:7: field 'prompt' must be a non-empty string, got 42`
(data rows), or a SpecError at the probe field that names the token (grader tokens).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import DataError, SiteError

if TYPE_CHECKING:
    from ..spec import LoadedProbe
    from ..subject import Subject


# ---- rows ---------------------------------------------------------------------------------------

def read_rows(probe: LoadedProbe, rel: str, loc: tuple, text_fields: Sequence[str] = ("prompt",),
              optional_text: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Rows of a data file named at `loc` of the probe (relative to the probe file), read once.

    `text_fields` must be present in every row as non-empty strings; `optional_text` fields must be
    strings when present. No model needed: this runs at collection.
    """
    rows = probe.rows(rel, loc, tuple(text_fields))
    path = probe.path.parent / rel
    for i, row in enumerate(rows):
        for name in text_fields:
            _check_text(row[name], name, path, i + 1)
        for name in optional_text:
            if name in row:
                _check_text(row[name], name, path, i + 1)
    return rows


def _check_text(value: Any, name: str, path: Path, line: int) -> None:
    if not isinstance(value, str):
        raise DataError(f"{path}:{line}: field '{name}' must be a string, got {_shown(value)}")
    if not value.strip():
        raise DataError(f"{path}:{line}: field '{name}' is empty")


def _shown(value: Any) -> str:
    return "null" if value is None else f"{type(value).__name__} {value!r}"[:80]


# ---- splits -------------------------------------------------------------------------------------

def split_indices(n: int, sizes: dict[str, int], seed: int) -> dict[str, np.ndarray]:
    """Consecutive parts of one seeded permutation of range(n), in the order of `sizes`.

    The same seed gives the same permutation for every set of the same length, so equal-length sets
    paired line by line (harmful/harmless twins) stay paired across the split.
    """
    if sum(sizes.values()) > n:
        raise ValueError(f"the split asks for {sum(sizes.values())} rows of {n}")
    perm = np.random.default_rng(seed).permutation(n)
    out, start = {}, 0
    for part, size in sizes.items():
        out[part] = perm[start:start + size]
        start += size
    return out


# ---- encoding -----------------------------------------------------------------------------------

def encode_rows(subject: Subject, prompts: Sequence[str], path: Path, lines: Sequence[int] | None = None,
                chat_template: bool = False, system: str | None = None, new_tokens: int = 0) -> list[list[int]]:
    """Token ids of each prompt, as the model sees them; a prompt that does not fit the model's
    context (with `new_tokens` generated after it) is a DataError at its data line."""
    ids = subject.encode_all(prompts, chat_template, system)
    limit = subject.max_positions
    unk, special = subject.tokenizer.unk_token_id, set(subject.tokenizer.all_special_ids)
    for k, x in enumerate(ids):
        line = lines[k] if lines is not None else k + 1
        words = [t for t in x if t not in special or t == unk]
        if unk is not None and words and all(t == unk for t in words):
            raise DataError(f"{path}:{line}: every word of the prompt is the unknown token "
                            f"{subject.tokenizer.unk_token!r} for model '{subject.info.id}': it shows the model nothing")
        if limit is not None and len(x) + new_tokens > limit:
            extra = f" + {new_tokens} generated" if new_tokens else ""
            raise DataError(f"{path}:{line}: prompt is {len(x)} tokens{extra}, more than the "
                            f"{limit} positions model '{subject.info.id}' accepts")
    return ids


# ---- tokens -------------------------------------------------------------------------------------

def answer_tokens(subject: Subject, text: str) -> list[int]:
    """Ids of a continuation such as ' Paris'; SiteError when the tokenizer cannot represent it
    (it would be scored as the unknown token) or it is empty after tokenization."""
    ids = subject.token_id(text)
    if not ids:
        raise SiteError(f"{text!r} is empty after tokenization")
    unk = subject.tokenizer.unk_token_id
    if unk is not None and unk in ids:
        raise SiteError(f"{text!r} is not in the vocabulary of model '{subject.info.id}' (it would be "
                        f"scored as the unknown token {subject.tokenizer.unk_token!r})")
    return ids


def single_token(subject: Subject, text: str) -> int:
    """The one id of `text`; SiteError naming the count when it is several tokens (or unknown)."""
    ids = answer_tokens(subject, text)
    if len(ids) != 1:
        raise SiteError(f"{text!r} is {len(ids)} tokens for model '{subject.info.id}'; it must be one "
                        "(try with or without a leading space)")
    return ids[0]


def data_error(path: Path, line: int, field: str, err: SiteError) -> DataError:
    """A token problem of a data row, located at its file and line."""
    return DataError(f"{path}:{line}: {field} {err.message}")


# ---- positions ----------------------------------------------------------------------------------

def text_token_index(subject: Subject, text: str, ids: Sequence[int], token: str, occurrence: int = -1) -> int:
    """Index in `ids` (the encoding of `text`) of the token that ends the `occurrence`-th `token` in the
    text (0 the first, -1 the last). SiteError when the text does not occur that often, or when the
    tokenizer does not end a token where it ends (a patch there would land inside a word)."""
    starts, at = [], text.find(token)
    while at >= 0:
        starts.append(at)
        at = text.find(token, at + 1)
    if not -len(starts) <= occurrence < len(starts):
        times = {0: "does not occur", 1: "occurs once"}.get(len(starts), f"occurs {len(starts)} times")
        raise SiteError(f"{token!r} {times} in {_clip(text)}" +
                        (f"; occurrence {occurrence} does not exist" if starts else ""))
    end = starts[occurrence] + len(token)
    head = subject.encode(text[:end].rstrip()) if text[:end].strip() else []
    if not head or list(ids[:len(head)]) != head or len(head) > len(ids):
        raise SiteError(f"the tokenizer of model '{subject.info.id}' does not end a token where {token!r} ends "
                        f"in {_clip(text)}")
    return len(head) - 1


def token_index(subject: Subject, text: str, ids: Sequence[int], position: Any) -> int:
    """The shared position vocabulary resolved on one prompt: 'last', an int (negative from the end) or
    a TokenPosition ({token, occurrence}); a non-negative index into `ids`, or SiteError."""
    if position == "last":
        return len(ids) - 1
    if isinstance(position, int) and not isinstance(position, bool):
        if not -len(ids) <= position < len(ids):
            raise SiteError(f"position {position} is outside the prompt ({len(ids)} tokens: {_clip(text)})")
        return position % len(ids)
    token = getattr(position, "token", None)
    if isinstance(token, str):
        return text_token_index(subject, text, ids, token, getattr(position, "occurrence", -1))
    raise SiteError(f"position must be 'last', an int or {{token, occurrence}}, not {position!r}")


def _clip(text: str, n: int = 60) -> str:
    return repr(text if len(text) <= n else text[:n - 3] + "...")
