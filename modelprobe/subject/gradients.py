"""First-order effects of adding a vector to the residual stream, from one forward and backward pass.

For a scalar score read at the last prompt position (e.g. the log-odds of a set of tokens), the
gradient with respect to a vector v added to resid_pre of layer l at every position predicts, to
first order, how adding any vector at that layer moves the score: score(x + r) ≈ score(x) + g_l · r.
One backward pass gives g_l for every layer at once, so a sweep over many candidate vectors costs a
dot product each instead of a forward each.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .interventions import Add, RunState, hooked
from .sites import Site
from .subject import Subject


def addition_gradients(subject: Subject, ids: Sequence[Sequence[int]], layers: Sequence[int],
                       score: Callable[[torch.Tensor], torch.Tensor],
                       batch_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(d mean score / d v_l for each layer in `layers` [len(layers), d_model] float64, base scores [n]).

    `score` maps last-position logits [b, vocab] to one score per row. The added vectors are zero, so
    the forward is the clean one and the scores returned are the model's own.
    """
    d = subject.sitemap.d_model
    dtype = next(subject.model.parameters()).dtype
    total = torch.zeros(len(layers), d, dtype=torch.float64)
    scores = torch.empty(len(ids), dtype=torch.float64)
    # The backward pass keeps every layer's activations: half the usual batch keeps memory in check.
    size = max(1, (batch_size or subject.batch_size) // 2)
    for batch in subject.batches(ids, size):
        vecs = [torch.zeros(d, dtype=dtype, device=subject.device, requires_grad=True) for _ in layers]
        edits = [Add(Site("resid_pre", layer), positions="all", vector=v) for layer, v in zip(layers, vecs)]
        state = RunState(phase="prompt", pad=batch.pad, prompt_len=batch.input_ids.shape[1])
        with torch.enable_grad(), hooked(subject.model, subject.sitemap, state, edits):
            out = subject.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                position_ids=batch.position_ids, use_cache=False, logits_to_keep=1)
            s = score(out.logits[:, -1].float())
            grads = torch.autograd.grad(s.sum(), vecs)
        total += torch.stack([g.detach().double().cpu() for g in grads])
        scores[batch.rows] = s.detach().double().cpu()
    return total / max(1, len(ids)), scores


__all__ = ["addition_gradients"]
