"""Task data for ablation claims: prompts with one-token answers, and reference prompts that line up.

Shared by the circuit kind and circuit discovery. Builds the engine's `AblationData`, checks the data
with one located line per problem, and gives the runner its per-row metric.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .._lazy import torch
from ..errors import DataError, SiteError
from .metrics import metric_values
from .prompts import data_error, encode_rows, single_token


@dataclass
class Task:
    """Tokenized prompts and targets, the reference prompts, and how the two line up.

    It is the engine's `AblationData` (subject/ablation.py) plus the targets a metric reads.
    """

    prompt_ids: list[list[int]]
    answers: torch.Tensor  # [n]
    wrongs: torch.Tensor | None  # [n] (logit_diff only)
    keys: list[tuple]  # batching / mean group of each prompt
    ref_ids: list[list[int]]
    ref_keys: list[tuple]
    ref_source: list[int] | None  # resample: reference row of each prompt
    paired: bool  # the reference file pairs line by line with the prompt file
    settings: dict[str, Any]

    def row_metric(self, metric: str) -> Any:
        """The runner's per-row metric: `metric` of each row's own answer (and wrong token)."""
        def values(logits: torch.Tensor, prompts: list[int]) -> torch.Tensor:
            idx = torch.as_tensor(prompts)
            wrongs = self.wrongs[idx] if self.wrongs is not None else None
            return metric_values(logits, metric, self.answers[idx], wrongs)
        return values


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

    def one_token(text: Any, field: str, line: int) -> int:
        try:
            return single_token(subject, text)
        except SiteError as e:
            raise data_error(prompt_path, line, field, e) from None

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
        ids.extend(encode_rows(subject, [row["prompt"]], prompt_path, [line]))
    per_position = ablation in ("mean", "resample")

    def group_value(row: dict, path: Path, line: int) -> tuple:
        if group_by is None:
            return ()
        if group_by not in row:
            raise DataError(f"{path}:{line}: missing field '{group_by}' (group_by needs it in both files)")
        return (row[group_by],)

    keys = [(len(x), *group_value(prompt_rows[i], prompt_path, i + 1)) if per_position else (len(x),)
            for i, x in zip(used, ids)]
    ref_ids = encode_rows(subject, [r["prompt"] for r in ref_rows], ref_path) if ref_rows else []
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


def heldout_rows(rows: str | None, n: int) -> str | None:
    """The complement of a leading or trailing slice, as a slice; None when it is not one."""
    if rows is None:
        return None
    used = parse_rows(rows, n)
    if used[0] == 0 and used[-1] < n - 1:
        return f"{used[-1] + 1}:"
    if used[-1] == n - 1 and used[0] > 0:
        return f":{used[0]}"
    return None


def read_prompt_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a JSONL file that `modelprobe discover` / `find` reads: each with a prompt, at least one."""
    from ..spec.load import parse_jsonl

    rows = parse_jsonl(path, ("prompt",))
    if not rows:
        raise DataError(f"{path}: holds no rows")
    return rows
