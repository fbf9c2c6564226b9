"""Units read from one site: single neurons, residual dimensions, SAE latents and direction files.

A unit reads a scalar activation a = f(x . read + bias) at a site and writes along one vector
(`SetUnit` sets a to a target value). Neurons and residual dimensions are coordinates (read = write =
e_j); an SAE latent reads W_enc[:, i] (b_dec folded into the bias) and writes W_dec[i]; a direction u
reads and writes u.

SAEs come from the SAELens on-disk format: a folder with `cfg.json` and `sae_weights.safetensors`
(W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in], `threshold` [d_sae] for
JumpReLU). Only local folders and safetensors are read: no network, no pickles. `read_sae` and
`read_direction` check the files without torch (the safetensors header is JSON), so a probe file's
mistakes show at collection; `load_*` build the tensors.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import SiteError
from ..names import canonical_name, parse_canonical
from .sites import Site

if TYPE_CHECKING:
    import torch

    from .interventions import SetUnit
    from .sitemap import SiteMap

SAE_CFG = "cfg.json"
SAE_WEIGHTS = "sae_weights.safetensors"
DIRECTION_KEY = "direction"
# components where one coordinate is a meaningful unit, and how wide they are
COORDINATE_COMPONENTS = ("mlp.post", "resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")
SAE_ARCHITECTURES = ("standard", "jumprelu")


class UnitFileError(ValueError):
    """A problem with an SAE folder or a direction file; the message names the file and the field."""


def site_width(site: Site, sitemap: SiteMap) -> int:
    """How many coordinates the activation at `site` has."""
    return sitemap.d_mlp if site.component == "mlp.post" else sitemap.d_model


# ---- files, checked without torch ------------------------------------------------------------------

def safetensors_header(path: Path) -> dict[str, tuple[str, list[int]]]:
    """{tensor name: (dtype, shape)} from a safetensors file's JSON header, without loading the tensors; a
    file cut short of its tensors is refused here, so `validate` refuses it too."""
    return {name: (dtype, shape) for name, (dtype, shape, _) in _header(path).items()}


def _header(path: Path) -> dict[str, tuple[str, list[int], tuple[int, int]]]:
    """{tensor name: (dtype, shape, absolute byte range)}; UnitFileError when the file does not hold them."""
    try:
        size_on_disk = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise UnitFileError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
            (size,) = struct.unpack("<Q", raw)
            if size > 100 << 20:
                raise UnitFileError(f"{path}: not a safetensors file (header length {size})")
            head = json.loads(f.read(size))
    except OSError as e:
        raise UnitFileError(f"{path}: cannot be read ({e.strerror or type(e).__name__})") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UnitFileError(f"{path}: not a safetensors file (its header is not JSON)") from None
    if not isinstance(head, dict):
        raise UnitFileError(f"{path}: not a safetensors file (its header is not a mapping)")
    out = {}
    try:
        for name, info in head.items():
            if name != "__metadata__" and isinstance(info, dict):
                start, end = (8 + size + int(x) for x in info["data_offsets"])
                out[name] = (str(info.get("dtype")), [int(s) for s in info.get("shape", [])], (start, end))
    except (KeyError, TypeError, ValueError):
        raise UnitFileError(f"{path}: not a safetensors file (a tensor has no valid data_offsets)") from None
    need = max((end for _, _, (_, end) in out.values()), default=8 + size)
    if need > size_on_disk:
        raise UnitFileError(f"{path}: truncated: its tensors need {need} bytes, the file has {size_on_disk}")
    return out


_NUMPY_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2"}


def tensor_values(path: Path, name: str) -> Any:
    """A tensor of a safetensors file as a numpy array, without torch: memory-mapped, so that a check reads
    what it looks at (bfloat16 is widened to float32)."""
    import numpy as np

    dtype, shape, (start, end) = _header(path)[name]
    if dtype not in _NUMPY_DTYPES:
        raise UnitFileError(f"{path}: tensor '{name}' has dtype {dtype}; a float tensor (F32, F16, BF16, F64) "
                            "is needed")
    count = (end - start) // np.dtype(_NUMPY_DTYPES[dtype]).itemsize
    if count == 0:
        return np.zeros(shape, np.float32)
    raw = np.memmap(path, dtype=_NUMPY_DTYPES[dtype], mode="r", offset=start, shape=(count,))
    values = (raw.astype(np.uint32) << 16).view(np.float32) if dtype == "BF16" else raw
    return values.reshape(shape)


def check_values(path: Path, name: str, values: Any, what: str, nonzero: bool = True) -> None:
    """Finite and (`nonzero`) not all zero: a NaN or a zero vector would measure nothing, silently."""
    import numpy as np

    if not np.isfinite(values).all():
        raise UnitFileError(f"{path}: tensor '{name}' holds {int((~np.isfinite(values)).sum())} values that are "
                            "not finite (NaN or inf)")
    if nonzero and not np.any(values):
        raise UnitFileError(f"{path}: {what} is all zeros: it reads and writes nothing")


@dataclass(frozen=True)
class SaeFiles:
    folder: Path
    cfg: dict[str, Any]
    d_in: int
    d_sae: int
    hook_name: str
    component: str
    layer: int | None
    architecture: str
    apply_b_dec_to_input: bool

    @property
    def weights(self) -> Path:
        return self.folder / SAE_WEIGHTS


def _cfg_int(cfg: dict, name: str, where: Path) -> int:
    value = cfg.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UnitFileError(f"{where}: field '{name}' must be a positive integer, got {value!r}")
    return value


def read_sae(folder: Path) -> SaeFiles:
    """Check an SAELens folder: cfg.json fields, the weights file and its tensor shapes."""
    cfg_path, weights = folder / SAE_CFG, folder / SAE_WEIGHTS
    if not folder.is_dir():
        raise UnitFileError(f"{folder}: not a folder (an SAE is a folder with {SAE_CFG} and {SAE_WEIGHTS})")
    if not cfg_path.is_file():
        raise UnitFileError(f"{cfg_path}: not found (an SAELens SAE folder holds {SAE_CFG} and {SAE_WEIGHTS})")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UnitFileError(f"{cfg_path}: not readable JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise UnitFileError(f"{cfg_path}: must hold a JSON object")
    d_in, d_sae = _cfg_int(cfg, "d_in", cfg_path), _cfg_int(cfg, "d_sae", cfg_path)
    meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    hook_name = cfg.get("hook_name", meta.get("hook_name"))  # SAELens 6 keeps it under metadata
    if not isinstance(hook_name, str):
        raise UnitFileError(f"{cfg_path}: field 'hook_name' is missing (e.g. 'blocks.9.hook_resid_post')")
    parsed = parse_canonical(hook_name)
    if parsed is None or parsed[0] not in COORDINATE_COMPONENTS:
        known = ", ".join(canonical_name(c, 9) for c in COORDINATE_COMPONENTS)
        raise UnitFileError(f"{cfg_path}: field 'hook_name' {hook_name!r} is not a site modelprobe can encode at "
                            f"(known: {known}, any layer)")
    head = cfg.get("hook_head_index", meta.get("hook_head_index"))
    if head is not None:
        raise UnitFileError(f"{cfg_path}: field 'hook_head_index' is {head!r}: per-head SAEs are not supported")
    arch = cfg.get("architecture", "standard")
    if arch not in SAE_ARCHITECTURES:
        raise UnitFileError(f"{cfg_path}: field 'architecture' {arch!r} is not supported (supported: "
                            f"{', '.join(SAE_ARCHITECTURES)}; a top-k latent's activation depends on the others)")
    act = cfg.get("activation_fn_str", cfg.get("activation_fn", "relu"))
    if arch == "standard" and act not in ("relu", None):
        raise UnitFileError(f"{cfg_path}: field 'activation_fn_str' {act!r} is not supported (relu only)")
    norm = cfg.get("normalize_activations", "none")
    if norm not in ("none", None):
        raise UnitFileError(f"{cfg_path}: field 'normalize_activations' {norm!r} is not supported (none only: "
                            "the SAE must read the site's raw activations)")
    apply = cfg.get("apply_b_dec_to_input", True)
    if not isinstance(apply, bool):
        raise UnitFileError(f"{cfg_path}: field 'apply_b_dec_to_input' must be true or false, got {apply!r}")
    if not weights.is_file():
        pickled = [p.name for p in folder.glob("*.pt")] + [p.name for p in folder.glob("*.pth")]
        extra = f" ({', '.join(pickled)} not loaded: modelprobe reads no pickles)" if pickled else ""
        raise UnitFileError(f"{weights}: not found{extra}")
    shapes = safetensors_header(weights)
    want = {"W_enc": [d_in, d_sae], "b_enc": [d_sae], "W_dec": [d_sae, d_in], "b_dec": [d_in]}
    if arch == "jumprelu":
        want["threshold"] = [d_sae]
    for name, shape in want.items():
        if name not in shapes:
            raise UnitFileError(f"{weights}: tensor '{name}' is missing (has: {', '.join(sorted(shapes)) or 'none'})")
        if shapes[name][1] != shape:
            raise UnitFileError(f"{weights}: tensor '{name}' has shape {shapes[name][1]}, but {SAE_CFG} "
                                f"(d_in {d_in}, d_sae {d_sae}) implies {shape}")
    for name in want:
        check_values(weights, name, tensor_values(weights, name), f"tensor '{name}'", nonzero=False)
    return SaeFiles(folder, cfg, d_in, d_sae, hook_name, parsed[0], parsed[1], arch, apply)


def read_direction(path: Path) -> int:
    """Check a direction file (safetensors holding one 1-D tensor 'direction'); its length."""
    if not path.is_file():
        raise UnitFileError(f"{path}: not found")
    shapes = safetensors_header(path)
    if DIRECTION_KEY not in shapes:
        raise UnitFileError(f"{path}: tensor '{DIRECTION_KEY}' is missing (has: {', '.join(sorted(shapes)) or 'none'})")
    shape = shapes[DIRECTION_KEY][1]
    if len(shape) != 1 or shape[0] < 1:
        raise UnitFileError(f"{path}: tensor '{DIRECTION_KEY}' must be 1-D, got shape {shape}")
    check_values(path, DIRECTION_KEY, tensor_values(path, DIRECTION_KEY), f"tensor '{DIRECTION_KEY}'")
    return shape[0]


def check_latent(files: SaeFiles, latent: int) -> None:
    """The latent's encoder column and decoder row are not zero: such a latent never fires or writes nothing."""
    check_values(files.weights, "W_enc", tensor_values(files.weights, "W_enc")[:, latent],
                 f"latent {latent}'s encoder column W_enc[:, {latent}]")
    check_values(files.weights, "W_dec", tensor_values(files.weights, "W_dec")[latent],
                 f"latent {latent}'s decoder row W_dec[{latent}]")


def save_direction(path: Path, direction: torch.Tensor, hook_name: str | None = None) -> None:
    """Write a direction file (what `read_direction` reads); the site goes into the metadata."""
    from safetensors.torch import save_file

    meta = {"hook_name": hook_name} if hook_name else None
    save_file({DIRECTION_KEY: direction.detach().float().contiguous().cpu()}, str(path), metadata=meta)


# ---- unit sets --------------------------------------------------------------------------------------

@dataclass
class UnitSet:
    """n units at one site. `coords` (coordinate units) avoids an identity matrix: a = x[..., coords]."""

    site: Site
    labels: list[str]
    read: torch.Tensor | None = None  # [n, d]
    write: torch.Tensor | None = None  # [n, d]
    bias: torch.Tensor | None = None  # [n]
    activation: str = "identity"
    threshold: torch.Tensor | None = None  # [n]
    coords: torch.Tensor | None = None  # [n] long
    width: int = 0

    def __len__(self) -> int:
        return len(self.labels)

    def activations(self, x: torch.Tensor) -> torch.Tensor:
        """[..., d] activations at the site -> [..., n] unit activations."""
        if self.coords is not None:
            return x[..., self.coords.to(x.device)].float()
        a = x.float() @ self.read.T.to(x.device) + self.bias.to(x.device)
        if self.activation == "relu":
            return a.clamp(min=0)
        if self.activation == "jumprelu":
            return a.where(a > self.threshold.to(x.device), a.new_zeros(()))
        return a

    def subset(self, idx: list[int]) -> UnitSet:
        """The units at positions `idx` of this set, in that order."""
        import torch

        i = torch.tensor(idx, dtype=torch.long)

        def pick(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[i]
        return UnitSet(self.site, [self.labels[j] for j in idx], pick(self.read), pick(self.write), pick(self.bias),
                       self.activation, pick(self.threshold), pick(self.coords), self.width)

    def vectors(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Any]:
        """(read [k, d], write [k, d], bias [k], threshold [k] or None) of units `idx`."""
        import torch

        if self.coords is not None:
            eye = torch.zeros(len(idx), self.width)
            eye[torch.arange(len(idx)), self.coords[idx]] = 1.0
            return eye, eye, torch.zeros(len(idx)), None
        th = self.threshold[idx] if self.threshold is not None else None
        return self.read[idx], self.write[idx], self.bias[idx], th

    def set_to(self, idx: torch.Tensor, target: torch.Tensor, repeat: int = 1) -> SetUnit:
        """One SetUnit on all positions: row r sets unit idx[r // repeat] to target[r // repeat]."""
        from .interventions import SetUnit

        read, write, bias, th = (None if t is None else t.repeat_interleave(repeat, 0) for t in self.vectors(idx))
        return SetUnit(self.site, "all", read=read, write=write, bias=bias,
                       target=target.float().repeat_interleave(repeat, 0), activation=self.activation, threshold=th)


def coordinate_units(site: Site, sitemap: SiteMap, coords: list[int] | None = None) -> UnitSet:
    """Neurons of mlp.post, or dimensions of a residual-width site (all of them when coords is None)."""
    import torch

    width = site_width(site, sitemap)
    idx = list(range(width)) if coords is None else list(coords)
    name = canonical_name(site.component, site.layer)
    return UnitSet(site, [f"{name}[{j}]" for j in idx], coords=torch.tensor(idx, dtype=torch.long), width=width)


def sae_site(files: SaeFiles, sitemap: SiteMap) -> Site:
    """The model site an SAE reads, checked against the model (layer in range, width = d_in)."""
    site = Site(files.component, files.layer)
    try:
        site.hook_point(sitemap)
    except SiteError as e:
        raise UnitFileError(f"{files.folder / SAE_CFG}: field 'hook_name' {files.hook_name!r}: {e.message}") from None
    width = site_width(site, sitemap)
    if files.d_in != width:
        raise UnitFileError(f"{files.folder / SAE_CFG}: field 'd_in' is {files.d_in}, but {files.hook_name} of model "
                            f"type '{sitemap.model_type}' is {width} wide: this SAE was trained on another model "
                            "or site")
    return site


def sae_units(files: SaeFiles, site: Site, latents: list[int] | None = None) -> UnitSet:
    """Latents of an SAE (all when None) as units: b_dec folded into the encoder bias."""
    import torch
    from safetensors.torch import load_file

    w = {k: v.float() for k, v in load_file(str(files.weights)).items()}
    idx = torch.arange(files.d_sae) if latents is None else torch.tensor(latents, dtype=torch.long)
    enc = w["W_enc"][:, idx]  # [d_in, k]
    bias = w["b_enc"][idx] - (w["b_dec"] @ enc if files.apply_b_dec_to_input else 0.0)
    th = w["threshold"][idx] if files.architecture == "jumprelu" else None
    act = "jumprelu" if files.architecture == "jumprelu" else "relu"
    return UnitSet(site, [f"{files.folder.name}[{int(i)}]" for i in idx], read=enc.T.contiguous(),
                   write=w["W_dec"][idx].contiguous(), bias=bias, activation=act, threshold=th, width=files.d_in)


def direction_units(site: Site, directions: torch.Tensor, labels: list[str]) -> UnitSet:
    """Directions [n, d] (normalised here) as units: the projection on each."""
    import torch

    u = directions.float() / directions.float().norm(dim=-1, keepdim=True)
    return UnitSet(site, labels, read=u, write=u, bias=torch.zeros(len(u)), width=u.shape[-1])


def load_direction(path: Path) -> torch.Tensor:
    from safetensors.torch import load_file

    return load_file(str(path))[DIRECTION_KEY].float()
