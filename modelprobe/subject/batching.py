"""How many prompts go in one forward pass when the batch size is `auto` (the default).

A batch of fixed size is wrong both ways: small batches waste a CPU or GPU on greedy generation (every
step streams all the weights whatever the number of rows: on SmolLM2-135M, 2 CPU threads, one step costs
about 75 ms + 1.5 ms per row, so 16 rows take 6.4 ms per row-step and 96 rows 2.3 ms), and large ones
can run a long-context model out of memory. `auto` takes as many rows as fit a memory budget, capped
where more rows stop paying off.

The memory one row needs is estimated from the model's shape, not found by trial: a failed allocation
on the CPU kills the process instead of raising, so probing for the limit is not an option there. The
estimate counts, per row of `width` tokens (prompt plus tokens to generate), the KV cache of every layer,
one layer's activations (hidden, attention scores, MLP) and the logits kept; hooks' captures are the
caller's and are bounded by the same rows.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

# Above these, more rows per forward bought no speed in our measurements (benchmarks/bench_library.py):
# CPU generation 96 -> 192 rows gained 16% per row-step; a prompt pass is compute-bound from ~1k tokens.
CPU_LIMITS = (128, 2048)  # (rows, tokens of a prompt pass)
GPU_LIMITS = (512, 65536)
BUDGET_SHARE = 0.25  # of the memory available when the run starts
FALLBACK_BUDGET = 4 << 30


@dataclass(frozen=True)
class Shape:
    """What the estimate needs of a model."""

    n_layers: int
    d_model: int
    d_mlp: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab: int
    bytes_per_value: int

    @classmethod
    def of(cls, model: Any) -> Shape:
        config = model.config
        text = config.get_text_config() if hasattr(config, "get_text_config") else config

        def get(*names: str, default: int) -> int:
            for name in names:
                value = getattr(text, name, None)
                if isinstance(value, int) and value > 0:
                    return value
            return default

        d = get("hidden_size", "n_embd", "d_model", default=1024)
        heads = get("num_attention_heads", "n_head", default=16)
        return cls(n_layers=get("num_hidden_layers", "n_layer", default=32), d_model=d,
                   d_mlp=get("intermediate_size", "n_inner", default=4 * d), n_heads=heads,
                   n_kv_heads=get("num_key_value_heads", default=heads),
                   head_dim=get("head_dim", default=max(1, d // heads)),
                   vocab=get("vocab_size", default=50_000),
                   bytes_per_value=next(model.parameters()).element_size())


def row_bytes(shape: Shape, width: int, logits_positions: int = 1) -> int:
    """Bytes one row of `width` tokens needs: KV cache of every layer, one layer's activations (the
    residual and its copies, the MLP's hidden, the attention scores), float32 logits at `logits_positions`."""
    b = shape.bytes_per_value
    kv = 2 * shape.n_layers * shape.n_kv_heads * shape.head_dim * width * b
    layer = width * (8 * shape.d_model + 3 * shape.d_mlp + shape.n_heads * width) * b
    logits = logits_positions * shape.vocab * 4
    return kv + layer + logits


def memory_budget(device: torch.device) -> int:
    """Bytes a batch may use: a share of the free GPU memory, or of the memory the OS reports available."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * BUDGET_SHARE)
    available = 0
    try:  # MemAvailable counts reclaimable page cache; free pages alone undercount a busy machine
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    if available <= 0:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return FALLBACK_BUDGET
    return int(available * BUDGET_SHARE) if available > 0 else FALLBACK_BUDGET


class AutoBatch:
    """Rows per forward for a model, by sequence shape; the budget is read once, when first needed."""

    def __init__(self, model: Any) -> None:
        self.shape = Shape.of(model)
        self.device = next(model.parameters()).device
        self.limits = GPU_LIMITS if self.device.type == "cuda" else CPU_LIMITS
        self._budget: int | None = None
        self._rows: dict[tuple[int, int], int] = {}

    @property
    def budget(self) -> int:
        if self._budget is None:
            self._budget = memory_budget(self.device)
        return self._budget

    def rows(self, prompt_width: int, new_tokens: int = 0) -> int:
        """The most rows of `prompt_width` tokens (plus `new_tokens` to generate) for one forward."""
        key = (prompt_width, new_tokens)
        if key not in self._rows:
            max_rows, max_tokens = self.limits
            by_memory = self.budget // max(1, row_bytes(self.shape, prompt_width + new_tokens))
            # A prompt pass is bounded by tokens; generation steps are one token per row.
            by_tokens = max_tokens // max(1, prompt_width) if new_tokens == 0 else max_rows
            self._rows[key] = max(1, min(max_rows, by_memory, by_tokens))
        return self._rows[key]


# A prompt pass is compute-bound: a batch stops growing once padding would add this share of its real tokens.
MAX_PADDING = 0.25


def chunk_sorted(lengths: list[int], order: list[int], rows_for: Any,
                 max_padding: float | None = None, shared: int = 0) -> list[list[int]]:
    """Split `order` (indices sorted by ascending length) into consecutive batches, each as long as
    `rows_for(longest length in it)` allows and, with `max_padding`, padded by at most that share of
    its real tokens after the `shared` first ones (a prefix every prompt has, such as a chat template's
    system turn, which forwards that share it compute once)."""
    out: list[list[int]] = []
    current: list[int] = []
    real = 0
    for i in order:
        n = max(1, lengths[i] - shared)
        too_many = current and len(current) + 1 > rows_for(lengths[i])
        too_padded = current and max_padding is not None and (len(current) + 1) * n > (1 + max_padding) * (real + n)
        if too_many or too_padded:
            out.append(current)
            current, real = [], 0
        current.append(i)
        real += n
    if current:
        out.append(current)
    return out



def common_prefix(ids: Any) -> int:
    """Tokens every prompt starts with (a chat template's system turn, say), leaving each prompt at least
    one token of its own; 0 when they share nothing."""
    if not ids:
        return 0
    n = min(len(x) for x in ids) - 1
    first = ids[0]
    for x in ids[1:]:
        while n > 0 and list(x[:n]) != list(first[:n]):
            n -= 1
    return max(n, 0)
