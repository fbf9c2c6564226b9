"""The model under test. Knows models, tokenizers and hooks; nothing about claims."""

from .interventions import (
    AblateDirection,
    Add,
    Intervention,
    MeanAblate,
    Patch,
    RunState,
    WeightDelta,
    ZeroAblate,
    hooked,
    leaked_hooks,
)
from .sitemap import SiteMap, canonical_name
from .sites import Site, resolve_layer, resolve_sites
from .subject import Batch, Forward, Subject, load_subject

__all__ = [
    "AblateDirection", "Add", "Batch", "Forward", "Intervention", "MeanAblate", "Patch", "RunState", "Site",
    "SiteMap", "Subject", "WeightDelta", "ZeroAblate", "canonical_name", "hooked", "leaked_hooks",
    "load_subject", "resolve_layer", "resolve_sites",
]
