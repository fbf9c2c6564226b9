"""Named groups of weights, and the ways to touch them: in place (restored exactly), as per-row deltas
in a batch, and by their gradient attribution.

A group is a set of slices of linear maps of one layer: a sublayer (attention q/k/v/o, or the MLP's
input and output matrices), one attention head (its q rows, k/v rows when no other head shares them,
its o columns), a contiguous block of MLP neurons (their gate/up rows and down columns) or a whole
layer. Slices are stated on the linear map's axes (`out`, `in`), whatever the storage layout (GPT-2
stores [in, out]). Biases and norms are not in any group.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from ..errors import SiteError
from .hooks import add_hook, edit_restored, note_edit
from .sitemap import SiteMap

Scheme = Literal["block_sublayer", "attention_head", "mlp_neuron_block", "layer"]
SCHEMES: tuple[str, ...] = ("block_sublayer", "attention_head", "mlp_neuron_block", "layer")


@dataclass(frozen=True)
class Slice:
    """Rows (`out`) or columns (`in`) [start, stop) of one linear map's weight."""

    module: str  # module path, e.g. model.layers.3.mlp.down_proj
    axis: Literal["out", "in"]
    start: int
    stop: int

    @property
    def parameter(self) -> str:
        return f"{self.module}.weight"


@dataclass(frozen=True)
class WeightGroup:
    name: str  # e.g. L3.attn, L3.mlp, L3.attn.h5, L3.mlp[0:256], L3
    layer: int
    kind: Literal["attn", "mlp", "layer"]
    slices: tuple[Slice, ...]
    outputs: tuple[tuple[str, int, int], ...] = ()  # (attn.z | mlp.post, first unit, stop): what it writes through


def _module(model: nn.Module, path: str) -> nn.Module:
    mod = model
    for part in path.split("."):
        mod = mod[int(part)] if part.isdigit() else getattr(mod, part)
    return mod


def linear_view(sitemap: SiteMap, sl: Slice) -> torch.Tensor:
    """The slice as a view of the stored weight, in linear-map layout [out, in] order of axes."""
    w = _module(sitemap.model, sl.module).weight
    mat = w.t() if sitemap.family.conv1d else w  # GPT-2 Conv1D stores [in, out]
    return mat[sl.start:sl.stop] if sl.axis == "out" else mat[:, sl.start:sl.stop]


def _full(sitemap: SiteMap, path: str) -> Slice:
    w = _module(sitemap.model, path).weight
    n_out = w.shape[1] if sitemap.family.conv1d else w.shape[0]
    return Slice(path, "out", 0, n_out)


def weight_groups(sitemap: SiteMap, by: str, block: int = 256, layers: Sequence[int] | None = None) -> list[WeightGroup]:
    """The groups of a scheme, layer by layer (attention before MLP)."""
    if by not in SCHEMES:
        raise SiteError(f"unknown group scheme '{by}' (known: {', '.join(SCHEMES)})")
    f = sitemap.family
    out: list[WeightGroup] = []
    for layer in (range(sitemap.n_layers) if layers is None else layers):
        pre = f"{f.layers}.{layer}."
        attn_mods = [pre + m for m in (f.qkv or (f"{f.attn}.{_fused_qkv(sitemap, layer)}",))]
        attn = tuple(_full(sitemap, m) for m in attn_mods) + (_full(sitemap, pre + f.attn_out_proj),)
        mlp = tuple(_full(sitemap, pre + m) for m in f.mlp_in) + (_full(sitemap, pre + f.mlp_out_proj),)
        heads, neurons = ("attn.z", 0, sitemap.n_heads), ("mlp.post", 0, sitemap.d_mlp)
        if by == "block_sublayer":
            out += [WeightGroup(f"L{layer}.attn", layer, "attn", attn, (heads,)),
                    WeightGroup(f"L{layer}.mlp", layer, "mlp", mlp, (neurons,))]
        elif by == "layer":
            out.append(WeightGroup(f"L{layer}", layer, "layer", attn + mlp, (heads, neurons)))
        elif by == "attention_head":
            out += _head_groups(sitemap, layer, pre)
        else:
            for a in range(0, sitemap.d_mlp, block):
                b = min(a + block, sitemap.d_mlp)
                sl = tuple(Slice(pre + m, "out", a, b) for m in f.mlp_in) + (Slice(pre + f.mlp_out_proj, "in", a, b),)
                out.append(WeightGroup(f"L{layer}.mlp[{a}:{b}]", layer, "mlp", sl, (("mlp.post", a, b),)))
    return out


def _fused_qkv(sitemap: SiteMap, layer: int) -> str:
    """The fused q/k/v projection's name inside the attention module (GPT-2: c_attn, NeoX: query_key_value)."""
    attn = sitemap.module(layer, sitemap.family.attn)
    for name in ("c_attn", "query_key_value", "qkv_proj", "Wqkv"):
        if hasattr(attn, name):
            return name
    raise SiteError(f"model type '{sitemap.model_type}': no fused q/k/v projection found in the attention module")


def _head_groups(sitemap: SiteMap, layer: int, pre: str) -> list[WeightGroup]:
    """Per head: q rows and o columns; k/v rows too when each head has its own (no grouped-query
    attention); a fused q/k/v matrix is left out (its per-head layout differs by family)."""
    f, dh = sitemap.family, sitemap.d_head
    own_kv = sitemap.n_kv_heads == sitemap.n_heads
    out = []
    for h in range(sitemap.n_heads):
        a, b = h * dh, (h + 1) * dh
        sl: list[Slice] = []
        if f.qkv is not None:
            sl.append(Slice(pre + f.qkv[0], "out", a, b))
            if own_kv:
                sl += [Slice(pre + f.qkv[1], "out", a, b), Slice(pre + f.qkv[2], "out", a, b)]
        sl.append(Slice(pre + f.attn_out_proj, "in", a, b))
        out.append(WeightGroup(f"L{layer}.attn.h{h}", layer, "attn", tuple(sl), (("attn.z", h, h + 1),)))
    return out


def group_notes(sitemap: SiteMap, by: str) -> list[str]:
    """What the groups leave out on this model, for the report."""
    notes = ["weight matrices only: biases and norm weights belong to no group"]
    if by == "attention_head":
        if sitemap.family.qkv is None:
            notes.append("fused q/k/v matrix: a head's group holds only its output-projection columns")
        elif sitemap.n_kv_heads < sitemap.n_heads:
            notes.append("grouped-query attention: k/v rows are shared by several heads, so a head's group "
                         "holds its q rows and output-projection columns only")
    return notes


def group_size(sitemap: SiteMap, g: WeightGroup) -> int:
    return sum(linear_view(sitemap, s).numel() for s in g.slices)


def group_norm(sitemap: SiteMap, g: WeightGroup) -> float:
    with torch.no_grad():
        return float(sum(linear_view(sitemap, s).double().pow(2).sum() for s in g.slices) ** 0.5)


# ---- in place, restored exactly --------------------------------------------------------------------

Edit = Callable[[torch.Tensor, Slice], torch.Tensor]  # (current values, slice) -> new values


@contextlib.contextmanager
def perturbed(sitemap: SiteMap, slices: Sequence[Slice], edit: Edit) -> Iterator[None]:
    """Replace each slice by `edit(values, slice)` for the duration of the context.

    Every slice is copied before any is edited, and the copies are written back bit for bit in a
    `finally`, so the weights come back exactly on success, on an exception and on KeyboardInterrupt
    (also when the edit itself fails half-way).
    """
    saved: list[tuple[torch.Tensor, torch.Tensor, int]] = []
    try:
        with torch.no_grad():
            for sl in slices:
                view = linear_view(sitemap, sl)
                key = note_edit(_module(sitemap.model, sl.module).weight, f"perturbed() on {sl.axis} [{sl.start}:{sl.stop}]")
                saved.append((view, view.detach().clone(), key))
            for (view, original, _), sl in zip(saved, slices):
                view.copy_(edit(original.clone(), sl).to(view.dtype))
        yield
    finally:
        with torch.no_grad():
            for view, original, key in reversed(saved):  # newest first: overlapping slices unwind to the original
                view.copy_(original)
                edit_restored(key)


def zero(values: torch.Tensor, sl: Slice) -> torch.Tensor:
    return torch.zeros_like(values)


# ---- random perturbations ----------------------------------------------------------------------------

def noise(sitemap: SiteMap, g: WeightGroup, relative: float, seed: int) -> dict[Slice, torch.Tensor]:
    """Gaussian noise over the group, scaled so that its norm is `relative` x the group's weight norm;
    a function of (group name, seed) only, so batched and looped runs draw the same noise."""
    key = int.from_bytes(hashlib.sha256(f"{g.name}|{seed}".encode()).digest()[:8], "little") >> 1
    gen = torch.Generator().manual_seed(key)
    raw = {s: torch.randn(tuple(linear_view(sitemap, s).shape), generator=gen, dtype=torch.float64) for s in g.slices}
    total = float(sum(v.pow(2).sum() for v in raw.values()) ** 0.5)
    scale = relative * group_norm(sitemap, g) / max(total, 1e-30)
    return {s: (v * scale).float() for s, v in raw.items()}


@contextlib.contextmanager
def row_deltas(sitemap: SiteMap, per_row: Sequence[dict[Slice, torch.Tensor]]) -> Iterator[None]:
    """Each batch row i runs with its own weight deltas `per_row[i]` ({slice: delta in [out, in] layout}).

    A linear map is linear in its weight: (W + D) x = W x + D x, so a hook on the module's output adds
    D x for the rows that carry D (rows that share one delta tensor in one matmul). Equal to editing the
    weights up to float rounding; the weights themselves are never touched.
    """
    by_module: dict[str, dict[tuple, list[tuple[int, torch.Tensor]]]] = defaultdict(lambda: defaultdict(list))
    for row, deltas in enumerate(per_row):
        for sl, d in deltas.items():
            by_module[sl.module][(sl.axis, sl.start, sl.stop)].append((row, d))
    handles = []

    def hook(mod: nn.Module, args: tuple, output: torch.Tensor, path: str) -> torch.Tensor:
        x = args[0]
        out = output.clone()
        for (axis, a, b), items in by_module[path].items():
            shared: dict[int, tuple[torch.Tensor, list[int]]] = {}
            for r, t in items:  # rows that carry the same delta tensor share one matmul
                shared.setdefault(id(t), (t, []))[1].append(r)
            for t, rs in shared.values():
                rows = torch.tensor(rs, device=x.device)
                d = t.to(x.device, x.dtype)
                if axis == "out":
                    out[rows, :, a:b] += x[rows] @ d.T
                else:
                    out[rows] += x[rows, :, a:b] @ d.T
        return out

    try:
        for path in by_module:
            def fn(m: nn.Module, a: tuple, o: torch.Tensor, path: str = path) -> torch.Tensor:
                return hook(m, a, o, path)
            handles.append(add_hook(_module(sitemap.model, path), fn, "per-row weight deltas (row_deltas)"))
        yield
    finally:
        for h in handles:
            h.remove()


# ---- output ablation ------------------------------------------------------------------------------------

def output_zeroing(sitemap: SiteMap, row_groups: Sequence[WeightGroup | None]) -> list[Any]:
    """Interventions that zero each batch row's group output (its heads' z, its neurons' activations)
    at every position; None leaves a row clean. One ZeroAblate per (component, layer) with a per-row mask."""
    from .interventions import ZeroAblate
    from .sites import Site

    masks: dict[tuple[str, int], torch.Tensor] = {}
    for row, g in enumerate(row_groups):
        if g is None:
            continue
        for comp, a, b in g.outputs:
            width = sitemap.n_heads if comp == "attn.z" else sitemap.d_mlp
            m = masks.setdefault((comp, g.layer), torch.zeros(len(row_groups), width, dtype=torch.bool))
            m[row, a:b] = True
    return [ZeroAblate(Site(comp, layer), positions="all", unit_mask=m) for (comp, layer), m in masks.items()]


# ---- gradient attribution ------------------------------------------------------------------------------

def gradient_attribution(subject: Any, groups: Sequence[WeightGroup], ids: Sequence[Sequence[int]],
                         score: Callable[[torch.Tensor], torch.Tensor],
                         batch_size: int | None = None) -> tuple[list[float], list[float]]:
    """One backward pass of the mean `score(last-position logits)` over the prompts.

    Returns per group |Σ w·∂s/∂w| (the first-order change of the score when the group is zeroed) and
    Σ |w·∂s/∂w|. Only the groups' matrices get gradients; flags and .grad are put back afterwards.
    """
    sm, model = subject.sitemap, subject.model
    wanted = {sl.parameter for g in groups for sl in g.slices}
    named = dict(model.named_parameters())
    flags = {n: p.requires_grad for n, p in named.items()}
    grads = {n: p.grad for n, p in named.items()}
    try:
        for n, p in named.items():
            p.requires_grad_(n in wanted)
            p.grad = None
        with torch.enable_grad():
            for batch in subject.batches(ids, batch_size):
                out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                            position_ids=batch.position_ids, use_cache=False, logits_to_keep=1)
                (score(out.logits[:, -1].float()).sum() / len(ids)).backward()
        signed, absolute = [], []
        with torch.no_grad():
            for g in groups:
                s = a = 0.0
                for sl in g.slices:
                    w = linear_view(sm, sl)
                    grad = _module(model, sl.module).weight.grad
                    gv = (grad.t() if sm.family.conv1d else grad)
                    gv = gv[sl.start:sl.stop] if sl.axis == "out" else gv[:, sl.start:sl.stop]
                    prod = (w.double() * gv.double())
                    s += float(prod.sum())
                    a += float(prod.abs().sum())
                signed.append(abs(s))
                absolute.append(a)
        return signed, absolute
    finally:
        for n, p in named.items():
            p.grad = grads[n]
            p.requires_grad_(flags[n])


__all__ = ["SCHEMES", "Slice", "WeightGroup", "gradient_attribution", "group_norm", "group_notes", "group_size",
           "linear_view", "noise", "output_zeroing", "perturbed", "row_deltas", "weight_groups", "zero"]
