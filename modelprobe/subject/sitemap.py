"""Where each canonical site lives in a Hugging Face model, per architecture family.

A site is read or written through a hook on one module: either the module's input (pre-hook) or its
output. The table below is the only place that knows Hugging Face module names; everything else asks
it through `SiteMap`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from torch import nn

from ..errors import SiteError
from ..names import COMPONENTS, PER_LAYER, canonical_name

IO = Literal["input", "output"]



@dataclass(frozen=True)
class Family:
    """Module paths (relative to the CausalLM, or to a decoder layer) of one architecture family."""

    name: str
    layers: str
    embed: str
    final_norm: str
    unembed: str
    attn: str  # attention module inside a layer
    attn_write: str  # module whose output the layer adds to the residual stream for attention
    mlp_write: str  # the same for the MLP
    attn_out_proj: str  # its input is attn.z (heads concatenated)
    qkv: tuple[str, str, str] | None  # the q, k, v projections (None: one fused matrix)
    mlp_out_proj: str  # its input is mlp.post
    mlp_in: tuple[str, ...]  # matrices that read the MLP input (gate and up for gated MLPs)
    resid_mid_reader: str | None  # a module whose input is resid_mid; None for parallel blocks
    post_norm: bool = False
    parallel: bool = False
    gated: bool = True
    conv1d: bool = False  # GPT-2 stores weights as [in, out]
    notes: tuple[str, ...] = field(default_factory=tuple)


_LLAMA = Family(
    name="llama", layers="model.layers", embed="model.embed_tokens", final_norm="model.norm",
    unembed="lm_head", attn="self_attn", attn_write="self_attn", mlp_write="mlp",
    attn_out_proj="self_attn.o_proj", mlp_out_proj="mlp.down_proj", mlp_in=("mlp.gate_proj", "mlp.up_proj"),
    resid_mid_reader="post_attention_layernorm", qkv=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
)
_GEMMA = Family(
    name="gemma", layers="model.layers", embed="model.embed_tokens", final_norm="model.norm",
    unembed="lm_head", attn="self_attn", attn_write="post_attention_layernorm",
    mlp_write="post_feedforward_layernorm", attn_out_proj="self_attn.o_proj", mlp_out_proj="mlp.down_proj",
    qkv=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    mlp_in=("mlp.gate_proj", "mlp.up_proj"), resid_mid_reader="pre_feedforward_layernorm", post_norm=True,
    notes=("post-norm sublayers: attn_out/mlp_out are read after the post-norm, where they join the "
           "residual stream",),
)
# model_type "gemma3" (Gemma 3 4B and up) loads as Gemma3ForConditionalGeneration: the text decoder sits
# under model.language_model; text-only prompts never touch the vision tower.
_GEMMA3_MM = Family(**{**_GEMMA.__dict__, "layers": "model.language_model.layers",
                       "embed": "model.language_model.embed_tokens", "final_norm": "model.language_model.norm"})
_GPT2 = Family(
    name="gpt2", layers="transformer.h", embed="transformer.wte", final_norm="transformer.ln_f",
    unembed="lm_head", attn="attn", attn_write="attn", mlp_write="mlp", attn_out_proj="attn.c_proj",
    mlp_out_proj="mlp.c_proj", mlp_in=("mlp.c_fc",), resid_mid_reader="ln_2", gated=False, conv1d=True, qkv=None,
    notes=("learned absolute position embeddings: left padding needs explicit position ids",),
)
_NEOX = Family(
    name="gpt_neox", layers="gpt_neox.layers", embed="gpt_neox.embed_in", final_norm="gpt_neox.final_layer_norm",
    unembed="embed_out", attn="attention", attn_write="attention", mlp_write="mlp",
    attn_out_proj="attention.dense", mlp_out_proj="mlp.dense_4h_to_h", mlp_in=("mlp.dense_h_to_4h",),
    resid_mid_reader=None, parallel=True, gated=False, qkv=None,
    notes=("parallel attention and MLP: both read resid_pre, so there is no resid_mid",),
)

FAMILIES: dict[str, Family] = {
    "llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA, "qwen3": _LLAMA,
    "gemma2": _GEMMA, "gemma3": _GEMMA3_MM, "gemma3_text": _GEMMA,
    "gpt2": _GPT2, "gpt_neox": _NEOX,
}


def _get(root: nn.Module, path: str) -> nn.Module:
    mod = root
    for part in path.split("."):
        mod = getattr(mod, part) if not part.isdigit() else mod[int(part)]
    return mod


@dataclass(frozen=True)
class HookPoint:
    """One module and which side of it a site is read from."""

    module: nn.Module
    io: IO
    path: str
    tuple_output: bool = False  # attention modules return (output, weights)


class SiteMap:
    """Resolves canonical sites to hook points for one loaded model."""

    def __init__(self, model: nn.Module):
        config = model.config
        self.model_type = config.model_type
        family = FAMILIES.get(self.model_type)
        if family is None:
            known = ", ".join(sorted(FAMILIES))
            raise SiteError(f"model type '{self.model_type}' is not supported (supported: {known})")
        if family.name == "gpt_neox" and not getattr(config, "use_parallel_residual", True):
            family = Family(**{**family.__dict__, "parallel": False,
                               "resid_mid_reader": "post_attention_layernorm", "notes": ()})
        if family.name == "gpt_neox" and not hasattr(model, "embed_out"):
            family = Family(**{**family.__dict__, "unembed": "lm_head"})
        self.family = family
        self.model = model
        try:
            self.layers: nn.ModuleList = _get(model, family.layers)
        except AttributeError:  # e.g. a bare decoder without its LM head: say so instead of a traceback
            raise SiteError(f"model type '{self.model_type}': {type(model).__name__} has no decoder layers at "
                            f"'{family.layers}' (load it as a causal LM)") from None
        self.n_layers = len(self.layers)
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        self.d_model = int(getattr(text, "hidden_size", None) or text.n_embd)
        self.n_heads = int(getattr(text, "num_attention_heads", None) or text.n_head)
        self.n_kv_heads = int(getattr(text, "num_key_value_heads", None) or self.n_heads)
        o_proj = self.module(0, family.attn_out_proj)
        self.d_attn = o_proj.weight.shape[0] if family.conv1d else o_proj.weight.shape[1]
        self.d_head = self.d_attn // self.n_heads
        down = self.module(0, family.mlp_out_proj)
        self.d_mlp = down.weight.shape[0] if family.conv1d else down.weight.shape[1]
        self.tied_embeddings = bool(getattr(config, "tie_word_embeddings", False)) or (
            self.unembed.weight is self.embed.weight)

    # ---- modules -------------------------------------------------------------------------
    def module(self, layer: int, rel: str) -> nn.Module:
        return _get(self.layers[layer], rel)

    @property
    def embed(self) -> nn.Module:
        return _get(self.model, self.family.embed)

    @property
    def final_norm(self) -> nn.Module:
        return _get(self.model, self.family.final_norm)

    @property
    def unembed(self) -> nn.Module:
        return _get(self.model, self.family.unembed)

    def features(self) -> dict[str, object]:
        """What the site map detected, for the report."""
        f = self.family
        return {
            "model_type": self.model_type, "family": f.name, "n_layers": self.n_layers, "d_model": self.d_model,
            "n_heads": self.n_heads, "n_kv_heads": self.n_kv_heads, "d_head": self.d_head, "d_mlp": self.d_mlp,
            "post_norm_sublayers": f.post_norm, "parallel_attn_mlp": f.parallel, "gated_mlp": f.gated,
            "tied_embeddings": self.tied_embeddings, "grouped_query_attention": self.n_kv_heads < self.n_heads,
            "notes": list(f.notes),
        }

    # ---- sites ---------------------------------------------------------------------------
    def hook_point(self, component: str, layer: int | None) -> HookPoint:
        f = self.family
        if component in PER_LAYER:
            if layer is None or not 0 <= layer < self.n_layers:
                raise SiteError(f"layer {layer} is out of range for {self.model_type} with {self.n_layers} layers")
            prefix = f"{f.layers}.{layer}"
            if component == "resid_pre":
                return HookPoint(self.layers[layer], "input", prefix)
            if component == "resid_post":
                return HookPoint(self.layers[layer], "output", prefix)
            if component == "resid_mid":
                if f.resid_mid_reader is None:
                    raise SiteError(f"model type '{self.model_type}' has no resid_mid site: "
                                    "attention and MLP run in parallel")
                return HookPoint(self.module(layer, f.resid_mid_reader), "input",
                                 f"{prefix}.{f.resid_mid_reader}")
            if component == "attn_out":
                return HookPoint(self.module(layer, f.attn_write), "output", f"{prefix}.{f.attn_write}",
                                 tuple_output=f.attn_write == f.attn)
            if component == "mlp_out":
                return HookPoint(self.module(layer, f.mlp_write), "output", f"{prefix}.{f.mlp_write}")
            if component == "attn.z":
                return HookPoint(self.module(layer, f.attn_out_proj), "input", f"{prefix}.{f.attn_out_proj}")
            if component in ("attn.q", "attn.k", "attn.v"):
                return self._qkv(component, layer, prefix)
            if component == "attn.pattern":
                raise SiteError("attn.pattern (the attention probabilities) is not a module output in the "
                                "attention implementations modelprobe hooks (sdpa, flash); it is not available yet")
            if component == "mlp.post":
                return HookPoint(self.module(layer, f.mlp_out_proj), "input", f"{prefix}.{f.mlp_out_proj}")
        if component == "embed":
            return HookPoint(self.embed, "output", f.embed)
        if component == "final":
            return HookPoint(self.final_norm, "output", f.final_norm)
        if component == "logits":
            return HookPoint(self.unembed, "output", f.unembed)
        raise SiteError(f"component '{component}' is not available for model type '{self.model_type}' "
                        f"(available: {', '.join(COMPONENTS)})")

    def _qkv(self, component: str, layer: int, prefix: str) -> HookPoint:
        """q, k or v: the projection's output, per head, before rotary embeddings and any q/k norm."""
        f = self.family
        if f.qkv is None:
            raise SiteError(f"model type '{self.model_type}' computes q, k and v in one fused matrix; name it "
                            "with the escape hatch {module: <its path>, io: output} instead")
        rel = f.qkv["qkv".index(component[-1])]
        return HookPoint(self.module(layer, rel), "output", f"{prefix}.{rel}")

    def heads_of(self, component: str) -> int:
        """How many heads a headed component has: key/value heads for k and v (grouped-query attention)."""
        return self.n_kv_heads if component in ("attn.k", "attn.v") else self.n_heads

    def raw_hook_point(self, path: str, io: IO) -> HookPoint:
        try:
            mod = _get(self.model, path)
        except (AttributeError, IndexError, TypeError):
            raise SiteError(f"model type '{self.model_type}' has no module '{path}'") from None
        return HookPoint(mod, io, path)

    # Residual-writing matrices, for weight orthogonalisation: (module, weight layout).
    def residual_writers(self) -> list[tuple[str, nn.Module]]:
        f = self.family
        out = [(f.embed, self.embed)]
        for i in range(self.n_layers):
            out.append((f"{f.layers}.{i}.{f.attn_out_proj}", self.module(i, f.attn_out_proj)))
            out.append((f"{f.layers}.{i}.{f.mlp_out_proj}", self.module(i, f.mlp_out_proj)))
        return out


__all__ = ["COMPONENTS", "PER_LAYER", "Family", "HookPoint", "SiteMap", "canonical_name"]
