"""The site vocabulary (TransformerLens names), shared by probe files and the engine. No torch here."""

from __future__ import annotations

COMPONENTS = (
    "embed", "resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out",
    "attn.q", "attn.k", "attn.v", "attn.z", "attn.pattern", "mlp.post", "final", "logits",
)
PER_LAYER = frozenset({"resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "attn.q", "attn.k", "attn.v",
                       "attn.z", "attn.pattern", "mlp.post"})
HEADED = frozenset({"attn.q", "attn.k", "attn.v", "attn.z"})  # components with one slice per head
PER_NEURON = frozenset({"mlp.post"})


def canonical_name(component: str, layer: int | None) -> str:
    """TransformerLens hook name, so a site pastes into TransformerLens / SAELens."""
    if component == "embed":
        return "hook_embed"
    if component == "final":
        return "ln_final.hook_normalized"
    if component == "logits":
        return "unembed"
    if component.startswith("attn."):
        return f"blocks.{layer}.attn.hook_{component[len('attn.'):]}"
    if component == "mlp.post":
        return f"blocks.{layer}.mlp.hook_post"
    return f"blocks.{layer}.hook_{component}"


def parse_canonical(name: str) -> tuple[str, int | None] | None:
    """(component, layer) of a TransformerLens hook name such as `blocks.9.hook_resid_post` (the inverse of
    `canonical_name`), or None when the name is not one of our sites (SAELens configs name their site so)."""
    import re

    for component in COMPONENTS:
        if canonical_name(component, 0) == name and component not in PER_LAYER:
            return component, None
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", name)
    if not m:
        return None
    layer = int(m.group(1))
    for component in PER_LAYER:
        if canonical_name(component, layer) == name:
            return component, layer
    return None
