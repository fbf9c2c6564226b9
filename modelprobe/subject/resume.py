"""Resume a forward pass from a cached residual stream: run decoder layers start..L-1 only.

An intervention that first touches layer `start` leaves every layer below it exactly as in the clean
run, so recomputing them is waste. `resume()` takes the clean run's resid_pre at `start`, runs the
remaining decoder layers, the final norm and the unembedding, with interventions and captures
attached through the same `hooked()` context as a full forward (same hook points, same semantics).

Only families whose decoder layers we can drive exactly are resumed (rotary position embeddings
from the model's own rotary module, masks from transformers' own mask builders, no logit
post-processing). Every other family falls back to a full forward: correct, only slower.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

from .interventions import Intervention, RunState, WeightDelta, hooked
from .sites import Site
from .subject import Batch, Forward, InterventionsFor, Subject, cache_kwarg

# Model types whose decoder stack is: rotary embeddings shared by all layers, a causal (or sliding
# window) mask per layer type, layer(hidden, attention_mask, position_ids, position_embeddings),
# then norm and lm_head with nothing after it. Gemma is left out on purpose: it soft-caps logits.
RESUMABLE = frozenset({"llama", "mistral", "qwen2", "qwen3"})


def can_resume(subject: Subject) -> bool:
    """Whether `resume` runs only the layers from `start` for this model (else it runs a full forward)."""
    base = getattr(subject.model, "model", None)
    return (subject.sitemap.model_type in RESUMABLE and subject.sitemap.family.name == "llama"
            and base is not None and hasattr(base, "rotary_emb") and hasattr(base, "layers"))


def first_layer(sites_or_interventions: Sequence[Intervention | WeightDelta | Site], subject: Subject) -> int:
    """The lowest decoder layer an intervention or capture touches (-1 for the embedding or unknown
    places, n_layers when it touches only the final norm / unembedding)."""
    lowest = subject.n_layers
    layer_path = re.compile(re.escape(subject.sitemap.family.layers) + r"\.(\d+)\.")
    after = (subject.sitemap.family.final_norm, subject.sitemap.family.unembed)
    for item in sites_or_interventions:
        if isinstance(item, WeightDelta):
            m = layer_path.match(item.parameter)
            if m:
                lowest = min(lowest, int(m.group(1)))
            elif not item.parameter.startswith(after):
                return -1
            continue
        site = item if isinstance(item, Site) else item.site
        if site.module is not None:
            m = layer_path.match(site.module + ".")
            if m:
                lowest = min(lowest, int(m.group(1)))
            elif not site.module.startswith(after):
                return -1
        elif site.layer is not None:
            lowest = min(lowest, site.layer)
        elif site.component == "embed":
            return -1
    return lowest


def _masks(subject: Subject, batch: Batch, hidden: torch.Tensor) -> dict[str, object]:
    """The attention masks the model's own forward would build, keyed by layer type."""
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    config = subject.model.config
    kwargs = dict(config=config, inputs_embeds=hidden, attention_mask=batch.attention_mask,
                  position_ids=batch.position_ids, **{cache_kwarg(create_causal_mask): None})
    masks: dict[str, object] = {"full_attention": create_causal_mask(**kwargs)}
    types = set(getattr(config, "layer_types", None) or [])
    mistral_window = config.model_type == "mistral" and getattr(config, "sliding_window", None) is not None
    if "sliding_attention" in types or mistral_window:
        masks["sliding_attention"] = create_sliding_window_causal_mask(**kwargs)
    return masks


def _layer_type(subject: Subject, layer: int) -> str:
    config = subject.model.config
    types = getattr(config, "layer_types", None)
    if types:
        return types[layer]
    if config.model_type == "mistral" and getattr(config, "sliding_window", None) is not None:
        return "sliding_attention"
    return "full_attention"


def resume(subject: Subject, batch: Batch, start: int, resid_pre: torch.Tensor | None,
           interventions: InterventionsFor = (), capture: Sequence[Site] = (),
           logits: str = "last") -> Forward:
    """Run decoder layers start..L-1, the final norm and the unembedding from `resid_pre` at `start`.

    `resid_pre` ([b, s, d_model], the padded batch) must be the model's own residual stream at the
    input of layer `start` for this batch: it is a cache of the clean run, not an intervention.
    Interventions and captures must all sit at layer `start` or above (ValueError otherwise: the
    cached stream would silently miss them). Families that cannot be resumed, `start` == 0 without a
    cache, and `resid_pre=None` run the full forward instead, which gives the same numbers.
    `logits="last"` unembeds only the last position ([b, vocab]; captures at `final`/`logits` then
    see that position only); "all" gives [b, s, vocab].
    """
    chosen = subject.interventions_for(interventions, batch.rows)
    lowest = first_layer([*chosen, *capture], subject)
    if lowest < start:
        raise ValueError(f"cannot resume at layer {start}: an intervention or capture touches layer {lowest}, "
                         "below the cached residual stream")
    if resid_pre is None or not can_resume(subject):
        return subject.forward(batch, capture, chosen, logits)
    base = subject.model.model
    hidden = resid_pre.to(subject.device).to(next(subject.model.parameters()).dtype)
    if hidden.shape[:2] != batch.input_ids.shape:
        raise ValueError(f"resid_pre has shape {tuple(hidden.shape)}, the batch is {tuple(batch.input_ids.shape)}")
    state = RunState(phase="prompt", pad=batch.pad, prompt_len=batch.input_ids.shape[1])
    with torch.inference_mode(), hooked(subject.model, subject.sitemap, state, chosen, capture) as cap:
        masks = _masks(subject, batch, hidden)
        position_embeddings = base.rotary_emb(hidden, batch.position_ids)
        for layer in range(start, subject.n_layers):
            hidden = subject.sitemap.layers[layer](
                hidden, attention_mask=masks[_layer_type(subject, layer)], position_ids=batch.position_ids,
                position_embeddings=position_embeddings, use_cache=False)
            if isinstance(hidden, tuple):  # older transformers return (hidden, ...)
                hidden = hidden[0]
        if logits == "last":
            hidden = hidden[:, -1:]
        out = subject.sitemap.unembed(subject.sitemap.final_norm(hidden)) if logits else None
    lg = None
    if out is not None:
        lg = out[:, -1].float() if logits == "last" else out.float()
    return Forward(batch, {s: v[-1] for s, v in cap.items()}, lg)
