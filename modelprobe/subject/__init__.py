"""The model under test. Knows models, tokenizers and hooks; nothing about claims.

Names are loaded on first use, so `modelprobe.subject.resolve` (pure path work) never imports torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "AblateDirection": "interventions", "Add": "interventions", "From": "interventions", "Intervention": "interventions",
    "MeanAblate": "interventions", "NormShift": "interventions", "Patch": "interventions", "RunState": "interventions",
    "SetUnit": "interventions", "WeightDelta": "interventions", "ZeroAblate": "interventions", "hooked": "interventions",
    "leaked_hooks": "interventions", "SiteMap": "sitemap", "canonical_name": "sitemap", "Site": "sites",
    "resolve_layer": "sites", "resolve_sites": "sites", "Batch": "subject", "Forward": "subject",
    "Subject": "subject", "load_subject": "subject", "common_prefix": "batching",
    "CleanPrompt": "resumable", "can_resume": "resumable", "can_share_prefix": "resumable", "clean_pass": "resumable",
    "first_layer": "resumable", "generate_shared": "resumable", "greedy": "resumable", "greedy_from_kv": "resumable",
    "resume": "resumable", "resume_last": "resumable", "resume_variants": "resumable", "run_layers": "resumable",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'modelprobe.subject' has no attribute '{name}'")
    return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
