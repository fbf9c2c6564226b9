"""Sites resolved against one model: layers as ints, heads/neurons checked, canonical names."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import SiteError
from ..names import COMPONENTS, HEADED, PER_LAYER, PER_NEURON, canonical_name

if TYPE_CHECKING:  # sites stay importable without torch: kinds name sites in code that runs later
    from .sitemap import HookPoint, SiteMap


@dataclass(frozen=True)
class Site:
    component: str
    layer: int | None = None
    heads: tuple[int, ...] | None = None
    neurons: tuple[int, ...] | None = None
    module: str | None = None  # escape hatch: a raw module path
    io: str = "output"

    @property
    def name(self) -> str:
        if self.module is not None:
            return f"{self.module}:{self.io}"
        base = canonical_name(self.component, self.layer)
        if self.heads is not None:
            base += f"[heads={','.join(map(str, self.heads))}]"
        if self.neurons is not None:
            base += f"[neurons={','.join(map(str, self.neurons))}]"
        return base

    def hook_point(self, sitemap: SiteMap) -> HookPoint:
        if self.module is not None:
            return sitemap.raw_hook_point(self.module, self.io)  # type: ignore[arg-type]
        return sitemap.hook_point(self.component, self.layer)


def resolve_layer(spec: Any, n_layers: int, loc: tuple = ("layer",)) -> list[int]:
    """int (negative counts from the end), float in [0, 1] (fraction of depth), list, 'a:b' range (ints or
    fractions of depth: '0.25:0.75'), 'all'."""
    if spec == "all":
        return list(range(n_layers))
    if isinstance(spec, list | tuple):
        out: list[int] = []
        for i, s in enumerate(spec):
            out.extend(resolve_layer(s, n_layers, (*loc, i)))
        return out
    if isinstance(spec, str) and ":" in spec:
        a, _, b = spec.partition(":")
        start = _range_bound(a, 0, spec, n_layers, loc)
        stop = _range_bound(b, n_layers, spec, n_layers, loc)
        if start >= stop:
            raise SiteError(f"layer range '{spec}' is empty ({n_layers} layers)", loc)
        return [resolve_layer(i, n_layers, loc)[0] for i in range(start, stop)]
    if isinstance(spec, bool):
        raise SiteError(f"layer must be an int, a fraction, a list or a range, not {spec!r}", loc)
    if isinstance(spec, float):
        if not 0.0 <= spec <= 1.0:
            raise SiteError(f"layer fraction {spec} must lie in [0, 1]", loc)
        return [min(n_layers - 1, math.floor(spec * n_layers))]
    if isinstance(spec, int):
        layer = spec + n_layers if spec < 0 else spec
        if not 0 <= layer < n_layers:
            raise SiteError(f"layer {spec} is beyond the model's depth ({n_layers} layers: 0..{n_layers - 1})", loc)
        return [layer]
    raise SiteError(f"layer must be an int, a fraction, a list or a range, not {spec!r}", loc)


def _range_bound(text: str, default: int, spec: str, n_layers: int, loc: tuple) -> int:
    """One bound of 'start:stop': empty (default), an int (negative from the end, as in Python slices:
    '-2:' = the last two layers) or a fraction of depth ('0.25:0.75' = floor(0.25 L) .. floor(0.75 L) - 1)."""
    text = text.strip()
    if not text:
        return default
    try:
        if "." in text or "e" in text.lower():
            f = float(text)
            if not 0.0 <= f <= 1.0:  # also rejects nan
                raise SiteError(f"layer range '{spec}': {text} is a fraction of depth and must lie in [0, 1]", loc)
            return math.floor(f * n_layers)
        x = int(text)
    except ValueError:
        raise SiteError(f"layer range '{spec}' is not 'start:stop' (ints, or fractions of depth such as "
                        "'0.25:0.75')", loc) from None
    return x + n_layers if x < 0 else x


def _indices(value: Any, limit: int, what: str, loc: tuple) -> tuple[int, ...] | None:
    if value is None:
        return None
    values = [value] if isinstance(value, int) else list(value)
    for i, v in enumerate(values):
        # bool is an int to Python, but YAML `true` is no index.
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < limit:
            raise SiteError(f"{what} index {v} is out of range (the model has {limit})",
                            loc if len(values) == 1 else (*loc, i))
    return tuple(values)


def resolve_sites(spec: dict[str, Any], sitemap: SiteMap, loc: tuple = ()) -> list[Site]:
    """Turn one site mapping from a probe file into one Site per layer."""
    if spec.get("module"):
        site = Site(component="module", module=spec["module"], io=spec.get("io", "output"))
        site.hook_point(sitemap)
        return [site]
    component = spec.get("component", "resid_post")
    if component not in COMPONENTS:
        raise SiteError(f"unknown component '{component}' (known: {', '.join(COMPONENTS)})", (*loc, "component"))
    heads = neurons = None
    if spec.get("head") is not None:
        if component not in HEADED:
            raise SiteError(f"'head' only applies to components {', '.join(sorted(HEADED))}", (*loc, "head"))
        heads = _indices(spec["head"], sitemap.heads_of(component), "head", (*loc, "head"))
    if spec.get("neuron") is not None:
        if component not in PER_NEURON:
            raise SiteError("'neuron' only applies to component mlp.post", (*loc, "neuron"))
        neurons = _indices(spec["neuron"], sitemap.d_mlp, "neuron", (*loc, "neuron"))
    if component not in PER_LAYER:
        layers: list[int | None] = [None]
    else:
        layers = list(resolve_layer(spec.get("layer", -1), sitemap.n_layers, (*loc, "layer")))
    sites = [Site(component, layer, heads, neurons) for layer in layers]
    for s in sites:
        try:
            s.hook_point(sitemap)
        except SiteError as e:
            raise SiteError(e.message, (*loc, "component")) from None
    return sites
