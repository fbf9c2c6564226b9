"""Shared fixtures: tiny random models of every supported family, built from configs (no downloads).

`tiny_subject(family)` returns a `Subject` wrapping a 2-layer, 32-wide, 4-head model with the toy
word-level tokenizer. Models are built once per session with a fixed seed; tests must leave them as
they found them (no lingering hooks, weights restored).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch

if TYPE_CHECKING:
    from modelprobe.subject import Subject

torch.set_num_threads(1)


def _import_every_modelprobe_module() -> None:
    """pytester's in-process runs put sys.modules back as they found it: a module first imported inside one is
    dropped afterwards, and a later test would monkeypatch a fresh copy of it while the code under test still
    runs the old one (the patch silently does nothing; seen with kind classes held by the registry). Imported
    here, before any test, every modelprobe module is in the snapshot and stays one module for the session."""
    import importlib
    import pkgutil

    import modelprobe
    for info in pkgutil.walk_packages(modelprobe.__path__, "modelprobe."):
        importlib.import_module(info.name)
    # transformers imports its model-loading code (and with it torch.distributed.tensor) on the first load; when
    # that load ran inside a pytester run, the restore drops those modules, and importing them again registers
    # torch's c10d_functional operators twice, which torch refuses ("Only a single TORCH_LIBRARY ...").
    importlib.import_module("transformers.modeling_utils")


_import_every_modelprobe_module()


@pytest.fixture(autouse=True)
def _subject_face_stays_lazy():
    """`modelprobe.subject` hands out its names lazily. A test that monkeypatches a name on the face leaves,
    after undo, a concrete attribute there, and every later patch of the name's own module is then bypassed
    (a load counted 0 times, on whichever worker ran the two tests in that order). Patch names where they live."""
    import modelprobe.subject as face

    yield
    pinned = sorted(set(face._WHERE) & set(vars(face)))
    for name in pinned:
        delattr(face, name)
    assert not pinned, f"this test left {pinned} set on the modelprobe.subject face: patch the defining module"


TOY_TOKENIZER_DIR = Path(__file__).parent / "fixtures" / "toy_tokenizer"
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "gpt2", "gpt_neox")
BOS, EOS, PAD = "<bos>", "<eos>", "<pad>"
# Used only when the shared toy tokenizer has not been built: same conventions (BOS added by the
# tokenizer, chat template starting with BOS).
_FALLBACK_WORDS = [
    "how", "do", "i", "make", "a", "tell", "me", "to", "build", "write", "poem", "about", "cake", "the",
    "and", "of", "for", "with", "this", "that", "please", "you", "it", "my", "good", "bad", "day", "now",
    "story", "friend", "home", "water", "food", "music", "sure", "here", "is", "answer", ".", ",",
] + [f"t{i}" for i in range(50)]
_FALLBACK_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ ' <user> ' + message['content'] + ' </user>' }}{% elif message['role'] == 'system' %}"
    "{{ ' ' + message['content'] }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ ' <assistant>' }}"
    "{% endif %}"
)


def _fallback_tokenizer():
    """A minimal WordLevel tokenizer with the toy tokenizer's conventions."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = [PAD, "<unk>", BOS, EOS, "<user>", "</user>", "<assistant>"]
    vocab = {w: i for i, w in enumerate(specials + _FALLBACK_WORDS)}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A $B",
                                                       special_tokens=[(BOS, vocab[BOS])])
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                  unk_token="<unk>", additional_special_tokens=specials[4:])
    tok.chat_template = _FALLBACK_TEMPLATE
    return tok


@pytest.fixture(scope="session")
def toy_tokenizer():
    """The shared word-level toy tokenizer (adds <bos>; chat template starts with <bos>)."""
    if (TOY_TOKENIZER_DIR / "tokenizer.json").exists():
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(str(TOY_TOKENIZER_DIR))
    return _fallback_tokenizer()


def tiny_config(family: str, vocab_size: int, bos: int, eos: int, pad: int):
    """A transformers config for a 2-layer, 32-wide, 4-head model of `family`.

    Weights are initialised with a larger spread than usual so that logits are far from uniform:
    greedy decoding and argmax comparisons then do not hinge on near-ties.
    """
    import transformers as tf

    ids = dict(bos_token_id=bos, eos_token_id=eos, pad_token_id=pad, vocab_size=vocab_size,
               initializer_range=0.2)
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=64, **ids)
    if family == "llama":  # grouped-query attention, untied
        return tf.LlamaConfig(num_key_value_heads=2, head_dim=8, tie_word_embeddings=False, **common)
    if family == "mistral":  # plain multi-head attention
        return tf.MistralConfig(num_key_value_heads=4, head_dim=8, sliding_window=None,
                                tie_word_embeddings=False, **common)
    if family == "qwen2":  # q/k/v biases
        return tf.Qwen2Config(num_key_value_heads=2, tie_word_embeddings=False, **common)
    if family == "qwen3":  # head_dim * heads != hidden_size: d_head must come from the weights
        return tf.Qwen3Config(num_key_value_heads=2, head_dim=16, tie_word_embeddings=False, **common)
    if family == "gemma2":  # post-norm sublayers, tied embeddings, final logit soft-capping
        return tf.Gemma2Config(num_key_value_heads=2, head_dim=8, tie_word_embeddings=True, **common)
    if family == "gemma3":
        return tf.Gemma3TextConfig(num_key_value_heads=2, head_dim=8, tie_word_embeddings=True, **common)
    if family == "gpt2":  # Conv1D weights, biases, learned absolute positions, tied embeddings
        return tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, tie_word_embeddings=True, **ids)
    if family == "gpt_neox":  # parallel attention + MLP
        return tf.GPTNeoXConfig(use_parallel_residual=True, tie_word_embeddings=False, **common)
    raise ValueError(f"unknown tiny family {family!r}")


def build_tiny_model(family: str, tokenizer, seed: int = 0):
    """A freshly initialised tiny model of `family` in eval mode, vocabulary matching `tokenizer`."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(family, len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id,
                         tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model.eval()


@pytest.fixture(scope="session")
def tiny_subject(toy_tokenizer) -> Callable[[str], Subject]:
    """Factory: `tiny_subject("gpt2")` -> a Subject over a session-wide tiny model of that family."""
    from modelprobe.report.record import ModelInfo
    from modelprobe.subject import SiteMap, Subject

    built: dict[str, Subject] = {}

    def make(family: str) -> Subject:
        if family not in built:
            model = build_tiny_model(family, toy_tokenizer)
            info = ModelInfo(id=f"tiny-{family}", slug=f"tiny-{family}", model_type=model.config.model_type,
                             n_layers=2, dtype="float32", device="cpu")
            built[family] = Subject(model, toy_tokenizer, info, SiteMap(model), batch_size=8, progress=False)
        return built[family]

    return make
