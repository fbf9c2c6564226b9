"""Activations at one token of each prompt: the raw material of concept vectors, function vectors,
patchscopes and back-patching (read a state here, write it elsewhere with `subject.Patch` / `Add`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from .._lazy import torch

if TYPE_CHECKING:
    from ..subject import InterventionsFor, Site, Subject


def states_at(subject: Subject, ids: Sequence[Sequence[int]], sites: Sequence[Site], position: int = -1,
              interventions: InterventionsFor = (), batch_size: int | None = None,
              desc: str = "states") -> dict[Site, torch.Tensor]:
    """{site: [n, ...]} the activation of each prompt at token `position` (unpadded; negative from the
    end), in the caller's order, float32 on the CPU; one forward per batch captures every site, and stops
    after the highest layer a site reads (subject.run_until: the layers above cannot change them)."""
    from ..subject import run_until

    out: dict[Site, torch.Tensor] = {}
    for fw in run_until(subject, ids, sites, interventions, batch_size, desc):
        for site in sites:
            x = fw.at(site, position).float().cpu()
            if site not in out:
                out[site] = torch.empty(len(ids), *x.shape[1:])
            out[site][fw.batch.rows] = x
    return out


def mean_state(subject: Subject, ids: Sequence[Sequence[int]], sites: Sequence[Site], position: int = -1,
               batch_size: int | None = None) -> dict[Site, torch.Tensor]:
    """{site: [...]} the mean activation at `position` over the prompts, summed in float64 (each forward
    stops after the highest layer a site reads)."""
    from ..subject import run_until

    sums: dict[Site, torch.Tensor] = {}
    for fw in run_until(subject, ids, sites, batch_size=batch_size, desc="mean state"):
        for site in sites:
            x = fw.at(site, position).double().cpu().sum(0)
            sums[site] = sums[site] + x if site in sums else x
    return {site: (s / max(1, len(ids))).float() for site, s in sums.items()}
