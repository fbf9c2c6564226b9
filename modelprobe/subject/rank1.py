"""Rank-1 updates of a block's MLP input matrices, kept as factors and applied in a hook.

For a block whose MLP reads the attention output, the effect of a context on the query token's MLP
equals the update W -> W + a bᵀ of every matrix that reads the MLP input (gate and up for gated MLPs),
with a = W (u_ctx - u_plain) and b = u_plain / ‖u_plain‖², u being the MLP input at the query token
(Dherin et al. 2025, arXiv:2507.16003; post-LN inputs as Innocenti & Achour 2025). ΔW is never
materialised: the hook adds a (bᵀu) to W u, and norms of differences of updates come from inner
products of the factors.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .hooks import add_hook
from .sitemap import SiteMap
from .sites import Site


def not_applicable(sitemap: SiteMap) -> str | None:
    """Why the rank-1 identity cannot hold for this model's blocks, or None when it can."""
    f, config = sitemap.family, sitemap.model.config
    if f.parallel:
        return (f"not applicable: model type '{sitemap.model_type}' runs attention and MLP in parallel, so the "
                "MLP does not read the attention output (the contextual-block assumption fails)")
    if any(getattr(config, k, None) for k in ("num_local_experts", "num_experts", "n_routed_experts")):
        return (f"not applicable: model type '{sitemap.model_type}' routes tokens to experts, so there is no "
                "fixed MLP weight to update")
    return None


def mlp_input_site(sitemap: SiteMap, layer: int) -> Site:
    """The MLP input u (after the pre-MLP norm) at `layer`: the input of its first input matrix."""
    return Site("module", module=f"{sitemap.family.layers}.{layer}.{sitemap.family.mlp_in[0]}", io="input")


def mlp_in_modules(sitemap: SiteMap, layer: int) -> list[nn.Module]:
    return [sitemap.module(layer, rel) for rel in sitemap.family.mlp_in]


def weight_times(module: nn.Module, v: torch.Tensor, conv1d: bool) -> torch.Tensor:
    """W v without the bias (GPT-2's Conv1D stores W as [in, out])."""
    w = module.weight.detach().to(v.dtype)
    return v @ w if conv1d else v @ w.T


@dataclass
class Rank1:
    """Per-prompt factors of one layer's update: a [n, sum of the input matrices' outputs], b [n, d]."""

    a: torch.Tensor
    b: torch.Tensor

    def take(self, rows: Sequence[int] | torch.Tensor) -> Rank1:
        return Rank1(self.a[rows], self.b[rows])


def factors(sitemap: SiteMap, layer: int, u_plain: torch.Tensor, u_ctx: torch.Tensor) -> Rank1:
    """The update that makes every MLP input matrix at `layer` map u_plain to what it maps u_ctx to."""
    du = (u_ctx - u_plain).double()
    conv1d = sitemap.family.conv1d
    a = torch.cat([weight_times(m, du, conv1d) for m in mlp_in_modules(sitemap, layer)], dim=-1)
    b = u_plain.double() / (u_plain.double() ** 2).sum(-1, keepdim=True)
    return Rank1(a, b)


def frobenius(x: Rank1) -> torch.Tensor:
    """‖a bᵀ‖_F per prompt."""
    return x.a.norm(dim=-1) * x.b.norm(dim=-1)


def frobenius_diff(x: Rank1, y: Rank1) -> torch.Tensor:
    """‖a bᵀ - c dᵀ‖_F per prompt, from inner products: ‖a‖²‖b‖² + ‖c‖²‖d‖² - 2(a·c)(b·d)."""
    aa, bb = (x.a * x.a).sum(-1), (x.b * x.b).sum(-1)
    cc, dd = (y.a * y.a).sum(-1), (y.b * y.b).sum(-1)
    cross = (x.a * y.a).sum(-1) * (x.b * y.b).sum(-1)
    return (aa * bb + cc * dd - 2 * cross).clamp(min=0).sqrt()


@contextlib.contextmanager
def rank1_applied(sitemap: SiteMap, updates: Mapping[int, Rank1], rows: Sequence[int]) -> Iterator[None]:
    """Within the context, each batch row r's query token (the last column; batches are left-padded)
    goes through W u + a_r (b_rᵀ u) at every MLP input matrix of each layer in `updates`."""
    handles = []
    index = torch.as_tensor(list(rows), dtype=torch.long)
    try:
        for layer, upd in updates.items():
            mine = upd.take(index)
            start = 0
            for module in mlp_in_modules(sitemap, layer):
                width = module.weight.shape[1] if sitemap.family.conv1d else module.weight.shape[0]
                a = mine.a[:, start:start + width]
                start += width

                def hook(mod, args, output, a=a, b=mine.b):
                    u = args[0][:, -1].to(b.dtype)
                    scale = (u * b.to(u.device)).sum(-1, keepdim=True)
                    out = output.clone()
                    out[:, -1] += (a.to(u.device) * scale).to(out.dtype)
                    return out
                handles.append(add_hook(module, hook, f"rank-1 update at layer {layer}"))
        yield
    finally:
        for h in handles:
            h.remove()


def online_updates(model: nn.Module, sitemap: SiteMap, batch, mid_ctx: torch.Tensor,
                   u_ctx: torch.Tensor) -> tuple[dict[int, Rank1], dict[int, torch.Tensor]]:
    """The identity's updates for one batch in a single pass: at each layer, in order, the query token's
    resid_mid and MLP input u of the no-context run (already updated below) give the bias and the
    factors that make it follow the with-context run (mid_ctx, u_ctx: [b, L, d]); they are applied at
    once, so the next layer sees the updated run. Returns ({layer: Rank1}, {layer: bias [b, d]})."""
    updates: dict[int, Rank1] = {}
    biases: dict[int, torch.Tensor] = {}
    handles = []
    f = sitemap.family

    def at_mid(layer: int):
        def pre(mod, args, kwargs):
            h = (args[0] if args else kwargs["hidden_states"])[:, -1].double()
            biases[layer] = mid_ctx[:, layer].to(h.device) - h
        return pre

    def at_u(layer: int):
        def pre(mod, args):
            u = args[0][:, -1].double()
            updates[layer] = factors(sitemap, layer, u, u_ctx[:, layer].to(u.device))
        return pre

    def add_bias(layer: int):
        def post(mod, args, output):
            out = output.clone()
            out[:, -1] += biases[layer].to(out.dtype)
            return out
        return post
    try:
        for layer in range(sitemap.n_layers):
            handles.append(add_hook(sitemap.module(layer, f.resid_mid_reader), at_mid(layer),
                                    f"online rank-1 update: resid_mid capture at layer {layer}", pre=True,
                                    with_kwargs=True))
            handles.append(add_hook(sitemap.module(layer, f.mlp_in[0]), at_u(layer),
                                    f"online rank-1 update: MLP-input capture at layer {layer}", pre=True))
            start = 0
            for module in mlp_in_modules(sitemap, layer):
                width = module.weight.shape[1] if f.conv1d else module.weight.shape[0]

                def apply(mod, args, output, layer=layer, lo=start, hi=start + width):
                    upd = updates[layer]
                    u = args[0][:, -1].double()
                    out = output.clone()
                    out[:, -1] += (upd.a[:, lo:hi] * (u * upd.b).sum(-1, keepdim=True)).to(out.dtype)
                    return out
                handles.append(add_hook(module, apply, f"online rank-1 update at layer {layer}"))
                start += width
            handles.append(add_hook(sitemap.module(layer, f.mlp_write), add_bias(layer),
                                    f"online rank-1 update: bias at layer {layer}"))
        with torch.inference_mode():
            model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                  use_cache=False, logits_to_keep=1)
    finally:
        for h in handles:
            h.remove()
    return updates, biases


class _Stop(Exception):
    """Raised by the hook at the last layer a pass needs: the layers above it would be wasted work."""


def query_mlp_inputs(model: nn.Module, sitemap: SiteMap, batch, layers: Sequence[int]) -> dict[int, torch.Tensor]:
    """The MLP input u at the last column of each row, per layer in `layers` ({layer: [b, d] float64}),
    running the model only up to the highest of them (no logits)."""
    got: dict[int, torch.Tensor] = {}
    top = max(layers)
    handles = []

    def make(layer: int):
        def pre(mod, args):
            got[layer] = args[0][:, -1].double().cpu()
            if layer == top:
                raise _Stop
        return pre
    try:
        for layer in layers:
            handles.append(add_hook(mlp_in_modules(sitemap, layer)[0], make(layer),
                                    f"rank-1 MLP-input capture at layer {layer}", pre=True))
        with torch.inference_mode():
            model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                  use_cache=False, logits_to_keep=1)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    return got


__all__ = ["Rank1", "online_updates", "query_mlp_inputs", "factors", "frobenius", "frobenius_diff", "mlp_in_modules", "mlp_input_site",
           "not_applicable", "rank1_applied", "weight_times"]
