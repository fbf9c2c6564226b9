"""The intervention vocabulary and the one context manager that applies it.

Every intervention names a site and the positions it touches. All hooks go on through `hooked()`,
which removes exactly the hooks it added (never the user's own) whatever happens inside. Its hooks and
weight edits, like every other hook of the package, go through `hooks.py`, so `leaked_hooks` sees them.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from ..errors import SiteError
from ..names import HEADED, PER_NEURON
from .hooks import add_hook, edit_restored, note_edit
from .hooks import leaked_hooks as leaked_hooks  # its old home: callers and tests import it from here
from .sitemap import HookPoint, SiteMap
from .sites import Site


@dataclass(frozen=True)
class From:
    """A token index (unpadded; negative counts from the end of the prompt; or a [rows] tensor of them)
    and every token after it, generated tokens included: e.g. an injection that starts mid-prompt."""

    index: Any


@dataclass(frozen=True)
class Span:
    """Prompt tokens start..stop-1 (unpadded; ints or [rows] tensors) and no generated token: an injection
    over one sentence of the prompt that the reply is then written without."""

    start: Any
    stop: Any


Positions = Literal["all", "prompt", "generated", "last"] | int | From | Span


@dataclass
class RunState:
    """What the hooks need to know about the forward call in flight."""

    phase: Literal["prompt", "generated"] = "prompt"
    pad: torch.Tensor | None = None  # [batch] left-padding per row
    prompt_len: int = 0  # padded prompt length

    def columns_mask(self, positions: Positions, batch: int, seq: int, device) -> torch.Tensor:
        """Which columns of this call an intervention touches, as a [batch, seq] bool mask."""
        mask = torch.zeros(batch, seq, dtype=torch.bool, device=device)
        cols = torch.arange(seq, device=device)
        if self.phase == "generated":
            if isinstance(positions, From) or (isinstance(positions, str) and positions in ("all", "generated")):
                mask[:] = True
            return mask
        pad = self.pad.to(device) if self.pad is not None else torch.zeros(batch, dtype=torch.long, device=device)
        # Without a KV cache, generated tokens sit after the prompt in the same call.
        plen = self.prompt_len or seq
        generated = cols[None, :] >= plen
        if positions == "generated":
            return generated.expand(batch, seq).clone()
        if positions == "all":
            return cols[None, :] >= pad[:, None]
        if positions == "prompt":
            return (cols[None, :] >= pad[:, None]) & ~generated
        if positions == "last":
            mask[:, plen - 1] = True
            return mask
        if isinstance(positions, From):
            p = torch.as_tensor(positions.index, device=device).expand(batch)
            start = torch.where(p >= 0, pad + p, plen + p)
            return cols[None, :] >= start[:, None]
        if isinstance(positions, Span):
            a = pad + torch.as_tensor(positions.start, device=device).expand(batch)
            b = pad + torch.as_tensor(positions.stop, device=device).expand(batch)
            return (cols[None, :] >= a[:, None]) & (cols[None, :] < b[:, None])
        if isinstance(positions, int):
            target = pad + positions if positions >= 0 else torch.full_like(pad, plen + positions)
            return cols[None, :] == target[:, None]
        if isinstance(positions, torch.Tensor):  # per-row token index (unpadded; negative from the end)
            p = positions.to(device)
            target = torch.where(p >= 0, pad + p, plen + p)
            return cols[None, :] == target[:, None]
        raise ValueError(f"unknown positions {positions!r}")


@dataclass
class Intervention(ABC):
    """Base: an edit of the activation at `site` on the columns picked by `positions`."""

    site: Site
    positions: Any = "all"

    @abstractmethod
    def edit(self, x: torch.Tensor, mask: torch.Tensor, state: RunState) -> torch.Tensor:
        """Return x with the masked columns edited."""


def _where(mask: torch.Tensor, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    m = mask.reshape(*mask.shape, *([1] * (old.dim() - mask.dim())))
    return torch.where(m, new, old)


def _every_column(positions: Any, state: RunState) -> bool:
    """Whether `positions` covers every column of this call without building a mask: a generated step with
    the KV cache, for positions that reach generated tokens (the hot loop of steered generation)."""
    return state.phase == "generated" and (isinstance(positions, From) or
                                           (isinstance(positions, str) and positions in ("all", "generated")))


@dataclass
class Add(Intervention):
    vector: torch.Tensor = None  # [d] or [rows, d]
    scale: float = 1.0

    def edit(self, x, mask, state):
        v = self.vector.to(x.dtype).to(x.device)
        if v.dim() == 2:
            v = v[:, None, :]
        new = x + self.scale * v
        return new if mask is None else _where(mask, new, x)


@dataclass
class NormShift(Intervention):
    """Turn x toward a direction v, keeping its norm (in-context vectors, Liu et al.):
    x <- |x| normalize(x/|x| + strength (1 + max(0, cos(x, -v))) v/|v|). A [rows, d] v gives each row its own."""

    vector: torch.Tensor = None
    strength: float = 0.1

    def edit(self, x, mask, state):
        v = self.vector.to(x.device).float()
        if v.dim() == 2:
            v = v[:, None, :]
        v = v / v.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        xf = x.float()
        norm = xf.norm(dim=-1, keepdim=True)
        unit = xf / norm.clamp_min(1e-12)
        lam = self.strength * (1 + (-(unit * v).sum(-1, keepdim=True)).clamp_min(0))
        turned = unit + lam * v
        new = turned / turned.norm(dim=-1, keepdim=True).clamp_min(1e-12) * norm
        return _where(mask, new.to(x.dtype), x)


@dataclass
class AblateDirection(Intervention):
    """Project a unit direction out: x <- x - (x.u) u. A [rows, d] direction gives each row its own."""

    direction: torch.Tensor = None

    def _unit(self, x: torch.Tensor) -> torch.Tensor:
        # Normalised once per direction, dtype and device, not at every hook call of every generated token.
        key = (id(self.direction), x.dtype, x.device)
        cached = self.__dict__.get("_unit_cache")
        if cached is None or cached[0] != key:
            u = self.direction.to(x.dtype).to(x.device)
            if u.dim() == 2:
                u = u[:, None, :]
            norm = u.norm(dim=-1, keepdim=True)
            # A zero direction projects out nothing (x stays bit for bit): rows of a batch without an ablation.
            cached = (key, torch.where(norm > 0, u / norm, torch.zeros_like(u)))
            self.__dict__["_unit_cache"] = cached
        return cached[1]

    def edit(self, x, mask, state):
        u = self._unit(x)
        new = x - (x * u).sum(-1, keepdim=True) * u
        return new if mask is None else _where(mask, new, x)


def _unit_mask(units: tuple[int, ...] | None, unit_mask: torch.Tensor | None, n_units: int,
               state: RunState, device) -> torch.Tensor:
    """[rows or 1, n_units] bool: which heads/neurons to replace (all when the site names none)."""
    if unit_mask is not None:
        return unit_mask.to(device)
    m = torch.zeros(1, n_units, dtype=torch.bool, device=device)
    if units is None:
        m[:] = True
    else:
        m[0, list(units)] = True
    return m


def _replace_units(x: torch.Tensor, mask: torch.Tensor, value: torch.Tensor, site: Site,
                   unit_mask: torch.Tensor | None, state: RunState) -> torch.Tensor:
    """Replace the chosen heads/neurons (or the whole vector) of x by value on masked columns."""
    if site.component in HEADED or site.component in PER_NEURON:
        units = site.heads if site.component in HEADED else site.neurons
        um = _unit_mask(units, unit_mask, x.shape[2], state, x.device)  # [rows|1, units]
        full = mask[:, :, None] & um[:, None, :]  # [b, s, units]
        return _where(full, value.expand_as(x) if value.dim() < x.dim() else value, x)
    return _where(mask, value.expand_as(x) if value.dim() < x.dim() else value, x)


@dataclass
class ZeroAblate(Intervention):
    unit_mask: torch.Tensor | None = None  # [rows, n_units] per-row choice of heads/neurons

    def edit(self, x, mask, state):
        return _replace_units(x, mask, torch.zeros((), dtype=x.dtype, device=x.device), self.site,
                              self.unit_mask, state)


@dataclass
class MeanAblate(Intervention):
    """Replace by reference means: per position ([T, ...], indexed by unpadded token index) or one mean."""

    means: torch.Tensor = None
    per_position: bool = True
    unit_mask: torch.Tensor | None = None

    def edit(self, x, mask, state):
        m = self.means.to(x.dtype).to(x.device)
        if not self.per_position:
            value = m.expand(x.shape[0], x.shape[1], *m.shape)
        else:
            pad = (state.pad.to(x.device) if state.pad is not None
                   else torch.zeros(x.shape[0], dtype=torch.long, device=x.device))
            cols = torch.arange(x.shape[1], device=x.device)[None, :]
            idx = cols - pad[:, None]
            # Generated tokens take the last mean, with the KV cache (phase "generated") and without it
            # (they then sit after the prompt in the same call), so both modes generate alike.
            if state.phase == "generated":
                idx = torch.full_like(idx, m.shape[0] - 1)
            elif state.prompt_len:
                idx = torch.where(cols >= state.prompt_len, m.shape[0] - 1, idx)
            idx = idx.clamp(0, m.shape[0] - 1)
            value = m[idx]  # [b, s, ...]
        return _replace_units(x, mask, value, self.site, self.unit_mask, state)


@dataclass
class Patch(Intervention):
    """Write values taken from another run.

    `values` is [rows, ...] (one vector per prompt, written on every chosen column) or, with
    `per_position`, [rows, seq, ...] token by token (the batch must be laid out like the run the values
    came from). `unit_mask` [rows, units] limits the write to some heads / neurons per row. Resample
    ablation is a per-position Patch of another prompt's activations.
    """

    values: torch.Tensor = None
    per_position: bool = False
    unit_mask: torch.Tensor | None = None

    def edit(self, x, mask, state):
        v = self.values.to(x.dtype).to(x.device)
        value = v if self.per_position else v[:, None].expand_as(x)
        return _replace_units(x, mask, value, self.site, self.unit_mask, state)


@dataclass
class SetUnit(Intervention):
    """Set one unit's activation to `target` by writing along the unit's output vector.

    A unit reads a = f(x . read + bias) from the site (f: identity; ReLU; or JumpReLU with `threshold`)
    and writes along `write`: x <- x + (target - a) * write. A neuron or a residual dimension j is
    read = write = e_j (its coordinate set to target); a direction u is read = write = u (its projection
    set to target); an SAE latent i is read = W_enc[:, i], write = W_dec[i], so target 0 removes the
    latent's decoded contribution a_i W_dec[i]. `read`, `write` are [d] or [rows, d]; `bias`, `target`
    and `threshold` scalars or [rows]: one unit per batch row rides in one forward.
    """

    read: torch.Tensor = None
    write: torch.Tensor = None
    bias: Any = 0.0
    target: Any = 0.0
    activation: Literal["identity", "relu", "jumprelu"] = "identity"
    threshold: Any = None

    def edit(self, x, mask, state):
        def rows(v: Any) -> torch.Tensor:
            t = torch.as_tensor(v, dtype=x.dtype, device=x.device)
            return t[:, None] if t.dim() == 1 else t  # [rows] -> [rows, 1] broadcasts over positions

        r = self.read.to(x.dtype).to(x.device)
        w = self.write.to(x.dtype).to(x.device)
        if r.dim() == 2:
            r, w = r[:, None, :], w[:, None, :]
        a = (x * r).sum(-1) + rows(self.bias)  # [b, s]
        if self.activation == "relu":
            a = a.clamp(min=0)
        elif self.activation == "jumprelu":
            a = torch.where(a > rows(self.threshold), a, torch.zeros_like(a))
        return _where(mask, x + (rows(self.target) - a)[..., None] * w, x)


@dataclass
class WeightDelta:
    """Add `delta` to a parameter for the duration of the context; restored exactly afterwards."""

    parameter: str
    delta: torch.Tensor
    site: Site | None = field(default=None)


def per_row(iv: Intervention | WeightDelta) -> bool:
    """Whether an intervention holds per-row tensors (one value per batch row), so that dropping rows from a
    batch would misalign it. Conservative: an intervention type not known here counts as per-row."""
    if isinstance(iv, WeightDelta):
        return False
    pos = iv.positions
    if isinstance(pos, torch.Tensor) or (isinstance(pos, From) and not isinstance(pos.index, int)) or \
            (isinstance(pos, Span) and not (isinstance(pos.start, int) and isinstance(pos.stop, int))):
        return True
    if type(iv) is Add:
        return iv.vector.dim() == 2
    if type(iv) is AblateDirection:
        return iv.direction.dim() == 2
    if type(iv) in (ZeroAblate, MeanAblate):
        return iv.unit_mask is not None and iv.unit_mask.shape[0] > 1
    return True


# ---- hooks ------------------------------------------------------------------------------

def _view(x: torch.Tensor, site: Site, sitemap: SiteMap) -> torch.Tensor:
    if site.component in HEADED:
        return x.view(*x.shape[:-1], sitemap.heads_of(site.component), sitemap.d_head)
    return x


def _what(actions) -> str:
    """The tag of one hook of `hooked()`: the interventions and captures it carries."""
    names = sorted({type(obj).__name__ if what == "edit" else "capture" for what, obj in actions})
    return f"hooked(): {', '.join(names)}"


@contextlib.contextmanager
def hooked(model: nn.Module, sitemap: SiteMap, state: RunState,
           interventions: Sequence[Intervention | WeightDelta] = (),
           capture: Sequence[Site] = ()) -> Iterator[dict[Site, list[torch.Tensor]]]:
    """Attach interventions and captures; yield {site: [tensor per forward call]}; always clean up."""
    captured: dict[Site, list[torch.Tensor]] = {s: [] for s in capture}
    by_point: dict[int, tuple[HookPoint, list[tuple[str, Any]]]] = {}
    for iv in interventions:
        if isinstance(iv, WeightDelta):
            continue
        hp = iv.site.hook_point(sitemap)
        by_point.setdefault(id(hp.module) * 2 + (hp.io == "input"), (hp, []))[1].append(("edit", iv))
    for site in capture:
        hp = site.hook_point(sitemap)
        by_point.setdefault(id(hp.module) * 2 + (hp.io == "input"), (hp, []))[1].append(("capture", site))

    def process(x: torch.Tensor, actions) -> torch.Tensor:
        for what, obj in actions:
            site = obj.site if what == "edit" else obj
            v = _view(x, site, sitemap)
            if what == "edit":
                # Add and AblateDirection themselves (not subclasses) take mask=None for "every column".
                fast = type(obj) in (Add, AblateDirection) and _every_column(obj.positions, state)
                mask = None if fast else state.columns_mask(obj.positions, v.shape[0], v.shape[1], v.device)
                v = obj.edit(v, mask, state)
                x = v.reshape(x.shape)
            else:
                captured[obj].append(v.detach().clone())
        return x

    handles = []
    weights: list[tuple[torch.Tensor, torch.Tensor, int]] = []
    try:
        for hp, actions in by_point.values():
            if hp.io == "input":
                def pre(mod, args, kwargs, actions=actions):
                    if args:
                        return (process(args[0], actions), *args[1:]), kwargs
                    kwargs = dict(kwargs)
                    kwargs["hidden_states"] = process(kwargs["hidden_states"], actions)
                    return args, kwargs
                handles.append(add_hook(hp.module, pre, _what(actions), pre=True, with_kwargs=True))
            else:
                def post(mod, args, output, actions=actions):
                    if isinstance(output, tuple):
                        return (process(output[0], actions), *output[1:])
                    return process(output, actions)
                handles.append(add_hook(hp.module, post, _what(actions)))
        # remove_duplicate=False: a tied weight answers to both of its names (lm_head.weight too).
        params = dict(model.named_parameters(remove_duplicate=False))
        for iv in interventions:
            if isinstance(iv, WeightDelta):
                p = params.get(iv.parameter)
                if p is None:
                    raise SiteError(f"model type '{sitemap.model_type}' has no parameter '{iv.parameter}'")
                if p.device.type == "meta":  # offloaded by accelerate: an edit here would silently do nothing
                    raise SiteError(f"parameter '{iv.parameter}' is offloaded (device_map with max_memory), so a "
                                    "weight edit cannot reach it; load the whole model on one device")
                weights.append((p, p.detach().clone(), note_edit(p, "hooked(): WeightDelta")))
                with torch.no_grad():
                    p.add_(iv.delta.to(p.dtype).to(p.device))
        yield captured
    finally:
        for h in handles:
            h.remove()
        with torch.no_grad():
            # Newest first: two deltas on one (or one tied) tensor must unwind to the first original.
            for p, original, key in reversed(weights):
                p.copy_(original)
                edit_restored(key)
