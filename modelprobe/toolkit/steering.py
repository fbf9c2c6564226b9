"""Ready-made interventions on the residual stream, in the engine's vocabulary (subject/interventions).

`vector` / `direction` may be [d] (every row alike) or [rows, d] (one per batch row: many seeds of a
control ride in one batch).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from ..subject import Intervention

# Arditi et al.'s directional ablation: every block input and every sublayer write
RESIDUAL_WRITES = ("resid_pre", "attn_out", "mlp_out")


def ablate_direction_everywhere(n_layers: int, direction: torch.Tensor) -> list[Intervention]:
    """Project the (unit) direction out of every block input, attention output and MLP output, at all
    positions, generated tokens included."""
    from ..subject import AblateDirection, Site

    return [AblateDirection(Site(c, layer), positions="all", direction=direction)
            for layer in range(n_layers) for c in RESIDUAL_WRITES]


def add_at_layer(layer: int, vector: torch.Tensor, scale: float = 1.0, positions: object = "all",
                 component: str = "resid_pre") -> list[Intervention]:
    """Add scale * vector to the residual stream at one layer (the input of block `layer` by default)."""
    from ..subject import Add, Site

    return [Add(Site(component, layer), positions=positions, vector=vector, scale=scale)]


def stack_variants(variants: Sequence[Sequence[Intervention]], n: int) -> Callable[[list[int]], list[Intervention]] | None:
    """Several steerings of the same n prompts as ONE batch of len(variants) * n rows, variant-major (row
    v * n + i is prompt i under variant v): the per-row interventions for any rows of it, or None when
    the variants cannot share a batch.

    Greedy generation pays for every step's weights whatever the number of rows, so the base replies, the
    intervened ones and each candidate's are far cheaper side by side than one after another. Only Add
    and AblateDirection with one [d] vector each are stacked: a variant without one at some site gets a
    zero vector there, and adding zero or projecting out a zero direction leaves x bit for bit.
    """
    import torch

    from ..subject import AblateDirection, Add

    keys: dict[tuple, int] = {}
    for variant in variants:
        for iv in variant:
            vec = iv.vector if type(iv) is Add else iv.direction if type(iv) is AblateDirection else None
            if vec is None or vec.dim() != 1 or not isinstance(iv.positions, (str, int)):
                return None
            keys.setdefault((type(iv), iv.site, iv.positions), len(keys))
    if not keys:
        return lambda rows: []
    d = next(iv.vector if type(iv) is Add else iv.direction for v in variants for iv in v).shape[-1]
    table = torch.zeros(len(keys), len(variants), d)
    for vi, variant in enumerate(variants):
        for iv in variant:
            k = keys[(type(iv), iv.site, iv.positions)]
            if table[k, vi].any():
                return None  # two edits of one kind at one site: order would matter
            table[k, vi] = (iv.vector.float() * iv.scale) if type(iv) is Add else iv.direction.float()

    def for_rows(rows: list[int]) -> list[Intervention]:
        which = torch.as_tensor([r // n for r in rows], dtype=torch.long)
        out: list[Intervention] = []
        for (kind, site, positions), k in keys.items():
            vecs = table[k, which]
            out.append(Add(site, positions, vector=vecs) if kind is Add else
                       AblateDirection(site, positions, direction=vecs))
        return out

    return for_rows
