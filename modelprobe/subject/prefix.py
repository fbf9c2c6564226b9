"""Prompts that start alike: which models can run after a cached prefix, and greedy generation that runs a
shared prefix (a chat template's system turn, say) once per batch instead of once per row.

Generation over a shared prefix (`plan`) runs the prefix as its own call, one row per distinct set of
interventions on it, copies its KV cache to every row of the batch, then runs the rows' own tokens after it
(left padding now sits between the prefix and each row's tokens, masked; positions go on from the prefix).
An intervention's positions are rewritten for the two calls so that each touches exactly the tokens it
touched in one padded call (`_split`); whenever that, or the intervention itself, cannot be carried over
exactly (per-position values laid out like the padded batch, per-row positions, a type not known here),
`plan` says no and the batch runs as one padded call, as before.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .interventions import (
    AblateDirection,
    Add,
    From,
    Intervention,
    MeanAblate,
    NormShift,
    Patch,
    SetUnit,
    Span,
    WeightDelta,
    ZeroAblate,
)

if TYPE_CHECKING:
    from .subject import Batch, Subject

# Model types whose decoder stack is: rotary embeddings shared by all layers, a causal (or sliding
# window) mask per layer type, layer(hidden, attention_mask, position_ids, position_embeddings),
# then norm and lm_head with nothing after it. Gemma is left out on purpose: it soft-caps logits.
RESUMABLE = frozenset({"llama", "mistral", "qwen2", "qwen3"})

# A shorter shared prefix is not worth a call of its own (the BOS every prompt starts with, say).
MIN_SHARED = 4


def can_resume(subject: Subject) -> bool:
    """Whether `resume` runs only the layers from `start` for this model (else it runs a full forward)."""
    base = getattr(subject.model, "model", None)
    return (subject.sitemap.model_type in RESUMABLE and subject.sitemap.family.name == "llama"
            and base is not None and hasattr(base, "rotary_emb") and hasattr(base, "layers"))


def can_share_prefix(subject: Subject) -> bool:
    """Whether a run can start after the first token (plain causal attention in every layer)."""
    return (can_resume(subject) and getattr(subject.model.config, "_attn_implementation", None) in ("sdpa", "eager")
            and all(layer_type(subject, layer) == "full_attention" for layer in range(subject.n_layers)))


def layer_type(subject: Subject, layer: int) -> str:
    config = subject.model.config
    types = getattr(config, "layer_types", None)
    if types:
        return types[layer]
    if config.model_type == "mistral" and getattr(config, "sliding_window", None) is not None:
        return "sliding_attention"
    return "full_attention"


# ---- generation over a shared prefix -------------------------------------------------------------

@dataclass
class SharedPrefix:
    """How one padded generation batch runs as a shared prefix call and a call of the rows' own tokens."""

    length: int  # P: prefix tokens
    source: torch.Tensor  # [b] long: the prefix row whose cache each batch row takes
    prefix_ids: torch.Tensor  # [k, P]
    prefix_edits: list[Any]  # the interventions on the prefix, per-row tensors cut to the k prefix rows
    edits: list[Any]  # the interventions for the rows' own tokens (positions counted from the prefix's end)
    ids: torch.Tensor  # [b, W - P] the rows' own tokens, left-padded as in the batch
    mask: torch.Tensor  # [b, W] attention mask over prefix + own tokens (the padding in between masked)
    positions: torch.Tensor  # [b, W - P] position ids, going on from the prefix

    @property
    def saved(self) -> int:
        """Token positions per layer not computed: b rows' prefixes against k prefix rows."""
        return (len(self.source) - len(self.prefix_ids)) * self.length


class _Unshareable(Exception):
    """An intervention whose effect a split run cannot reproduce exactly."""


# Interventions whose edit reads nothing of the call's layout (RunState: padding, prompt length, phase), so
# that they act alike on a column wherever it sits. MeanAblate and Patch qualify without per_position only
# (per position, they index the padded batch's columns). Subclasses may read it: not these.
_LAYOUT_FREE = (Add, AblateDirection, NormShift, ZeroAblate, SetUnit, MeanAblate, Patch)


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _split(positions: Any, plen: int, lengths: Sequence[int]) -> tuple[Any, Any]:
    """`positions` of a padded prompt call as (positions on the prefix call, positions on the call of the rows'
    own tokens), None where it touches none of them: the same tokens of every row, counted in unpadded
    token indices t (prefix t < plen; own tokens t - plen). Generated steps read positions as before (From,
    "all", "generated" touch every new token; the rest none), which every rewrite below keeps."""
    shortest = min(lengths)
    if isinstance(positions, str):
        if positions in ("all", "prompt"):
            return positions, positions
        if positions in ("generated", "last"):  # no prefix token: every row has a token of its own after it
            return None, positions
    elif _int(positions):
        if positions >= 0:
            return (positions, None) if positions < plen else (None, positions - plen)
        if shortest + positions >= plen:  # counted from each row's end: its own tokens in every row
            return None, positions
    elif isinstance(positions, From) and _int(positions.index):
        k = positions.index
        if k >= 0:
            return (From(k) if k < plen else None), From(max(k - plen, 0))
        if shortest + k >= plen:
            return None, positions
        if max(lengths) + k <= 0:  # every token of every row (and some padding, which no token reads)
            return From(0), From(0)
    elif isinstance(positions, Span) and _int(positions.start) and _int(positions.stop):
        a, b = max(positions.start, 0), positions.stop  # a negative start reaches only padding
        head = Span(a, min(b, plen)) if a < min(b, plen) else None
        tail = Span(max(a - plen, 0), b - plen) if b - plen > max(a - plen, 0) else None
        return head, tail
    raise _Unshareable(positions)


def _per_row_fields(iv: Intervention, rows: int) -> list[str]:
    """The fields of `iv` that hold one value per batch row, to be cut to the prefix rows (a field of one row
    broadcasts to all, like a [d] vector)."""
    t = type(iv)
    if t in (Add, NormShift):
        candidates = [("vector", iv.vector.dim() == 2)]
    elif t is AblateDirection:
        candidates = [("direction", iv.direction.dim() == 2)]
    elif t in (ZeroAblate, MeanAblate):
        candidates = [("unit_mask", iv.unit_mask is not None)]
    elif t is Patch:
        candidates = [("values", True), ("unit_mask", iv.unit_mask is not None)]
    else:  # SetUnit (scalars or [rows] tensors): left to the padded call when it reaches the prefix
        raise _Unshareable(iv)
    out = []
    for name, by_row in candidates:
        value = getattr(iv, name)
        if by_row and value.shape[0] != 1:
            if value.shape[0] != rows:
                raise _Unshareable(iv)
            out.append(name)
    return out


def _row_bytes(t: torch.Tensor) -> torch.Tensor:
    """[rows, n] uint8: each row's values bit for bit (so -0.0 and 0.0, or two NaNs, never count as equal)."""
    flat = t.detach().reshape(len(t), -1)
    if flat.dtype == torch.bool:
        return flat.to(torch.uint8).cpu()
    return flat.contiguous().view(torch.uint8).cpu()


def _edits(edits: Sequence[Any], plen: int, lengths: Sequence[int]) -> tuple[list[Any], list[Any], torch.Tensor]:
    """(interventions on the prefix, their rows' identity, interventions on the own tokens); see `plan`."""
    rows = len(lengths)
    head: list[tuple[Any, Any, list[str]]] = []
    tail: list[Any] = []
    keys = [torch.zeros(rows, 1, dtype=torch.uint8)]
    for iv in edits:
        if isinstance(iv, WeightDelta):  # a weight edit acts on every token alike
            head.append((iv, None, []))
            tail.append(iv)
            continue
        if type(iv) not in _LAYOUT_FREE or (type(iv) in (MeanAblate, Patch) and iv.per_position):
            raise _Unshareable(iv)
        first, rest = _split(iv.positions, plen, lengths)
        if first is not None:
            fields = _per_row_fields(iv, rows)
            keys += [_row_bytes(getattr(iv, name)) for name in fields]
            head.append((iv, first, fields))
        if rest is not None:
            tail.append(iv if rest == iv.positions else dataclasses.replace(iv, positions=rest))
    _, source = torch.unique(torch.cat(keys, dim=1), dim=0, return_inverse=True)
    return head, tail, source


def plan(subject: Subject, batch: Batch, edits: Sequence[Any], min_shared: int = MIN_SHARED) -> SharedPrefix | None:
    """The shared-prefix run of a padded generation batch under `edits` (the batch rows' interventions), or
    None when it would not pay (a prefix under `min_shared` tokens, as many prefix rows as rows) or cannot
    give the tokens of one padded call (see the module's note)."""
    from .batching import common_prefix

    b = len(batch.rows)
    if b < 2 or not can_share_prefix(subject):
        return None
    pad = [int(p) for p in batch.pad]
    ids = [batch.input_ids[i, pad[i]:].tolist() for i in range(b)]
    plen = common_prefix(ids)
    if plen < min_shared:
        return None
    try:
        head, tail, source = _edits(edits, plen, batch.lengths)
    except _Unshareable:
        return None
    k = int(source.max()) + 1
    if k >= b:
        return None
    dev = batch.input_ids.device
    first = torch.tensor([int((source == g).nonzero()[0]) for g in range(k)])  # one batch row per prefix row
    prefix_edits = [iv if first_pos is None else dataclasses.replace(
        iv, positions=first_pos, **{name: getattr(iv, name)[first.to(getattr(iv, name).device)] for name in fields})
        for iv, first_pos, fields in head]
    width = batch.input_ids.shape[1] - plen
    cols = torch.arange(width, device=dev)[None, :]
    padded = cols < batch.pad.to(dev)[:, None]
    # Row i's own tokens sit at columns pad_i + plen.. of the batch; here, after its pad_i pad columns.
    own = torch.where(padded, torch.full_like(cols, subject.pad_id), batch.input_ids[:, plen:])
    positions = torch.where(padded, torch.zeros_like(cols), batch.position_ids[:, plen:])
    mask = torch.cat([torch.ones(b, plen, dtype=batch.attention_mask.dtype, device=dev),
                      (~padded).to(batch.attention_mask.dtype)], dim=1)
    prefix_ids = torch.tensor([ids[0][:plen]] * k, device=dev)
    return SharedPrefix(plen, source.to(dev), prefix_ids, prefix_edits, tail, own, mask, positions)
