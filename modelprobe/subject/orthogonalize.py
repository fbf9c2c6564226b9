"""Weight orthogonalisation: edit every matrix that writes the residual stream so that it cannot write
along one direction (Arditi et al. 2024).

W <- W - u u^T W for each residual writer: the token (and position) embeddings, the attention output
projections and the MLP down projections, with their biases. In a pre-norm model the residual stream
is then orthogonal to u everywhere, which is exactly what projecting u out of every block input,
attention output and MLP output with hooks does. In a model with post-norm sublayers (Gemma 2/3,
OLMo 2) a norm rescales each sublayer's output elementwise before it joins the stream, so an edit
of the projection no longer keeps the stream orthogonal: there we refuse rather than give a
different intervention under the same name.

The edits are `WeightDelta`s, so `hooked()` applies them and restores the exact original weights.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import SiteError
from .interventions import WeightDelta
from .sitemap import SiteMap


def _writers(sitemap: SiteMap) -> list[tuple[str, nn.Module]]:
    """Residual writers from the site map, plus any other embedding table of width d_model
    (learned position embeddings, as in GPT-2), which also adds straight into the stream."""
    out = list(sitemap.residual_writers())
    seen = {id(m) for _, m in out}
    for name, mod in sitemap.model.named_modules():
        if (isinstance(mod, nn.Embedding) and id(mod) not in seen and mod.embedding_dim == sitemap.d_model
                and mod.weight is not sitemap.embed.weight):
            out.append((name, mod))
            seen.add(id(mod))
    return out


def _writes_rows(module: nn.Module, conv1d: bool) -> bool:
    """Whether the module's weight holds d_model-vectors as rows (embedding, GPT-2 Conv1D [in, out])
    rather than as columns (nn.Linear stores [out, in])."""
    if isinstance(module, nn.Embedding):
        return True
    if isinstance(module, nn.Linear):
        return False
    return conv1d or type(module).__name__ == "Conv1D"


def check_orthogonalizable(sitemap: SiteMap) -> None:
    """Raise SiteError where weight orthogonalisation is not equivalent to ablating the direction."""
    if sitemap.family.post_norm:
        raise SiteError(
            f"weight_orthogonalize is not available for model type '{sitemap.model_type}': its attention and "
            "MLP outputs pass through a post-norm before they join the residual stream, so editing the "
            "projections does not keep the stream orthogonal to the direction (use ablate, which hooks "
            "after the post-norm)")


def orthogonalizing_deltas(sitemap: SiteMap, direction: torch.Tensor) -> list[WeightDelta]:
    """The weight edits that stop every residual writer from writing along `direction`.

    Raises SiteError for families with post-norm sublayers, where the edit is not equivalent to
    ablating the direction.
    """
    check_orthogonalizable(sitemap)
    family = sitemap.family
    u = direction.detach().double().flatten().cpu()
    if u.numel() != sitemap.d_model:
        raise ValueError(f"direction has {u.numel()} entries; the model's residual width is {sitemap.d_model}")
    norm = u.norm()
    if not torch.isfinite(norm) or norm == 0:
        raise ValueError("cannot orthogonalise against a zero or non-finite direction")
    u = u / norm
    deltas: list[WeightDelta] = []
    for path, module in _writers(sitemap):
        w = module.weight.detach().double().cpu()
        if _writes_rows(module, family.conv1d):
            delta = -torch.outer(w @ u, u)  # each row loses its component along u
        else:
            delta = -torch.outer(u, u @ w)  # each column loses it
        deltas.append(WeightDelta(f"{path}.weight", delta.to(module.weight.dtype)))
        bias = getattr(module, "bias", None)
        if isinstance(bias, torch.Tensor) and bias.shape == (sitemap.d_model,):
            b = bias.detach().double().cpu()
            deltas.append(WeightDelta(f"{path}.bias", (-(b @ u) * u).to(bias.dtype)))
    return deltas


def orthogonalization_notes(sitemap: SiteMap) -> list[str]:
    """What a report should say about an orthogonalised model."""
    notes = []
    if sitemap.tied_embeddings:
        notes.append("tied embeddings: orthogonalising the token embedding also edits the unembedding, so "
                     "the logits differ slightly from hook-based ablation")
    extra = [n for n, _ in _writers(sitemap)[1 + 2 * sitemap.n_layers:]]
    if extra:
        notes.append(f"also orthogonalised: {', '.join(extra)}")
    return notes


__all__ = ["check_orthogonalizable", "orthogonalization_notes", "orthogonalizing_deltas"]
