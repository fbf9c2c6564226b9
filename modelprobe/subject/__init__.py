"""The model under test. Knows models, tokenizers and hooks; nothing about claims.

This package is the face: code outside `subject/` imports from `modelprobe.subject` only, never from a
module inside it (tests/test_layering.py checks), so the modules behind the face can be split, merged
or renamed without touching a kind. Names are loaded on first use, so a kind that names sites, or
`unfetched` (pure path work), never imports torch; the engine comes in when a measurement first runs.
A few names are given a longer name here than in their module, where the short one would be unclear
outside it (`rank1_factors`, `jacobian_states`, `AblationUnit`, ...).
"""

# The TYPE_CHECKING imports below are the face itself, named in __all__ through _WHERE:
# ruff: noqa: F401
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# face name -> "module" (same name there) or "module:name"
_WHERE = {
    # the intervention vocabulary and the one context that applies it
    "AblateDirection": "interventions", "Add": "interventions", "From": "interventions", "Intervention": "interventions",
    "MeanAblate": "interventions", "NormShift": "interventions", "Patch": "interventions", "RunState": "interventions",
    "SetUnit": "interventions", "Span": "interventions", "WeightDelta": "interventions", "ZeroAblate": "interventions",
    "hooked": "interventions", "leaked_hooks": "hooks",
    # sites and the model
    "SiteMap": "sitemap", "canonical_name": "sitemap", "Site": "sites", "resolve_layer": "sites",
    "resolve_sites": "sites", "Batch": "subject", "Forward": "subject", "InterventionsFor": "subject",
    "Subject": "subject", "load_subject": "subject", "unfetched": "resolve", "worker_device": "devices",
    "run_preflight": "preflight", "check_no_hooks_left": "preflight",
    # units: neurons, directions, SAE latents
    "UnitFileError": "units", "UnitSet": "units", "check_latent": "units", "coordinate_units": "units",
    "direction_units": "units", "load_direction": "units", "read_direction": "units", "read_sae": "units",
    "sae_site": "units", "sae_units": "units", "site_width": "units",
    # component ablation
    "AblationRunner": "ablation", "AblationScope": "ablation:Scope", "AblationUnit": "ablation:Unit",
    "build_scope": "ablation",
    # rank-1 updates of MLP input matrices
    "Rank1": "rank1", "frobenius": "rank1", "frobenius_diff": "rank1", "mlp_input_site": "rank1",
    "online_updates": "rank1", "query_mlp_inputs": "rank1", "rank1_applied": "rank1",
    "rank1_factors": "rank1:factors", "rank1_not_applicable": "rank1:not_applicable",
    # Jacobians of the last layer's output
    "edited_logits": "jacobian", "jacobian_states": "jacobian:states", "jacobians": "jacobian",
    # weight groups and their perturbation
    "WeightGroup": "weights", "gradient_attribution": "weights", "group_notes": "weights",
    "output_zeroing": "weights", "perturbed_weights": "weights:perturbed", "row_deltas": "weights",
    "weight_groups": "weights", "weight_noise": "weights:noise",
    # weight orthogonalisation
    "check_orthogonalizable": "orthogonalize", "orthogonalization_notes": "orthogonalize",
    "orthogonalizing_deltas": "orthogonalize",
    # the resumable forward: layers from a cached clean prefix, and greedy continuation from it
    "common_prefix": "batching", "CleanPrompt": "resumable", "can_resume": "prefix",
    "can_share_prefix": "prefix", "clean_pass": "resumable", "first_layer": "resumable",
    "generate_shared": "resumable", "greedy": "resumable", "greedy_from_kv": "resumable", "resume": "resumable",
    "resume_last": "resumable", "resume_variants": "resumable", "run_layers": "resumable",
    "run_until": "resumable", "stop_point": "resumable",
}

__all__ = sorted(_WHERE)

if TYPE_CHECKING:  # the same names, for editors and type checkers (tests/test_layering.py keeps them equal)
    from .ablation import AblationRunner, build_scope
    from .ablation import Scope as AblationScope
    from .ablation import Unit as AblationUnit
    from .batching import common_prefix
    from .devices import worker_device
    from .hooks import leaked_hooks
    from .interventions import (
        AblateDirection,
        Add,
        From,
        Intervention,
        MeanAblate,
        NormShift,
        Patch,
        RunState,
        SetUnit,
        Span,
        WeightDelta,
        ZeroAblate,
        hooked,
    )
    from .jacobian import edited_logits, jacobians
    from .jacobian import states as jacobian_states
    from .orthogonalize import check_orthogonalizable, orthogonalization_notes, orthogonalizing_deltas
    from .prefix import can_resume, can_share_prefix
    from .preflight import check_no_hooks_left, run_preflight
    from .rank1 import (
        Rank1,
        frobenius,
        frobenius_diff,
        mlp_input_site,
        online_updates,
        query_mlp_inputs,
        rank1_applied,
    )
    from .rank1 import factors as rank1_factors
    from .rank1 import not_applicable as rank1_not_applicable
    from .resolve import unfetched
    from .resumable import (
        CleanPrompt,
        clean_pass,
        first_layer,
        generate_shared,
        greedy,
        greedy_from_kv,
        resume,
        resume_last,
        resume_variants,
        run_layers,
        run_until,
        stop_point,
    )
    from .sitemap import SiteMap, canonical_name
    from .sites import Site, resolve_layer, resolve_sites
    from .subject import Batch, Forward, InterventionsFor, Subject, load_subject
    from .units import (
        UnitFileError,
        UnitSet,
        check_latent,
        coordinate_units,
        direction_units,
        load_direction,
        read_direction,
        read_sae,
        sae_site,
        sae_units,
        site_width,
    )
    from .weights import (
        WeightGroup,
        gradient_attribution,
        group_notes,
        output_zeroing,
        row_deltas,
        weight_groups,
    )
    from .weights import noise as weight_noise
    from .weights import perturbed as perturbed_weights


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'modelprobe.subject' has no attribute '{name}'")
    module, _, attr = _WHERE[name].partition(":")
    return getattr(importlib.import_module(f".{module}", __name__), attr or name)
