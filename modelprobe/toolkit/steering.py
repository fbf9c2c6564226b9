"""Ready-made interventions on the residual stream, in the engine's vocabulary (subject/interventions).

`vector` / `direction` may be [d] (every row alike) or [rows, d] (one per batch row: many seeds of a
control ride in one batch).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from ..subject.interventions import Intervention

# Arditi et al.'s directional ablation: every block input and every sublayer write
RESIDUAL_WRITES = ("resid_pre", "attn_out", "mlp_out")


def ablate_direction_everywhere(n_layers: int, direction: torch.Tensor) -> list[Intervention]:
    """Project the (unit) direction out of every block input, attention output and MLP output, at all
    positions, generated tokens included."""
    from ..subject.interventions import AblateDirection
    from ..subject.sites import Site

    return [AblateDirection(Site(c, layer), positions="all", direction=direction)
            for layer in range(n_layers) for c in RESIDUAL_WRITES]


def add_at_layer(layer: int, vector: torch.Tensor, scale: float = 1.0, positions: object = "all",
                 component: str = "resid_pre") -> list[Intervention]:
    """Add scale * vector to the residual stream at one layer (the input of block `layer` by default)."""
    from ..subject.interventions import Add
    from ..subject.sites import Site

    return [Add(Site(component, layer), positions=positions, vector=vector, scale=scale)]
