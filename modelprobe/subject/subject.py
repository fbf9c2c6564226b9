"""The model under test: tokenizer conventions, batched forwards with captures, greedy generation."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import ModelLoadError, SiteError
from ..model_facts import ModelInfo
from .batching import MAX_PADDING, AutoBatch, chunk_sorted, common_prefix
from .interventions import Intervention, RunState, WeightDelta, hooked, leaked_hooks, per_row
from .prefix import SharedPrefix, plan
from .sitemap import SiteMap
from .sites import Site

InterventionsFor = Sequence[Intervention | WeightDelta] | Callable[[list[int]], Sequence[Intervention | WeightDelta]]


@dataclass
class Batch:
    rows: list[int]  # indices of these prompts in the caller's list
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    pad: torch.Tensor  # [b] number of left-pad columns
    lengths: list[int]


@dataclass
class Forward:
    """One batch's results: captured activations (full padded sequence) and logits."""

    batch: Batch
    acts: dict[Site, torch.Tensor]
    logits: torch.Tensor | None  # [b, vocab] at the last position, or [b, s, vocab]

    def at(self, site: Site, index: int | Sequence[int] = -1) -> torch.Tensor:
        """Activation at one unpadded token index per row (negative counts from the end)."""
        x = self.acts[site]
        b = x.shape[0]
        idx = torch.as_tensor(index).expand(b) if not isinstance(index, int) else torch.full((b,), index)
        cols = torch.where(idx >= 0, self.batch.pad + idx, x.shape[1] + idx)
        return x[torch.arange(b), cols]


@dataclass
class Subject:
    model: Any
    tokenizer: Any
    info: ModelInfo
    sitemap: SiteMap
    batch_size: int = 16  # rows per forward when fixed; with auto_batch, the nominal size callers scale from
    progress: bool = True
    cache: dict[Any, Any] = field(default_factory=dict)  # shared activations (means etc.) across probes
    auto_batch: bool = False  # --probe-batch-size auto: rows per forward from a memory budget (subject/batching)
    share_prefix: bool = True  # generation runs a prefix all rows share once per batch (subject/prefix)
    _auto: Any = field(default=None, repr=False)

    # ---- shape facts ------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return self.sitemap.n_layers

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def max_positions(self) -> int | None:
        """The longest sequence the model accepts (its position table), None when it states none."""
        config = self.model.config
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        for name in ("max_position_embeddings", "n_positions"):
            value = getattr(text, name, None)
            if isinstance(value, int) and value > 0:
                return value
        return None

    @property
    def pad_id(self) -> int:
        tok = self.tokenizer
        for candidate in (tok.pad_token_id, tok.eos_token_id, 0):
            if candidate is not None:
                return int(candidate)
        return 0

    # ---- tokenization ------------------------------------------------------------------------
    @property
    def adds_bos(self) -> bool:
        """Whether the tokenizer puts BOS in front of plain text on its own."""
        tok = self.tokenizer
        if tok.bos_token_id is None:
            return False
        ids = tok("a", add_special_tokens=True).input_ids
        return bool(ids) and ids[0] == tok.bos_token_id

    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def render(self, prompt: str, chat_template: bool, system: str | None = None) -> str:
        if not chat_template:
            return prompt
        if not self.has_chat_template():
            raise SiteError(f"model '{self.info.id}': the tokenizer has no chat template, "
                            "but the prompt set asks for chat_template: true")
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": prompt}]
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def encode(self, prompt: str, chat_template: bool = False, system: str | None = None) -> list[int]:
        """Token ids exactly as the model should see them: one BOS at most, template specials kept."""
        tok = self.tokenizer
        if chat_template:
            # The rendered template already holds its special tokens; letting the tokenizer add its own
            # would double BOS on Llama-3-style tokenizers.
            ids = tok(self.render(prompt, True, system), add_special_tokens=False).input_ids
            if self.adds_bos and (not ids or ids[0] != tok.bos_token_id):
                ids = [tok.bos_token_id, *ids]
        else:
            ids = tok(prompt, add_special_tokens=True).input_ids
        bos = tok.bos_token_id
        while bos is not None and len(ids) > 1 and ids[0] == bos and ids[1] == bos:
            ids = ids[1:]
        return list(ids)

    def encode_all(self, prompts: Sequence[str], chat_template: bool = False,
                   system: str | None = None) -> list[list[int]]:
        return [self.encode(p, chat_template, system) for p in prompts]

    def token_id(self, text: str) -> list[int]:
        """Ids of a continuation such as ' Paris' (no special tokens)."""
        return list(self.tokenizer(text, add_special_tokens=False).input_ids)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    # ---- batching ------------------------------------------------------------------------------
    def make_batch(self, ids: Sequence[Sequence[int]], rows: list[int]) -> Batch:
        lengths = [len(x) for x in ids]
        width = max(lengths)
        input_ids = torch.full((len(ids), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for i, x in enumerate(ids):
            input_ids[i, width - len(x):] = torch.tensor(x, dtype=torch.long)
            mask[i, width - len(x):] = 1
        # Left padding shifts real tokens right: positions must count real tokens only, or
        # absolute-position and rotary models see the wrong positions.
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        pad = torch.tensor([width - n for n in lengths], dtype=torch.long)
        dev = self.device
        return Batch(rows, input_ids.to(dev), mask.to(dev), position_ids.to(dev), pad, lengths)

    def batches(self, ids: Sequence[Sequence[int]], batch_size: int | None = None,
                new_tokens: int = 0) -> Iterator[Batch]:
        """Batches of similar length (less padding); each batch says which caller rows it holds.

        `batch_size` fixes the rows per batch; without it the run's size is used, which with `auto_batch`
        is as many rows as fit the memory budget for the batch's longest prompt plus `new_tokens`."""
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        if batch_size is None and self.auto_batch:
            lengths = [len(x) for x in ids]
            # Generation pays per step whatever the rows, so only prompt passes split to save padding.
            chunks = chunk_sorted(lengths, order, lambda width: self.auto_rows(width, new_tokens),
                                  MAX_PADDING if new_tokens == 0 else None, common_prefix(ids))
        else:
            size = batch_size or self.batch_size
            chunks = [order[start:start + size] for start in range(0, len(order), size)]
        for rows in chunks:
            yield self.make_batch([ids[r] for r in rows], rows)

    def auto_rows(self, width: int, new_tokens: int = 0) -> int:
        """Rows of `width` tokens (+ `new_tokens` generated) per forward under the auto batch size."""
        if self._auto is None:
            self._auto = AutoBatch(self.model)
        return self._auto.rows(width, new_tokens)

    # ---- forward ----------------------------------------------------------------------------
    def interventions_for(self, interventions: InterventionsFor, rows: list[int]) -> Sequence[Any]:
        """The interventions for these rows (a callable gets the rows; a list is used as is)."""
        return interventions(rows) if callable(interventions) else interventions

    def forward(self, batch: Batch, capture: Sequence[Site] = (), interventions: InterventionsFor = (),
                logits: str = "last") -> Forward:
        state = RunState(phase="prompt", pad=batch.pad, prompt_len=batch.input_ids.shape[1])
        edits = self.interventions_for(interventions, batch.rows)
        # Unembedding every position is a quarter of a small model's prefill: skip it when unused.
        keep = {} if logits == "all" or _touches_logits(capture, edits) else {"logits_to_keep": 1}
        with torch.inference_mode(), hooked(self.model, self.sitemap, state, edits, capture) as cap:
            out = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                             position_ids=batch.position_ids, use_cache=False, **keep)
        lg = None
        if logits == "last":
            lg = out.logits[:, -1].float()
        elif logits == "all":
            lg = out.logits.float()
        acts = {s: v[-1] for s, v in cap.items()}
        return Forward(batch, acts, lg)

    def run(self, ids: Sequence[Sequence[int]], capture: Sequence[Site] = (),
            interventions: InterventionsFor = (), logits: str = "last", batch_size: int | None = None,
            desc: str = "forward") -> Iterator[Forward]:
        from ..progress import bar
        batches = list(self.batches(ids, batch_size))
        for batch in bar(batches, desc, total=len(batches), enabled=self.progress):
            yield self.forward(batch, capture, interventions, logits)

    def last_logits(self, ids: Sequence[Sequence[int]], interventions: InterventionsFor = (),
                    batch_size: int | None = None) -> torch.Tensor:
        """[n, vocab] next-token logits at the last prompt position, in the caller's order."""
        out: torch.Tensor | None = None
        for fw in self.run(ids, (), interventions, "last", batch_size):
            if out is None:
                out = torch.empty(len(ids), fw.logits.shape[-1])
            out[fw.batch.rows] = fw.logits.cpu()
        return out if out is not None else torch.empty(0)

    # ---- generation ---------------------------------------------------------------------------
    def generate(self, ids: Sequence[Sequence[int]], max_new_tokens: int = 32,
                 interventions: InterventionsFor = (), batch_size: int | None = None, use_cache: bool = True,
                 stop_at_eos: bool = True, desc: str = "generate",
                 settled: Callable[[list[int]], bool] | None = None) -> list[list[int]]:
        """Greedy continuation ids per prompt. Interventions see phase 'prompt' then 'generated'.

        A row stops at EOS (with `stop_at_eos`) or as soon as `settled(its ids so far)` is True (a grader
        whose verdict can no longer change). With the KV cache, finished rows leave the batch and its
        cache when the interventions allow it (a callable is asked again for the rows left; a list must
        hold no per-row tensors), so a row that stops early costs nothing more. A prefix every row of a
        batch starts with (a chat template's system turn) runs once per distinct set of interventions on it,
        the numbers of every row unchanged (subject/prefix.py; `share_prefix=False` turns it off).
        """
        from ..progress import bar
        results: list[list[int]] = [[] for _ in ids]
        eos = self.tokenizer.eos_token_id
        batches = list(self.batches(ids, batch_size, new_tokens=max_new_tokens))
        for batch in bar(batches, desc, total=len(batches), enabled=self.progress):
            gen = self._generate_batch(batch, max_new_tokens, interventions, use_cache,
                                       eos if stop_at_eos else None, settled)
            for row, seq in zip(batch.rows, gen):
                results[row] = seq
        return results

    def _generate_batch(self, batch: Batch, max_new: int, interventions: InterventionsFor, use_cache: bool,
                        eos: int | None, settled: Callable[[list[int]], bool] | None = None) -> list[list[int]]:
        from transformers import DynamicCache
        state = RunState(phase="prompt", pad=batch.pad, prompt_len=batch.input_ids.shape[1])
        edits = self.interventions_for(interventions, batch.rows)
        shrink = use_cache and (callable(interventions) or not any(per_row(e) for e in edits))
        b = batch.input_ids.shape[0]
        tokens, mask, pos = batch.input_ids, batch.attention_mask, batch.position_ids
        active = list(range(b))  # batch-local rows in the current batch, in order
        done = [False] * b
        out: list[list[int]] = [[] for _ in range(b)]
        cache = DynamicCache() if use_cache else None
        step_ids, step_pos = tokens, pos
        keep = {} if _touches_logits((), edits) else {"logits_to_keep": 1}
        steps = 0
        with torch.inference_mode():
            shared = plan(self, batch, edits) if use_cache and self.share_prefix else None
            if shared is not None:  # the cache holds columns 0..P-1 of every row: the loop runs the rest
                self._run_prefix(shared, cache, batch.pad)
                plen = shared.length
                tokens, pos, step_ids, step_pos = tokens[:, plen:], pos[:, plen:], tokens[:, plen:], pos[:, plen:]
                # The same positions land on the same columns: pad_i - P pad columns, a prompt of W - P.
                state = RunState(phase="prompt", pad=batch.pad - plen, prompt_len=tokens.shape[1])
            while steps < max_new:
                rehook = False
                with hooked(self.model, self.sitemap, state, edits):
                    while steps < max_new and not rehook:
                        if use_cache:
                            res = self.model(input_ids=step_ids, attention_mask=mask, position_ids=step_pos,
                                             **{cache_kwarg(self.model.forward): cache}, use_cache=True, **keep)
                        else:
                            # Recompute everything, marking which columns are generated so interventions
                            # touch the same tokens as with the cache.
                            state.phase = "prompt"
                            res = self.model(input_ids=tokens, attention_mask=mask, position_ids=pos,
                                             use_cache=False, **keep)
                        steps += 1
                        nxt = res.logits[:, -1].argmax(-1)
                        finished = self._take(nxt, active, done, out, eos, settled)
                        if all(done[i] for i in active):
                            return out
                        if shrink and finished:
                            sel = torch.tensor([j for j, i in enumerate(active) if not done[i]], device=nxt.device)
                            cache.batch_select_indices(sel)
                            tokens, mask, pos, nxt = tokens[sel], mask[sel], pos[sel], nxt[sel]
                            active = [i for i in active if not done[i]]
                            if callable(interventions):
                                edits = self.interventions_for(interventions, [batch.rows[i] for i in active])
                                rehook = True
                        elif finished or any(done[i] for i in active):
                            nxt = torch.where(torch.tensor([done[i] for i in active], device=nxt.device),
                                              torch.full_like(nxt, self.pad_id), nxt)
                        next_pos = pos[:, -1:] + 1
                        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
                        mask = torch.cat([mask, torch.ones_like(nxt[:, None])], dim=1)
                        pos = torch.cat([pos, next_pos], dim=1)
                        step_ids, step_pos = nxt[:, None], next_pos
                        state.phase = "generated"
        return out

    def _run_prefix(self, shared: SharedPrefix, cache: Any, pad: torch.Tensor) -> None:
        """Run the shared prefix (once per prefix row, right-padded to the batch's width) and fill `cache` with
        every batch row's first P columns of the padded call (subject/prefix)."""
        from transformers import DynamicCache

        k, width = shared.prefix_ids.shape
        own = DynamicCache()
        state = RunState(phase="prompt", pad=torch.zeros(k, dtype=torch.long), prompt_len=width)
        with hooked(self.model, self.sitemap, state, shared.prefix_edits):
            self.model(input_ids=shared.prefix_ids, attention_mask=shared.prefix_mask,
                       position_ids=shared.prefix_positions, use_cache=True, logits_to_keep=1,
                       **{cache_kwarg(self.model.forward): own})
        shared.fill(cache, own, pad)

    @staticmethod
    def _take(nxt: torch.Tensor, active: list[int], done: list[bool], out: list[list[int]], eos: int | None,
              settled: Callable[[list[int]], bool] | None) -> bool:
        """Append each unfinished row's token; mark rows that hit EOS or are settled. True if any finished."""
        finished = False
        for j, i in enumerate(active):
            if done[i]:
                continue
            t = int(nxt[j])
            if eos is not None and t == eos:
                done[i] = finished = True
                continue
            out[i].append(t)
            if settled is not None and settled(out[i]):
                done[i] = finished = True
        return finished

    # ---- decoding the residual stream ---------------------------------------------------------
    def unembed(self, resid: torch.Tensor) -> torch.Tensor:
        """Logit lens: final norm then unembedding, for residual vectors [..., d_model]."""
        with torch.inference_mode():
            x = resid.to(self.device).to(next(self.model.parameters()).dtype)
            logits = self.sitemap.unembed(self.sitemap.final_norm(x)).float()
            # Gemma 2 soft-caps its logits after the unembedding; without it probabilities differ.
            config = self.model.config
            text = config.get_text_config() if hasattr(config, "get_text_config") else config
            cap = getattr(text, "final_logit_softcapping", None)
            return torch.tanh(logits / cap) * cap if cap else logits

    # ---- hygiene -------------------------------------------------------------------------------
    def leaked_hooks(self) -> list[str]:
        return leaked_hooks(self.model)


def cache_kwarg(fn: Callable[..., Any]) -> str:
    """The name `fn` takes the KV cache under: `cache` from transformers 5.x (where `past_key_values`
    is deprecated, removal announced for 5.40), `past_key_values` before."""
    import inspect

    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def _touches_logits(capture: Sequence[Site], edits: Sequence[Any]) -> bool:
    sites = list(capture) + [e.site for e in edits if getattr(e, "site", None) is not None]
    return any(s.component == "logits" or s.module is not None for s in sites)


def load_subject(model: str, device: str = "cpu", dtype: str = "float32", trust_remote_code: bool = False,
                 batch_size: int | str = 16, progress: bool = True, max_memory: dict[Any, Any] | None = None,
                 offload_folder: str | None = None, revision: str | None = None,
                 allow_pickle: bool = False) -> Subject:
    """Resolve and load --model; raises ModelLoadError with one clear line on any user mistake.

    device "auto" places the model with accelerate's device_map="auto": across the GPUs, or, given
    `max_memory` (e.g. {"cpu": "2GiB"}), part of it on the CPU and the rest offloaded to `offload_folder`
    on disk (the code path of a model split across devices; tests/test_offload.py)."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .resolve import converted_gguf, resolve

    resolved = resolve(model, revision, allow_pickle=allow_pickle, progress=progress)
    path = converted_gguf(resolved, progress) if resolved.gguf_file else resolved.path
    torch_dtype = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                   "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}.get(dtype)
    if torch_dtype is None:
        raise ModelLoadError(f"--probe-dtype '{dtype}' is not one of float32, bfloat16, float16")
    placement: dict[str, Any] = {}
    if device == "auto":
        device_map: Any = "auto" if torch.cuda.is_available() or max_memory else None
        target = "cuda" if torch.cuda.is_available() else "cpu"
        if max_memory:
            placement = {"max_memory": max_memory, "offload_folder": offload_folder}
    else:
        device_map, target = None, device
    from ..options import device_unusable

    why = device_unusable(device)
    if why:
        raise ModelLoadError(f"--probe-device {device}: {why}")
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        mdl = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, device_map=device_map,
                                                   trust_remote_code=trust_remote_code, **placement)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"model '{model}' could not be loaded from {path}: {first}") from None
    if device_map is None:
        mdl = mdl.to(target)
    mdl.eval()
    try:
        sitemap = SiteMap(mdl)
    except SiteError as e:
        raise ModelLoadError(f"model '{model}': {e.message}") from None
    info = ModelInfo(id=model, slug=resolved.slug, path=str(path), hash=resolved.fingerprint, revision=resolved.revision,
                     model_type=mdl.config.model_type, n_layers=sitemap.n_layers, dtype=str(torch_dtype).split(".")[-1],
                     device=str(next(mdl.parameters()).device) if device_map is None else "auto")
    info_versions = {"transformers": transformers.__version__, "torch": torch.__version__}
    auto = batch_size == "auto"
    subject = Subject(mdl, tok, info, sitemap, batch_size=16 if auto else int(batch_size), progress=progress,
                      auto_batch=auto)
    subject.cache["versions"] = info_versions
    return subject
