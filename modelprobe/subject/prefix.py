"""Prompts that start alike: which models can run after a cached prefix, and greedy generation that runs a
prefix all rows share (a chat template's system turn, say) once per batch instead of once per row.

Generation over a shared prefix (`plan`) keeps every row's numbers bit for bit those of one padded call.
The padded batch [b, W] (row i: pad_i pad columns, then its tokens, the P prefix tokens first) is cut after
column P: the prefix runs alone, one row per distinct set of interventions on it, right-padded to the
batch's width W (a prefix token then sees as many keys, masked or not, as in the padded call: with fewer,
the CPU attention kernel sums in another order, and about 5e-5 of the logits differ); row i's KV cache is
the padded call's columns 0..P-1, i.e. pad_i masked columns, then the prefix's first P - pad_i tokens; the
batch's columns P.. then run as one call with the batch's own mask and position ids, so every row sees
its tokens where the padded call put them (its last pad_i prefix tokens are computed there again).
Interventions on that call keep their positions: the run state it gets says "pad_i - P pad columns, a
prompt of W - P", which puts every position the padded call would touch on the same column.

On the prefix call an intervention must touch the same prefix tokens of every row (`_on_prefix`), and a
per-row one is cut to the prefix rows (rows whose values are equal bit for bit share one). Whenever that
cannot be told, or an intervention's edit may read the layout of the call (a type not known here,
per-position values of a padded batch), `plan` says no and the batch runs as one padded call, as before.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .batching import common_prefix
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
    """How one padded generation batch [b, W] runs as a prefix call and a call of the columns after it."""

    length: int  # P: prefix tokens
    source: torch.Tensor  # [b] long: the prefix row whose keys and values each batch row takes
    prefix_ids: torch.Tensor  # [k, W]: the prefix, then pad columns up to the batch's width
    prefix_mask: torch.Tensor  # [k, W]
    prefix_positions: torch.Tensor  # [k, W]
    prefix_edits: list[Any]  # the interventions on the prefix tokens, per-row tensors cut to the k prefix rows

    @property
    def saved(self) -> int:
        """Token positions per layer not computed: b rows' first P columns against k prefix rows of W."""
        return len(self.source) * self.length - self.prefix_ids.numel()

    def fill(self, cache: Any, prefix_cache: Any, pad: torch.Tensor) -> None:
        """Write into the empty `cache` each batch row's columns 0..P-1 of the padded call, taken from the
        prefix call's cache: pad_i columns (masked: any finite values do), then prefix tokens 0..P-1-pad_i."""
        dev = self.prefix_ids.device
        cols = (torch.arange(self.length, device=dev)[None, :] - pad.to(dev)[:, None]).clamp(min=0)  # [b, P]
        rows = self.source[:, None]
        for layer_idx, layer in enumerate(prefix_cache.layers):
            # [k, heads, W, d] -> [b, P, heads, d] -> [b, heads, P, d]
            keys = layer.keys[rows, :, cols].transpose(1, 2).contiguous()
            values = layer.values[rows, :, cols].transpose(1, 2).contiguous()
            cache.update(keys, values, layer_idx)


class _Unshareable(Exception):
    """An intervention whose effect a split run cannot reproduce exactly."""


# Interventions whose edit reads the run state only as the column mask does (MeanAblate per position: token
# index cols - pad, generated from prompt_len on), which both calls keep, so that they act alike however the
# batch is cut. Patch per position is left out: its values are laid out like the padded batch's columns.
# Subclasses may read more: not these.
_LAYOUT_FREE = (Add, AblateDirection, NormShift, ZeroAblate, SetUnit, MeanAblate, Patch)


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _tokens(index: Any, lengths: torch.Tensor) -> torch.Tensor | None:
    """Unpadded token index per row of a position index (negative: from each row's end), or None."""
    if _int(index) or isinstance(index, torch.Tensor) and index.dim() <= 1 and not index.is_floating_point():
        t = torch.as_tensor(index).cpu().expand(len(lengths))
        return torch.where(t >= 0, t, lengths + t)
    return None


def _on_prefix(positions: Any, plen: int, lengths: Sequence[int]) -> Any:
    """Positions for the prefix call (pad 0) that touch the prefix tokens `positions` touches in the padded
    call, the same in every row; None when it touches none. Raises _Unshareable otherwise."""
    n = torch.as_tensor(list(lengths))
    if isinstance(positions, str):
        if positions in ("all", "prompt"):
            return positions
        if positions in ("generated", "last"):  # every row has a token of its own after the prefix
            return None
    elif isinstance(positions, From):
        t = _tokens(positions.index, n)
        if t is not None:
            if bool((t >= plen).all()):
                return None
            t = t.clamp(min=0)  # a start before a row's first token: from its first token (and padding, unread)
            if bool((t == t[0]).all()):
                return From(int(t[0]))
    elif isinstance(positions, Span):  # counted from each row's first token, never from its end
        if _int(positions.start) and _int(positions.stop):
            a, b = max(positions.start, 0), min(positions.stop, plen)  # a negative start reaches padding only
            return Span(a, b) if a < b else None
        start = torch.as_tensor(positions.start)
        if not start.is_floating_point() and bool((start >= plen).all()):
            return None
    else:
        t = _tokens(positions, n)
        if t is not None:
            if bool(((t >= plen) | (t < 0)).all()):  # after the prefix, or before a row's first token
                return None
            if _int(positions) and positions >= 0:
                return positions
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


def _prefix_edits(edits: Sequence[Any], plen: int, lengths: Sequence[int]) -> tuple[list[Any], torch.Tensor]:
    """The interventions of the prefix call, for one row of each group of batch rows whose interventions on
    the prefix are equal bit for bit, and each batch row's group; see the module's note."""
    rows = len(lengths)
    touching: list[tuple[Any, Any, list[str]]] = []
    keys = [torch.zeros(rows, 1, dtype=torch.uint8)]
    for iv in edits:
        if isinstance(iv, WeightDelta):  # a weight edit acts on every token alike
            touching.append((iv, None, []))
            continue
        if type(iv) not in _LAYOUT_FREE or (type(iv) is Patch and iv.per_position):
            raise _Unshareable(iv)
        positions = _on_prefix(iv.positions, plen, lengths)
        if positions is not None:
            fields = _per_row_fields(iv, rows)
            keys += [_row_bytes(getattr(iv, name)) for name in fields]
            touching.append((iv, positions, fields))
    _, source = torch.unique(torch.cat(keys, dim=1), dim=0, return_inverse=True)
    first = [int((source == g).nonzero()[0]) for g in range(int(source.max()) + 1)]  # a batch row per group
    out = []
    for iv, positions, fields in touching:
        if positions is None:
            out.append(iv)
            continue
        cut = {name: getattr(iv, name)[torch.tensor(first, device=getattr(iv, name).device)] for name in fields}
        out.append(dataclasses.replace(iv, positions=positions, **cut))
    return out, source


def plan(subject: Subject, batch: Batch, edits: Sequence[Any], min_shared: int = MIN_SHARED) -> SharedPrefix | None:
    """The shared-prefix run of a padded generation batch under `edits` (the batch rows' interventions), or
    None when it would not pay (a prefix under `min_shared` tokens, no fewer token positions to compute) or
    cannot give the numbers of one padded call (see the module's note)."""
    b, width = batch.input_ids.shape
    if b < 2 or not can_share_prefix(subject):
        return None
    pad = [int(p) for p in batch.pad]
    plen = common_prefix([batch.input_ids[i, pad[i]:].tolist() for i in range(b)])
    if plen < min_shared:
        return None
    try:
        prefix_edits, source = _prefix_edits(edits, plen, batch.lengths)
    except _Unshareable:
        return None
    k = int(source.max()) + 1
    if k * width >= b * plen:
        return None
    dev = batch.input_ids.device
    ids = torch.full((k, width), subject.pad_id, dtype=torch.long, device=dev)
    ids[:, :plen] = batch.input_ids[0, pad[0]:pad[0] + plen]
    mask = torch.zeros((k, width), dtype=batch.attention_mask.dtype, device=dev)
    mask[:, :plen] = 1
    positions = torch.arange(width, device=dev).expand(k, width)  # the pad columns' positions are never read
    return SharedPrefix(plen, source.to(dev), ids, mask, positions, prefix_edits)
