"""Hub models (`org/name`, `org/name@REVISION`): find them in the local Hugging Face cache, or download them
with huggingface_hub when the hub is reachable. Every failure a user can meet is one ModelLoadError line.

The environment is read when a model is fetched, not when huggingface_hub was imported, so HF_ENDPOINT,
HF_HUB_OFFLINE, HF_TOKEN and HF_HOME / HF_HUB_CACHE set by a CI step or an ini-driven wrapper still count.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelLoadError
from ..progress import line as progress_line
from ..progress import uncaptured

HUB_ID = re.compile(r"^([A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(.+))?$")
# What a causal LM needs, weights as safetensors only: a pickle (.bin) can run code when it is loaded.
SAFE_FILES = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.tiktoken", "*.txt"]
PICKLE_FILES = ["*.bin"]


@dataclass(frozen=True)
class HubSnapshot:
    path: Path  # the snapshot folder in the local cache
    commit: str  # the full commit sha the revision resolved to


def split_hub_id(model: str) -> tuple[str, str | None] | None:
    """('org/name', 'REVISION' or None) for a hub id, None for anything else."""
    m = HUB_ID.match(model)
    return (m.group(1), m.group(2)) if m else None


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")


def offline() -> bool:
    from huggingface_hub import constants
    return _truthy("HF_HUB_OFFLINE") or bool(constants.HF_HUB_OFFLINE)


def hub_cache() -> Path:
    from huggingface_hub import constants
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path(constants.HF_HUB_CACHE)


def endpoint() -> str:
    from huggingface_hub import constants
    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def cached(repo: str, revision: str | None, allow_pickle: bool = False) -> HubSnapshot | None:
    """The cached snapshot of `repo` at `revision` when it holds every file a run fetches, or None; never touches
    the network."""
    from huggingface_hub import snapshot_download
    for patterns in [SAFE_FILES] + ([SAFE_FILES + PICKLE_FILES] if allow_pickle else []):
        try:
            path = Path(snapshot_download(repo, revision=revision, cache_dir=hub_cache(), local_files_only=True,
                                          allow_patterns=patterns))
        except Exception:  # any failure means "not (completely) in the cache"
            continue
        if any(path.glob("*.safetensors")) or (allow_pickle and any(path.glob("*.bin"))):
            return HubSnapshot(path, path.name)
    return None


def _named(repo: str, revision: str | None) -> str:
    return f"{repo}@{revision}" if revision else repo


def fetch(repo: str, revision: str | None, allow_pickle: bool = False, progress: bool = True) -> HubSnapshot:
    """The snapshot of `repo` at `revision` (default branch when None), downloaded when missing.

    Offline (HF_HUB_OFFLINE) or with the hub out of reach, the cached snapshot is used. A cut download keeps the
    files it completed; huggingface_hub resumes a cut file a few times itself, then drops its partial copy, which
    the next run fetches again."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        DryRunError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    name = _named(repo, revision)
    cache = hub_cache()
    if offline():
        found = cached(repo, revision, allow_pickle)
        if found is None:
            raise ModelLoadError(f"model '{name}' is not in the local Hugging Face cache ({cache}) and HF_HUB_OFFLINE "
                                 "is set: unset it to download the model, or download it elsewhere first")
        return found
    kwargs = dict(revision=revision, cache_dir=cache, endpoint=endpoint(), token=os.environ.get("HF_TOKEN") or None)
    try:
        try:
            with _bars(False):
                plan = snapshot_download(repo, allow_patterns=SAFE_FILES + PICKLE_FILES, dry_run=True, **kwargs)
        except DryRunError as e:
            # The dry run hides why the hub did not answer; a refusal (missing, gated) is not "out of reach".
            if isinstance(e.__cause__, HfHubHTTPError):
                raise e.__cause__ from None
            found = cached(repo, revision, allow_pickle)
            if found is None:
                raise ModelLoadError(f"model '{name}': the hub ({endpoint()}) cannot be reached and the model is not "
                                     f"in the local Hugging Face cache ({cache})") from None
            return found
        files = _chosen(name, [f.filename for f in plan], allow_pickle)
        with uncaptured():  # the real stderr decides, not pytest's capture of it
            terminal = progress and sys.stderr.isatty()
        for f in plan:  # CI logs get one line per file; a terminal gets huggingface_hub's progress bars
            if f.filename in files and f.will_download and not terminal:
                progress_line(f"modelprobe: downloading {name}: {f.filename} ({_size(f.file_size)})", progress)
        with _bars(terminal), _quiet_retries(), uncaptured() if terminal else contextlib.nullcontext():
            path = Path(snapshot_download(repo, allow_patterns=files, **kwargs))
    except GatedRepoError:
        how = "the token in HF_TOKEN has no access to it" if os.environ.get("HF_TOKEN") else "set HF_TOKEN"
        raise ModelLoadError(f"model '{name}' is gated on the hub: accept its terms on the model page and {how}"
                             ) from None
    except RevisionNotFoundError:
        raise ModelLoadError(f"model '{repo}' has no revision '{revision}' on the hub (branch, tag or commit)"
                             ) from None
    except RepositoryNotFoundError:
        tip = "" if os.environ.get("HF_TOKEN") else " (a private repository needs HF_TOKEN)"
        raise ModelLoadError(f"model '{name}' is neither a local folder nor a model on the hub ({endpoint()}){tip}"
                             ) from None
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else "?"
        raise ModelLoadError(f"model '{name}': the hub answered HTTP {status}; try again later") from None
    except ValueError as e:  # huggingface_hub's own check of the repo id
        raise ModelLoadError(f"model '{name}' is not a valid hub id: {str(e).splitlines()[0][:200]}") from None
    except (LocalEntryNotFoundError, OSError, *_transport_errors()) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ModelLoadError(f"model '{name}': the download was cut off ({type(e).__name__}: {first}); run again to "
                             "fetch the rest") from None
    return HubSnapshot(path, path.name)


def _chosen(name: str, files: list[str], allow_pickle: bool) -> list[str]:
    """The files to fetch: safetensors weights when the repo has them, pickles only when allowed."""
    weights = [f for f in files if f.endswith(".safetensors")]
    pickles = [f for f in files if f.endswith(".bin")]
    if not weights and pickles and not allow_pickle:
        raise ModelLoadError(f"model '{name}' has only PyTorch pickle weights ({pickles[0]}), which can run code when "
                             "loaded: pass --probe-allow-pickle to download and load them")
    if not weights and not pickles:
        raise ModelLoadError(f"model '{name}' has no weights on the hub (no .safetensors file)")
    return [f for f in files if not f.endswith(".bin") or not weights]


def _transport_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = []
    for module in ("httpx2", "httpx"):  # huggingface_hub moved from httpx to its fork httpx2
        try:
            errors.append(__import__(module).TransportError)
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def _size(n: int | None) -> str:
    if n is None:
        return "size unknown"
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return ""


@contextlib.contextmanager
def _quiet_retries() -> Iterator[None]:
    """huggingface_hub logs every resumed attempt of a cut download; the user gets one line from us instead."""
    logger = logging.getLogger("huggingface_hub")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


class _bars:
    """huggingface_hub's own progress bars on a terminal only (CI logs get our one line per file)."""

    def __init__(self, on: bool):
        self.on = on
        self.was_disabled = False

    def __enter__(self) -> None:
        from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars
        self.was_disabled = are_progress_bars_disabled()
        if not self.on:
            disable_progress_bars()

    def __exit__(self, *exc: object) -> None:
        from huggingface_hub.utils import enable_progress_bars
        if not self.on and not self.was_disabled:
            enable_progress_bars()
